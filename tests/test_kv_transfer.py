"""KV beyond the prefix cache: KV connectors, offloading backends and disaggregated prefill.

Cheap level: every connector of the installed vLLM is classified; the refusals and the attestation check
as tables of (input, expected); the steering key a token-keyed connector stores KV under.

Integration level (real vLLM on CPU, the embedded toy and its shipped profile, `ExampleConnector` on one
shared directory, prefix caching off so that every reuse goes through the connector):

- a `kv_both` server: differently steered requests never load each other's KV, identically steered ones
  do (cached tokens > 0, asserted before answers are compared), and every answer equals the same request
  on a server without a connector;
- a prefill/decode split (`kv_producer` → `kv_consumer`) with the same settings: the decode answers
  equal a single server's, with the KV loaded; with other settings on the prefill side, or without the
  producer's attestation, the decode side refuses.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import openai
import pytest
from helpers import BASE_ARGS, chat, served_steps, server_state

from steer_server.eval.demo import toy_profile_path
from steer_server.profile import load_profile
from steer_server.serving.kv_transfer import (
    ATTESTATION_KEY,
    EC_CONNECTORS,
    KV_CONNECTORS,
    OFFLOADING_SPECS,
    OFFLOADING_TIERS,
    KVFacts,
    check_kv_origin,
    deployment_id,
    kv_refusals,
    should_attest,
)
from steer_server.serving.launcher import ServerStartError, VllmServer
from steer_server.serving.policy import Policy, PolicyError
from steer_server.serving.vllm_adapter import hooks
from steer_server.toy.model import toy_model_dir

# --------------------------------------------------------------------------------------------------
# Classification and refusals.
# --------------------------------------------------------------------------------------------------


def test_every_connector_of_the_installed_vllm_is_classified():
    """At run time (the factories' registries) and in the sources (what `make vllm-compat` reads for
    other releases): the same names, every one in the tables."""
    from steer_server.serving.vllm_adapter.compat import installed_tree, registered_connectors

    registries = hooks.connector_registry()
    kv_names, ec_names = registries["kv"], registries["ec"]
    tree = installed_tree()
    assert registered_connectors(tree, "kv.factory.registry") == kv_names
    assert registered_connectors(tree, "ec.factory.registry") == ec_names
    assert len(kv_names) >= 15 and len(ec_names) >= 2
    assert sorted(set(kv_names) - set(KV_CONNECTORS)) == []
    assert sorted(set(ec_names) - set(EC_CONNECTORS)) == []
    # OffloadingConnector's storage backends: its specs and their secondary tiers.
    assert registries["offloading"] and sorted(set(registries["offloading"]) - set(OFFLOADING_SPECS)) == []
    assert registries["tier"] and sorted(set(registries["tier"]) - set(OFFLOADING_TIERS)) == []
    for table in (KV_CONNECTORS, EC_CONNECTORS, OFFLOADING_SPECS, OFFLOADING_TIERS):
        for name, known in table.items():
            assert known.keyed_by in (
                "block_hashes",
                "cache_salt",
                "steering",
                "request",
                "tokens",
                "none",
                "dummy",
            )
            assert known.why, name
            # Keyed by the steering: allowed; by tokens or not real KV: refused; request-directed: allowed
            # only where the decode request can carry the prefill side's attestation.
            if known.keyed_by in ("tokens", "dummy"):
                assert not known.allowed, name
            elif known.keyed_by != "request":
                assert known.allowed, name


def _kv(name: str | None, role: str = "kv_both", **kwargs: Any) -> KVFacts:
    return KVFacts(connector=name, role=role if name else None, **kwargs)


REFUSALS = [
    (_kv(None), []),
    (_kv("ExampleConnector"), []),
    (_kv("OffloadingConnector"), []),
    (_kv("NixlConnector"), []),
    (_kv("LMCacheMPConnector"), []),
    (_kv("LMCacheConnectorV1"), ["LMCacheConnectorV1"]),
    (_kv("HF3FSKVConnector"), ["HF3FSKVConnector"]),
    (_kv("DecodeBenchConnector"), ["DecodeBenchConnector"]),
    (_kv("MooncakeConnector"), ["MooncakeConnector: disaggregated prefill in which"]),
    (_kv("NixlPushConnector"), ["NixlPushConnector: disaggregated prefill in which"]),
    (_kv("MoRIIOConnector"), ["MoRIIOConnector: disaggregated prefill in which"]),
    (_kv("NoSuchConnector"), ["NoSuchConnector, which modality-steer has not classified"]),
    (_kv("ExampleConnector", module_path="my.connectors"), ["kv_connector_module_path='my.connectors'"]),
    (_kv("OffloadingConnector", extra_module_paths=("my.specs",)), ["code from my.specs"]),
    (_kv("OffloadingConnector", offloading=("TieringOffloadingSpec", "fs", "p2p")), []),
    (_kv("OffloadingConnector", offloading=("MySpec",)), ["offloading backend(s) MySpec"]),
    (
        _kv("OffloadingConnector", offloading=("CPUOffloadingSpec", "mytier")),
        ["offloading backend(s) mytier"],
    ),
    (
        _kv("MultiConnector", children=(_kv("OffloadingConnector", module_path="my.connectors"),)),
        ["kv_connector_module_path='my.connectors'"],
    ),
    (_kv("MultiConnector"), ["MultiConnector without children"]),
    (_kv("MultiConnector", children=(_kv("NixlConnector"), _kv("OffloadingConnector"))), []),
    (
        _kv("MultiConnector", children=(_kv("NixlConnector"), _kv("LMCacheConnectorV1"))),
        ["LMCacheConnectorV1"],
    ),
    (
        _kv("MultiConnector", children=(_kv("MultiConnector", children=(_kv("DecodeBenchConnector"),)),)),
        ["DecodeBenchConnector"],
    ),
    (KVFacts(ec_connector="ECExampleConnector"), []),
    (KVFacts(ec_connector="ECNoSuch"), ["ECNoSuch, which modality-steer has not classified"]),
]


@pytest.mark.parametrize(("facts", "named"), REFUSALS)
def test_refusals(facts, named):
    refusals = kv_refusals(facts)
    assert len(refusals) == len(named), refusals
    for refusal, name in zip(refusals, named, strict=True):
        assert name in refusal


@pytest.mark.parametrize("simple", ["0", "1"])
def test_every_offloading_backend_becomes_a_classified_connector(monkeypatch, simple):
    """`--kv-offloading-size` with each `--kv-offloading-backend` becomes a connector (vLLM's own
    conversion, `VllmConfig._post_init_kv_transfer_config`), which the same table classifies."""
    from typing import get_args

    from vllm.config import CacheConfig, VllmConfig
    from vllm.config.cache import KVOffloadingBackend

    monkeypatch.setenv("VLLM_USE_SIMPLE_KV_OFFLOAD", simple)
    backends = get_args(KVOffloadingBackend)
    assert backends
    for backend in backends:
        config = SimpleNamespace(
            cache_config=CacheConfig(kv_offloading_size=1.0, kv_offloading_backend=backend),
            kv_transfer_config=None,
        )
        VllmConfig._post_init_kv_transfer_config(config)  # type: ignore[arg-type]
        facts = hooks.kv_facts(config)
        assert facts.connector in KV_CONNECTORS, (backend, facts)


# --------------------------------------------------------------------------------------------------
# Attestation.
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def contract() -> Policy:
    from steer_server.serving.settings import PluginSettings
    from steer_server.spec import OFF

    profile = load_profile(toy_profile_path())
    plugin = PluginSettings(toy_profile_path(), profile, max_gain=8.0, allow_raw_heads=False)
    return Policy(
        plugin, OFF, None, False, {"image": "Answer from the image.", "text": "Answer from the text."}
    )


def test_the_deployment_id_names_every_setting_that_decides_steering(contract):
    from dataclasses import replace

    from steer_server.spec import parse_spec

    geometry = contract.plugin.geometry
    variants = [
        replace(contract, plugin=replace(contract.plugin, max_gain=9.0)),
        replace(contract, plugin=replace(contract.plugin, allow_raw_heads=True)),
        replace(contract, default=parse_spec("image", geometry=geometry, max_gain=8.0)),
        replace(contract, enforce=parse_spec("text", geometry=geometry, max_gain=8.0)),
        replace(contract, inject_instruction=True),
        replace(contract, instructions={**contract.instructions, "image": "Use the picture."}),
    ]
    ids = {deployment_id(contract), *(deployment_id(v) for v in variants)}
    assert len(ids) == len(variants) + 1


CONSUMER = _kv("ExampleConnector", role="kv_consumer")
BOTH = _kv("NixlConnector", role="kv_both")
PRODUCER = _kv("NixlConnector", role="kv_producer")


def _attested(contract: Policy, salt: str, deployment: str | None = None) -> dict[str, Any]:
    return {ATTESTATION_KEY: {"deployment": deployment or deployment_id(contract), "steering": salt}}


ORIGINS: list[tuple[KVFacts, Any, str, int | None]] = [
    (BOTH, None, "msA", None),  # computes its own KV
    (BOTH, {"do_remote_decode": True}, "msA", None),  # a prefill request
    (BOTH, {"do_remote_prefill": True}, "msA", 400),  # loads remote KV, unattested
    (BOTH, {"do_remote_decode": True, "remote_block_ids": [[1]]}, "msA", 400),  # NIXL reads back
    (BOTH, {"do_remote_prefill": True, "attested": "msA"}, "msA", None),
    (BOTH, {"do_remote_prefill": True, "attested": "msB"}, "msA", 409),
    (BOTH, {"do_remote_prefill": True, "attested": "msA", "deployment": "0" * 16}, "msA", 409),
    (BOTH, "not an object", "msA", 400),
    (BOTH, ["do_remote_prefill"], "msA", 400),
    (PRODUCER, {"do_remote_prefill": True, "attested": "msA"}, "msA", 400),  # a producer never loads
    (CONSUMER, None, "msA", 400),  # every request of a consumer loads
    (CONSUMER, {}, "msA", 400),
    (CONSUMER, {"attested": "msA"}, "msA", None),
    (CONSUMER, {"attested": "msB", "deployment": "f" * 16}, "msB", 409),
    (CONSUMER, {ATTESTATION_KEY: "yes"}, "msA", 400),
    (_kv("MultiConnector", children=(_kv("OffloadingConnector"), CONSUMER)), None, "msA", 400),
]


@pytest.mark.parametrize(("facts", "params", "salt", "status"), ORIGINS)
def test_kv_origin(contract, facts, params, salt, status):
    if isinstance(params, dict) and "attested" in params:
        params = {
            **{k: v for k, v in params.items() if k not in ("attested", "deployment")},
            **_attested(contract, params["attested"], params.get("deployment")),
        }
    if status is None:
        check_kv_origin(params, facts, contract, salt)
        return
    with pytest.raises(PolicyError) as refused:
        check_kv_origin(params, facts, contract, salt)
    assert refused.value.status == status and refused.value.reason == "kv_transfer"


ATTEST = [
    (PRODUCER, None, None, True),
    (BOTH, None, None, False),  # a request served here: nothing to hand on
    (BOTH, {"remote_block_ids": [1]}, None, True),  # the connector named KV for a decode side
    (BOTH, None, {"do_remote_decode": True}, True),  # a proxy's prefill request
    (CONSUMER, None, {"do_remote_decode": False}, False),
]


@pytest.mark.parametrize(("facts", "returned", "asked", "expected"), ATTEST)
def test_only_kv_handed_to_a_decode_side_is_attested(facts, returned, asked, expected):
    assert should_attest(returned, asked, facts) is expected


def _engine_request(extra: dict[str, Any], abort: bool = False) -> SimpleNamespace:
    from vllm.sampling_params import SamplingParams

    return SimpleNamespace(
        request_id="r",
        sampling_params=SamplingParams(extra_args=extra),
        cache_salt=None,
        abort_immediately=abort,
    )


def test_the_engine_checks_kv_origin_except_for_canaries_and_clean_up_requests(contract, monkeypatch):
    """The EngineCore's check (every entry point): an unattested remote load is refused; vLLM's clean-up
    request after a refused decode request (`abort_immediately`, which frees the prefill side's blocks)
    and the deployment's own canaries pass."""
    from steer_server.serving.engine_core import steer_engine_request
    from steer_server.serving.settings import CANARY_KEY, CANARY_SECRET_ENV

    remote = {"kv_transfer_params": {"do_remote_prefill": True}}
    with pytest.raises(PolicyError) as refused:
        steer_engine_request(_engine_request(dict(remote)), contract, BOTH)
    assert refused.value.status == 400
    steer_engine_request(_engine_request(dict(remote), abort=True), contract, BOTH)
    steer_engine_request(_engine_request(dict(remote)), contract, None)  # no connector: vLLM refuses it
    monkeypatch.setenv(CANARY_SECRET_ENV, "s3cret")
    canary = {**remote, CANARY_KEY: "s3cret", "modality_steer": "off"}
    steer_engine_request(_engine_request(canary), contract, BOTH)
    request = _engine_request({"kv_transfer_params": {"do_remote_prefill": True}})
    salt = "ms" + __import__("steer_server.spec", fromlist=["gains_digest"]).gains_digest({})
    request.sampling_params.extra_args["kv_transfer_params"][ATTESTATION_KEY] = {
        "deployment": deployment_id(contract),
        "steering": salt,
    }
    steer_engine_request(request, contract, BOTH)
    assert request.cache_salt == salt


def test_connector_facts_find_the_users_code_and_every_child():
    facts = hooks._kv_connector_facts(
        {
            "kv_connector": "MultiConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {
                "connectors": [
                    {"kv_connector": "NixlConnector", "kv_role": "kv_consumer"},
                    {
                        "kv_connector": "OffloadingConnector",
                        "kv_role": "kv_both",
                        "kv_connector_extra_config": {
                            "spec_name": "TieringOffloadingSpec",
                            "secondary_tiers": [{"type": "fs"}, {"type": "MyTier", "module_path": "my.tier"}],
                        },
                    },
                ]
            },
        }
    )
    assert [c.connector for c in facts.children] == ["NixlConnector", "OffloadingConnector"]
    assert facts.consumer and facts.children[1].extra_module_paths == ("my.tier",)
    assert facts.children[1].offloading == ("TieringOffloadingSpec", "fs", "MyTier")
    assert any("my.tier" in r for r in kv_refusals(facts))


