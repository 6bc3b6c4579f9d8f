"""The deployment's policy on vLLM's own app, in-process: the app `vllm serve` builds (`build_app`: every
router of this vLLM, its `--api-key` middleware), with the plugin's adapter rows installed, driven through
Starlette's test client (milliseconds per request). No engine: a stand-in answers what gets past
modality-steer and records the body it was handed (tests/helpers.py `build_vllm_app`).

What needs an engine (answers equal to a transformers reference, the header on a generated answer, the
route walk of a running keyed server, canaries) stays end to end in tests/test_serving_policy.py, whose
server also checks that its route table is the one built here.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import (
    PUBLIC_PROBES,
    InProcessApp,
    Reply,
    assert_every_route_needs_the_key,
    build_vllm_app,
    generation_bodies,
)

from steer_server.data.prompts import INSTRUCTIONS, insert_instruction, openai_messages, user_text

pytestmark = pytest.mark.slow  # imports vLLM

KEY = "s3cret-key"
ROOT = "/api"

# The routes of vLLM 0.32's app (generate task) that modality-steer refuses by default. A route vLLM adds
# shows up here (and in the state endpoint of a running server, tests/test_serving_policy.py).
EXPECTED_REFUSED = {
    "/generative_scoring",
    "/inference/v1/generate",
    "/invocations",
    "/v1/chat/completions/batch",
    "/v1/systemone",
}
GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")

# name -> the arguments of `modality-steer serve MODEL --profile PROFILE` (its own flags and vLLM's)
APPS: dict[str, tuple[str, ...]] = {
    "open": ("--allow-raw-heads",),
    "closed": (),
    "enforced": ("--enforce-steer", "text", "--allow-raw-heads", "--root-path", ROOT),
    "keyed-open": ("--allow-raw-heads", "--api-key", KEY, "--root-path", ROOT),
    "keyed-enforced": ("--enforce-steer", "text", "--api-key", KEY),
    "default-inject": ("--default-steer", "image", "--inject-instruction", "--allow-raw-heads"),
}


@pytest.fixture(scope="module")
def app_for(tiny_llava, llava_profile) -> Iterator[Callable[[str], InProcessApp]]:
    """Makes (once per module) the app of one :data:`APPS` entry, its record of what reached vLLM cleared."""
    built: dict[str, InProcessApp] = {}

    def get(name: str) -> InProcessApp:
        if name not in built:
            built[name] = build_vllm_app(tiny_llava, llava_profile, APPS[name])
        built[name].reached.clear()
        return built[name]

    yield get


def test_building_the_app_leaves_the_process_as_it_was(tiny_llava, llava_profile, monkeypatch):
    """The build neither registers the plugin (vLLM's argument parser loads general plugins) nor leaves
    an adapter row, a setting or an environment variable behind; a setting of the caller's environment
    does not reach the app."""
    import vllm.entrypoints.launchers.app  # noqa: F401 - importing vLLM sets variables of its own first

    from steer_server.serving import plugin
    from steer_server.serving.vllm_adapter import table

    monkeypatch.setenv("MODALITY_STEER_ENFORCE", "image")
    monkeypatch.setenv("VLLM_API_KEY", "from-the-caller")
    environment = dict(os.environ)
    rows = dict(table._INSTALLED)
    registered = plugin._REGISTERED
    app = build_vllm_app(tiny_llava, llava_profile)
    assert dict(os.environ) == environment
    assert dict(table._INSTALLED) == rows
    assert registered == plugin._REGISTERED
    reply = app.send()(
        "POST", "/v1/completions", None, {"prompt": "hi", "modality_steer": {"heads": [[0, 0, 1.0]]}}
    )
    assert reply.status == 400 and "--allow-raw-heads" in _error(reply)["message"], reply


def _error(reply: Reply) -> dict[str, Any]:
    return dict(reply.json()["error"])


# --------------------------------------------------------------------------------------------------
# The route table.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["open", "enforced", "keyed-enforced"])
def test_every_route_of_vllms_app_is_classified(app_for, name):
    """The table the state endpoint reports is derived from the app: every path of its OpenAPI document is
    steered, inert or refused; the refused ones are exactly those this vLLM version is known to have; the
    generation routes are steered."""
    app = app_for(name)
    send = app.send()
    routes = send("GET", "/v1/modality_steer/state", app.key, None).json()["routes"]
    document = send("GET", "/openapi.json", app.key, None).json()
    known = set(routes["steered"]) | set(routes["inert"]) | set(routes["refused"])
    assert set(document["paths"]) <= known, set(document["paths"]) - known
    assert set(routes["refused"]) == EXPECTED_REFUSED, routes["refused"]
    assert set(GENERATION_ROUTES) <= set(routes["steered"])
    assert routes["public"] == PUBLIC_PROBES
    assert app.reached == []


def test_openapi_documents_the_parameter(app_for):
    document = app_for("open").send()("GET", "/openapi.json", None, None).json()
    schemas = document["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        forms = schemas[name]["properties"]["modality_steer"]["anyOf"]
        assert {"type": "string", "enum": ["off", "image", "text"]} in forms
        follow = next(f for f in forms if f.get("properties", {}).get("follow"))
        assert follow["properties"]["gain"] == {"type": "number", "minimum": 0, "maximum": 8.0}
        assert any("heads" in f.get("properties", {}) for f in forms)  # --allow-raw-heads is on
    closed = app_for("closed").send()("GET", "/openapi.json", None, None).json()
    forms = closed["components"]["schemas"]["ChatCompletionRequest"]["properties"]["modality_steer"]["anyOf"]
    assert not any("heads" in f.get("properties", {}) for f in forms)


# --------------------------------------------------------------------------------------------------
# --api-key: every route, nothing read before the key.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["keyed-open", "keyed-enforced"])
def test_every_route_of_vllms_app_needs_the_key(app_for, tiny_llava, name):
    """The route walk of a running keyed server (tests/helpers.py), on vLLM's app with and without a policy
    and a root path: nothing but the public probes gets past without the key."""
    app = app_for(name)
    assert_every_route_needs_the_key(
        app.send(),
        str(tiny_llava),
        KEY,
        nothing_reached=lambda: all(path in PUBLIC_PROBES for _, path, _ in app.reached),
    )


UNAUTHENTICATED = [
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "modality_steer": "off"},
    ),
    ("POST", "/v1/completions", {"prompt": "hi", "modality_steer": {"follow": "text", "gain": 99}}),
    ("POST", "/v1/completions", {"prompt": "hi", "vllm_xargs": {"modality_steer": "{broken"}}),
    ("POST", "/invocations", {"prompt": "hi", "modality_steer": "text"}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/modality_steer/state", None),
    ("POST", "/v1/modality_steer/canaries", {}),
]


@pytest.mark.parametrize(
    ("method", "path", "fields"),
    UNAUTHENTICATED,
    ids=[f"{m} {p} {i}" for i, (m, p, _) in enumerate(UNAUTHENTICATED)],
)
@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_the_key_comes_before_anything_else(app_for, tiny_llava, method, path, fields, key):
    """vLLM's authentication runs before modality-steer reads the request: without the key 401, never a
    steering error (which would tell an anonymous client about the policy) or an answer."""
    app = app_for("keyed-enforced")
    body = None if fields is None else {"model": str(tiny_llava), "max_tokens": 2, **fields}
    reply = app.send()(method, path, key, body)
    assert reply.status == 401 and reply.json() == {"error": "Unauthorized"}, reply
    assert "x-modality-steer" not in reply.headers
    assert app.reached == []


def test_the_state_endpoint_answers_with_the_key(app_for):
    app = app_for("keyed-enforced")
    state = app.send()("GET", "/v1/modality_steer/state", KEY, None).json()
    assert state["policy"] == {"default": "off", "enforce": "text"}
    assert state["profile_id"] and state["deployment_id"] and state["routes"]["public"] == PUBLIC_PROBES


# --------------------------------------------------------------------------------------------------
# The policy on every route.
# --------------------------------------------------------------------------------------------------


def _bodies(model: str) -> dict[str, dict[str, Any]]:
    return generation_bodies(model, [{"role": "user", "content": "What colour is the object?"}])


BAD_SPECS = ["bogus", {"follow": "image", "gain": -1}, {"follow": "sideways"}]
OTHER_SPECS = ["image", {"follow": "text", "gain": 0}, "off", {"heads": [[0, 1, 2.0]]}]


def _handed_on_spec(body: bytes) -> str:
    """The canonical spec (`SteerSpec.to_wire`) in the body vLLM received, which has no top-level field."""
    payload = json.loads(body)
    assert "modality_steer" not in payload, payload
    return str(payload["vllm_xargs"]["modality_steer"])


@pytest.mark.parametrize("name", ["open", "enforced"])
def test_every_steered_route_obeys_the_policy(app_for, tiny_llava, name):
    """On every steered route of vLLM's app: a bad spec is 400 in either form (top level, `vllm_xargs`);
    under `--enforce-steer text` every other spec is 403 and nothing reaches vLLM; a request without a field
    and one that asks for text are handed on as the same canonical text spec, labelled; under the root path
    and without it (as the router matches)."""
    app = app_for(name)
    bodies = _bodies(str(tiny_llava))
    send = app.send()
    routes = send("GET", "/v1/modality_steer/state", None, None).json()["routes"]
    assert set(routes["steered"]) <= set(bodies), "a steered route the tests do not know"
    prefixes = (True, False) if app.root else (True,)
    for path in routes["steered"]:
        body = bodies[path]
        for bad, prefixed in itertools.product(BAD_SPECS, prefixes):
            for fields in ({"modality_steer": bad}, {"vllm_xargs": {"modality_steer": json.dumps(bad)}}):
                reply = app.post(path, {**body, **fields}, prefixed=prefixed)
                assert reply.status == 400 and _error(reply)["param"] == "modality_steer", (path, bad, reply)
        assert app.reached == []
        if name == "open":
            reply = app.post(path, {**body, "modality_steer": "image"})
            assert reply.status == 200 and reply.headers["x-modality-steer"].startswith("mode=image; gain=3")
            assert _handed_on_spec(app.reached.pop()[2]) == "image"
            reply = app.post(path, body)
            assert reply.status == 200 and "x-modality-steer" not in reply.headers
            assert _handed_on_spec(app.reached.pop()[2]) == "off"  # the engine applies no default to it
            continue
        for asked, prefixed in itertools.product(OTHER_SPECS, prefixes):
            reply = app.post(path, {**body, "modality_steer": asked}, prefixed=prefixed)
            assert reply.status == 403 and _error(reply)["param"] == "modality_steer", (path, asked, reply)
            assert "enforces" in _error(reply)["message"]
        assert app.reached == []
        for prefixed in prefixes:
            implicit = app.post(path, body, prefixed=prefixed)
            explicit = app.post(path, {**body, "modality_steer": "text"}, prefixed=prefixed)
            for reply in (implicit, explicit):
                assert reply.status == 200 and reply.headers["x-modality-steer"].startswith(
                    "mode=text; gain=3"
                )
            handed = [_handed_on_spec(body) for _, _, body in app.reached]
            assert handed[0] == handed[1] == "text", handed
            app.reached.clear()


@pytest.mark.parametrize("name", ["open", "enforced"])
def test_every_refused_route_is_refused_as_the_policy_says(app_for, tiny_llava, name):
    """Deny by default: a route modality-steer does not handle refuses a request that carries steering
    (400) and, while a policy steers every request, any request (403); without a policy a request that says
    nothing about steering passes untouched."""
    app = app_for(name)
    model = str(tiny_llava)
    for path in sorted(EXPECTED_REFUSED):
        carries = app.post(path, {"model": model, "prompt": "hi", "modality_steer": "text"})
        plain = app.post(path, {"model": model, "prompt": "hi"})
        if name == "enforced":
            assert carries.status in (400, 403) and _error(carries)["param"] == "modality_steer", (
                path,
                carries,
            )
            assert plain.status == 403 and "steers every request" in _error(plain)["message"], (path, plain)
            assert app.reached == []
        else:
            assert carries.status == 400 and "does not take modality_steer" in _error(carries)["message"], (
                path
            )
            assert plain.status == 200 and app.reached[-1][1] == path
            assert json.loads(app.reached[-1][2]) == {"model": model, "prompt": "hi"}
            app.reached.clear()


def test_the_default_and_the_injected_instruction(app_for, tiny_llava, serve_samples):
    """`--default-steer image --inject-instruction`: a request without a field is handed on exactly as one
    asking for image, the mode's sentence put where the data layout puts it (the prompt then is the
    sample's own, instruction included); an explicit "off" is handed on untouched, unlabelled."""
    app = app_for("default-inject")
    sample = serve_samples[2].sample
    routes = {
        "/v1/chat/completions": (
            {"messages": openai_messages(serve_samples[2], with_instruction=False)},
            {"messages": openai_messages(serve_samples[2])},
        ),
        "/v1/completions": (
            {"prompt": user_text(sample, with_instruction=False)},
            {"prompt": insert_instruction(user_text(sample, with_instruction=False), INSTRUCTIONS["image"])},
        ),
    }
    for path, (plain, instructed) in routes.items():
        body = {"model": str(tiny_llava), "max_tokens": 4, **plain}
        defaulted = app.post(path, body)
        explicit = app.post(path, {**body, "modality_steer": "image"})
        off = app.post(path, {**body, "modality_steer": "off"})
        assert defaulted.headers["x-modality-steer"].startswith("mode=image; gain=3")
        assert explicit.headers["x-modality-steer"] == defaulted.headers["x-modality-steer"]
        assert "x-modality-steer" not in off.headers
        handed = app.steered_bodies()
        assert handed[0] == handed[1] == {**body, **instructed, "vllm_xargs": {"modality_steer": "image"}}, (
            path
        )
        assert handed[2] == {**body, "vllm_xargs": {"modality_steer": "off"}}, path
        app.reached.clear()


FORBIDDEN = [
    {"modality_steer": "image"},
    {"modality_steer": {"heads": [[0, 0, 1.0]]}},
    {"vllm_xargs": {"modality_steer": '{"heads": [[1, 3, 0.0]]}'}},
    {"modality_steer": "off"},
    {"modality_steer": {"follow": "text", "gain": 0}},
    {"vllm_xargs": {"modality_steer": "image"}},
    {"vllm_xargs": {"modality_steer": "off"}},
    {"modality_steer": "off", "stream": True},
    {"modality_steer": "image", "n": 2, "temperature": 0.5},
]


@pytest.mark.parametrize("extra", FORBIDDEN, ids=[json.dumps(e) for e in FORBIDDEN])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_the_enforced_policy_refuses_everything_else_with_403(app_for, tiny_llava, path, extra):
    app = app_for("keyed-enforced")
    body = {**_bodies(str(tiny_llava))[path], **extra}
    reply = app.post(path, body)
    assert reply.status == 403, reply
    error = _error(reply)
    assert error["param"] == "modality_steer" and error["type"] == "PermissionDeniedError"
    assert "enforces" in error["message"], error
    assert app.reached == []


# --------------------------------------------------------------------------------------------------
# Bad values: one row per case, the expected error text (a running server answers the same: the
# fuzzing and load tests of tests/test_hardening.py).
# --------------------------------------------------------------------------------------------------

TOO_MANY_HEADS = [[layer, head, 1.5] for layer in range(2) for head in range(4)] + [[0, 0, 1.5]]
BAD_INPUT: list[tuple[str, str, dict[str, Any], str]] = [
    # (case, app, request fields, expected error text)
    ("gain NaN", "open", {"modality_steer": {"follow": "text", "gain": float("nan")}}, "gain must be finite"),
    (
        "gain +inf",
        "open",
        {"modality_steer": {"follow": "text", "gain": float("inf")}},
        "gain must be finite",
    ),
    (
        "gain -inf",
        "open",
        {"modality_steer": {"follow": "image", "gain": float("-inf")}},
        "gain must be finite",
    ),
    ("gain negative", "open", {"modality_steer": {"follow": "text", "gain": -1}}, "gain must lie in [0, 8]"),
    ("gain above max", "open", {"modality_steer": {"follow": "text", "gain": 9}}, "gain must lie in [0, 8]"),
    ("gain string", "open", {"modality_steer": {"follow": "text", "gain": "2"}}, "gain must be a number"),
    ("gain bool", "open", {"modality_steer": {"follow": "text", "gain": True}}, "gain must be a number"),
    ("gain null", "open", {"modality_steer": {"follow": "text", "gain": None}}, "gain must be a number"),
    (
        "gain object",
        "open",
        {"modality_steer": {"follow": "text", "gain": {"a": 1}}},
        "gain must be a number",
    ),
    (
        "nested object",
        "open",
        {"modality_steer": {"follow": {"follow": "text"}}},
        "follow must be 'image' or",
    ),
    ("unknown mode", "open", {"modality_steer": "loud"}, "unknown mode 'loud'"),
    ("unknown follow", "open", {"modality_steer": {"follow": "both"}}, "follow must be 'image' or 'text'"),
    ("unknown keys", "open", {"modality_steer": {"follow": "text", "boost": 2}}, "unknown keys"),
    ("number", "open", {"modality_steer": 2}, "got int"),
    ("list", "open", {"modality_steer": ["image"]}, "got list"),
    ("layer out of range", "open", {"modality_steer": {"heads": [[2, 0, 1.0]]}}, "layer 2 is out of range"),
    ("head out of range", "open", {"modality_steer": {"heads": [[0, 4, 1.0]]}}, "head 4 is out of range"),
    ("negative head", "open", {"modality_steer": {"heads": [[0, -1, 1.0]]}}, "head -1 is out of range"),
    ("float layer", "open", {"modality_steer": {"heads": [[0.5, 0, 1.0]]}}, "layer must be an integer"),
    ("head not a triple", "open", {"modality_steer": {"heads": [[0, 0]]}}, "must be [layer, head, gain]"),
    ("duplicated head", "open", {"modality_steer": {"heads": [[0, 0, 1.0], [0, 0, 2.0]]}}, "listed twice"),
    ("empty head list", "open", {"modality_steer": {"heads": []}}, "non-empty list"),
    ("oversized head list", "open", {"modality_steer": {"heads": TOO_MANY_HEADS}}, "only 8 heads"),
    ("raw head gain NaN", "open", {"modality_steer": {"heads": [[0, 0, float("nan")]]}}, "must be finite"),
    ("raw heads not allowed", "closed", {"modality_steer": {"heads": [[0, 0, 0.0]]}}, "--allow-raw-heads"),
    ("xargs malformed JSON", "open", {"vllm_xargs": {"modality_steer": "{not json"}}, "not valid JSON"),
    (
        "xargs gain too big",
        "open",
        {"vllm_xargs": {"modality_steer": '{"follow":"text","gain":99}'}},
        "[0, 8]",
    ),
    (
        "xargs NaN literal",
        "open",
        {"vllm_xargs": {"modality_steer": '{"follow":"text","gain":NaN}'}},
        "finite",
    ),
    (
        "xargs not a string",
        "open",
        {"vllm_xargs": {"modality_steer": {"follow": "text"}}},
        "must be a string",
    ),
    ("xargs not an object", "open", {"vllm_xargs": "modality_steer=text"}, "vllm_xargs must be an object"),
    ("given twice", "open", {"modality_steer": "text", "vllm_xargs": {"modality_steer": "text"}}, "once"),
]


@pytest.mark.parametrize(("case", "name", "fields", "needle"), BAD_INPUT, ids=[row[0] for row in BAD_INPUT])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_bad_values_get_400_naming_the_fault(app_for, tiny_llava, path, case, name, fields, needle):
    app = app_for(name)
    reply = app.post(path, {**_bodies(str(tiny_llava))[path], **fields})
    assert reply.status == 400, (case, reply)
    error = _error(reply)
    assert error["param"] == "modality_steer" and error["type"] == "BadRequestError", error
    assert needle in error["message"], (case, error["message"])
    assert app.reached == []


def test_an_oversized_body_gets_413_and_malformed_json_is_left_to_vllm(app_for, tiny_llava):
    from steer_server.serving.api import MAX_BODY_BYTES

    app = app_for("open")
    body = {**_bodies(str(tiny_llava))["/v1/completions"], "prompt": "x" * (MAX_BODY_BYTES + 1)}
    reply = app.post("/v1/completions", body)
    assert reply.status == 413 and _error(reply)["type"] == "RequestTooLargeError", reply.status
    assert app.reached == []
    enforced = app_for("enforced")
    reply = enforced.send()("POST", "/v1/completions", None, b"{not json")
    assert reply.status == 400 and "not a JSON object" in _error(reply)["message"], reply
    assert enforced.reached == []
    reply = app.send()("POST", "/v1/completions", None, b"{not json")
    assert app.reached == [("POST", "/v1/completions", b"{not json")]  # vLLM answers it as vLLM does
