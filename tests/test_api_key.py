"""`--api-key` closes every door: with API keys, every route of the running app outside the public probes
(`steer_server.serving.api.PUBLIC_PROBES`) answers 401 without a key, whatever its path (vLLM itself
guards only /v1, /v2, /inference and /cohere), before anything of the request is read.

Here the middleware runs in a hand-made app with every kind of route (steered, refused, inert, mounts,
websockets, a path no route matches), with and without a root path, through Starlette's test client, with
vLLM's own key check. The same walk over every route of vLLM's own app runs in-process in
tests/test_policy_app.py (with and without a policy and a root path), and on a running keyed server, where
nothing may be generated, in tests/test_serving_policy.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import FastAPI, WebSocket
from helpers import PUBLIC_PROBES
from pydantic import BaseModel
from starlette.routing import Mount

KEY = "s3cret-key"
ROOT = "/api"
PUBLIC = PUBLIC_PROBES


# --------------------------------------------------------------------------------------------------
# The middleware, in an app with every kind of route.
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def client_for(monkeypatch, llava_profile) -> Iterator[Any]:
    """Makes a test client of an app with steered, refused, inert and public routes, a mount, websocket
    routes, behind the middleware with (or without) vLLM's key check."""
    from starlette.testclient import TestClient

    from steer_server.serving.api import ModalitySteerMiddleware
    from steer_server.serving.policy import policy
    from steer_server.serving.settings import settings
    from steer_server.serving.vllm_adapter.hooks import authenticator

    monkeypatch.setenv("MODALITY_STEER_PROFILE", str(llava_profile))
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    settings.cache_clear()
    policy.cache_clear()

    def build(keys: list[str] | None, root_path: str = "") -> Any:
        app = FastAPI(root_path=root_path)
        generated: list[str] = []

        @app.post("/v1/chat/completions")
        async def chat(body: Chat) -> dict[str, Any]:
            generated.append("chat")
            return {"ok": True}

        @app.post("/invocations")
        async def invocations(body: dict[str, Any]) -> dict[str, Any]:
            generated.append("invocations")
            return {"ok": True}

        @app.post("/tokenize")
        async def tokenize(body: dict[str, Any]) -> dict[str, Any]:
            return {"tokens": []}

        for path in ("/health", "/version", "/load", "/ping"):
            app.get(path)(lambda: {"ok": True})
        # A route that answers OPTIONS itself (a CORS-aware handler): not a preflight the router refuses.
        app.options("/v1/options-aware")(lambda: {"ok": True})
        app.post("/ping")(lambda: {"ok": True})
        # As vLLM mounts Prometheus' app (`vllm/entrypoints/serve/instrumentator/metrics.py`).
        metrics = Mount("/metrics", app=_plain_text)
        metrics.path_regex = re.compile("^/metrics(?P<path>.*)$")
        app.router.routes.append(metrics)
        for path in ("/v1/realtime", "/ws"):
            app.websocket(path)(_socket)

        app.add_middleware(
            ModalitySteerMiddleware,
            authenticate=authenticator(SimpleNamespace(api_key=keys)) if keys else None,
        )
        client = TestClient(app, root_path=root_path)
        client.generated = generated  # type: ignore[attr-defined]
        return client

    yield build
    settings.cache_clear()
    policy.cache_clear()


class Chat(BaseModel):
    prompt: str = ""
    vllm_xargs: dict[str, str] | None = None


async def _socket(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text("hello")
    await websocket.close()


async def _plain_text(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"modality_steer_requests_total 0\n"})


BAD = {"prompt": "hi", "modality_steer": "bogus"}
# (method, path, headers, expected status): every kind of route, without a key, with a wrong one, with it.
CASES = [
    ("POST", "/invocations", {}, 401),  # outside vLLM's guarded prefixes: the example
    ("POST", "/invocations", {"Authorization": "Bearer nope"}, 401),
    ("POST", "/invocations", {"Authorization": f"Basic {KEY}"}, 401),
    ("POST", "/invocations", {"Authorization": f"Bearer {KEY}"}, 400),  # as today: the steering error
    ("POST", "/v1/chat/completions", {}, 401),
    ("POST", "/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}, 400),
    ("POST", "/tokenize", {}, 401),
    ("POST", "/tokenize", {"Authorization": f"Bearer {KEY}"}, 200),
    ("GET", "/load", {}, 401),
    ("GET", "/openapi.json", {}, 401),  # the schema names the profile
    ("GET", "/v1/modality_steer/state", {}, 401),
    ("POST", "/no/such/route", {}, 401),  # closed by default, also where no route matches
    ("GET", "/no/such/route", {"Authorization": f"Bearer {KEY}"}, 404),
    ("GET", "/health", {}, 200),
    ("GET", "/version", {}, 200),
    ("GET", "/ping", {}, 200),
    ("POST", "/ping", {}, 200),
    ("GET", "/metrics", {}, 200),
    ("OPTIONS", "/invocations", {}, 405),  # a CORS preflight is not refused (vLLM lets it pass too)
    ("OPTIONS", "/v1/options-aware", {}, 401),  # ... but a route that takes OPTIONS needs the key
    ("OPTIONS", "/v1/options-aware", {"Authorization": f"Bearer {KEY}"}, 400),  # past the key: as today
]


@pytest.mark.slow  # imports vLLM (its key check)
@pytest.mark.parametrize("root_path", ["", ROOT])
@pytest.mark.parametrize(("method", "path", "headers", "expected"), CASES)
def test_every_route_but_the_public_probes_needs_the_key(
    client_for, root_path, method, path, headers, expected
):
    client = client_for([KEY, "other"], root_path)
    response = client.request(method, root_path + path, headers=headers, json=BAD)
    assert response.status_code == expected, (response.status_code, response.text)
    if expected == 401:
        # Nothing of the deployment before 401: vLLM's own answer, no steering error, no profile id.
        assert response.json() == {"error": "Unauthorized"}
        assert "x-modality-steer" not in response.headers
    assert client.generated == []


@pytest.mark.slow  # imports vLLM (its key check)
def test_websockets_need_the_key_and_no_keys_means_open(client_for):
    from starlette.websockets import WebSocketDisconnect

    client = client_for([KEY])
    for path in ("/v1/realtime", "/ws"):
        with pytest.raises(WebSocketDisconnect) as closed, client.websocket_connect(path):
            pass
        assert closed.value.code == 1008
        with client.websocket_connect(path, headers={"Authorization": f"Bearer {KEY}"}) as socket:
            assert socket.receive_text() == "hello"
    open_client = client_for(None)
    response = open_client.post("/invocations", json={"prompt": "hi"})
    assert response.status_code == 200 and open_client.generated == ["invocations"]


@pytest.mark.slow  # imports vLLM
def test_the_keys_are_vllms_own(monkeypatch):
    """`--api-key` (several allowed), else `VLLM_API_KEY`, else no check (as vLLM decides)."""
    from steer_server.serving.vllm_adapter.hooks import authenticator

    def scope(token: str) -> dict[str, Any]:
        return {"type": "http", "headers": [(b"authorization", f"Bearer {token}".encode())]}

    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert authenticator(SimpleNamespace(api_key=None)) is None
    check = authenticator(SimpleNamespace(api_key=["a", "b"]))
    assert check(scope("a")) and check(scope("b")) and not check(scope("c"))
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    check = authenticator(SimpleNamespace(api_key=None))
    assert check(scope("from-env")) and not check(scope("a"))
