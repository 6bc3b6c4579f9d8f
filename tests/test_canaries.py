"""Steering that proves itself: the profile's canaries, checked before a deployment serves.

Cheap level: the judgement, the report, the internal canary path (no client may carry the canary key;
the EngineCore accepts it only with the deployment's secret), the settings, and the analysis choosing
canaries. Integration level (real vLLM on CPU, the embedded toy and its shipped profile): the honest
server starts and reports its canaries passed; each simulated silent failure, installed in the server's
own processes by a `sitecustomize` on their path (the project's code untouched), stops the start naming
the canary; the toy served in bfloat16 passes; a geometry-matched variant passes under
`--profile-match geometry` and another model of the same geometry fails; no HTTP request reaches the
canary path.
"""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import BASE_ARGS, engine_env, http_request, server_state, walk_body

from steer_server.eval.demo import toy_profile_path
from steer_server.profile import CANARY_SETTINGS, load_profile
from steer_server.serving.canary import GEOMETRY_RELATIVE, CanaryReport, judge
from steer_server.serving.launcher import ServerStartError, VllmServer
from steer_server.toy.model import toy_model_dir

SECRET = "known-to-the-test-only"


# --------------------------------------------------------------------------------------------------
# Judgement and report.
# --------------------------------------------------------------------------------------------------


def _served(
    profile: Any, shift: float = 0.0, noop: bool = False, ranks: int = 1
) -> dict[tuple[int, str, str], float]:
    served = {}
    for rank in range(ranks):
        for canary in profile.canaries.samples:
            for setting in CANARY_SETTINGS:
                value = canary.recorded["off" if noop else setting] + shift
                served[(rank, canary.id, setting)] = value
    return served


def test_the_shipped_toy_profile_carries_canaries_with_large_effects():
    profile = load_profile(toy_profile_path())
    assert profile.canaries is not None
    canaries = profile.canaries
    assert {c.follow for c in canaries.samples} == {"image", "text"} and len(canaries.samples) >= 2
    for canary in canaries.samples:
        own = canary.recorded[f"{canary.follow}_block"] - canary.recorded["off"]
        assert abs(own) >= 4 * canaries.tolerance, (canary.id, own)
        assert canary.messages[0]["content"][0]["image_url"]["url"].startswith("data:image/")


@pytest.mark.parametrize("match", ["fingerprint", "geometry"])
def test_judge_passes_the_recorded_figures_and_fails_steering_without_effect(match):
    profile = load_profile(toy_profile_path())
    assert profile.canaries is not None
    assert all(c.ok for c in judge(profile.canaries, _served(profile, ranks=2), match))
    failed = [c for c in judge(profile.canaries, _served(profile, noop=True, ranks=2), match) if not c.ok]
    # Every canary's own block fails, on both ranks.
    own = {(c.rank, c.canary) for c in failed if c.setting.endswith("_block")}
    assert own == {(r, c.id) for r in (0, 1) for c in profile.canaries.samples}
    report = CanaryReport.of(judge(profile.canaries, _served(profile, noop=True), match), match, 1.0)
    assert report.status == "failed"
    first = report.failures()[0]
    assert f"canary {first.canary}" in report.message() and "recorded" in report.message()


def test_geometry_match_compares_effects_fingerprint_match_compares_figures():
    """Another checkpoint's unsteered figures may differ (geometry) but not the analysed one's."""
    profile = load_profile(toy_profile_path())
    assert profile.canaries is not None
    shifted = _served(profile, shift=5 * profile.canaries.tolerance)
    assert all(c.ok for c in judge(profile.canaries, shifted, "geometry"))
    assert not all(c.ok for c in judge(profile.canaries, shifted, "fingerprint"))
    # Half the recorded effect is allowed under geometry, not more.
    canary = profile.canaries.samples[0]
    setting = f"{canary.follow}_block"
    effect = canary.recorded[setting] - canary.recorded["off"]
    for factor, ok in ((1 - GEOMETRY_RELATIVE + 0.05, True), (1 - GEOMETRY_RELATIVE - 0.2, False)):
        served = _served(profile)
        served[(0, canary.id, setting)] = canary.recorded["off"] + factor * effect
        check = next(
            c
            for c in judge(profile.canaries, served, "geometry")
            if (c.canary, c.setting) == (canary.id, setting)
        )
        assert check.ok is ok, (factor, check)


