"""The steering contract, enforced in the engine: the non-HTTP entry points, beam search, cache salts no
client can forge, server defaults, start-up refusals and the handshake, and slots under preemption (real
vLLM on CPU). The route table and the policy on every route: tests/test_policy_app.py (vLLM's app
in-process) and tests/test_serving_policy.py (a running server)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import (
    Reply,
    engine_env,
    http_request,
    run_engine_script,
    serve,
    server_state,
)
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import BaseModel

from steer_server.data.prompts import openai_messages
from steer_server.eval.demo import toy_profile_path
from steer_server.profile import load_profile
from steer_server.serving.api import require_armed_workers
from steer_server.serving.engine_core import steering_salt
from steer_server.serving.launcher import CPU_DEFAULT_ARGS, VllmServer, free_port
from steer_server.serving.worker import engine_refusals
from steer_server.spec import gains_digest
from steer_server.toy.model import toy_model_dir

CLI = [sys.executable, "-m", "steer_server.cli"]


# --------------------------------------------------------------------------------------------------
# Cheap checks: salts, engine refusals, the handshake.
# --------------------------------------------------------------------------------------------------


GAINS = st.dictionaries(
    st.tuples(st.integers(0, 7), st.integers(0, 7)), st.floats(0, 8, allow_nan=False), max_size=4
)


@hypothesis_settings(max_examples=300, deadline=None, derandomize=True)
@given(
    client_a=st.one_of(st.none(), st.text(max_size=128)),
    client_b=st.one_of(st.none(), st.text(max_size=128)),
    gains_a=GAINS,
    gains_b=GAINS,
)
def test_no_client_salt_reaches_another_steerings_blocks(client_a, client_b, gains_a, gains_b):
    """Two requests share prefix-cache blocks exactly when their gains and their client salts agree,
    whatever the client salts are; every salt stays within vLLM's limits."""
    a, b = steering_salt(client_a, gains_a), steering_salt(client_b, gains_b)
    for salt in (a, b):
        assert len(salt) <= 51 and set(salt) <= set("0123456789abcdefms.")
    same_steering = gains_digest(gains_a) == gains_digest(gains_b)
    assert (a == b) == (same_steering and (client_a or None) == (client_b or None))


def test_forged_salt_of_the_old_scheme_is_hashed():
    """The salt a client could compute before (`"ms" + digest`) is just a client salt now."""
    steered = steering_salt(None, {(1, 3): 0.0})
    assert steering_salt(steered, {}) != steered
    assert steering_salt(steered, {}).startswith(steering_salt(None, {}) + ".")


def _config(**overrides: Any) -> SimpleNamespace:
    """A `VllmConfig` stand-in with the attributes the adapter reads (rows ``config.*``)."""
    base = {
        "speculative_config": None,
        "parallel_config": SimpleNamespace(enable_dbo=False, ubatch_size=0, prefill_context_parallel_size=1),
        "model_config": SimpleNamespace(use_mla=False),
        "compilation_config": SimpleNamespace(pass_config=SimpleNamespace(fuse_attn_quant=False)),
    }
    base.update(overrides)
    return SimpleNamespace(**base)


def _runner(kind: str) -> Any:
    """An instance of vLLM's real V1 or V2 runner class (never initialised: only its class is read)."""
    import importlib

    from steer_server.serving.vllm_adapter import table

    module = importlib.import_module(table.V1_RUNNER if kind == "V1" else table.V2_RUNNER)
    return object.__new__(module.GPUModelRunner)


