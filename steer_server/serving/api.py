"""What runs in the API server: the `modality_steer` request parameter, the policy's HTTP answers, the
response header, metrics, the OpenAPI document and the state endpoint.

One ASGI middleware in front of `/v1/chat/completions` and `/v1/completions` reads `modality_steer` from
the top level of the JSON body or from `vllm_xargs["modality_steer"]` (same validation for both),
applies the deployment's :class:`~steer_server.serving.policy.Policy`, and hands the engine one canonical
string in `vllm_xargs`, where vLLM carries it to the workers as `SamplingParams.extra_args`. Anything it
cannot accept is answered here, in the OpenAI error shape.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ..spec import SteerSpec, spec_json_schema
from .policy import Policy, PolicyError, rewrite
from .settings import EXTRA_ARGS_KEY, WORKER_STATE_METHOD, PluginSettings, settings

STEERED_PATHS = ("/v1/chat/completions", "/v1/completions")
# GET: the workers' steering state (slots held, requests tracked); under /v1 so that --api-key guards it.
STATE_PATH = "/v1/modality_steer/state"
HEADER = b"x-modality-steer"
MAX_BODY_BYTES = 64 * 2**20

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


# --------------------------------------------------------------------------------------------------
# Metrics (default registry, which vLLM's /metrics serves; never the `vllm:` prefix, vLLM unregisters every `vllm:*` collector when its stat logger starts).
# --------------------------------------------------------------------------------------------------


class _Metrics:
    def __init__(self, plugin: PluginSettings) -> None:
        from prometheus_client import Counter, Info

        self.requests = Counter("modality_steer_requests", "Requests by effective steering mode", ["mode"])
        self.rejected = Counter("modality_steer_rejected", "Requests refused by modality-steer", ["reason"])
        self.info = Info("modality_steer_profile", "The arbitration-head profile this server applies")
        self.info.info(
            {
                "profile_id": plugin.profile.profile_id,
                "model": plugin.profile.model.architecture,
                "profile_path": str(plugin.profile_path),
            }
        )


_METRICS: _Metrics | None = None


def metrics(plugin: PluginSettings) -> _Metrics:
    """The process's metrics (created once: prometheus collectors are process-wide)."""
    global _METRICS
    if _METRICS is None:
        _METRICS = _Metrics(plugin)
    return _METRICS


# --------------------------------------------------------------------------------------------------
# The middleware.
# --------------------------------------------------------------------------------------------------


def _header_value(spec: SteerSpec, plugin: PluginSettings) -> bytes:
    if spec.mode == "heads":
        gain = "raw"
    else:
        gain = format(plugin.profile.default_gain if spec.gain is None else spec.gain, "g")
    return f"mode={spec.mode}; gain={gain}; profile={plugin.profile.profile_id}".encode()


async def _error(send: Send, status: int, message: str) -> None:
    kind = {400: "BadRequestError", 403: "PermissionDeniedError", 413: "RequestTooLargeError"}.get(
        status, "Error"
    )
    await _json(
        send, status, {"error": {"message": message, "type": kind, "param": EXTRA_ARGS_KEY, "code": status}}
    )


