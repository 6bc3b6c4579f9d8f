"""The serving path through real vLLM servers (CPU here): `modality-steer serve` with a profile against a
transformers reference of the same gains, batch isolation, prefix caching, TP=2, compiled mode, the
request errors, the policy, the header and the metrics; pipeline parallel and speculative decoding."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from helpers import (
    BASE_ARGS,
    SPEC_IDS,
    SPECS,
    assert_same_steps,
    chat,
    http_request,
    reference_steps,
    serve,
    served_steps,
    server_state,
    write_profile,
)

from steer_server.data.prompts import openai_messages
from steer_server.hf.model import load_model
from steer_server.profile import load_profile
from steer_server.serving.launcher import ServerStartError, VllmServer

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def llava_server(tiny_llava, llava_profile):
    with serve(tiny_llava, llava_profile, "--enforce-eager") as server:
        yield server


def _series(server) -> list[tuple[str, str, float]]:
    """(name, labels as written, value) of every sample line of the server's /metrics."""
    text = http_request(server, "/metrics", timeout=10).body.decode()
    lines = [line.rpartition(" ") for line in text.splitlines() if line and not line.startswith("#")]
    return [(*series.partition("{")[::2], float(value)) for series, _, value in lines]


def _metrics(server) -> dict[str, float]:
    """The plugin's series by name with labels (as written) -> value."""
    return {
        name + ("{" + labels if labels else ""): value
        for name, labels, value in _series(server)
        if name.startswith("modality_steer_")
    }


@pytest.mark.parametrize("steer", SPECS, ids=SPEC_IDS)
def test_llava_matches_transformers_reference(llava_server, tiny_llava, llava_profile, serve_samples, steer):
    reference = load_model(tiny_llava)
    profile = load_profile(llava_profile)
    client = llava_server.client()
    for sample in serve_samples[:3]:
        got = served_steps(chat(client, str(tiny_llava), sample, None if steer == "off" else steer))
        assert_same_steps(got, reference_steps(reference, profile, sample, steer), 1e-3)


def test_steering_changes_the_output(llava_server, tiny_llava, serve_samples):
    client = llava_server.client()
    plain = served_steps(chat(client, str(tiny_llava), serve_samples[0]))
    blocked = served_steps(
        chat(client, str(tiny_llava), serve_samples[0], {"heads": [[0, h, 0.0] for h in range(4)]})
    )
    assert plain != blocked


def test_mixed_batch_matches_requests_sent_alone(llava_server, tiny_llava, serve_samples):
    client = llava_server.client()
    work = [(sample, SPECS[i % 4]) for i, sample in enumerate(serve_samples)]
    alone = [served_steps(chat(client, str(tiny_llava), s, spec)) for s, spec in work]
    with ThreadPoolExecutor(max_workers=16) as pool:
        together = list(pool.map(lambda item: served_steps(chat(client, str(tiny_llava), *item)), work))
    # Exactly: steering one request must not change a neighbour's numbers in the same batch.
    assert together == alone


def test_unsteered_requests_are_bit_identical_to_plain_vllm(tiny_llava, llava_server, serve_samples):
    client = llava_server.client()
    steered_side = [served_steps(chat(client, str(tiny_llava), s)) for s in serve_samples[:4]]
    with VllmServer(tiny_llava, [*BASE_ARGS, "--enforce-eager"]) as plain:
        plain_side = [served_steps(chat(plain.client(), str(tiny_llava), s)) for s in serve_samples[:4]]
    assert steered_side == plain_side


def test_tensor_parallel_2_equals_1(tiny_llava, llava_profile, llava_server, serve_samples):
    env = dict(__import__("os").environ, VLLM_CPU_OMP_THREADS_BIND="0|1")
    tp1 = [
        served_steps(chat(llava_server.client(), str(tiny_llava), s, spec))
        for s, spec in zip(serve_samples[:5], SPECS, strict=True)
    ]
    with serve(
        tiny_llava, llava_profile, "--enforce-eager", "--tensor-parallel-size", "2", env=env
    ) as tp2_server:
        tp2 = [
            served_steps(chat(tp2_server.client(), str(tiny_llava), s, spec))
            for s, spec in zip(serve_samples[:5], SPECS, strict=True)
        ]
    for got, expected in zip(tp2, tp1, strict=True):
        assert_same_steps(got, expected, 1e-4)


