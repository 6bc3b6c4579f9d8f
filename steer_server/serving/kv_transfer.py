"""KV that one request computed and another loads, outside vLLM's prefix cache: KV connectors
(`--kv-transfer-config`), KV offloading (`--kv-offloading-size`, which vLLM turns into a connector in
`VllmConfig.__post_init__`, `vllm/config/vllm.py`) and disaggregated prefill (a producer instance computes
the prompt's KV, a consumer decodes from it).

Steering changes the KV of every layer after the first steered one, so KV computed under one steering
must never serve a request under another. The prefix cache is kept apart by the steering-derived cache
salt (:mod:`.engine_core`); beyond it:

- **Stores keyed by the steering.** A connector whose stored KV is keyed by `Request.block_hashes` keys it
  by the salt (vLLM folds `cache_salt` into the first block's hash, `vllm/v1/core/kv_cache_utils.py`). A
  connector keyed by token ids has the steering folded into its key by the adapter where the adapter
  knows how (`ExampleConnector`); every other connector is refused at start-up by name
  (:data:`KV_CONNECTORS`, :func:`kv_refusals`).
- **Disaggregated prefill.** The decode side does not trust that the prefill side steered the same way.
  The producer adds an attestation to the `kv_transfer_params` it returns (the deployment's
  :func:`deployment_id` and the request's steering salt); a consumer refuses a request whose KV would come
  from elsewhere (role `kv_consumer`, or `do_remote_prefill` in its `kv_transfer_params`) unless the
  attestation names this deployment and the steering this server decided for it (:func:`check_kv_origin`).
  The router copies the producer's `kv_transfer_params` into the decode request, as vLLM's P/D proxies do.

The attestation guards against mismatched deployments, not against a client that forges one: like vLLM's
own `kv_transfer_params`, it is trusted input from the router; decode instances belong behind it
(`--api-key`, network policy).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

from .policy import Policy, PolicyError

# Where the producer's attestation travels: a key of the request's `kv_transfer_params` (vLLM passes the
# dict from the OpenAI request to `SamplingParams.extra_args["kv_transfer_params"]` and returns the
# connector's `request_finished` params as the response's `kv_transfer_params`).
ATTESTATION_KEY = "modality_steer"
# Where vLLM puts a request's `kv_transfer_params` in its sampling parameters (`SamplingParams.extra_args`,
# set by the OpenAI protocol's `to_sampling_params`, read by `vllm/v1/request.py`).
KV_PARAMS_ARG = "kv_transfer_params"
# `kv_transfer_params` keys that make a request load KV from another instance: `do_remote_prefill`
# (vLLM's scheduler waits for the remote KV, `vllm/v1/core/sched/scheduler.py`) and `remote_block_ids`
# (NIXL's bidirectional mode reads them back for a `do_remote_decode` request, `nixl/pull_scheduler.py`).
REMOTE_PREFILL_KEY = "do_remote_prefill"
REMOTE_LOAD_KEYS = (REMOTE_PREFILL_KEY, "remote_block_ids")
# The key with which P/D proxies ask a prefill instance to keep the KV for a decode side.
REMOTE_DECODE_KEY = "do_remote_decode"
# The key `MultiConnector` reads its children from (`kv_connector_extra_config`, `vllm/config/kv_transfer.py`).
MULTI_CONNECTOR_CHILDREN = "connectors"


KeyedBy = Literal["block_hashes", "cache_salt", "steering", "request", "tokens", "none", "dummy"]


@dataclass(frozen=True)
class ConnectorClass:
    """How a KV connector keys the KV it stores or loads, and whether the plugin allows it.

    Attributes:
        keyed_by: ``block_hashes`` (carries the steering salt), ``cache_salt`` (the salt itself), ``steering`` (the adapter folds the
            steering into the connector's own key), ``request`` (request-directed transfer: the consumer
            loads exactly what the producer's `kv_transfer_params` name; attested), ``tokens`` (token ids
            and image hashes only), ``none`` (no KV reuse between requests) or ``dummy`` (not real KV).
        allowed: whether a deployment may run it with the plugin.
        why: the reason, with the vLLM file it was read from.
    """

    keyed_by: KeyedBy
    allowed: bool
    why: str


_SALT = (
    "so the steering-derived cache salt keys it (a store shared between instances must be written only by "
    "instances that run modality-steer: a plain vLLM keeps a client's salt as it is)"
)
_ATTESTED = (
    "request-directed transfer for disaggregated prefill: the decode side loads what the prefill side's "
    "`kv_transfer_params` name; accepted only with the producer's attestation"
)
_UNATTESTABLE = (
    "disaggregated prefill in which the decode request cannot carry the prefill instance's attestation"
)
_TOKENS = "keys stored KV by token ids without the cache salt, so differently steered requests would share it"

# Every KV connector vLLM 0.32-0.34 registers (`KVConnectorFactory`, `.../kv_connector/factory.py`).
# A connector missing here is refused at start-up; the contract test fails when vLLM ships one.
KV_CONNECTORS: dict[str, ConnectorClass] = {
    "ExampleConnector": ConnectorClass(
        "steering",
        True,
        "keys stored KV by the prompt's token ids and image hashes only (`example_connector.py`, "
        "`_generate_foldername_debug`); the adapter adds the steering key to the hashes it reads",
    ),
    "OffloadingConnector": ConnectorClass(
        "block_hashes",
        True,
        f"keys offloaded blocks by `Request.block_hashes` (`offloading/scheduler.py`), {_SALT}",
    ),
    "SimpleCPUOffloadConnector": ConnectorClass(
        "block_hashes",
        True,
        f"keys offloaded blocks by `Request.block_hashes` (`vllm/v1/simple_kv_offload/manager.py`), {_SALT}",
    ),
    "MooncakeStoreConnector": ConnectorClass(
        "block_hashes",
        True,
        f"looks up and stores by `Request.block_hashes` (`mooncake/store/scheduler.py`), {_SALT}",
    ),
    "UMBPStoreConnector": ConnectorClass(
        "block_hashes", True, f"keys by `Request.block_hashes` (vLLM 0.34, `umbp/scheduler.py`), {_SALT}"
    ),
    "HiSparseConnector": ConnectorClass(
        "none",
        True,
        "offloads a request's own cold pages; reuse across requests only through prefix-cache hits keyed "
        f"by block hash (`vllm/v1/hisparse/coordinator.py`), {_SALT}",
    ),
    "LMCacheMPConnector": ConnectorClass(
        "cache_salt",
        True,
        "passes `Request.cache_salt` to LMCache's lookup, store and retrieve (`lmcache_mp_connector.py`), "
        f"{_SALT}",
    ),
    "ExampleHiddenStatesConnector": ConnectorClass(
        "none",
        True,
        "stores the speculator's hidden states per request and never loads KV into a request "
        "(`get_num_new_matched_tokens` returns 0, `example_hidden_states_connector.py`)",
    ),
    "NixlConnector": ConnectorClass("request", True, f"{_ATTESTED} (`nixl/pull_scheduler.py`)"),
    "NixlPullConnector": ConnectorClass("request", True, f"{_ATTESTED} (`nixl/pull_scheduler.py`)"),
    "NixlPushConnector": ConnectorClass(
        "request",
        False,
        f"{_UNATTESTABLE}: the prefill instance writes into blocks the decode request registered first "
        "(`nixl/push_scheduler.py`)",
    ),
    "MooncakeConnector": ConnectorClass(
        "request",
        False,
        f"{_UNATTESTABLE}: its proxy sends prefill and decode requests at once and the prefill side returns "
        "no parameters (`mooncake/mooncake_connector.py`, `request_finished`)",
    ),
    "MoRIIOConnector": ConnectorClass(
        "request",
        False,
        f"{_UNATTESTABLE}: in write mode the decode side allocates before the prefill side writes, and in "
        "read mode a non-producer claims the prompt as loaded for every request, `do_remote_prefill` or "
        "not (`moriio/moriio_connector.py`, `get_num_new_matched_tokens`)",
    ),
    "MultiConnector": ConnectorClass(
        "none", True, "loads through its children and stores in all of them: allowed when every child is"
    ),
    "LMCacheConnectorV1": ConnectorClass(
        "tokens",
        False,
        f"{_TOKENS} (LMCache's chunk hashes, `lmcache_integration/vllm_v1_adapter.py`); "
        "use `--kv-offloading-backend lmcache` (LMCacheMPConnector), which passes the salt",
    ),
    "FlexKVConnectorV1": ConnectorClass(
        "tokens", False, f"{_TOKENS} (FlexKV matches `Request.all_token_ids`, `flexkv_connector.py`)"
    ),
    "HF3FSKVConnector": ConnectorClass(
        "tokens",
        False,
        "keys stored KV by a chained MD5 of token ids, without the cache salt or even image hashes "
        "(`hf3fs/hf3fs_connector.py`), so differently steered requests would share it",
    ),
    "DecodeBenchConnector": ConnectorClass(
        "dummy",
        False,
        "fills the prompt's KV with random values for benchmarks (`decode_bench_connector.py`): "
        "no steering applies to it",
    ),
}

# `OffloadingConnector`'s storage backends (`kv_connector_extra_config.spec_name`, default
# :data:`DEFAULT_OFFLOADING_SPEC`, `vllm/v1/kv_offload/factory.py`) and `TieringOffloadingSpec`'s secondary
# tiers (`secondary_tiers[].type`, `vllm/v1/kv_offload/tiering/factory.py`). They store and load the
# blocks the connector's scheduler names, by `make_offload_key(Request.block_hashes[i], group)`
# (`offloading/scheduler.py`), so the steering-derived salt keys every one of them.
DEFAULT_OFFLOADING_SPEC = "CPUOffloadingSpec"
_OFFLOADED = f"stores the blocks `OffloadingConnector` names by `Request.block_hashes`, {_SALT}"
OFFLOADING_SPECS: dict[str, ConnectorClass] = {
    name: ConnectorClass("block_hashes", True, _OFFLOADED)
    for name in ("CPUOffloadingSpec", "TieringOffloadingSpec")
}
OFFLOADING_TIERS: dict[str, ConnectorClass] = {
    name: ConnectorClass("block_hashes", True, _OFFLOADED) for name in ("example", "fs", "p2p", "obj", "kvcr")
}


# Every encoder-cache connector (`--ec-transfer-config`, `vllm/distributed/ec_transfer/ec_connector/factory.py`):
# they move the vision encoder's outputs, keyed by image hash, which steering does not change (the plugin
# scales the language model's decoder attention only; vision towers' attention is not an `Attention`
# layer, design notes §9).
_ENCODER = "moves vision-encoder outputs keyed by image hash; steering acts after the encoder"
EC_CONNECTORS: dict[str, ConnectorClass] = {
    name: ConnectorClass("none", True, f"{_ENCODER} (`ec_connector/{where}`)")
    for name, where in (
        ("ECExampleConnector", "example_connector.py"),
        ("ECCPUConnector", "cpu/"),
        ("ECMooncakeConnector", "mooncake/"),
    )
}


@dataclass(frozen=True)
class KVFacts:
    """An engine's KV transfer configuration, read from `VllmConfig.kv_transfer_config` and
    `ec_transfer_config` by :mod:`.vllm_adapter`.

    Attributes:
        connector: `kv_connector` (None: no connector).
        role: `kv_role` (``kv_producer``, ``kv_consumer``, ``kv_both``; None without a connector).
        module_path: `kv_connector_module_path` (a connector class loaded from the user's module).
        extra_module_paths: module paths in `kv_connector_extra_config` (an offloading spec's
            `spec_module_path`, a tier's `module_path`: code of the user's that stores and loads KV).
        children: for `MultiConnector`, its children (from `kv_connector_extra_config.connectors`).
        ec_connector: `ec_transfer_config.ec_connector` (None: none).
        offloading: for `OffloadingConnector`, its spec and its secondary tiers' types.
    """

    connector: str | None = None
    role: str | None = None
    module_path: str | None = None
    extra_module_paths: tuple[str, ...] = ()
    children: tuple[KVFacts, ...] = ()
    ec_connector: str | None = None
    offloading: tuple[str, ...] = ()

    @property
    def consumer(self) -> bool:
        """Whether every request's KV may come from a producer (role `kv_consumer`, of the connector or of
        one of `MultiConnector`'s children)."""
        return self.connector is not None and (
            self.role == "kv_consumer" or any(child.consumer for child in self.children)
        )


def kv_refusals(facts: KVFacts) -> list[str]:
    """The KV transfer configurations the plugin refuses, named with the reason (empty: none); a
    `MultiConnector` is refused when any of its children is."""
    refusals = []
    if facts.connector is not None:
        known = KV_CONNECTORS.get(facts.connector)
        if facts.module_path:
            refusals.append(
                f"the KV connector {facts.connector} from kv_connector_module_path={facts.module_path!r}: "
                "modality-steer cannot tell whether it keys stored KV by the steering"
            )
        elif known is None:
            refusals.append(
                f"the KV connector {facts.connector}, which modality-steer has not classified (a vLLM "
                "release newer than the plugin's table, or a connector registered at run time)"
            )
        elif not known.allowed:
            refusals.append(f"the KV connector {facts.connector}: {known.why}")
        elif facts.extra_module_paths:
            refusals.append(
                f"the KV connector {facts.connector} with code from {', '.join(facts.extra_module_paths)} "
                "(kv_connector_extra_config): modality-steer cannot tell how it keys stored KV"
            )
        elif unknown := [
            name for name in facts.offloading if name not in OFFLOADING_SPECS and name not in OFFLOADING_TIERS
        ]:
            refusals.append(
                f"the KV connector {facts.connector} with the offloading backend(s) {', '.join(unknown)}, "
                "which modality-steer has not classified"
            )
        elif facts.connector == "MultiConnector" and not facts.children:
            refusals.append(
                f"MultiConnector without children in kv_connector_extra_config.{MULTI_CONNECTOR_CHILDREN}"
            )
        for child in facts.children:
            refusals.extend(kv_refusals(child))
    if facts.ec_connector is not None:
        ec = EC_CONNECTORS.get(facts.ec_connector)
        if ec is None or not ec.allowed:
            refusals.append(
                f"the encoder-cache connector {facts.ec_connector}"
                + (f": {ec.why}" if ec else ", which modality-steer has not classified")
            )
    return refusals


def deployment_id(contract: Policy) -> str:
    """16 hex digits naming what decides a request's steering on this server: the profile, `--max-gain`,
    `--allow-raw-heads`, `--default-steer`, `--enforce-steer` and the injected instructions. The two
    sides of a prefill/decode split must report the same one."""
    parts = [
        contract.plugin.profile.profile_id,
        repr(contract.plugin.max_gain),
        str(int(contract.plugin.allow_raw_heads)),
        contract.default.to_wire(),
        contract.enforce.to_wire() if contract.enforce is not None else "",
        str(int(contract.inject_instruction)),
        *(f"{mode}={text}" for mode, text in sorted(contract.instructions.items())),
    ]
    return hashlib.sha256("\x1f".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def attestation(contract: Policy, salt: str | None) -> dict[str, str]:
    """What the producer adds to a finished request's `kv_transfer_params` under :data:`ATTESTATION_KEY`:
    this deployment and the steering salt its KV was computed under."""
    return {"deployment": deployment_id(contract), "steering": salt or ""}


def loads_remote_kv(kv_params: dict[str, Any] | None, facts: KVFacts) -> bool:
    """Whether a request's KV may come from another instance: every request of a `kv_consumer` (a
    `MultiConnector` child's role included), and any request whose `kv_transfer_params` set one of
    :data:`REMOTE_LOAD_KEYS`."""
    return facts.consumer or bool(kv_params and any(kv_params.get(k) for k in REMOTE_LOAD_KEYS))


def check_kv_origin(kv_params: Any, facts: KVFacts, contract: Policy, salt: str) -> None:
    """Refuse a request whose KV would come from an instance that did not steer it as this one does.

    Args:
        kv_params: the request's `kv_transfer_params` (None when it has none).
        facts: this engine's KV transfer configuration.
        contract: this deployment's policy.
        salt: the steering salt this server derived for the request.

    Raises:
        PolicyError: 400 ``kv_transfer`` for `kv_transfer_params` that are not an object, for a remote load
            on a `kv_producer`, or when the KV would come from elsewhere and the request carries no
            attestation; 409 ``kv_transfer`` when the attestation names another deployment or another
            steering.
    """
    if kv_params is not None and not isinstance(kv_params, dict):
        # vLLM's scheduler reads it as a dict inside the engine loop (`Scheduler.add_request`).
        raise PolicyError(400, "kv_transfer", "kv_transfer_params must be an object")
    remote = [k for k in REMOTE_LOAD_KEYS if kv_params and kv_params.get(k)]
    if remote and facts.role == "kv_producer":
        raise PolicyError(
            400, "kv_transfer", f"kv_transfer_params {', '.join(remote)}: this instance only produces KV"
        )
    attested = kv_params.get(ATTESTATION_KEY) if kv_params else None
    if attested is None:
        if loads_remote_kv(kv_params, facts):
            why = f"kv_role {facts.role}" if facts.consumer else f"kv_transfer_params {', '.join(remote)}"
            raise PolicyError(
                400,
                "kv_transfer",
                f"this request's KV comes from a prefill instance ({why}), and its kv_transfer_params carry "
                f"no {ATTESTATION_KEY!r} attestation from it; send the prefill response's kv_transfer_params "
                "unchanged, from a prefill instance that runs modality-steer with the same settings",
            )
        return
    if not isinstance(attested, dict):
        raise PolicyError(400, "kv_transfer", f"kv_transfer_params.{ATTESTATION_KEY} must be an object")
    ours = deployment_id(contract)
    if attested.get("deployment") != ours:
        raise PolicyError(
            409,
            "kv_transfer",
            f"the KV was computed by a deployment with other steering settings (producer "
            f"{attested.get('deployment')!r}, this instance {ours!r}): prefill and decode must run the same "
            "profile, --max-gain, --allow-raw-heads, --default-steer, --enforce-steer and instructions",
        )
    if attested.get("steering") != salt:
        raise PolicyError(
            409,
            "kv_transfer",
            f"the KV was computed under another steering (producer {attested.get('steering')!r}, this "
            f"instance {salt!r})",
        )


def should_attest(returned: dict[str, Any] | None, kv_params: Any, facts: KVFacts) -> bool:
    """Whether a finished request's `kv_transfer_params` get this instance's attestation: on a
    `kv_producer`, when the connector returned parameters for a decode side, or when the request asked
    to be decoded elsewhere (`do_remote_decode`, as vLLM's P/D proxies send prefill requests)."""
    return (
        facts.role == "kv_producer"
        or bool(returned)
        or (isinstance(kv_params, dict) and bool(kv_params.get(REMOTE_DECODE_KEY)))
    )
