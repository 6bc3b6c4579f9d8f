"""Helpers shared by the serving tests: a tiny model's profile, requests, and the transformers reference."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from steer_server.architectures import geometry_of
from steer_server.data.prompts import openai_messages
from steer_server.data.schema import LoadedSample
from steer_server.hf.hooks import scale_heads
from steer_server.hf.model import LoadedModel, encode
from steer_server.profile import Profile, load_profile
from steer_server.serving.launcher import VllmServer
from steer_server.spec import effective_gains, gains_matrix, parse_spec

MAX_TOKENS = 4
BASE_ARGS = ["--max-model-len", "256", "--max-num-seqs", "16"]
SPECS = ["off", "image", "text", {"follow": "text", "gain": 0}, {"heads": [[0, 1, 0.0], [1, 2, 4.0]]}]
SPEC_IDS = ["off", "image", "text", "block-text", "raw-heads"]

# The profile of the example: the smallest valid profile, 8 layers x 8 heads.
MINIMAL_PROFILE: dict[str, Any] = {
    "format": "modality-steer.profile/v1",
    "model": {
        "architecture": "LlavaForConditionalGeneration",
        "num_layers": 8,
        "num_heads": 8,
        "head_dim": 32,
    },
    "default_gain": 2.0,
    "modes": {
        "image": {"heads": [{"layer": 5, "head": 3, "score": 0.41}]},
        "text": {"heads": [{"layer": 6, "head": 1, "score": 0.37}]},
    },
}


def write_profile(model_dir: Path, path: Path, *, fingerprint: str | None = None) -> Path:
    """A hand-made profile for a tiny random model: two image heads, one text head."""
    config = json.loads((model_dir / "config.json").read_text())
    text = config["text_config"]
    heads = text["num_attention_heads"]
    profile = {
        "format": "modality-steer.profile/v1",
        "model": {
            "architecture": config["architectures"][0],
            "num_layers": text["num_hidden_layers"],
            "num_heads": heads,
            "head_dim": text.get("head_dim") or text["hidden_size"] // heads,
        },
        "default_gain": 3.0,
        "modes": {
            "image": {
                "heads": [
                    {"layer": 1, "head": 0, "score": 0.5},
                    {"layer": 0, "head": heads - 1, "score": 0.3},
                ]
            },
            "text": {"heads": [{"layer": 1, "head": heads - 1, "score": 0.4}]},
        },
    }
    if fingerprint:
        profile["model"]["fingerprint"] = fingerprint
    path.write_text(json.dumps(profile))
    return path


def image_url(colour: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat(
    client: Any,
    model: str,
    loaded: LoadedSample,
    steer: Any = None,
    max_tokens: int = MAX_TOKENS,
    token_ids: bool = False,
    kv_transfer_params: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """A greedy chat request with top-5 logprobs; `token_ids`: tokens come back as ``token_id:N`` (for
    byte-level vocabularies whose token strings do not survive detokenisation); `kv_transfer_params` as
    vLLM's disaggregated-prefill proxies send them."""
    extra: dict[str, Any] = {"ignore_eos": True}
    if kv_transfer_params is not None:
        extra["kv_transfer_params"] = kv_transfer_params
    if token_ids:
        extra["return_tokens_as_token_ids"] = True
    if steer is not None:
        extra["modality_steer"] = steer
    return client.chat.completions.create(
        model=model,
        messages=openai_messages(loaded),
        max_tokens=max_tokens,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
        extra_body=extra,
        **kwargs,
    )


def served_steps(reply: Any) -> list[tuple[str, dict[str, float]]]:
    return [
        (step.token.strip(), {t.token.strip(): t.logprob for t in step.top_logprobs})
        for step in reply.choices[0].logprobs.content
    ]


