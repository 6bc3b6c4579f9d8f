"""A deployment's policy end to end: one server under `--enforce-steer text`, `--api-key` and a root path,
serving the embedded toy with its shipped profile (canaries on), compared with transformers.

The policy's answers on every route, for every kind of value, are tested on vLLM's own app in-process
(tests/test_policy_app.py); this server checks that its route table is that app's, and what only an
engine shows: the answers are the steered ones, on every route and request form, and nothing is generated
without the key.
"""

from __future__ import annotations

from functools import cache

import openai
import pytest
from helpers import (
    assert_every_route_needs_the_key,
    assert_same_steps,
    build_vllm_app,
    chat,
    generated_tokens,
    generation_bodies,
    http_request,
    reference_steps,
    serve,
    served_steps,
    server_send,
    server_state,
    walk_body,
)

from steer_server.data.prompts import openai_messages
from steer_server.eval.demo import toy_profile_path
from steer_server.hf.model import LoadedModel, load_model
from steer_server.profile import load_profile
from steer_server.serving.launcher import VllmServer
from steer_server.toy.model import toy_model_dir

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

API_KEY = "test-key-7c1f"
ROOT = "/api"
VLLM_ARGS = ("--api-key", API_KEY, "--root-path", ROOT)
STEER_ARGS = ("--enforce-steer", "text", "--allow-raw-heads", "--canaries", "on")
MODEL = str(toy_model_dir())


@cache
def toy_reference() -> LoadedModel:
    return load_model(toy_model_dir())


class _KeyedServer:
    """The enforced server with its key filled in for every client (which sends no root path: the router
    matches paths with and without it)."""

    def __init__(self, server: VllmServer) -> None:
        self.server = server
        self.base_url = server.base_url

    def client(self, **kwargs):
        return self.server.client(api_key=API_KEY, **kwargs)


@pytest.fixture(scope="module")
def enforced_raw_server():
    """The toy with its shipped profile: every request text-steered, API key, root path, canaries on."""
    with serve(
        toy_model_dir(), toy_profile_path(), "--enforce-eager", *VLLM_ARGS, steer_args=STEER_ARGS
    ) as server:
        yield server


@pytest.fixture(scope="module")
def enforced_server(enforced_raw_server):
    return _KeyedServer(enforced_raw_server)


def _post(server, path: str, body, *, prefixed: bool = True):
    return http_request(server, (ROOT if prefixed else "") + path, "POST", key=API_KEY, body=body)


def test_the_served_route_table_and_state_are_those_of_vllms_app(enforced_raw_server):
    """The in-process app of tests/test_policy_app.py is the one this server runs: the same route table
    from the same arguments; the canaries passed under the policy and the key; no slot held."""
    state = server_state(enforced_raw_server, key=API_KEY, root=ROOT)
    app = build_vllm_app(toy_model_dir(), toy_profile_path(), (*STEER_ARGS, *VLLM_ARGS))
    in_process = app.send()("GET", "/v1/modality_steer/state", API_KEY, None).json()
    assert state["routes"] == in_process["routes"]
    assert state["policy"] == in_process["policy"] == {"default": "off", "enforce": "text"}
    assert state["canaries"]["status"] == "passed", state["canaries"]
    assert [w["slots_in_use"] for w in state["workers"]] == [0]


def test_canaries_need_what_no_client_may_ask_for(enforced_server):
    """The canaries ran steering a client gets 403 for under `--enforce-steer text` (off, image, a block):
    the internal path gave it to them, and only to them."""
    for asked in ("off", "image", {"follow": "text", "gain": 0}):
        reply = _post(
            enforced_server,
            "/v1/completions",
            {"model": MODEL, "prompt": "hi", "max_tokens": 1, "modality_steer": asked},
        )
        assert reply.status == 403, reply


def test_enforced_policy_steers_requests_without_a_field(enforced_server, serve_samples):
    enforced = served_steps(chat(enforced_server.client(), MODEL, serve_samples[1]))
    expected = reference_steps(toy_reference(), load_profile(toy_profile_path()), serve_samples[1], "text")
    assert_same_steps(enforced, expected, 1e-3)
    raw = enforced_server.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=openai_messages(serve_samples[1]), max_tokens=2
    )
    assert raw.headers["x-modality-steer"].startswith("mode=text; gain=3")
    with pytest.raises(openai.BadRequestError, match="gain must lie in"):
        enforced_server.client().completions.create(
            model=MODEL,
            prompt="x",
            max_tokens=2,
            extra_body={"modality_steer": {"follow": "text", "gain": -1}},
        )


def _bodies(sample) -> dict[str, dict]:
    return generation_bodies(MODEL, openai_messages(sample))


def _answer(path: str, body: dict):
    """What a route answered: its tokens with top logprobs where it has them, else its text."""
    if path == "/v1/chat/completions":
        return [
            (s["token"], {t["token"]: round(t["logprob"], 4) for t in s["top_logprobs"]})
            for s in body["choices"][0]["logprobs"]["content"]
        ]
    if path == "/v1/completions":
        return body["choices"][0]["logprobs"]["top_logprobs"]
    if path == "/v1/responses":
        return [part["text"] for item in body["output"] for part in item.get("content") or []]
    return body["content"]