def _steps_for_specs(server, model, samples):
    return [
        served_steps(chat(server.client(), str(model), s, spec))
        for s, spec in zip(samples[:5], SPECS, strict=True)
    ]


def test_pipeline_parallel_2_equals_1(tiny_llava, llava_profile, llava_server, serve_samples):
    """Each stage steers the profile's heads on the layers it holds (global layer indices); the profile
    has heads on both stages (layers 0 and 1 of the 2-layer model)."""
    heads_layers = {
        layer for mode in ("image", "text") for layer, _ in load_profile(llava_profile).heads(mode)
    }
    assert heads_layers == {0, 1}
    env = dict(__import__("os").environ, VLLM_CPU_OMP_THREADS_BIND="0|1")
    pp1 = _steps_for_specs(llava_server, tiny_llava, serve_samples)
    # Compiled, not eager: vLLM 0.32 allocates the buffers a later stage receives activations in only in
    # its profiling run (`gpu_model_runner.py`, `_dummy_run`), which an eager CPU engine with a fixed KV
    # size skips; the later stage then fails its first step ("assert self.intermediate_tensors is not
    # None"), with or without the plugin.
    with serve(tiny_llava, llava_profile, "--pipeline-parallel-size", "2", env=env) as pp2_server:
        pp2 = _steps_for_specs(pp2_server, tiny_llava, serve_samples)
        workers = server_state(pp2_server)["workers"]
    for got, expected in zip(pp2, pp1, strict=True):
        assert_same_steps(got, expected, 1e-4)
    stages = sorted((w["pp_rank"], w["layers"], w["steered_layers"]) for w in workers)
    assert stages == [(0, [0, 1], [0]), (1, [1, 2], [1])]


def _spec_decode_counts(server) -> dict[str, float]:
    text = http_request(server, "/metrics", timeout=10).body.decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vllm:spec_decode_num_"):
            name, _, value = line.rpartition(" ")
            key = name.split("{")[0]
            counts[key] = counts.get(key, 0.0) + float(value)
    return counts


def test_speculative_ngram_decoding_steers_the_target(tiny_llava, llava_profile, llava_server, serve_samples):
    """n-gram lookup has no drafter; the steered target verifies several tokens per request and step, so
    greedy tokens and logprobs equal those of decoding without speculation."""
    config = json.dumps({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3})
    work = [(s, spec) for s in serve_samples[:4] for spec in SPECS]
    alone = [
        served_steps(chat(llava_server.client(), str(tiny_llava), s, spec, max_tokens=12)) for s, spec in work
    ]
    with serve(tiny_llava, llava_profile, "--enforce-eager", "--speculative-config", config) as spec_server:
        got = [
            served_steps(chat(spec_server.client(), str(tiny_llava), s, spec, max_tokens=12))
            for s, spec in work
        ]
        counts = _spec_decode_counts(spec_server)
    assert counts.get("vllm:spec_decode_num_draft_tokens_total", 0) > 0, counts  # verification steps ran
    assert counts.get("vllm:spec_decode_num_accepted_tokens_total", 0) > 0, counts
    for steps, expected in zip(got, alone, strict=True):
        assert_same_steps(steps, expected, 1e-4)


def test_compiled_mode_equals_eager(tiny_llava, llava_profile, llava_server, serve_samples):
    eager = [
        served_steps(chat(llava_server.client(), str(tiny_llava), s, spec))
        for s, spec in zip(serve_samples[:5], SPECS, strict=True)
    ]
    with serve(tiny_llava, llava_profile) as compiled:
        got = [
            served_steps(chat(compiled.client(), str(tiny_llava), s, spec))
            for s, spec in zip(serve_samples[:5], SPECS, strict=True)
        ]
    for steps, expected in zip(got, eager, strict=True):
        assert_same_steps(steps, expected, 1e-4)


# --------------------------------------------------------------------------------------------------
# Header and metrics (request errors: test_hardening.py).
# --------------------------------------------------------------------------------------------------


