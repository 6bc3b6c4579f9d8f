"""Hardening against a real server on loopback: fuzzed values, load, client faults, engine death.

Every case ends with the server still healthy (except the engine-death test, the module's last on it,
whose server must stop serving instead of serving unsteered). Each kind of bad value, one row per case,
is answered by the policy before vLLM sees it: tested on vLLM's app in-process (tests/test_policy_app.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
import pytest
from helpers import http_request, serve, server_state
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steer_server.data.prompts import openai_messages, user_text
from steer_server.data.schema import LoadedSample

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROUTES = ("/v1/chat/completions", "/v1/completions")
# CI sends fewer concurrent requests than the full load test (`make bench` sets 200).
LOAD_REQUESTS = int(os.environ.get("MODALITY_STEER_LOAD_REQUESTS", "48"))
# Long enough for requests that are still generating when a client goes away (overrides BASE_ARGS);
# the servers here run a copy of the tiny model whose config allows it (its weights are the same).
# Long enough that a request is still running when a test, slowed by a loaded machine, looks at it.
LONG_CONTEXT = ("--max-model-len", "32768")
LONG_GENERATION = 30000


@pytest.fixture(scope="module")
def long_llava(tiny_llava, tmp_path_factory):
    """The tiny LLaVA with max_position_embeddings 32768 (RoPE, random weights: any length is as good)."""
    import shutil

    folder = tmp_path_factory.mktemp("long-llava") / "model"
    shutil.copytree(tiny_llava, folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 32768
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def open_server(long_llava, llava_profile):
    """Raw heads allowed, max gain 8 (the default); vLLM logs aborts (the abort test reads them). The
    engine-death test, the module's last, kills it."""
    with serve(
        long_llava, llava_profile, "--enforce-eager", "--enable-log-requests", *LONG_CONTEXT
    ) as server:
        yield server


def base_body(model: str, route: str, sample: LoadedSample) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": 1, "temperature": 0}
    if route == "/v1/chat/completions":
        body["messages"] = openai_messages(sample)
    else:
        body["prompt"] = "USER: What colour is the object? ASSISTANT:"
    return body


def worker_state(server: Any) -> list[dict[str, Any]]:
    return list(server_state(server)["workers"])