PARALLEL = {"enable_dbo": False, "ubatch_size": 0, "prefill_context_parallel_size": 1}
REFUSALS = [
    ({}, "V1", 8, 2048, None),
    ({}, "V2", 8, 2048, None),
    (
        {"parallel_config": SimpleNamespace(**{**PARALLEL, "enable_dbo": True})},
        "V2",
        8,
        2048,
        "micro-batching",
    ),
    ({"parallel_config": SimpleNamespace(**{**PARALLEL, "ubatch_size": 2})}, "V1", 8, 2048, "micro-batching"),
    ({"model_config": SimpleNamespace(use_mla=True)}, "V2", 8, 2048, "MLA attention"),
    (
        {"compilation_config": SimpleNamespace(pass_config=SimpleNamespace(fuse_attn_quant=True))},
        "V1",
        8,
        2048,
        "fused FP8",
    ),
    (
        {"speculative_config": SimpleNamespace(method="eagle", enable_adaptive_verification=True)},
        "V2",
        8,
        2048,
        "adaptive draft verification",
    ),
    (
        {"parallel_config": SimpleNamespace(**{**PARALLEL, "prefill_context_parallel_size": 2})},
        "V2",
        8,
        2048,
        "prefill context parallel",
    ),
    ({}, "V1", 129, 2048, "129 attention heads per rank"),
    ({}, "V2", 8, 70000, "70000 tokens per step"),
]


@pytest.mark.slow  # imports vLLM
@pytest.mark.parametrize(("overrides", "runner", "heads", "tokens", "needle"), REFUSALS)
def test_engine_refusals_name_the_configuration(overrides, runner, heads, tokens, needle):
    """Refusals are read from what vLLM built: the config and the runner class found at load."""
    from steer_server.serving.vllm_adapter.hooks import engine_facts

    facts = engine_facts(_config(**overrides), _runner(runner))
    assert facts.runner == runner
    found = engine_refusals(facts, heads, tokens)
    if needle is None:
        assert found == []
    else:
        assert len(found) == 1 and needle in found[0], found


@pytest.mark.slow  # imports vLLM
def test_the_rust_front_end_is_refused_by_name(monkeypatch):
    """vLLM's Rust front-end serves HTTP without the API server's app and request builders."""
    from steer_server.serving.vllm_adapter.hooks import engine_facts

    monkeypatch.setenv("VLLM_USE_RUST_FRONTEND", "1")
    found = engine_refusals(engine_facts(_config(), _runner("V2")), 8, 2048)
    assert len(found) == 1 and "Rust front-end" in found[0], found
    monkeypatch.setenv("VLLM_USE_RUST_FRONTEND", "0")
    assert engine_refusals(engine_facts(_config(), _runner("V2")), 8, 2048) == []


def test_a_drafter_running_the_targets_attention_is_refused_by_name():
    """Speculative decoding: a drafter with its own layers runs unsteered (allowed); one that runs the
    target model's attention modules would be scaled with the target's slot map (refused, by method)."""
    from torch import nn

    from steer_server.serving.settings import SteeringConfigError
    from steer_server.serving.worker import check_drafter

    target_layers = {0: nn.Linear(2, 2), 1: nn.Linear(2, 2)}
    for drafter in (None, object(), nn.Sequential(nn.Linear(2, 2))):  # none, n-gram, own layers
        check_drafter(drafter, target_layers, "mtp")
    with pytest.raises(SteeringConfigError, match="method 'mtp'"):
        check_drafter(nn.Sequential(target_layers[1]), target_layers, "mtp")


@pytest.mark.slow  # imports vLLM
def test_the_drafter_is_found_on_either_runner():
    """V1 keeps its drafter in `runner.drafter`, V2 in `runner.speculator` (a check that looked only at
    `drafter` would pass silently on V2)."""
    from torch import nn

    from steer_server.serving.vllm_adapter.hooks import drafter_model

    model = nn.Linear(2, 2)
    assert drafter_model(SimpleNamespace(speculator=SimpleNamespace(model=model))) is model
    assert drafter_model(SimpleNamespace(drafter=SimpleNamespace(model=model))) is model
    assert drafter_model(SimpleNamespace(speculator=None, drafter=object())) is None


@pytest.mark.slow  # imports vLLM
def test_a_worker_without_steering_says_why():
    """A worker whose runner the plugin did not set up (an unknown runner class, or one refused) names
    its runner class and the refusals its configuration meets in the handshake."""
    from steer_server.serving.settings import SteeringConfigError
    from steer_server.serving.vllm_adapter.hooks import report_worker_state

    config = _config(speculative_config=SimpleNamespace(method="eagle", enable_adaptive_verification=True))
    for runner, needle in (
        (_runner("V2"), r"gpu\.model_runner\.GPUModelRunner\).*adaptive draft verification"),
        (object(), r"builtins\.object\) was not set up for steering$"),
    ):
        with pytest.raises(SteeringConfigError, match=needle):
            report_worker_state(SimpleNamespace(model_runner=runner, vllm_config=config))