def test_the_steering_key_folds_the_steering_into_a_token_keyed_connectors_key(monkeypatch):
    monkeypatch.setenv("MODALITY_STEER_PROFILE", str(toy_profile_path()))
    hooks.settings.cache_clear()
    try:

        def request(spec: str | None, features: list[Any]) -> SimpleNamespace:
            extra = {"modality_steer": spec} if spec is not None else {}
            return SimpleNamespace(
                req_id="r", sampling_params=SimpleNamespace(extra_args=extra), mm_features=features
            )

        image = SimpleNamespace(identifier="img")
        requests = [
            request(None, [image]),
            request("off", [image]),
            request("image", []),
            request(
                json.dumps({"follow": "image", "gain": load_profile(toy_profile_path()).default_gain}), []
            ),
        ]
        before = [r.mm_features for r in requests]
        with hooks.keyed_by_steering(requests):
            keys = [[f.identifier for f in r.mm_features] for r in requests]
        assert [r.mm_features for r in requests] == before and all(
            a is b for a, b in zip((r.mm_features for r in requests), before, strict=True)
        )
        assert keys[0] == keys[1] and keys[0][0] == "img"  # unsteered: same key, whatever the form
        assert keys[2] == keys[3] != keys[1][1:]  # "image" runs at the profile's default gain
        broken = SimpleNamespace(
            req_id="x", sampling_params=SimpleNamespace(extra_args={"modality_steer": "nonsense"})
        )
        assert hooks.steering_key(broken) != hooks.steering_key(broken)  # never shared, never raises
    finally:
        hooks.settings.cache_clear()