def reference_steps(
    loaded_model: LoadedModel,
    profile: Profile,
    sample: LoadedSample,
    steer: Any,
    token_ids: bool = False,
    drop_inputs: tuple[str, ...] = (),
) -> list[tuple[str, dict[str, float]]]:
    """Greedy steps and top-5 logprobs from transformers with the same gains (pre-hooks on o_proj);
    `token_ids`: tokens named ``token_id:N`` as vLLM names them with `return_tokens_as_token_ids`;
    `drop_inputs`: processor outputs withheld from the model."""
    geometry = geometry_of(loaded_model.model.config)
    spec = parse_spec(steer if steer is not None else "off", geometry=geometry, allow_raw_heads=True)
    gains = gains_matrix(effective_gains(spec, profile), geometry)
    batch = {k: v for k, v in encode(loaded_model, [sample]).items() if k not in drop_inputs}
    tokenizer = loaded_model.processor.tokenizer
    with torch.inference_mode(), scale_heads(loaded_model.model, gains):
        out = loaded_model.model.generate(
            **batch,
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            eos_token_id=None,
            pad_token_id=tokenizer.pad_token_id,
        )

    def name(token: int) -> str:
        return f"token_id:{token}" if token_ids else str(tokenizer.convert_ids_to_tokens(token))

    steps = []
    for logits in out.logits:
        logprobs = torch.log_softmax(logits[0].float(), dim=-1)
        top = torch.topk(logprobs, 5)
        words = {name(int(i)): float(v) for v, i in zip(top.values, top.indices, strict=True)}
        steps.append((name(int(logprobs.argmax())), words))
    return steps


def profile_of(path: Path) -> Profile:
    return load_profile(path)


def serve(model, profile, *extra, steer_args=("--allow-raw-heads",), env=None):
    """`modality-steer serve` on a tiny model (raw heads allowed unless steer_args say otherwise)."""
    return VllmServer(model, [*BASE_ARGS, *extra], profile=profile, steer_args=list(steer_args), env=env)


def assert_same_steps(got, expected, tolerance):
    assert [token for token, _ in got] == [token for token, _ in expected]
    for (_, got_top), (_, want_top) in zip(got, expected, strict=True):
        for word, logprob in want_top.items():
            if logprob > -20:  # ranks among near-zero probabilities are not comparable
                assert math.isclose(got_top[word], logprob, abs_tol=tolerance), (word, got_top, want_top)


def engine_env(**variables: str) -> dict[str, str]:
    """This process's environment with `variables`, without the Triton interpreter switch of the test
    session (an engine must never inherit it)."""
    return {k: v for k, v in {**os.environ, **variables}.items() if k != "TRITON_INTERPRET"}