def test_handshake_refuses_an_unarmed_or_silent_worker(monkeypatch, llava_profile):
    from steer_server.serving import settings as settings_module
    from steer_server.serving.settings import SteeringConfigError

    monkeypatch.setenv("MODALITY_STEER_PROFILE", str(llava_profile))
    settings_module.settings.cache_clear()
    settings_id = settings_module.settings().settings_id

    class Engine:
        def __init__(self, answer: Any) -> None:
            self.answer = answer

        async def collective_rpc(self, method: str) -> Any:
            if isinstance(self.answer, Exception):
                raise self.answer
            return self.answer

    async def states(engine: Engine) -> Any:
        return await engine.collective_rpc("modality_steer_state")

    try:
        armed = [{"armed": True, "settings_id": settings_id}]
        assert asyncio.run(require_armed_workers(Engine(armed), states)) == armed
        assert asyncio.run(require_armed_workers(None, states)) == []  # a render-only server has no engine
        for answer, needle in (
            (RuntimeError("no such method modality_steer_state"), "did not report steering armed"),
            ([{"armed": True, "settings_id": settings_id.replace(":8.0:", ":2.0:")}], "not armed"),
            ([{"armed": False, "settings_id": settings_id}], "not armed"),
            ([], "not armed"),
        ):
            with pytest.raises(SteeringConfigError, match=needle):
                asyncio.run(require_armed_workers(Engine(answer), states))
    finally:
        settings_module.settings.cache_clear()


class _GenerateBody(BaseModel):
    prompt: str
    vllm_xargs: dict[str, str] | None = None


class _OtherBody(BaseModel):
    prompt: str


def _generate(body: _GenerateBody) -> dict[str, Any]:
    return {}


def _other(body: _OtherBody) -> dict[str, Any]:
    return {}


def _models() -> dict[str, Any]:
    return {}


class _AsgiApp:
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        return None


def test_route_table_denies_by_default():
    """Sorted from the app itself: a route whose request model takes `vllm_xargs` is steered; GET routes,
    the listed inert routes and the metrics mount are inert; every other route (unknown POST routes, a
    route that accepts any method, any other mounted app) is refused; a request no route matches is
    left to the router (404 / 405); a route added later rebuilds the table."""
    from fastapi import FastAPI
    from starlette.routing import Mount, Route

    from steer_server.serving.api import classify_routes

    app = FastAPI()
    app.post("/generate")(_generate)
    app.post("/tokenize")(_other)
    app.post("/other")(_other)
    app.get("/models")(_models)
    app.router.routes.append(Route("/raw", _AsgiApp()))  # an ASGI endpoint: every method
    app.router.routes.append(Mount("/plugin", app=lambda scope, receive, send: None))
    app.router.routes.append(Mount("/metrics", app=lambda scope, receive, send: None))
    table = classify_routes(app)
    assert "/generate" in table.steered
    assert {"/tokenize", "/models", "/metrics"} <= set(table.inert)
    assert {"/other", "/raw", "/plugin"} <= set(table.refused)

    def kind(path: str, method: str = "POST") -> str:
        return table.kind_of({"type": "http", "path": path, "method": method, "root_path": ""})

    assert [kind(p) for p in ("/generate", "/tokenize", "/other", "/raw", "/plugin/x", "/nowhere")] == [
        "steered",
        "inert",
        "refused",
        "refused",
        "refused",
        "inert",
    ]
    assert table.describes(app)
    app.post("/late")(_other)
    assert not table.describes(app)


@pytest.mark.parametrize(
    ("headers", "json_body"),
    [
        ([], True),
        ([(b"content-type", b"application/json")], True),
        ([(b"Content-Type", b"Application/JSON; charset=utf-8")], True),
        ([(b"content-type", b"application/vnd.api+json")], True),
        ([(b"content-type", b"multipart/form-data; boundary=x")], False),
        ([(b"content-type", b"text/plain"), (b"content-type", b"application/json")], False),
    ],
)
def test_json_bodies_are_recognised_as_fastapi_recognises_them(headers, json_body):
    from steer_server.serving.api import _is_json

    assert _is_json({"headers": headers}) is json_body