def wait_for_state(server: Any, holds: Any, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The workers' state once `holds(state)` is true (or the last seen at timeout), polled every 0.1 s:
    a step runs between a request's arrival and its slot, longer on a loaded machine."""
    deadline = time.monotonic() + timeout
    state = worker_state(server)
    while not holds(state) and time.monotonic() < deadline:
        time.sleep(0.1)
        state = worker_state(server)
    return state


def wait_until_released(server: Any, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The workers' state once no slot is held and no request is tracked (or the last seen at timeout)."""
    return wait_for_state(
        server,
        lambda state: all(w["slots_in_use"] == 0 and w["requests_tracked"] == 0 for w in state),
        timeout,
    )


def assert_server_still_serves(server: Any, model: str, sample: LoadedSample) -> None:
    assert server.healthy()
    reply = http_request(
        server, ROUTES[0], "POST", body={**base_body(model, ROUTES[0], sample), "modality_steer": "image"}
    )
    assert reply.status == 200 and reply.headers["x-modality-steer"].startswith("mode=image"), reply


# --------------------------------------------------------------------------------------------------
# A body too large, and fuzzing (each kind of bad value, one row per case: tests/test_policy_app.py).
# --------------------------------------------------------------------------------------------------


def test_oversized_body_gets_413(open_server, long_llava, serve_samples):
    """Over the wire the body arrives in many chunks, and the answer comes before the last of them."""
    from steer_server.serving.api import MAX_BODY_BYTES

    body = base_body(str(long_llava), ROUTES[1], serve_samples[0])
    body["prompt"] = "x" * (MAX_BODY_BYTES + 1)
    reply = http_request(open_server, ROUTES[1], "POST", body=body)
    assert reply.status == 413, reply
    assert_server_still_serves(open_server, str(long_llava), serve_samples[0])


JSON_SCALARS = st.none() | st.booleans() | st.integers(-(10**9), 10**9) | st.floats() | st.text(max_size=12)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)
NUMBERS = st.integers(-5, 12) | st.floats()
NEAR_VALID = st.one_of(
    st.sampled_from(["off", "image", "text", " image ", "IMAGE", ""]),
    st.fixed_dictionaries({"follow": st.sampled_from(["image", "text", "both", ""]), "gain": NUMBERS}),
    st.fixed_dictionaries(
        {"heads": st.lists(st.lists(NUMBERS, min_size=0, max_size=4), min_size=0, max_size=10)}
    ),
)
STEER_VALUES = st.one_of(JSON_VALUES, NEAR_VALID, NEAR_VALID.map(lambda v: json.dumps(v)))
PLACEMENTS = st.sampled_from(["top", "xargs", "xargs-raw"])


@pytest.mark.parametrize("route", ROUTES)
def test_fuzzed_modality_steer_never_gets_a_5xx(open_server, long_llava, serve_samples, route):
    seen: dict[int, int] = {}

    @settings(
        max_examples=int(os.environ.get("MODALITY_STEER_FUZZ_EXAMPLES", "120")),
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(value=STEER_VALUES, placement=PLACEMENTS)
    def case(value: Any, placement: str) -> None:
        body = base_body(str(long_llava), route, serve_samples[0])
        if placement == "top":
            body["modality_steer"] = value
        elif placement == "xargs":
            body["vllm_xargs"] = {"modality_steer": value if isinstance(value, str) else json.dumps(value)}
        else:
            body["vllm_xargs"] = {"modality_steer": value}
        reply = http_request(open_server, route, "POST", body=body)
        seen[reply.status] = seen.get(reply.status, 0) + 1
        assert reply.status < 500, (body.get("modality_steer"), body.get("vllm_xargs"), reply)
        if reply.status == 400:
            assert reply.json()["error"]["param"] == "modality_steer", reply
        else:
            assert reply.status == 200, reply

    case()
    assert seen.get(200) and seen.get(400), seen  # the fuzzer reached both sides of the validation
    assert_server_still_serves(open_server, str(long_llava), serve_samples[0])


# --------------------------------------------------------------------------------------------------
# Load: many concurrent requests of mixed steering.
# --------------------------------------------------------------------------------------------------

LOAD_SPECS: list[Any] = [
    None,
    "image",
    "text",
    {"follow": "text", "gain": 0},
    {"follow": "image", "gain": 1.5},
    {"heads": [[0, 1, 0.0], [1, 2, 4.0]]},
    {"heads": [[1, 0, 2.5]]},
    "off",
]


def _load_request(index: int, model: str, samples: list[LoadedSample]) -> tuple[str, dict[str, Any]]:
    spec = LOAD_SPECS[index % len(LOAD_SPECS)]
    sample = samples[index % len(samples)]
    route = ROUTES[(index // len(LOAD_SPECS)) % 2]
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": 6,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": True if route == ROUTES[0] else 1,
    }
    if route == ROUTES[0]:
        body["messages"] = openai_messages(sample)
    else:
        body["prompt"] = f"USER: {user_text(sample.sample)} ASSISTANT:"
    if spec is not None:
        body["modality_steer"] = spec
    return route, body


def _tokens(route: str, reply: dict[str, Any]) -> list[str]:
    choice = reply["choices"][0]
    if route == ROUTES[0]:
        return [step["token"] for step in choice["logprobs"]["content"]]
    return list(choice["logprobs"]["tokens"])


def _server_rss(server: Any) -> int:
    root = psutil.Process(server.process.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def test_concurrent_mixed_load_completes_exactly_and_releases_every_slot(
    open_server, long_llava, serve_samples
):
    model = str(long_llava)
    requests = [_load_request(i, model, serve_samples) for i in range(LOAD_REQUESTS)]
    alone = [
        _tokens(route, http_request(open_server, route, "POST", body=body).json()) for route, body in requests
    ]

    def timed(item: tuple[str, dict[str, Any]]) -> tuple[int, Any, float]:
        started = time.perf_counter()
        reply = http_request(open_server, item[0], "POST", body=item[1], timeout=300)
        return reply.status, reply.json(), time.perf_counter() - started

    rss = [_server_rss(open_server)]
    latencies: list[float] = []
    for _wave in range(2):
        with ThreadPoolExecutor(max_workers=LOAD_REQUESTS) as pool:
            results = list(pool.map(timed, requests))
        assert [status for status, _, _ in results] == [200] * LOAD_REQUESTS, [
            r for r in results if r[0] != 200
        ]
        together = [
            _tokens(route, reply) for (route, _), (_, reply, _) in zip(requests, results, strict=True)
        ]
        assert together == alone
        latencies += [seconds for _, _, seconds in results]
        state = wait_until_released(open_server)
        assert all(w["slots_in_use"] == 0 and w["requests_tracked"] == 0 for w in state), state
        rss.append(_server_rss(open_server))
    growth = (rss[2] - rss[1]) / 2**20
    assert growth < 64, f"server memory grew by {growth:.0f} MiB over the second wave: {rss}"
    quantiles = statistics.quantiles(latencies, n=100)
    report = {
        "requests_per_wave": LOAD_REQUESTS,
        "waves": 2,
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_p99_s": round(quantiles[98], 3),
        "rss_mib": [round(r / 2**20) for r in rss],
    }
    print("load:", json.dumps(report))
    out = os.environ.get("MODALITY_STEER_LOAD_JSON")
    if out:
        with open(out, "w") as handle:
            json.dump(report, handle, indent=2)


# --------------------------------------------------------------------------------------------------
# Client faults: disconnects and aborts free their slots.
# --------------------------------------------------------------------------------------------------


def _long_body(model: str, sample: LoadedSample, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": openai_messages(sample),
        "max_tokens": LONG_GENERATION,
        "ignore_eos": True,
        "modality_steer": {"follow": "image", "gain": 2.5},
        **extra,
    }


def _send_raw(server: Any, path: str, body: dict[str, Any]) -> socket.socket:
    """POST on a socket the test holds, so that it can go away while the request runs."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def test_client_disconnecting_mid_stream_frees_its_slot(open_server, long_llava, serve_samples):
    body = _long_body(str(long_llava), serve_samples[0], stream=True)
    with _send_raw(open_server, "/v1/chat/completions", body) as sock:
        received = b""
        while received.count(b"data: ") < 3:
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk
        assert b"x-modality-steer: mode=image; gain=2.5" in received
        held = wait_for_state(open_server, lambda state: sum(w["slots_in_use"] for w in state) == 1)
        assert sum(w["slots_in_use"] for w in held) == 1, held
        sock.shutdown(socket.SHUT_RDWR)
    state = wait_until_released(open_server)
    assert all(w["slots_in_use"] == 0 and w["requests_tracked"] == 0 for w in state), state
    assert_server_still_serves(open_server, str(long_llava), serve_samples[0])


def _aborted_requests(server: Any) -> int:
    """Requests vLLM says it aborted (its log: "Aborted request(s) id,id.")."""
    log = server.log_path.read_text(errors="replace")
    return sum(
        len(line.partition("Aborted request(s) ")[2].rstrip(".").split(","))
        for line in log.splitlines()
        if "Aborted request(s) " in line
    )


def test_aborted_requests_free_their_slots(open_server, long_llava):
    """Non-streaming requests whose clients go away while they run are aborted by vLLM (its abort counter
    says so); their slots go back."""
    specs = ["text", {"follow": "text", "gain": 0}, {"heads": [[0, 0, 3.0]]}]
    aborted_before = _aborted_requests(open_server)
    sockets = [
        _send_raw(
            open_server,
            "/v1/completions",
            {
                "model": str(long_llava),
                "prompt": "USER: hi ASSISTANT:",
                "max_tokens": LONG_GENERATION,
                "ignore_eos": True,
                "modality_steer": spec,
            },
        )
        for spec in specs
    ]
    held = wait_for_state(
        open_server, lambda state: sum(w["requests_steered"] for w in state) >= len(specs), timeout=120
    )
    for sock in sockets:
        sock.close()
    assert sum(w["requests_steered"] for w in held) == len(specs), held
    assert sum(w["slots_in_use"] for w in held) == len(specs), held  # three distinct configurations
    state = wait_until_released(open_server)
    assert all(w["slots_in_use"] == 0 and w["requests_tracked"] == 0 for w in state), state
    deadline = time.monotonic() + 10
    while _aborted_requests(open_server) - aborted_before < len(specs) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _aborted_requests(open_server) - aborted_before == len(specs)
    assert open_server.healthy()


# --------------------------------------------------------------------------------------------------
# Engine death: 5xx, then the server stops; it never serves again (steered or not).
# --------------------------------------------------------------------------------------------------


def _engine_core(server: Any) -> psutil.Process:
    root = psutil.Process(server.process.pid)
    for child in root.children(recursive=True):
        if "EngineCor" in child.name() or "EngineCore" in " ".join(child.cmdline()):
            return child
    raise AssertionError(f"no EngineCore process under {root.pid}: {[c.name() for c in root.children(True)]}")


def test_engine_death_gives_5xx_and_the_server_stops(open_server, long_llava, serve_samples):
    """The last test of the module on this server: it kills its engine."""
    server = open_server
    model = str(long_llava)
    assert_server_still_serves(server, model, serve_samples[0])
    os.kill(_engine_core(server).pid, signal.SIGKILL)
    statuses: list[int | str] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        for steer in ("image", None):
            body = base_body(model, ROUTES[0], serve_samples[0])
            if steer:
                body["modality_steer"] = steer
            try:
                statuses.append(http_request(server, ROUTES[0], "POST", body=body, timeout=10).status)
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
                statuses.append(type(exc).__name__)
        if server.process.poll() is not None:
            break
        time.sleep(1.0)
    assert 200 not in statuses, statuses
    assert any(isinstance(s, int) and s >= 500 for s in statuses) or server.process.poll() is not None
    assert server.process.poll() is not None, f"the server kept running without an engine: {statuses}"
    assert not server.healthy()


# --------------------------------------------------------------------------------------------------
# Malformed profiles stop startup, naming the problem; nothing is served.
# --------------------------------------------------------------------------------------------------


def _profile_text(model_dir: Any, tmp_path: Any, change: Any) -> str:
    from helpers import write_profile

    raw = json.loads(write_profile(model_dir, tmp_path / "valid.json").read_text())
    return change(raw) if callable(change) else change


BAD_PROFILES: list[tuple[str, Any, str]] = [
    (
        "missing modes",
        lambda p: json.dumps({k: v for k, v in p.items() if k != "modes"}),
        "modes: Field required",
    ),
    (
        "missing model",
        lambda p: json.dumps({k: v for k, v in p.items() if k != "model"}),
        "model: Field required",
    ),
    (
        "wrong format",
        lambda p: json.dumps({**p, "format": "modality-steer.profile/v9"}),
        "format: Input should be",
    ),
    (
        "NaN score",
        lambda p: json.dumps(p).replace('"score": 0.5', '"score": NaN'),
        "NaN is not allowed in a profile",
    ),
    (
        "head out of range",
        lambda p: json.dumps(
            {**p, "modes": {**p["modes"], "text": {"heads": [{"layer": 0, "head": 9, "score": 1}]}}}
        ),
        "layer 0 head 9 is outside the model (2 layers x 4 heads x head_dim 32)",
    ),
    (
        "negative gain",
        lambda p: json.dumps({**p, "default_gain": -2}),
        "default_gain: Input should be greater than",
    ),
    ("not JSON", "{this is not json", "not valid JSON"),
]


@pytest.mark.parametrize(("case", "change", "needle"), BAD_PROFILES, ids=[row[0] for row in BAD_PROFILES])
def test_malformed_profile_stops_serve_before_anything_starts(tiny_llava, tmp_path, case, change, needle):
    import subprocess
    import sys

    profile = tmp_path / "profile.json"
    profile.write_text(_profile_text(tiny_llava, tmp_path, change))
    done = subprocess.run(
        [sys.executable, "-m", "steer_server.cli", "serve", str(tiny_llava), "--profile", str(profile)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0, case
    assert needle in done.stderr and str(profile) in done.stderr, done.stderr[-2000:]


def test_malformed_profile_stops_a_plain_vllm_launch(tiny_llava, tmp_path):
    """The plugin's own check: `python -m vllm.entrypoints.openai.api_server` with MODALITY_STEER_PROFILE."""
    import subprocess
    import sys

    from steer_server.serving.launcher import CPU_DEFAULT_ARGS, free_port

    profile = tmp_path / "profile.json"
    profile.write_text(_profile_text(tiny_llava, tmp_path, BAD_PROFILES[3][1]))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MODALITY_STEER_PROFILE"] = str(profile)
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_llava)]
    done = subprocess.run(
        [*command, "--port", str(port), *CPU_DEFAULT_ARGS],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode != 0
    assert "NaN is not allowed in a profile" in done.stdout + done.stderr, (done.stdout + done.stderr)[-3000:]