def test_every_steered_route_answers_text_steered(enforced_server, serve_samples):
    """On every steered route of the running app, with and without the root path: a request without a
    field is answered as one that asks for text, labelled; on chat, as transformers answers text-steered."""
    bodies = _bodies(serve_samples[3])
    routes = server_state(enforced_server, key=API_KEY)["routes"]
    assert set(routes["steered"]) <= set(bodies), "a steered route the tests do not know"
    for path in routes["steered"]:
        for prefixed in (True, False):
            implicit = _post(enforced_server, path, bodies[path], prefixed=prefixed)
            explicit = _post(
                enforced_server, path, {**bodies[path], "modality_steer": "text"}, prefixed=prefixed
            )
            for reply in (implicit, explicit):
                assert reply.status == 200, (path, reply)
                assert reply.headers["x-modality-steer"].startswith("mode=text; gain=3"), (
                    path,
                    reply.headers,
                )
            assert _answer(path, implicit.json()) == _answer(path, explicit.json()), path
    reply = _post(enforced_server, "/v1/chat/completions", bodies["/v1/chat/completions"])
    expected = reference_steps(toy_reference(), load_profile(toy_profile_path()), serve_samples[3], "text")
    got = [
        (token.strip(), {k.strip(): v for k, v in top.items()})
        for token, top in _answer("/v1/chat/completions", reply.json())
    ]
    assert_same_steps(got, expected[: len(got)], 1e-3)


def test_beam_search_runs_enforced(enforced_server, serve_samples):
    """Under enforcement beam search runs text-steered: with one beam it is the greedy answer, which is the
    text-steered one of transformers, and text steering changes the answer of some samples."""
    beam = {"model": MODEL, "max_tokens": 3, "use_beam_search": True, "n": 1, "ignore_eos": True}
    profile = load_profile(toy_profile_path())
    differs = 0
    for sample in serve_samples[:8]:
        messages = openai_messages(sample)
        searched = _post(enforced_server, "/v1/chat/completions", {**beam, "messages": messages})
        assert searched.status == 200, searched
        greedy = _post(
            enforced_server,
            "/v1/chat/completions",
            {
                "model": MODEL,
                "messages": messages,
                "max_tokens": 3,
                "temperature": 0,
                "ignore_eos": True,
                "logprobs": True,
            },
        )
        answers = [r.json()["choices"][0]["message"]["content"].strip() for r in (searched, greedy)]
        assert answers[0] == answers[1], answers
        steered, unsteered = (
            [token for token, _ in reference_steps(toy_reference(), profile, sample, steer)][:3]
            for steer in ("text", "off")
        )
        assert [s["token"].strip() for s in greedy.json()["choices"][0]["logprobs"]["content"]] == steered
        differs += steered != unsteered
    assert differs > 0, "the samples must show the steering"


def test_every_route_of_the_running_server_needs_the_key(enforced_raw_server):
    """The route walk on the running app (under its root path): nothing but the public probes answers
    without the key, and nothing is generated; with the key, chat generates."""
    before = generated_tokens(enforced_raw_server.base_url)
    assert_every_route_needs_the_key(
        server_send(enforced_raw_server, ROOT),
        MODEL,
        API_KEY,
        nothing_reached=lambda: generated_tokens(enforced_raw_server.base_url) == before,
    )
    reply = _post(enforced_raw_server, "/v1/chat/completions", walk_body(MODEL))
    assert reply.status == 200, reply
    assert generated_tokens(enforced_raw_server.base_url) > before


# --------------------------------------------------------------------------------------------------
# No request form escapes the enforced steering: streaming, n > 1, both routes.
# --------------------------------------------------------------------------------------------------


def _stream_tokens(stream) -> list[str]:
    return [
        step.token
        for chunk in stream
        for choice in chunk.choices
        if choice.logprobs and choice.logprobs.content
        for step in choice.logprobs.content
    ]


def test_streaming_and_n_greater_than_one_stay_enforced(enforced_server, serve_samples):
    client = enforced_server.client()
    sample = serve_samples[3]
    expected = reference_steps(toy_reference(), load_profile(toy_profile_path()), sample, "text")
    common = {
        "model": MODEL,
        "messages": openai_messages(sample),
        "max_tokens": len(expected),
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 5,
        "extra_body": {"ignore_eos": True},
    }
    streamed = _stream_tokens(client.chat.completions.create(stream=True, **common))
    assert [t.strip() for t in streamed] == [token for token, _ in expected]
    # n > 1 needs sampling, so the sampled tokens may differ; the first step's logprobs (raw model
    # logprobs, before sampling) do not, and must be the text-steered ones in every choice.
    several = client.chat.completions.create(n=3, **{**common, "temperature": 0.7})
    assert len(several.choices) == 3
    first_step = [expected[0]]
    for choice in several.choices:
        step = choice.logprobs.content[0]
        got = [(step.token.strip(), {t.token.strip(): t.logprob for t in step.top_logprobs})]
        # The list holds the sampled token first when it is not among the top ones: compare the shared words.
        shared = set(got[0][1]) & set(first_step[0][1])
        assert len(shared) >= 4, (got, first_step)
        for word in shared:
            assert abs(got[0][1][word] - first_step[0][1][word]) < 1e-3, (word, got, first_step)
    for extra in ({"modality_steer": "off"}, {"vllm_xargs": {"modality_steer": "image"}}):
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(stream=True, **{**common, "extra_body": extra})
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(n=2, **{**common, "temperature": 0.5, "extra_body": extra})
        with pytest.raises(openai.PermissionDeniedError):
            client.completions.create(
                model=MODEL,
                prompt="USER: hi ASSISTANT:",
                max_tokens=2,
                stream=True,
                extra_body=extra,
            )