def test_enforcement_compares_what_specs_do_not_how_they_are_written(llava_profile):
    from steer_server.serving.policy import Policy, PolicyError
    from steer_server.serving.settings import PluginSettings
    from steer_server.spec import SteerSpec

    plugin = PluginSettings(llava_profile, load_profile(llava_profile), max_gain=8.0, allow_raw_heads=False)
    contract = Policy(plugin, SteerSpec("off"), SteerSpec("text"), False, {})
    for same in ("text", {"follow": "text", "gain": 3}, '{"heads": [[1, 3, 3.0]]}'):
        assert contract.resolve(same) == SteerSpec("text")
    for other in ({"follow": "text", "gain": 2}, "image", "off"):
        with pytest.raises(PolicyError) as caught:
            contract.resolve(other)
        assert caught.value.status == 403


def test_the_handshake_runs_before_vllm_serves(monkeypatch, llava_profile):
    """The adapter puts the handshake where vLLM finishes the app's state (row
    ``api.init_endpoint_plugins_state``): an unarmed worker stops the start."""
    from vllm.entrypoints.launchers.api_server import app_state

    from steer_server.serving import settings as settings_module
    from steer_server.serving.settings import SteeringConfigError
    from steer_server.serving.vllm_adapter import hooks, table

    monkeypatch.setenv("MODALITY_STEER_PROFILE", str(llava_profile))
    settings_module.settings.cache_clear()
    key = "api.init_endpoint_plugins_state"
    was_installed = table.installed(key)
    try:
        table.install(key, hooks._init_endpoint_plugins_state)

        class Unarmed:
            async def collective_rpc(self, method: str) -> list[dict[str, Any]]:
                return [{"armed": False}]

        with pytest.raises(SteeringConfigError, match="not armed"):
            asyncio.run(
                app_state.init_endpoint_plugins_state(Unarmed(), SimpleNamespace(), SimpleNamespace())
            )
    finally:
        if not was_installed:
            table.uninstall(key)
        settings_module.settings.cache_clear()


# --------------------------------------------------------------------------------------------------
# Beam search and the prefix cache.
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def open_server(tiny_llava, llava_profile):
    """No policy; 32-token KV blocks (the smallest the CPU backend takes) so that short prompts hit the prefix cache."""
    with serve(
        tiny_llava,
        llava_profile,
        "--enforce-eager",
        "--block-size",
        "32",
        "--max-model-len",
        "512",
        "--enable-prompt-tokens-details",
    ) as server:
        yield server


def test_beam_search_is_refused_with_steering(open_server, tiny_llava, serve_samples):
    """Beam search builds new sampling parameters for every step (`vllm/entrypoints/generate/beam_search/`)
    and cannot carry a request's steering: refused, naming it. Under enforcement it runs with the enforced
    steering (tests/test_serving_policy.py)."""
    beam = {"model": str(tiny_llava), "max_tokens": 3, "use_beam_search": True, "n": 1, "ignore_eos": True}
    for steer in ({"follow": "image", "gain": 0}, "text", {"heads": [[0, 1, 0.0]]}):
        reply = http_request(
            open_server,
            "/v1/chat/completions",
            "POST",
            body={**beam, "messages": openai_messages(serve_samples[0]), "modality_steer": steer},
        )
        assert reply.status == 400 and "beam search" in reply.json()["error"]["message"], reply