# --------------------------------------------------------------------------------------------------
# Real servers: one KV store shared by a kv_both server, a producer and a consumer.
# --------------------------------------------------------------------------------------------------

BLOCK_TEXT = {"follow": "text", "gain": 0}
SERVED_ARGS = [
    *BASE_ARGS,
    "--enforce-eager",
    "--block-size",
    "32",
    "--no-enable-prefix-caching",
    "--enable-prompt-tokens-details",
]


def _connector(role: str, store: Path) -> list[str]:
    config = {
        "kv_connector": "ExampleConnector",
        "kv_role": role,
        "kv_connector_extra_config": {"shared_storage_path": str(store)},
    }
    return ["--kv-transfer-config", json.dumps(config)]


@pytest.fixture(scope="module")
def kv_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, VllmServer]]:
    """reference: no connector; both: `kv_both` on a store of its own; producer / consumer: a P/D pair on
    another store, under other settings (`--max-gain 6`, at or above the profile's default gain,
    which it therefore leaves alone). The consumer starts once the producer serves: `ExampleConnector`, vLLM's debug connector,
    creates an entry's folder before it writes the layers, and an instance that looks it up meanwhile
    fails (both run the same canaries while they start)."""
    own, shared = tmp_path_factory.mktemp("kv-store-both"), tmp_path_factory.mktemp("kv-store-pd")
    wide, narrow = ["--max-gain", "8"], ["--max-gain", "6"]
    servers = {
        "reference": VllmServer(toy_model_dir(), SERVED_ARGS, profile=toy_profile_path(), steer_args=wide),
        "both": VllmServer(
            toy_model_dir(),
            [*SERVED_ARGS, *_connector("kv_both", own)],
            profile=toy_profile_path(),
            steer_args=wide,
        ),
        "producer": VllmServer(
            toy_model_dir(),
            [*SERVED_ARGS, *_connector("kv_producer", shared)],
            profile=toy_profile_path(),
            steer_args=narrow,
        ),
        "consumer": VllmServer(
            toy_model_dir(),
            [*SERVED_ARGS, *_connector("kv_consumer", shared)],
            profile=toy_profile_path(),
            steer_args=narrow,
        ),
    }
    try:
        for name in ("reference", "both", "producer"):
            servers[name].launch()
        servers["producer"].wait_healthy()
        servers["consumer"].launch()
        for server in servers.values():
            server.wait_healthy()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