def run_engine_script(source: str, model: Path, tmp_path: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run `source` (a script that starts an engine on `model`, its first argument) in a fresh process and
    return the JSON it prints after ``RESULTS ``."""
    script = tmp_path / "engine_script.py"
    script.write_text(source)
    done = subprocess.run(
        [sys.executable, str(script), str(model)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
        check=False,
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line is not None, done.stdout[-2000:] + done.stderr[-3000:]
    return dict(json.loads(line.removeprefix("RESULTS ")))


# --------------------------------------------------------------------------------------------------
# HTTP: one request function for every test (urllib against a running server, no client library between
# the test and the wire) and the same shape from an in-process app (Starlette's test client).
# --------------------------------------------------------------------------------------------------

# The probes every deployment answers without credentials (steer_server.serving.api.PUBLIC_PROBES, pinned).
PUBLIC_PROBES = ["/health", "/metrics", "/ping", "/version"]


@dataclass(frozen=True)
class Reply:
    """One HTTP answer, also for 4xx / 5xx: its status, headers (names lower-cased) and body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON (NaN and Infinity literals accepted, as Python's json reads them)."""
        return json.loads(self.body)


# (method, path, key, body) -> Reply: a request to a running server or to an in-process app.
Send = Callable[[str, str, "str | None", Any], Reply]


def http_request(
    target: Any,
    path: str = "",
    method: str = "GET",
    *,
    key: str | None = None,
    body: Any = None,
    timeout: float = 120,
) -> Reply:
    """One request to `target` (a base URL or a VllmServer) + `path`; `key` as a bearer token; `body` as
    JSON (bytes as they are, so NaN literals or malformed JSON can be sent; not sent with GET / HEAD)."""
    base = target if isinstance(target, str) else target.base_url
    headers, data = _request_parts(method, key, body)
    request = urllib.request.Request(base + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Reply(response.status, _lower(response.headers), response.read())
    except urllib.error.HTTPError as error:
        return Reply(error.code, _lower(error.headers), error.read())


def _request_parts(method: str, key: str | None, body: Any) -> tuple[dict[str, str], bytes | None]:
    """The headers and body bytes of a request (see :func:`http_request`)."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = None
    if body is not None and method not in ("GET", "HEAD"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return headers, data


def _lower(headers: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def server_send(server: Any, root: str = "") -> Send:
    """:data:`Send` for a running server (under its `--root-path` `root`)."""
    return lambda method, path, key, body: http_request(server, root + path, method, key=key, body=body)


def client_send(client: Any, root: str = "") -> Send:
    """:data:`Send` for an in-process app behind Starlette's `TestClient`."""

    def send(method: str, path: str, key: str | None, body: Any) -> Reply:
        headers, content = _request_parts(method, key, body)
        answer = client.request(method, root + path, content=content, headers=headers)
        return Reply(answer.status_code, _lower(answer.headers), answer.content)

    return send


def server_state(server: Any, *, key: str | None = None, root: str = "") -> dict[str, Any]:
    """`GET /v1/modality_steer/state` of `server` (a VllmServer)."""
    reply = http_request(server, f"{root}/v1/modality_steer/state", key=key, timeout=60)
    assert reply.status == 200, reply
    return dict(reply.json())


def generated_tokens(base_url: str) -> float:
    """vLLM's count of generated tokens, from /metrics (a public probe)."""
    reply = http_request(base_url, "/metrics")
    assert reply.status == 200
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in reply.body.decode().splitlines()
        if line.startswith("vllm:generation_tokens_total")
    )


WALK_BODY_TEXT = "What colour is the object?"


def generation_bodies(model: str, messages: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A greedy request without steering for every route of vLLM 0.32's app that reaches generation (chat
    with `messages`; logprobs where the route has them); a steered route missing here fails the tests that
    walk the steered routes."""
    return {
        "/v1/chat/completions": {
            "model": model,
            "messages": messages,
            "max_tokens": 3,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 5,
            "ignore_eos": True,
        },
        "/v1/completions": {
            "model": model,
            "prompt": f"USER: {WALK_BODY_TEXT}\nASSISTANT:",
            "max_tokens": 3,
            "temperature": 0,
            "logprobs": 5,
            "ignore_eos": True,
        },
        "/v1/responses": {"model": model, "input": WALK_BODY_TEXT, "max_output_tokens": 3, "temperature": 0},
        "/v1/messages": {
            "model": model,
            "messages": [{"role": "user", "content": WALK_BODY_TEXT}],
            "max_tokens": 3,
            "temperature": 0,
        },
    }


def walk_body(model: str) -> dict[str, Any]:
    """One body that every route of vLLM's app would accept as a request (completion, chat, responses)."""
    return {
        "model": model,
        "prompt": f"USER: {WALK_BODY_TEXT}\nASSISTANT:",
        "messages": [{"role": "user", "content": WALK_BODY_TEXT}],
        "input": WALK_BODY_TEXT,
        "max_tokens": 2,
    }


def assert_every_route_needs_the_key(
    send: Send, model: str, key: str, nothing_reached: Callable[[], bool]
) -> None:
    """Every route of the app (from its own route table, every method it takes, path parameters filled
    in): without the key 401 (vLLM's own answer) and `nothing_reached()` stays true, unless it is a public
    probe; with the key, steering errors are answered again (a steered and a refused route).

    Args:
        send: a running server's or an in-process app's :data:`Send` (with its root path).
        nothing_reached: whether no unauthenticated request got through (a server: no token generated;
            an in-process app: nothing passed the middleware).
    """
    reply = send("GET", "/v1/modality_steer/state", key, None)
    assert reply.status == 200, reply
    routes = reply.json()["routes"]
    assert routes["public"] == PUBLIC_PROBES  # pinned: a probe vLLM adds or renames fails here
    body = walk_body(model)
    walked = 0
    for path, methods in routes["methods"].items():
        filled = path.replace("{", "").replace("}", "").replace(":path", "")
        for method in methods:
            if method == "WEBSOCKET":
                continue  # no HTTP method reaches a websocket route; tests/test_api_key.py covers the handshake
            method = "POST" if method == "*" else method
            reply = send(method, filled, None, body)
            walked += 1
            if path in PUBLIC_PROBES:
                assert reply.status != 401, (method, path)
                continue
            assert reply.status == 401, (method, path, reply.status, reply.body[:200])
            if method != "HEAD":  # a HEAD answer has no body
                assert reply.json() == {"error": "Unauthorized"}, (method, path, reply.body[:200])
    assert walked >= 30, walked  # every method of every route of vLLM 0.32's app (40 here)
    assert nothing_reached(), "an unauthenticated request got through"
    for path in ("/v1/chat/completions", "/invocations"):
        reply = send("POST", path, key, {**body, "modality_steer": "bogus"})
        assert reply.status == 400 and reply.json()["error"]["param"] == "modality_steer", (path, reply)


# --------------------------------------------------------------------------------------------------
# vLLM's own app, in-process: the policy tested in milliseconds per request.
# --------------------------------------------------------------------------------------------------

# The rows of the adapter that put the middleware into vLLM's app (steer_server/serving/vllm_adapter).
APP_ROWS = ("api.init_entrypoints_middleware", "api.launcher_init_entrypoints_middleware")
# Answered by vLLM's handlers in-process (they need no engine); the stand-in answers every other request.
APP_PASS_THROUGH = frozenset({"/openapi.json"})


class _StandIn:
    """The innermost middleware of an in-process app: records each request that got past modality-steer to
    a route that takes it (method, path, the body as it was handed on) and answers it with 200 in vLLM's
    place (there is no engine); :data:`APP_PASS_THROUGH` and requests no route takes go on to vLLM's
    router."""

    def __init__(self, app: Any, reached: list[tuple[str, str, bytes]]) -> None:
        self.app = app
        self.reached = reached

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if path in APP_PASS_THROUGH or not _routed(scope):
            await self.app(scope, receive, send)  # vLLM's router answers 404 / 405 itself
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.reached.append((scope["method"], path, body))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"reached": "vllm"}'})


def _routed(scope: Any) -> bool:
    """Whether a route of the app takes the request (path and method), as the router matches it."""
    from starlette.routing import Match

    return any(route.matches(scope)[0] == Match.FULL for route in scope["app"].routes)


@dataclass
class InProcessApp:
    """vLLM's OpenAI-compatible app as `vllm serve` builds it (`build_app`, every router of this vLLM, its
    `--api-key` middleware), with the plugin's adapter rows installed, behind Starlette's test client; no
    engine: a stand-in answers whatever gets past modality-steer and records it in `reached`."""

    app: Any
    client: Any
    reached: list[tuple[str, str, bytes]]
    root: str = ""
    key: str | None = None  # the first `--api-key`, sent by :meth:`post`

    def send(self) -> Send:
        return client_send(self.client, self.root)

    def post(self, path: str, body: Any, *, prefixed: bool = True) -> Reply:
        """POST `body` with the app's key, under its root path unless `prefixed` is false."""
        return client_send(self.client, self.root if prefixed else "")("POST", path, self.key, body)

    def steered_bodies(self) -> list[dict[str, Any]]:
        """The JSON bodies handed on to vLLM so far."""
        return [json.loads(body) for _, _, body in self.reached if body]


class _Exec(Exception):
    """Raised in place of `os.execvp` by :func:`serve_command`: the command `modality-steer serve` would run."""

    def __init__(self, command: list[str]) -> None:
        super().__init__(command)
        self.command = command


def serve_command(model: Path, profile: Path, args: tuple[str, ...]) -> list[str]:
    """What `modality-steer serve MODEL --profile PROFILE ARGS` would run (its `os.execvp` replaced): the
    vLLM command line; the deployment's settings are then in this process's environment, as the CLI puts
    them there for every process of the deployment. The caller restores the environment.

    Raises:
        AssertionError: serve refused the arguments (its message included).
    """
    from unittest import mock

    from typer.testing import CliRunner

    from steer_server.cli import app

    def execvp(file: str, command: list[str]) -> None:
        raise _Exec(command)

    with mock.patch("os.execvp", execvp):
        result = CliRunner().invoke(app, ["serve", str(model), "--profile", str(profile), *args])
    assert isinstance(result.exception, _Exec), (result.exit_code, result.output)
    return list(result.exception.command)


def build_vllm_app(model: Path, profile: Path, args: tuple[str, ...] = ()) -> InProcessApp:
    """vLLM's app as `modality-steer serve MODEL --profile PROFILE ARGS` would start it (ARGS: the CLI's own
    flags, e.g. ``--enforce-steer text``, and vLLM's, e.g. ``--api-key K``), in this process: the CLI turns
    its flags into the deployment's settings (:func:`serve_command`), and vLLM's parser and `build_app`
    build the app from the vLLM arguments.

    Hermetic: the settings hold for this app only (its middleware and OpenAPI document are built here),
    and the process is left as it was: environment, adapter rows (only the two that put the middleware
    into the app are installed, then removed) and vLLM's general plugins (not loaded by the argument
    parser here, so the plugin does not register in this process).

    Unlike a served app: the supported tasks are fixed to ``("generate",)`` and no model config is read;
    there is no engine, no start-up handshake and no canary run; whatever gets past modality-steer to a
    route is answered 200 by the stand-in (where vLLM would validate the body and generate).
    tests/test_serving_policy.py compares a running server's route table with this app's.
    """
    import vllm.plugins
    from starlette.middleware import Middleware
    from starlette.testclient import TestClient
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from steer_server.serving.policy import policy
    from steer_server.serving.settings import settings
    from steer_server.serving.vllm_adapter import hooks, table

    saved_env = dict(os.environ)
    saved_rows = {key for key in _adapter_row_keys() if table.installed(key)}
    saved_plugins_loaded = vllm.plugins.plugins_loaded
    try:
        os.environ.pop("VLLM_API_KEY", None)
        command = serve_command(model, profile, args)
        vllm_args = command[command.index("serve") + 2 :]  # after `serve MODEL`
        settings.cache_clear()
        policy.cache_clear()
        vllm.plugins.plugins_loaded = True  # the parser would load (register) the plugin: the whole adapter
        for key in APP_ROWS:
            if not table.installed(key):
                table.install(key, hooks._init_entrypoints_middleware)
        parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", str(model), *vllm_args])
        app = build_app(parsed, ("generate",))
        reached: list[tuple[str, str, bytes]] = []
        app.user_middleware.append(Middleware(_StandIn, reached=reached))
        app.middleware_stack = app.build_middleware_stack()
        app.openapi()
        app.state.engine_client = _ArmedEngine(settings())
    finally:
        vllm.plugins.plugins_loaded = saved_plugins_loaded
        for key in _adapter_row_keys():
            if table.installed(key) and key not in saved_rows:
                table.uninstall(key)
        os.environ.clear()
        os.environ.update(saved_env)
        settings.cache_clear()
        policy.cache_clear()
    root = parsed.root_path or ""
    key = parsed.api_key[0] if parsed.api_key else None
    return InProcessApp(app, TestClient(app, root_path=root), reached, root, key)


def _adapter_row_keys() -> list[str]:
    """Every row key of the adapter table."""
    from steer_server.serving.vllm_adapter.table import ROWS

    return [row.key for row in ROWS]


class _ArmedEngine:
    """An engine client whose one worker reports steering armed with the app's settings (for the state
    endpoint; the shape of steer_server.serving.vllm_adapter.hooks.report_worker_state)."""

    def __init__(self, plugin: Any) -> None:
        self.plugin = plugin

    async def collective_rpc(self, method: str) -> list[dict[str, Any]]:
        return [
            {"armed": True, "settings_id": self.plugin.settings_id, "slots_in_use": 0, "requests_tracked": 0}
        ]