# --------------------------------------------------------------------------------------------------
# The internal path.
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def enforced_text(monkeypatch) -> Iterator[Any]:
    """The toy profile under `--enforce-steer text`, with a known canary secret."""
    from steer_server.serving.policy import policy
    from steer_server.serving.settings import settings

    monkeypatch.setenv("MODALITY_STEER_PROFILE", str(toy_profile_path()))
    monkeypatch.setenv("MODALITY_STEER_ENFORCE", "text")
    monkeypatch.setenv("MODALITY_STEER_CANARIES", "on")
    monkeypatch.setenv("MODALITY_STEER_CANARY_SECRET", SECRET)
    settings.cache_clear()
    policy.cache_clear()
    yield policy()
    settings.cache_clear()
    policy.cache_clear()


@pytest.mark.parametrize(
    "payload",
    [
        {"modality_steer_canary": SECRET},
        {"vllm_xargs": {"modality_steer_canary": SECRET}},
        {"vllm_xargs": {"modality_steer_canary": SECRET, "modality_steer": "off"}},
        {"modality_steer": "off", "vllm_xargs": {"modality_steer_canary": "x"}},
    ],
)
def test_no_request_body_may_carry_the_canary_key(enforced_text, payload):
    from steer_server.serving.policy import PolicyError, asked_spec

    with pytest.raises(PolicyError, match="internal") as caught:
        asked_spec(payload)
    assert caught.value.status == 400


def test_the_request_builders_take_the_canary_key_only_from_the_canary_run(enforced_text):
    from steer_server.serving.canary import INTERNAL_RUN
    from steer_server.serving.frontend import decided_extra_args
    from steer_server.serving.policy import PolicyError

    extra = {"modality_steer": "off", "modality_steer_canary": SECRET}
    with pytest.raises(PolicyError, match="internal"):
        decided_extra_args(enforced_text, extra, pooling=False)
    token = INTERNAL_RUN.set(True)
    try:
        assert decided_extra_args(enforced_text, extra, pooling=False)["modality_steer"] == "off"
    finally:
        INTERNAL_RUN.reset(token)
    # Outside the run, "off" under enforcement is refused as ever.
    with pytest.raises(PolicyError):
        decided_extra_args(enforced_text, {"modality_steer": "off"}, pooling=False)


@pytest.mark.parametrize(("token", "accepted"), [(SECRET, True), ("guess", False), ("", False), (7, False)])
def test_the_engine_core_accepts_a_canary_only_with_the_deployments_secret(enforced_text, token, accepted):
    from steer_server.serving.engine_core import steer_engine_request
    from steer_server.serving.policy import PolicyError

    request = SimpleNamespace(
        request_id="c",
        sampling_params=SimpleNamespace(
            extra_args={"modality_steer": '{"follow":"image","gain":0.0}', "modality_steer_canary": token}
        ),
        cache_salt=None,
    )
    if accepted:
        steer_engine_request(request, enforced_text)
        assert request.sampling_params.extra_args == {"modality_steer": '{"follow":"image","gain":0.0}'}
    else:
        with pytest.raises(PolicyError, match="internal"):
            steer_engine_request(request, enforced_text)


@pytest.mark.parametrize(
    ("canaries", "match", "needle"),
    [
        ("on", "fingerprint", "carries no canaries"),
        ("auto", "geometry", "needs --canaries on"),
        ("off", "geometry", "needs --canaries on"),
        ("sometimes", "fingerprint", "must be 'on', 'auto' or 'off'"),
        ("on", "names", "must be one of fingerprint, geometry"),
    ],
)
def test_settings_refuse_an_unverifiable_deployment(monkeypatch, llava_profile, canaries, match, needle):
    """A profile without canaries (the hand-made test profile) is served only with --canaries auto/off."""
    from steer_server.serving.settings import SteeringConfigError, settings

    monkeypatch.setenv("MODALITY_STEER_PROFILE", str(llava_profile))
    monkeypatch.setenv("MODALITY_STEER_CANARIES", canaries)
    monkeypatch.setenv("MODALITY_STEER_PROFILE_MATCH", match)
    settings.cache_clear()
    try:
        with pytest.raises(SteeringConfigError, match=needle):
            settings()
        monkeypatch.setenv("MODALITY_STEER_CANARIES", "auto")
        monkeypatch.setenv("MODALITY_STEER_PROFILE_MATCH", "fingerprint")
        settings.cache_clear()
        plugin = settings()
        assert plugin is not None and not plugin.canaries
    finally:
        settings.cache_clear()