MODEL = str(toy_model_dir())


def _client(server: VllmServer) -> openai.OpenAI:
    return server.client(max_retries=0)


def _cached(reply: Any) -> int:
    return int(reply.usage.prompt_tokens_details.cached_tokens or 0)


@pytest.fixture(scope="module")
def moved_conflicts(kv_servers, toy_test_samples) -> list[Any]:
    """Conflicts on which blocking the text heads changes the top-5 logprobs (on the reference)."""
    client = _client(kv_servers["reference"])
    moved = []
    for sample in (s for s in toy_test_samples if s.sample.kind == "conflict"):
        off = served_steps(chat(client, MODEL, sample))
        if served_steps(chat(client, MODEL, sample, BLOCK_TEXT)) != off:
            moved.append(sample)
        if len(moved) == 4:
            return moved
    raise AssertionError(f"only {len(moved)} conflicts move under {BLOCK_TEXT}")


def test_a_kv_both_store_never_hands_one_steering_s_kv_to_another(kv_servers, moved_conflicts):
    reference, both = _client(kv_servers["reference"]), _client(kv_servers["both"])
    for sample in moved_conflicts:
        expected = {
            "off": served_steps(chat(reference, MODEL, sample)),
            "block": served_steps(chat(reference, MODEL, sample, BLOCK_TEXT)),
        }
        first = chat(both, MODEL, sample)  # stores the unsteered KV
        steered = chat(both, MODEL, sample, BLOCK_TEXT)
        assert _cached(steered) == 0, "a steered request loaded the unsteered request's KV"
        again = chat(both, MODEL, sample, BLOCK_TEXT)
        unsteered_again = chat(both, MODEL, sample)
        assert _cached(again) > 0 and _cached(unsteered_again) > 0, "identical steering no longer shares KV"
        for reply, setting in (
            (first, "off"),
            (steered, "block"),
            (again, "block"),
            (unsteered_again, "off"),
        ):
            assert served_steps(reply) == expected[setting], (sample.sample.id, setting)