def test_header_and_metrics(llava_server, tiny_llava, serve_samples, llava_profile):
    client = llava_server.client()
    before = _metrics(llava_server)
    raw = client.chat.completions.with_raw_response.create(
        model=str(tiny_llava),
        messages=openai_messages(serve_samples[0]),
        max_tokens=2,
        extra_body={"modality_steer": "text"},
    )
    profile_id = load_profile(llava_profile).profile_id
    assert raw.headers["x-modality-steer"] == f"mode=text; gain=3; profile={profile_id}"
    gain0 = client.completions.with_raw_response.create(
        model=str(tiny_llava),
        prompt="USER: hi ASSISTANT:",
        max_tokens=2,
        extra_body={"vllm_xargs": {"modality_steer": '{"follow": "image", "gain": 0}'}},
    )
    assert gain0.headers["x-modality-steer"] == f"mode=image; gain=0; profile={profile_id}"
    plain = client.completions.with_raw_response.create(
        model=str(tiny_llava), prompt="USER: hi ASSISTANT:", max_tokens=2
    )
    assert "x-modality-steer" not in plain.headers
    with pytest.raises(openai.BadRequestError):
        client.completions.create(
            model=str(tiny_llava), prompt="x", max_tokens=2, extra_body={"modality_steer": "loud"}
        )
    after = _metrics(llava_server)

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('modality_steer_requests_total{mode="text"}') == 1
    assert delta('modality_steer_requests_total{mode="image"}') == 1
    assert delta('modality_steer_requests_total{mode="off"}') == 1
    assert delta('modality_steer_rejected_total{reason="invalid"}') == 1
    info = [name for name in after if name.startswith("modality_steer_profile_info{")]
    assert (
        len(info) == 1
        and f'profile_id="{profile_id}"' in info[0]
        and 'model="LlavaForConditionalGeneration"' in info[0]
    )


DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "dashboard" / "modality-steer.json"


def _exported(server) -> dict[str, set[str]]:
    """Every series name of the server's /metrics with the label names it carries."""
    series: dict[str, set[str]] = {}
    for name, labels, _ in _series(server):
        series.setdefault(name, set()).update(re.findall(r'(\w+)="', labels))
    return series


def test_every_series_the_dashboard_queries_is_exported(llava_server, tiny_llava, serve_samples):
    """The shipped Grafana dashboard (docs/dashboard/modality-steer.json) queries only series a running
    server exports, with the labels it groups them by; the canary gauge shows exactly one status."""
    client = llava_server.client()
    client.chat.completions.create(
        model=str(tiny_llava), messages=openai_messages(serve_samples[0]), max_tokens=2
    )
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])] + [
        variable["query"] for variable in dashboard["templating"]["list"]
    ]
    exported = _exported(llava_server)
    queried = set()
    for expr in exprs:
        names = re.findall(r"\b(modality_steer_\w+|vllm:\w+)", expr)
        assert names, expr
        grouped = {
            label.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for label in group.split(",")
        }
        for name in names:
            assert name in exported, (name, expr)
            assert grouped - {"instance", "le"} <= exported[name] | {"le"}, (name, grouped, exported[name])
            queried.add(name)
    # Each of the plugin's series is on the dashboard (prometheus_client's *_created timestamps aside).
    plugin = {
        name for name in exported if name.startswith("modality_steer_") and not name.endswith("_created")
    }
    assert plugin <= queried, plugin - queried
    status = {k: v for k, v in _metrics(llava_server).items() if k.startswith("modality_steer_canary_status")}
    assert len(status) == 4 and sum(status.values()) == 1, status


# --------------------------------------------------------------------------------------------------
# Startup checks: nothing is served with a profile that does not fit the model.
# --------------------------------------------------------------------------------------------------


def test_profile_for_another_model_stops_startup(tiny_llava, tmp_path):
    profile = write_profile(tiny_llava, tmp_path / "p.json")
    raw = json.loads(profile.read_text())
    raw["model"]["num_layers"] = 3
    raw["model"]["fingerprint"] = "sha256:" + "0" * 32
    profile.write_text(json.dumps(raw))
    server = serve(tiny_llava, profile, "--enforce-eager")
    with pytest.raises(
        ServerStartError,
        match=r"3 layers x 4 heads x head_dim 32, but the served model has 2 layers \(attention on \[0, 1\] of layers 0-1\) x 4 heads",
    ):
        server.start()
    assert server.process is not None and server.process.returncode not in (0, None)


def test_profile_fingerprint_mismatch_stops_startup(tiny_llava, tmp_path):
    profile = write_profile(tiny_llava, tmp_path / "p.json", fingerprint="sha256:" + "0" * 32)
    server = serve(tiny_llava, profile, "--enforce-eager")
    with pytest.raises(ServerStartError, match="was made for model fingerprint sha256:0000"):
        server.start()