@pytest.mark.slow
def test_the_analysis_chooses_canaries_with_large_effects(toy_test_samples):
    from steer_server.analysis.canaries import EFFECT_OVER_TOLERANCE, measure_canaries
    from steer_server.hf.model import load_model

    profile = load_profile(toy_profile_path())
    conflicts = [s for s in toy_test_samples if s.sample.kind == "conflict"][:40]
    canaries = measure_canaries(load_model(toy_model_dir()), profile, conflicts, 1, 16)
    assert [c.follow for c in canaries.samples] == ["image", "text"]
    for canary in canaries.samples:
        own = canary.recorded[f"{canary.follow}_block"] - canary.recorded["off"]
        assert abs(own) >= EFFECT_OVER_TOLERANCE * canaries.tolerance
        assert (
            max(abs(canary.recorded[s] - canary.recorded_bf16[s]) for s in CANARY_SETTINGS)
            <= canaries.tolerance
        )


# --------------------------------------------------------------------------------------------------
# Real servers.
# --------------------------------------------------------------------------------------------------

# Silent failures of the kind the canaries exist for, installed in every process of the server.
SIMULATIONS = {
    "head-scaling op is a no-op": """
import steer_server.kernels.head_scale as k
k.head_scale_ = lambda output, slot_map, table: None
""",
    "heads shifted by one inside a layer": """
import torch
from steer_server.serving import worker
original = worker.WorkerSteering._place
def _place(self, digest, needed):
    original(self, digest, needed)
    row = self._slot_of_digest[digest]
    for table in self.tables.values():
        table[row] = torch.roll(table[row].clone(), 1)
worker.WorkerSteering._place = _place
""",
    "gains applied to the wrong layer": """
from steer_server.serving import worker
original = worker.WorkerSteering._place
def _place(self, digest, needed):
    original(self, digest, needed)
    row = self._slot_of_digest[digest]
    layers = sorted(self.tables)
    rows = [self.tables[layer][row].clone() for layer in layers]
    for layer, values in zip(layers, rows[1:] + rows[:1]):
        self.tables[layer][row] = values
worker.WorkerSteering._place = _place
""",
    "slot map left empty": """
from steer_server.serving import worker
worker.WorkerSteering.set_step = lambda self, request_ids, counts: self.deactivate()
""",
}


def _toy_server(
    tmp_path: Path,
    model: Path | None = None,
    *extra: str,
    steer: tuple[str, ...] = (),
    simulation: str | None = None,
) -> VllmServer:
    env = engine_env(MODALITY_STEER_CANARY_SECRET=SECRET)
    if simulation is not None:
        folder = tmp_path / "simulation"
        folder.mkdir()
        (folder / "sitecustomize.py").write_text(simulation)
        env["PYTHONPATH"] = ":".join(filter(None, [str(folder), env.get("PYTHONPATH")]))
    return VllmServer(
        model or toy_model_dir(),
        [*BASE_ARGS, "--enforce-eager", *extra],
        profile=toy_profile_path(),
        steer_args=["--canaries", "on", *steer],
        env=env,
        startup_timeout=300,
    )


@pytest.fixture(scope="module")
def honest(tmp_path_factory) -> Iterator[VllmServer]:
    with _toy_server(tmp_path_factory.mktemp("honest")) as server:
        yield server


@pytest.mark.vllm
def test_the_honest_server_starts_with_its_canaries_passed(honest):
    canaries = server_state(honest)["canaries"]
    profile = load_profile(toy_profile_path())
    assert profile.canaries is not None
    assert canaries["status"] == "passed" and canaries["failed"] == [], canaries
    assert canaries["checks"] == len(profile.canaries.samples) * len(CANARY_SETTINGS)
    assert "canaries passed" in honest.log_tail(400)


@pytest.mark.vllm
@pytest.mark.parametrize("name", list(SIMULATIONS))
def test_a_silent_steering_failure_stops_the_start(tmp_path, name):
    server = _toy_server(tmp_path, simulation=SIMULATIONS[name])
    with pytest.raises(ServerStartError) as caught:
        server.start()
    message = str(caught.value)
    assert "steering does not do what the profile records" in message, message[-3000:]
    assert "canary " in message and "recorded metric" in message