def _prefill(client: openai.OpenAI, sample: Any, steer: Any) -> dict[str, Any]:
    """A prefill request as vLLM's P/D proxies send it; the `kv_transfer_params` it returns."""
    reply = chat(client, MODEL, sample, steer, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
    params = (reply.model_extra or {}).get("kv_transfer_params")
    assert params and ATTESTATION_KEY in params, reply
    return dict(params)


def test_a_prefill_decode_split_with_the_same_settings_answers_as_one_server(kv_servers, moved_conflicts):
    ids = {name: server_state(server)["deployment_id"] for name, server in kv_servers.items()}
    assert ids["producer"] == ids["consumer"] != ids["both"] == ids["reference"]
    reference, producer, consumer = (
        _client(kv_servers[name]) for name in ("reference", "producer", "consumer")
    )
    for sample in moved_conflicts:
        for steer in (None, BLOCK_TEXT):
            params = _prefill(producer, sample, steer)
            decoded = chat(consumer, MODEL, sample, steer, kv_transfer_params=params)
            assert _cached(decoded) > 0, "the decode side did not load the prefill side's KV"
            assert served_steps(decoded) == served_steps(chat(reference, MODEL, sample, steer))


def test_the_decode_side_refuses_kv_it_cannot_trust(kv_servers, moved_conflicts):
    """Other settings on the prefill side (`--max-gain 8` against 6), another steering than the prefill
    ran, or no attestation at all: refused, named, never answered."""
    both, producer, consumer = (_client(kv_servers[name]) for name in ("both", "producer", "consumer"))
    sample = moved_conflicts[0]
    cases = [
        (_prefill(both, sample, BLOCK_TEXT), BLOCK_TEXT, 409, "other steering settings"),
        (_prefill(producer, sample, None), BLOCK_TEXT, 409, "another steering"),
        (None, BLOCK_TEXT, 400, "no 'modality_steer' attestation"),
        ({"do_remote_prefill": False}, None, 400, "no 'modality_steer' attestation"),
    ]
    for params, steer, status, message in cases:
        with pytest.raises(openai.APIStatusError) as refused:
            chat(consumer, MODEL, sample, steer, kv_transfer_params=params)
        assert refused.value.status_code == status and message in str(refused.value), str(refused.value)


def test_a_refused_connector_stops_the_start_by_name(tmp_path):
    """DecodeBenchConnector runs on CPU and fills the prompt's KV with random values: refused when the
    model loads, before anything is served."""
    config = {"kv_connector": "DecodeBenchConnector", "kv_role": "kv_both"}
    server = VllmServer(
        toy_model_dir(),
        [*SERVED_ARGS, "--kv-transfer-config", json.dumps(config)],
        profile=toy_profile_path(),
    )
    with pytest.raises(ServerStartError) as refused, server:
        pass
    assert "the KV connector DecodeBenchConnector: fills the prompt's KV with random values" in str(
        refused.value
    )
