"""What runs in the API server: the `modality_steer` request parameter, the policy's HTTP answers, the
response header, metrics, the OpenAPI document and the state endpoint.

The HTTP layer is the good experience, not the guard (the EngineCore is, :mod:`.engine_core`). One
ASGI middleware sorts every route of the running app, derived from the app itself when the first
request arrives (:func:`classify_routes`):

- *steered*: POST routes whose request model takes `vllm_xargs` (chat, completions, responses,
  messages, batch chat, ...). `modality_steer` is read from the top level of the JSON body or from
  `vllm_xargs["modality_steer"]` (same validation), the deployment's
  :class:`~steer_server.serving.policy.Policy` applied, and the canonical spec handed on in
  `vllm_xargs`; refusals are 400 / 403 in the OpenAI error shape with `param: modality_steer`, steered
  answers carry the `x-modality-steer` header;
- *inert*: routes that never reach the engine's generation (:data:`INERT_ROUTES`, and every GET);
- *refused*: every other route (deny by default): a request on it that carries `modality_steer`, or any
  request while a policy steers requests that ask for nothing, is refused with a 4xx.

Paths are matched the way the router matches them (`route.matches`, which strips `--root-path`).
Before the server answers anything, every worker of every engine must report that steering is armed
(:func:`require_armed_workers`). :mod:`.vllm_adapter` installs the middleware in vLLM's app and runs the
handshake; nothing here imports vLLM.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from ..spec import SteerSpec, spec_json_schema
from .canary import RERUN_PATH, CanaryReport, last_report, on_record, serving_blocked
from .canary import STATUSES as CANARY_STATUSES
from .kv_transfer import deployment_id
from .policy import PolicyError, asked_spec, policy, rewrite
from .settings import EXTRA_ARGS_KEY, PluginSettings, SteeringConfigError, settings

# POST routes of vLLM 0.32 that never reach the engine's generation or pooling (tokenising, rendering,
# aborting, administration). Every other non-GET route is steered (derived) or refused (by default).
INERT_ROUTES = frozenset(
    {
        "/tokenize",
        "/detokenize",
        "/v1/messages/count_tokens",
        "/v1/chat/completions/render",
        "/v1/completions/render",
        "/v1/messages/render",
        "/v1/responses/render",
        "/v1/chat/completions/derender",
        "/v1/completions/derender",
        "/v1/messages/derender",
        "/v1/responses/derender",
        "/v1/responses/{response_id}/cancel",
        "/abort_requests",
        "/inference/v1/abort_requests",
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/start_profile",
        "/stop_profile",
        "/scale_elastic_ep",
        "/is_scaling_elastic_ep",
        "/ping",
    }
)
# Mounted apps that never reach the engine (Prometheus' exposition).
INERT_MOUNTS = frozenset({"/metrics"})
# The routes that stay open without the key when the server runs with --api-key: probes that load balancers
# and scrapers call without credentials, none of which reaches the engine's generation or reads a body.
# Every other route of the running app, whatever its path, needs the key (closed by default).
PUBLIC_PROBES = frozenset({"/health", "/ping", "/version", "/metrics"})
# GET: the workers' steering state (slots held, requests tracked); needs the key under --api-key.
STATE_PATH = "/v1/modality_steer/state"
HEADER = b"x-modality-steer"
MAX_BODY_BYTES = 64 * 2**20

Scope = MutableMapping[str, Any]
# Whether a request carries one of the server's API keys (`--api-key`, `VLLM_API_KEY`), from its scope.
Authenticate = Callable[[Scope], bool]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
# Asks every worker of every engine for its steering state (given the engine client).
WorkerStates = Callable[[Any], Awaitable[list[dict[str, Any]]]]
# Runs the canary checks through the app's engine (given the app's state).
RunCanaries = Callable[[Any], Awaitable[CanaryReport]]


# --------------------------------------------------------------------------------------------------
# Metrics (default registry, which vLLM's /metrics serves; never the `vllm:` prefix, vLLM unregisters every `vllm:*` collector when its stat logger starts).
# --------------------------------------------------------------------------------------------------


class _Metrics:
    """The API server's metrics. With several API servers (`--api-server-count`, data parallel) vLLM
    puts `prometheus_client` in multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`,
    `vllm/v1/metrics/prometheus.py`), which exports counters summed over the processes and gauges, but
    not `Info`: the profile is therefore a gauge of value 1 with the profile in its labels, one series
    per deployment (`multiprocess_mode="max"`)."""

    def __init__(self, plugin: PluginSettings) -> None:
        from prometheus_client import Counter, Gauge

        self.requests = Counter("modality_steer_requests", "Requests by effective steering mode", ["mode"])
        self.rejected = Counter("modality_steer_rejected", "Requests refused by modality-steer", ["reason"])
        self.profile = Gauge(
            "modality_steer_profile_info",
            "The arbitration-head profile this server applies (value 1; the profile in the labels)",
            ["profile_id", "model", "profile_path", "settings_id"],
            multiprocess_mode="max",
        )
        self.profile.labels(
            profile_id=plugin.profile.profile_id,
            model=plugin.profile.model.architecture,
            profile_path=str(plugin.profile_path),
            settings_id=plugin.settings_id,
        ).set(1)
        for mode in ("off", "image", "text", "heads"):
            self.requests.labels(mode=mode)  # exported at 0 from the start
        # Each API-server process runs its own canary check (a rerun reaches the process that receives it):
        # one series per live process ("liveall": a `pid` label; a dead process' series go with it).
        self.canary_status = Gauge(
            "modality_steer_canary_status",
            "This API-server process' latest canary check: 1 on its status (pending before the first run)",
            ["status"],
            multiprocess_mode="liveall",
        )
        self.canary_finished = Gauge(
            "modality_steer_canary_last_run_timestamp_seconds",
            "When this API-server process' latest canary check finished (Unix time; 0 before the first run)",
            multiprocess_mode="liveall",
        )
        self.show_canaries(last_report())
        on_record(self.show_canaries)

    def show_canaries(self, report: CanaryReport | None) -> None:
        """Set the canary gauges to `report` (None: no run yet)."""
        current = report.status if report is not None else "pending"
        for status in CANARY_STATUSES:
            self.canary_status.labels(status=status).set(1 if status == current else 0)
        self.canary_finished.set(report.finished_at if report is not None else 0)


_METRICS: _Metrics | None = None


def metrics(plugin: PluginSettings) -> _Metrics:
    """The process's metrics (created once: prometheus collectors are process-wide)."""
    global _METRICS
    if _METRICS is None:
        _METRICS = _Metrics(plugin)
    return _METRICS


# --------------------------------------------------------------------------------------------------
# Routes.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouteTable:
    """The app's routes, by what the middleware does with them (route path templates)."""

    steered: tuple[str, ...]
    inert: tuple[str, ...]
    refused: tuple[str, ...]
    routes: tuple[tuple[Any, str], ...]  # (route, kind) in the router's order
    public: tuple[str, ...] = ()  # of those, the paths open without the key under --api-key
    methods: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (path, methods; "*": any) per route

    def _match(self, scope: Scope) -> tuple[Any, str] | None:
        """The first route that matches `scope` fully, as the router matches it, with its kind."""
        from starlette.routing import Match

        for route, kind in self.routes:
            if route.matches(scope)[0] == Match.FULL:
                return route, kind
        return None

    def kind_of(self, scope: Scope) -> str:
        """ "steered", "inert" or "refused" for a request, matched as the router matches it (the first
        route that matches fully); "inert" when no route matches (the router answers 404 or 405)."""
        found = self._match(scope)
        return "inert" if found is None else found[1]

    def is_public(self, scope: Scope) -> bool:
        """Whether a request may pass without the API key: its path is routed, as the router routes it, to
        a route whose path is one of :data:`PUBLIC_PROBES`, whatever the method (a method the probe does
        not take gets the router's 405); a request no route matches is not public."""
        from starlette.routing import Match

        for route, _ in self.routes:
            match = route.matches(scope)[0]
            if match == Match.FULL:
                return getattr(route, "path", None) in PUBLIC_PROBES
            if match == Match.PARTIAL and getattr(route, "path", None) in PUBLIC_PROBES:
                return True
        return False

    def matches_any(self, scope: Scope) -> bool:
        """Whether a route of the app takes this request fully (path and method)."""
        return self._match(scope) is not None

    def describes(self, app: Any) -> bool:
        """Whether the table is still that of `app`'s routes (a route added later rebuilds it)."""
        return len(self.routes) == len(app.routes) and all(
            r is a for (r, _), a in zip(self.routes, app.routes, strict=True)
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (for the state endpoint)."""
        return {
            "steered": list(self.steered),
            "inert": list(self.inert),
            "refused": list(self.refused),
            "public": list(self.public),
            "methods": {path: list(methods) for path, methods in self.methods},
        }


def _takes_vllm_xargs(route: Any) -> bool:
    import typing

    field = getattr(route, "body_field", None)
    if field is None:
        return False
    annotation = field.field_info.annotation
    candidates = [annotation, *typing.get_args(annotation)]
    return any("vllm_xargs" in getattr(c, "model_fields", {}) for c in candidates)


def classify_routes(app: Any) -> RouteTable:
    """Sort every route of `app`: a route is *steered* when its request model has a `vllm_xargs` field,
    *inert* when it serves only GET / HEAD, is one of :data:`INERT_ROUTES` or a mount of
    :data:`INERT_MOUNTS`, else *refused* (other mounted apps and routes that accept any method included).
    Websocket routes match only websocket requests, which carry no `modality_steer`; the request hooks
    and the EngineCore steer what they send."""
    from starlette.routing import Mount, Route, WebSocketRoute

    routes = []
    for route in app.routes:
        path = getattr(route, "path", "")
        if isinstance(route, Route):
            methods = set(route.methods) if route.methods is not None else {"*"}
            if _takes_vllm_xargs(route) and "POST" in methods:
                kind = "steered"
            elif methods <= {"GET", "HEAD"} or path in INERT_ROUTES:
                kind = "inert"
            else:
                kind = "refused"
        elif isinstance(route, WebSocketRoute) or (isinstance(route, Mount) and path in INERT_MOUNTS):
            kind = "inert"
        else:
            kind = "refused"
        routes.append((route, kind))

    def paths(kind: str) -> tuple[str, ...]:
        return tuple(sorted({route.path for route, k in routes if k == kind}))

    methods_of: dict[str, set[str]] = {}
    for route, _ in routes:
        if isinstance(route, WebSocketRoute):
            taken = {"WEBSOCKET"}
        elif isinstance(route, Route) and route.methods is not None:
            taken = set(route.methods)
        else:
            taken = {"*"}
        methods_of.setdefault(getattr(route, "path", ""), set()).update(taken)
    return RouteTable(
        paths("steered"),
        paths("inert"),
        paths("refused"),
        tuple(routes),
        public=tuple(
            sorted({route.path for route, _ in routes if getattr(route, "path", None) in PUBLIC_PROBES})
        ),
        methods=tuple((path, tuple(sorted(taken))) for path, taken in sorted(methods_of.items())),
    )


def _is_json(scope: Scope) -> bool:
    """Whether FastAPI reads the body as JSON: no content type, or `application/json` /
    `application/*+json` (case-insensitive; the first Content-Type header, as Starlette reads it)."""
    value = next((v for k, v in scope.get("headers", []) if k.lower() == b"content-type"), b"")
    media = value.decode("latin-1").split(";", 1)[0].strip().lower()
    if not media:
        return True
    main, _, sub = media.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


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

    def __init__(
        self,
        app: Callable[[Scope, Receive, Send], Awaitable[None]],
        worker_states: WorkerStates | None = None,
        authenticate: Authenticate | None = None,
        run_canaries: RunCanaries | None = None,
    ) -> None:
        """`worker_states` answers the state endpoint (without it, the endpoint answers 503);
        `authenticate`, given when the server runs with API keys, is required of every request outside
        :data:`PUBLIC_PROBES`, before anything of the request is read; `run_canaries` (given the app's
        state) answers :data:`~steer_server.serving.canary.RERUN_PATH`."""
        self.app = app
        self.worker_states = worker_states
        self.authenticate = authenticate
        self.run_canaries = run_canaries
        contract = policy()
        if contract is None:
            raise RuntimeError("ModalitySteerMiddleware needs a profile (MODALITY_STEER_PROFILE)")
        self.plugin = contract.plugin
        self.policy = contract
        self.metrics = metrics(contract.plugin)
        self._routes: RouteTable | None = None

    def routes(self, scope: Scope) -> RouteTable:
        """The route table of the app serving `scope`, built at the first request (by then every router,
        endpoint plugin and launcher route is mounted) and again whenever the app's routes change."""
        app = scope["app"]
        if self._routes is None or not self._routes.describes(app):
            self._routes = classify_routes(app)
        return self._routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not self._authenticated(scope):
            self.metrics.rejected.labels(reason="unauthenticated").inc()
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            else:
                await _json(send, 401, {"error": "Unauthorized"})  # vLLM's own answer, nothing more
            return
        if scope["type"] == "websocket" and serving_blocked():
            await send({"type": "websocket.close", "code": 1013})  # try again later: canaries failed
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = _route_path(scope)
        if scope.get("method") == "GET" and path == STATE_PATH:
            await self._state(scope, send)
            return
        if scope.get("method") == "POST" and path == RERUN_PATH:
            await self._rerun_canaries(scope, send)
            return
        kind = self.routes(scope).kind_of(scope)
        if kind == "inert":
            await self.app(scope, receive, send)
            return
        if serving_blocked():
            # The latest canary run failed: steering does not do what the profile records.
            self.metrics.rejected.labels(reason="canaries").inc()
            await _error(send, 503, "this deployment's steering failed its canary checks; it serves nothing")
            return
        body = await self._read_body(receive, send)
        if body is None:
            return
        if kind == "refused":
            await self._refused_route(scope, receive, send, body, path)
            return
        await self._steered(scope, receive, send, body)

    def _authenticated(self, scope: Scope) -> bool:
        """Whether the request may go on: no API keys configured, a CORS preflight (OPTIONS, which browsers
        send without credentials; vLLM's own authentication lets it pass too) that no route takes, a
        public probe, or a
        request carrying a key. Whatever the path: vLLM guards only some path prefixes
        (`vllm/entrypoints/serve/middleware/authenticate.py`)."""
        if self.authenticate is None:
            return True
        table = self.routes(scope)
        if scope.get("method") == "OPTIONS" and not table.matches_any(scope):
            return True  # a CORS preflight: no route takes OPTIONS here, the router answers 405
        return table.is_public(scope) or self.authenticate(scope)

    async def _read_body(self, receive: Receive, send: Send) -> bytes | None:
        """The whole request body, or None when the client left or the body is too large (answered)."""
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > MAX_BODY_BYTES:
                self.metrics.rejected.labels(reason="too_large").inc()
                await _error(send, 413, f"request body over {MAX_BODY_BYTES} bytes")
                return None
            if not message.get("more_body", False):
                return body

    async def _refused_route(
        self, scope: Scope, receive: Receive, send: Send, body: bytes, path: str
    ) -> None:
        """Deny by default: a route modality-steer does not handle serves only requests that say nothing
        about steering, and only while no policy steers such requests."""
        payload = _json_object(body)
        try:
            carries = payload is not None and asked_spec(payload) is not None
        except PolicyError:  # a malformed vllm_xargs or a value given twice: it carries steering
            carries = True
        if carries:
            self.metrics.rejected.labels(reason="route").inc()
            await _error(
                send, 400, f"{path} does not take modality_steer (modality-steer does not handle this route)"
            )
            return
        if self.policy.constrains_unmarked_requests:
            self.metrics.rejected.labels(reason="route").inc()
            await _error(
                send,
                403,
                f"this deployment steers every request, and modality-steer does not handle {path}; refused",
            )
            return
        await self.app(scope, _replay(body, receive), send)

    async def _steered(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        """Validate, apply the policy, rewrite, label the response, count."""
        if not _is_json(scope):
            # Form uploads (transcription): the request hooks and the EngineCore apply the contract.
            await self.app(scope, _replay(body, receive), send)
            return
        payload = _json_object(body)
        if payload is None:
            # Not ours to judge: vLLM answers malformed JSON itself. Only a body that carries no
            # steering can get here (we cannot see any), so nothing is served unsteered by mistake
            # unless a policy applies, and then it is refused.
            if self.policy.constrains_unmarked_requests:
                self.metrics.rejected.labels(reason="invalid").inc()
                await _error(send, 400, "the request body is not a JSON object")
                return
            await self.app(scope, _replay(body, receive), send)
            return
        try:
            spec = self.policy.resolve(asked_spec(payload))
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
            if engine is None or self.worker_states is None:
                raise RuntimeError("no engine client on this app")
            workers = await self.worker_states(engine)
        except Exception as exc:  # a dead or missing engine: say so, never report an empty state
            await _json(send, 503, {"error": {"message": f"engine unavailable: {exc}", "code": 503}})
            return
        report = last_report()
        await _json(
            send,
            200,
            {
                "profile_id": self.plugin.profile.profile_id,
                # Prefill and decode instances of one deployment must report the same (kv_transfer).
                "deployment_id": deployment_id(self.policy),
                "policy": {
                    "default": self.policy.default.to_wire(),
                    "enforce": None if self.policy.enforce is None else self.policy.enforce.to_wire(),
                },
                "routes": self.routes(scope).as_dict(),
                "canaries": None if report is None else report.as_dict(),
                "workers": workers,
            },
        )

    async def _rerun_canaries(self, scope: Scope, send: Send) -> None:
        """Run the canaries again (after the weights changed): 200 and the report when they pass, 503 when
        they fail (the server then refuses every request that reaches the engine)."""
        app_state = getattr(scope.get("app"), "state", None)
        if self.run_canaries is None or app_state is None:
            await _json(
                send, 503, {"error": {"message": "canary checks unavailable on this app", "code": 503}}
            )
            return
        report = await self.run_canaries(app_state)
        await _json(send, 200 if report.status != "failed" else 503, report.as_dict())


def _route_path(scope: Scope) -> str:
    """The path the router routes on: `scope["path"]` without the root path (`--root-path`), which is
    stripped only at a path boundary (as Starlette's router does)."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and (path == root or path[len(root)] == "/"):
        return path[len(root) :]
    return path


def _json_object(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None (not JSON, not an object, or nested too deeply to parse)."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None
    return payload if isinstance(payload, dict) else None


async def require_armed_workers(engine_client: Any, worker_states: WorkerStates) -> list[dict[str, Any]]:
    """The start-up handshake: every worker of every engine reports steering armed with this
    deployment's settings (none to ask on a render-only server, which has no engine).

    Args:
        engine_client: vLLM's engine client (None on a render-only server).
        worker_states: asks every worker of every engine for its state
            (:func:`steer_server.serving.vllm_adapter.hooks.worker_states`).

    Raises:
        SteeringConfigError: a worker did not answer (the plugin is not loaded there, or its runner was
            not set up) or answered with other settings (profile, `--max-gain`, `--allow-raw-heads`).
    """
    plugin = settings()
    assert plugin is not None
    if engine_client is None:
        return []  # a render-only server: no engine, nothing generates
    try:
        states = await worker_states(engine_client)
    except Exception as exc:
        raise SteeringConfigError(
            f"modality-steer: a worker did not report steering armed ({type(exc).__name__}: {exc}); "
            "refusing to serve"
        ) from exc
    wrong = [s for s in states if not s.get("armed") or s.get("settings_id") != plugin.settings_id]
    if not states or wrong:
        raise SteeringConfigError(
            f"modality-steer: workers not armed with this deployment's settings {plugin.settings_id} "
            f"(profile, --max-gain, --allow-raw-heads): {wrong or states}"
        )
    secret = plugin.canary_secret_digest()
    other = sorted({str(s.get("canary_secret")) for s in states if s.get("canary_secret") != secret})
    if plugin.canaries and other:
        raise SteeringConfigError(
            "modality-steer: engines started apart from this API server (headless, other nodes) hold another "
            "canary secret, so the canary check cannot reach them: set MODALITY_STEER_CANARY_SECRET to the same "
            "value for every process of the deployment"
        )
    return states


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


def document_parameter(app: Any) -> None:
    """Add `modality_steer` to the request schemas of the steered routes (:func:`classify_routes`) in the
    app's OpenAPI document."""
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
        for path in classify_routes(app).steered:
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