def _checkpoint_copy(
    tmp_path: Path, name: str, transform: Any, config_update: dict[str, Any] | None = None
) -> Path:
    """The toy checkpoint with its weights transformed (names and shapes kept) and its config updated."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / name
    shutil.copytree(toy_model_dir(), folder)
    weights = load_file(str(folder / "model.safetensors"))
    save_file(
        {key: transform(key, tensor).contiguous() for key, tensor in weights.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    if config_update:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **config_update}, indent=2))
    return folder


def _random_like(key: str, tensor: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    if tensor.dim() < 2:
        return tensor.clone()  # norms and biases as they were
    return torch.randn(tensor.shape, generator=generator, dtype=torch.float32).to(tensor.dtype) * float(
        tensor.float().std()
    )


@pytest.mark.vllm
def test_another_model_of_the_same_geometry_and_fingerprint_is_refused(tmp_path):
    """Same config, same weight names and shapes (so the same fingerprint), other weights: the heads do
    other work under the same names."""
    from steer_server.profile import model_fingerprint

    other = _checkpoint_copy(tmp_path, "other", _random_like)
    assert model_fingerprint(other) == model_fingerprint(toy_model_dir())
    with pytest.raises(ServerStartError, match="steering does not do what the profile records"):
        _toy_server(tmp_path, other).start()


@pytest.mark.vllm
def test_the_toy_served_in_bfloat16_passes_its_canaries(tmp_path):
    with _toy_server(tmp_path, None, "--dtype", "bfloat16") as server:
        canaries = server_state(server)["canaries"]
    assert canaries["status"] == "passed", canaries


@pytest.mark.vllm
def test_geometry_match_accepts_a_variant_whose_canaries_pass_and_refuses_another_model(tmp_path):
    """A bfloat16 build of the toy (weights rounded, config says so: another fingerprint) is refused by
    fingerprint and served under --profile-match geometry; a random model of the same geometry is not."""
    variant = _checkpoint_copy(
        tmp_path, "bf16-build", lambda key, t: t.to(torch.bfloat16), {"torch_dtype": "bfloat16"}
    )
    with pytest.raises(ServerStartError, match="model fingerprint"):
        _toy_server(tmp_path, variant).start()
    with _toy_server(tmp_path, variant, steer=("--profile-match", "geometry")) as server:
        canaries = server_state(server)["canaries"]
    assert canaries["status"] == "passed" and canaries["match"] == "geometry", canaries
    other = _checkpoint_copy(tmp_path, "other", _random_like, {"torch_dtype": "bfloat16"})
    with pytest.raises(ServerStartError, match="steering does not do what the profile records"):
        _toy_server(tmp_path, other, steer=("--profile-match", "geometry")).start()


@pytest.mark.vllm
def test_no_http_request_reaches_the_canary_path(honest):
    """On every route of the running app that steers or is refused, a body carrying the canary key, even
    with the deployment's secret, is refused before anything is generated."""
    routes = server_state(honest)["routes"]
    body = walk_body(str(toy_model_dir()))
    carried = [
        {"vllm_xargs": {"modality_steer_canary": SECRET, "modality_steer": "off"}},
        {"modality_steer_canary": SECRET},
    ]
    for path in [*routes["steered"], *routes["refused"]]:
        for extra in carried:
            reply = http_request(
                honest, path.replace("{", "").replace("}", ""), "POST", body={**body, **extra}
            )
            assert reply.status == 400, (path, extra, reply)
    assert server_state(honest)["canaries"]["status"] == "passed"


@pytest.mark.vllm
def test_the_canaries_run_again_on_demand(honest):
    reply = http_request(honest, "/v1/modality_steer/canaries", "POST", body={})
    assert reply.status == 200 and reply.json()["status"] == "passed", reply


@pytest.mark.vllm
def test_canaries_go_through_every_data_parallel_engine(tmp_path):
    """`--data-parallel-size 2` (two engines, two API servers): every API server checks every canary on
    both engines before it serves."""
    profile = load_profile(toy_profile_path())
    assert profile.canaries is not None
    with _toy_server(tmp_path, None, "--data-parallel-size", "2") as server:
        for _ in range(4):  # either API server may answer
            canaries = server_state(server)["canaries"]
            assert canaries["status"] == "passed", canaries
            assert canaries["checks"] == 2 * len(profile.canaries.samples) * len(CANARY_SETTINGS), canaries