def _completion(server: Any, model: str, prompt: str, **fields: Any) -> dict[str, Any]:
    reply = http_request(
        server,
        "/v1/completions",
        "POST",
        body={"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0, "logprobs": 5, **fields},
    )
    assert reply.status == 200, reply
    return dict(reply.json())


def _close(a: dict[str, Any], b: dict[str, Any], tolerance: float = 1e-4) -> bool:
    """Same tokens, and top logprobs within `tolerance` (a cached prefix is not recomputed in the same
    shapes, so the last digits may differ)."""
    steps_a, steps_b = (r["choices"][0]["logprobs"] for r in (a, b))
    if steps_a["tokens"] != steps_b["tokens"]:
        return False
    for top_a, top_b in zip(steps_a["top_logprobs"], steps_b["top_logprobs"], strict=True):
        if set(top_a) != set(top_b) or any(abs(top_a[t] - top_b[t]) > tolerance for t in top_a):
            return False
    return True


def _assert_close(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert _close(a, b), (a["choices"][0]["logprobs"], b["choices"][0]["logprobs"])


LONG_PROMPT = "USER: " + " ".join(["red blue green circle square"] * 52) + "\nASSISTANT:"


def test_prefix_cache_is_shared_only_by_identical_steering(open_server, tiny_llava, llava_profile):
    """Real cache hits (32-token blocks, a 260-token prompt), never across steering: not for unsteered
    requests whose client salt is a steered request's salt of the old scheme, nor for long salts."""
    model = str(tiny_llava)
    forged = steering_salt(None, {(1, 3): 0.0})  # what a client who has the profile can compute
    steer = {"follow": "text", "gain": 0}
    first = _completion(open_server, model, LONG_PROMPT, cache_salt=forged)
    assert first["usage"]["prompt_tokens"] >= 256
    steered = _completion(open_server, model, LONG_PROMPT, modality_steer=steer)
    assert steered["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    again = _completion(open_server, model, LONG_PROMPT, modality_steer=steer)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= 256  # identical steering shares
    _assert_close(again, steered)
    assert not _close(steered, first)
    for salt in ("s" * 125, "s" * 128, "x" * 109):
        reply = _completion(open_server, model, LONG_PROMPT, modality_steer=steer, cache_salt=salt)
        assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # another client salt
        _assert_close(reply, steered)
    reply = http_request(
        open_server,
        "/v1/completions",
        "POST",
        body={"model": model, "prompt": "hi", "cache_salt": "s" * 129, "modality_steer": "text"},
    )
    assert reply.status == 400, reply  # vLLM's own limit, answered as vLLM answers it
    with serve(
        tiny_llava, llava_profile, "--enforce-eager", "--no-enable-prefix-caching", "--max-model-len", "512"
    ) as fresh:
        uncached = _completion(fresh, model, LONG_PROMPT, modality_steer=steer)
    _assert_close(uncached, steered)


# --------------------------------------------------------------------------------------------------
# Server defaults and start-up refusals.
# --------------------------------------------------------------------------------------------------


def _serve_cli(
    model: Path, profile: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *CLI,
            "serve",
            str(model),
            "--profile",
            str(profile),
            *args,
            "--port",
            str(free_port()),
            *CPU_DEFAULT_ARGS,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        env=env,
    )


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (
            ["--default-steer", '{"heads": [[1, 0, 0]]}'],
            {},
            "MODALITY_STEER_DEFAULT='{\"heads\": [[1, 0, 0]]}' is not a spec a request could send on this "
            "server: raw heads are not allowed",
        ),
        (["--max-gain", "2"], {}, "--max-gain 2 is below the profile's default_gain 3"),
        (["--default-steer", '{"follow": "text", "gain": 9}'], {}, "gain must lie in [0, 8]"),
        (["--enforce-steer", "off"], {}, "MODALITY_STEER_ENFORCE must be 'image' or 'text'"),
        ([], {"VLLM_PLUGINS": "some_other_plugin"}, "does not list modality_steer"),
    ],
    ids=[
        "raw-default-without-allow",
        "max-gain-below-default",
        "default-over-max",
        "enforce-off",
        "plugins-allow-list",
    ],
)
def test_serve_refuses_defaults_a_request_could_not_send(tiny_llava, llava_profile, args, env, needle):
    done = _serve_cli(tiny_llava, llava_profile, *args, env={**os.environ, **env})
    assert done.returncode == 2, done.stderr[-2000:]
    assert needle in done.stderr, done.stderr[-2000:]


def _plain_launch(model: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--port",
            str(free_port()),
            *CPU_DEFAULT_ARGS,
            "--enforce-eager",
            *args,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
        env=engine_env(**env),
    )


def test_plain_launch_refuses_the_same_defaults_and_engine_limits(tiny_llava, llava_profile):
    """Without `serve`: every process checks the settings when the plugin loads, and each worker the
    engine's limits, before anything is served."""
    env = {"MODALITY_STEER_PROFILE": str(llava_profile), "MODALITY_STEER_MAX_GAIN": "2"}
    done = _plain_launch(tiny_llava, env)
    assert done.returncode != 0 and "below the profile's default_gain" in done.stdout + done.stderr
    env = {"MODALITY_STEER_PROFILE": str(llava_profile)}
    done = _plain_launch(tiny_llava, env, "--max-num-batched-tokens", "70000", "--max-model-len", "256")
    assert done.returncode != 0
    assert "70000 tokens per step (the kernel takes 65536" in done.stdout + done.stderr


# --------------------------------------------------------------------------------------------------
# Entry points that never pass through the HTTP app.
# --------------------------------------------------------------------------------------------------

OFFLINE = """
import json, sys
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=4,
              kv_cache_memory_bytes=256 * 2**20)
    def run(spec):
        extra = None if spec is None else {"modality_steer": spec}
        params = SamplingParams(max_tokens=3, temperature=0, logprobs=5, ignore_eos=True, extra_args=extra)
        try:
            out = llm.generate(["USER: What colour is the object?\\nASSISTANT:"], params, use_tqdm=False)
        except Exception as exc:
            return {"error": type(exc).__name__ + ": " + str(exc)}
        output = out[0].outputs[0]
        if output.finish_reason == "error":
            return {"error": "finished with an error"}
        return {"steps": [sorted((k, round(v.logprob, 5)) for k, v in step.items()) for step in output.logprobs]}
    cases = [("implicit", None), ("explicit", "text"), ("off", "off"), ("invalid", "bogus")]
    results = {name: run(spec) for name, spec in cases}
    # The EngineCore alone: undo the hook where requests are built; the engine still decides.
    from vllm.v1.engine.input_processor import InputProcessor
    InputProcessor.process_inputs = InputProcessor.process_inputs.__wrapped__
    results["engine_only"] = {name: run(spec) for name, spec in cases}
    print("RESULTS " + json.dumps(results))
"""


def test_offline_llm_applies_the_default_and_validation(tiny_llava, llava_profile, tmp_path):
    env = engine_env(MODALITY_STEER_PROFILE=str(llava_profile), MODALITY_STEER_DEFAULT="text")
    results = run_engine_script(OFFLINE, tiny_llava, tmp_path, env)
    assert results["implicit"] == results["explicit"] and "steps" in results["implicit"]
    assert results["off"]["steps"] != results["implicit"]["steps"]  # the default really steers
    assert "modality_steer" in results["invalid"]["error"] and "unknown mode" in results["invalid"]["error"]
    engine_only = results["engine_only"]
    for name in ("implicit", "explicit", "off"):
        assert engine_only[name] == results[name], name
    assert engine_only["invalid"] == {"error": "finished with an error"}  # that request only


def test_run_batch_applies_the_enforcement_and_validation(tiny_llava, llava_profile, tmp_path):
    model = str(tiny_llava)

    def line(custom_id: str, steer: Any) -> str:
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": "What colour is the object?"}],
            "max_tokens": 3,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 5,
            "ignore_eos": True,
        }
        if steer is not None:
            body["modality_steer"] = steer
        return json.dumps(
            {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
        )

    requests = tmp_path / "in.jsonl"
    requests.write_text(
        "\n".join(
            [
                line("implicit", None),
                line("explicit", "text"),
                line("forbidden", "image"),
                line("invalid", "bogus"),
            ]
        )
        + "\n"
    )
    results = tmp_path / "out.jsonl"
    env = engine_env(MODALITY_STEER_PROFILE=str(llava_profile), MODALITY_STEER_ENFORCE="text")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.run_batch",
            "-i",
            str(requests),
            "-o",
            str(results),
            "--model",
            model,
            *CPU_DEFAULT_ARGS,
            "--enforce-eager",
            "--max-model-len",
            "256",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    by_id = {r["custom_id"]: r for r in map(json.loads, results.read_text().splitlines())}
    implicit, explicit = (by_id[k]["response"] for k in ("implicit", "explicit"))
    assert implicit["status_code"] == explicit["status_code"] == 200
    steps = [
        [
            {t["token"]: t["logprob"] for t in step["top_logprobs"]}
            for step in r["body"]["choices"][0]["logprobs"]["content"]
        ]
        for r in (implicit, explicit)
    ]
    for got, want in zip(*steps, strict=True):
        assert set(got) == set(want) and all(abs(got[t] - want[t]) < 1e-4 for t in got)
    assert by_id["forbidden"]["response"]["status_code"] == 403
    assert by_id["invalid"]["response"]["status_code"] == 400
    assert "unknown mode" in json.dumps(by_id["invalid"])


# --------------------------------------------------------------------------------------------------
# Slots under preemption: more configurations than slots, with the KV cache forcing preemption.
# --------------------------------------------------------------------------------------------------

PREEMPT_PROMPT = "USER: " + " ".join(["What colour is the object ?"] * 16) + "\nASSISTANT:"
PREEMPT_TOKENS = 270


def _preemptions(server: Any) -> float:
    text = http_request(server, "/metrics").body.decode()
    return sum(
        float(x.rpartition(" ")[2]) for x in text.splitlines() if x.startswith("vllm:num_preemptions_total")
    )


@pytest.mark.parametrize("scheduling", ["fcfs", "priority"])
def test_preemption_with_more_configurations_than_slots(scheduling):
    """16 completions of ~100 prompt and 270 output tokens, each with its own gain, sent 0.3 s apart (each
    later one with a higher priority), on the toy model with 4 sequences and an 8 MiB KV cache: vLLM
    preempts (its counter says so); under priority scheduling the preempted requests stay in the runner
    while newer ones run, so the workers track more configurations than they have slots. Every request
    completes with its own steering (the same tokens as alone) and the engine stays alive."""
    model = toy_model_dir()
    count = 16
    server = VllmServer(
        model,
        ["--max-model-len", "380", "--max-num-seqs", "4", "--enforce-eager", "--dtype", "float32"],
        profile=toy_profile_path(),
        steer_args=["--allow-raw-heads"],
        cpu_defaults=False,
    )
    server.extra_args += ["--kv-cache-memory-bytes", str(8 * 2**20), "--scheduling-policy", scheduling]
    with server:

        def body(index: int) -> dict[str, Any]:
            return {
                "model": str(model),
                "prompt": PREEMPT_PROMPT,
                "max_tokens": PREEMPT_TOKENS,
                "temperature": 0,
                "ignore_eos": True,
                # Its own gain on every head of the first layer: a different configuration per request,
                # strong enough to change what a text-only prompt is answered.
                "modality_steer": {"heads": [[0, head, round(0.2 * index, 2)] for head in range(8)]},
                **({"priority": count - index} if scheduling == "priority" else {}),
            }

        def send(index: int) -> Reply:
            time.sleep(0.3 * index)
            return http_request(server, "/v1/completions", "POST", body=body(index))

        before = _preemptions(server)
        with ThreadPoolExecutor(max_workers=count) as pool:
            replies = list(pool.map(send, range(count)))
        assert all(r.status == 200 for r in replies), [r for r in replies if r.status != 200]
        texts = [r.json()["choices"][0]["text"] for r in replies]
        assert len(set(texts)) > 1  # the gains matter
        assert _preemptions(server) > before, "the test must force preemption"
        slots = server_state(server)["workers"][0]["max_slots"]
        if scheduling == "priority":
            # The worker's high-water mark: more configurations in flight (running and preempted) than slots.
            peak = server_state(server)["workers"][0]["requests_tracked_peak"]
            assert peak > slots, (peak, slots)
        assert server.healthy()
        for index, text in enumerate(texts):
            alone = http_request(server, "/v1/completions", "POST", body=body(index))
            assert alone.status == 200 and alone.json()["choices"][0]["text"] == text, index
        state = server_state(server)["workers"]
        assert all(w["slots_in_use"] == 0 and w["requests_tracked"] == 0 for w in state), state