class ModalitySteerMiddleware:
    """ASGI middleware: validate, apply policy, rewrite, label the response, count."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        plugin = settings()
        if plugin is None:
            raise RuntimeError("ModalitySteerMiddleware needs a profile (MODALITY_STEER_PROFILE)")
        self.plugin = plugin
        self.policy = Policy.from_environment(plugin)
        self.metrics = metrics(plugin)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") == "GET" and scope.get("path") == STATE_PATH:
            await self._state(scope, send)
            return
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in STEERED_PATHS:
            await self.app(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > MAX_BODY_BYTES:
                self.metrics.rejected.labels(reason="too_large").inc()
                await _error(send, 413, f"request body over {MAX_BODY_BYTES} bytes")
                return
            if not message.get("more_body", False):
                break
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            payload = None
        if not isinstance(payload, dict):
            # Not ours to judge: vLLM answers malformed JSON itself. Only a body that carries no
            # steering can get here (we cannot see any), so nothing is served unsteered by mistake
            # unless a policy applies, and then it is refused.
            if self.policy.enforce is not None or self.policy.default.mode != "off":
                self.metrics.rejected.labels(reason="invalid").inc()
                await _error(send, 400, "the request body is not a JSON object")
                return
            await self.app(scope, _replay(body, receive), send)
            return
        try:
            spec = self.policy.decide(payload)
            new_body = json.dumps(rewrite(payload, spec, self.policy)).encode()
        except PolicyError as exc:
            self.metrics.rejected.labels(reason=exc.reason).inc()
            await _error(send, exc.status, str(exc))
            return
        spec_header = _header_value(spec, self.plugin) if spec.mode != "off" else b""
        self.metrics.requests.labels(mode=spec.mode).inc()
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(new_body)).encode()))
        scope = dict(scope, headers=headers)

        async def labelled_send(message: Message) -> None:
            if (
                message["type"] == "http.response.start"
                and spec_header
                and 200 <= message.get("status", 500) < 300
            ):
                message = dict(message, headers=[*message.get("headers", []), (HEADER, spec_header)])
            await send(message)

        await self.app(scope, _replay(new_body, receive), labelled_send)

    async def _state(self, scope: Scope, send: Send) -> None:
        engine = getattr(getattr(scope.get("app"), "state", None), "engine_client", None)
        try:
            if engine is None:
                raise RuntimeError("no engine client on this app")
            workers = await engine.collective_rpc(WORKER_STATE_METHOD)
        except Exception as exc:  # a dead or missing engine: say so, never report an empty state
            await _json(send, 503, {"error": {"message": f"engine unavailable: {exc}", "code": 503}})
            return
        await _json(send, 200, {"profile_id": self.plugin.profile.profile_id, "workers": workers})


async def _json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Receive) -> Receive:
    """The (rewritten) body first, then the client's own messages: vLLM watches them for a disconnect,
    which is how it aborts a request whose client went away (and frees its steering slot)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


MIDDLEWARE_PATH = f"{ModalitySteerMiddleware.__module__}.{ModalitySteerMiddleware.__name__}"


def patch_api_server() -> None:
    """Install the middleware in every launch (`modality-steer serve` or a plain
    `python -m vllm.entrypoints.openai.api_server` with MODALITY_STEER_PROFILE) and document
    `modality_steer` in the OpenAPI schema.

    vLLM adds `--middleware` entries last, which makes them the outermost: they would run before
    `--api-key` authentication. This installs the middleware first instead (innermost), so an
    unauthenticated request is refused by vLLM before anything here reads it.
    """
    from vllm.entrypoints.launchers import app as launcher_app
    from vllm.entrypoints.serve.middleware import register as middleware_register

    original = middleware_register.init_entrypoints_middleware
    if getattr(original, "_modality_steer", False):
        return

    def init_entrypoints_middleware(args: Any, app: Any, *rest: Any, **kwargs: Any) -> Any:
        args.middleware = [m for m in (getattr(args, "middleware", None) or []) if m != MIDDLEWARE_PATH]
        app.add_middleware(ModalitySteerMiddleware)
        _document_parameter(app)
        return original(args, app, *rest, **kwargs)

    init_entrypoints_middleware._modality_steer = True  # type: ignore[attr-defined]
    # The launcher imported the function by name: rebind it there too.
    middleware_register.init_entrypoints_middleware = init_entrypoints_middleware
    launcher_app.init_entrypoints_middleware = init_entrypoints_middleware


def _document_parameter(app: Any) -> None:
    """Add `modality_steer` to the request schemas of the steered routes in the app's OpenAPI document."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        document: dict[str, Any] = original()
        plugin = settings()
        if plugin is None or document.get("x-modality-steer"):
            return document
        field = spec_json_schema(
            geometry=plugin.geometry, max_gain=plugin.max_gain, allow_raw_heads=plugin.allow_raw_heads
        )
        schemas = document.get("components", {}).get("schemas", {})
        for path in STEERED_PATHS:
            content = document.get("paths", {}).get(path, {}).get("post", {}).get("requestBody", {})
            for media in content.get("content", {}).values():
                refs = [media.get("schema", {})]
                refs += media.get("schema", {}).get("anyOf", [])
                for ref in refs:
                    name = ref.get("$ref", "").rpartition("/")[2]
                    if name in schemas:
                        schemas[name].setdefault("properties", {})[EXTRA_ARGS_KEY] = field
        document["x-modality-steer"] = {"profile_id": plugin.profile.profile_id}
        return document

    app.openapi = openapi
