"""`--enforce-steer`: every request steered as enforced; anything else refused with 403."""

from __future__ import annotations

import json

import openai
import pytest
from helpers import (
    assert_every_route_needs_the_key,
    assert_same_steps,
    chat,
    http_request,
    reference_steps,
    serve,
    served_steps,
)

from steer_server.data.prompts import INSTRUCTIONS, openai_messages
from steer_server.hf.model import load_model
from steer_server.profile import load_profile
from steer_server.toy.tokenizer import build_tokenizer

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


API_KEY = "test-key-7c1f"


class _KeyedServer:
    """The enforced server with its key filled in for every client."""

    def __init__(self, server):
        self.server = server
        self.base_url = server.base_url

    def client(self, **kwargs):
        return self.server.client(api_key=API_KEY, **kwargs)


@pytest.fixture(scope="module")
def enforced_raw_server(tiny_llava, llava_profile):
    with serve(
        tiny_llava,
        llava_profile,
        "--enforce-eager",
        "--api-key",
        API_KEY,
        steer_args=["--enforce-steer", "text"],
    ) as server:
        yield server


@pytest.fixture(scope="module")
def enforced_server(enforced_raw_server):
    return _KeyedServer(enforced_raw_server)


FORBIDDEN = [
    {"modality_steer": "image"},
    {"modality_steer": {"heads": [[0, 0, 1.0]]}},
    {"vllm_xargs": {"modality_steer": '{"heads": [[1, 3, 0.0]]}'}},
    {"modality_steer": "off"},
    {"modality_steer": {"follow": "text", "gain": 0}},
    {"vllm_xargs": {"modality_steer": "image"}},
    {"vllm_xargs": {"modality_steer": "off"}},
]


@pytest.mark.parametrize("extra", FORBIDDEN, ids=[json.dumps(e) for e in FORBIDDEN])
def test_enforced_policy_refuses_everything_else_with_403(enforced_server, tiny_llava, serve_samples, extra):
    with pytest.raises(openai.PermissionDeniedError) as caught:
        enforced_server.client().chat.completions.create(
            model=str(tiny_llava),
            messages=openai_messages(serve_samples[0]),
            max_tokens=2,
            extra_body=extra,
        )
    assert caught.value.body["param"] == "modality_steer" and "enforces" in caught.value.body["message"]


def test_enforced_policy_steers_requests_without_a_field(
    enforced_server, tiny_llava, llava_profile, serve_samples
):
    enforced = served_steps(chat(enforced_server.client(), str(tiny_llava), serve_samples[1]))
    expected = reference_steps(load_model(tiny_llava), load_profile(llava_profile), serve_samples[1], "text")
    assert_same_steps(enforced, expected, 1e-3)
    raw = enforced_server.client().chat.completions.with_raw_response.create(
        model=str(tiny_llava), messages=openai_messages(serve_samples[1]), max_tokens=2
    )
    assert raw.headers["x-modality-steer"].startswith("mode=text; gain=3")
    same = enforced_server.client().chat.completions.with_raw_response.create(
        model=str(tiny_llava),
        messages=openai_messages(serve_samples[1]),
        max_tokens=2,
        extra_body={"modality_steer": "text"},
    )
    assert same.headers["x-modality-steer"].startswith("mode=text; gain=3")
    with pytest.raises(openai.BadRequestError, match="gain must lie in"):
        enforced_server.client().completions.create(
            model=str(tiny_llava),
            prompt="x",
            max_tokens=2,
            extra_body={"modality_steer": {"follow": "text", "gain": -1}},
        )


@pytest.fixture(scope="module")
def default_inject_server(tiny_llava, llava_profile):
    args = ["--default-steer", "image", "--inject-instruction", "--allow-raw-heads"]
    with serve(tiny_llava, llava_profile, "--enforce-eager", steer_args=args) as server:
        yield server


def test_default_steer_and_injected_instruction(default_inject_server, tiny_llava, serve_samples):
    """A request without a field gets the default steering and the mode's instruction sentence; an explicit
    "off" is served unsteered and without the sentence."""
    client = default_inject_server.client()
    messages = openai_messages(serve_samples[2], with_instruction=False)

    def ask(extra):
        return client.chat.completions.with_raw_response.create(
            model=str(tiny_llava),
            messages=messages,
            max_tokens=4,
            temperature=0,
            logprobs=True,
            top_logprobs=5,
            extra_body={"ignore_eos": True, **extra},
        )

    defaulted, explicit, off = ask({}), ask({"modality_steer": "image"}), ask({"modality_steer": "off"})
    assert defaulted.headers["x-modality-steer"].startswith("mode=image; gain=3")
    assert "x-modality-steer" not in off.headers
    assert served_steps(defaulted.parse()) == served_steps(explicit.parse())
    sentence_tokens = len(build_tokenizer()(INSTRUCTIONS["image"], add_special_tokens=False)["input_ids"])
    assert defaulted.parse().usage.prompt_tokens == off.parse().usage.prompt_tokens + sentence_tokens


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


def test_streaming_and_n_greater_than_one_stay_enforced(
    enforced_server, tiny_llava, llava_profile, serve_samples
):
    client = enforced_server.client()
    sample = serve_samples[3]
    expected = reference_steps(load_model(tiny_llava), load_profile(llava_profile), sample, "text")
    common = {
        "model": str(tiny_llava),
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
                model=str(tiny_llava),
                prompt="USER: hi ASSISTANT:",
                max_tokens=2,
                stream=True,
                extra_body=extra,
            )


# --------------------------------------------------------------------------------------------------
# --api-key: nothing is served, and nothing about steering is answered, without the key.
# --------------------------------------------------------------------------------------------------

UNAUTHENTICATED = [
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "modality_steer": "off"},
    ),
    ("POST", "/v1/completions", {"prompt": "hi", "modality_steer": {"follow": "text", "gain": 99}}),
    ("POST", "/v1/completions", {"prompt": "hi", "vllm_xargs": {"modality_steer": "{broken"}}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/modality_steer/state", None),
]


@pytest.mark.parametrize(
    ("method", "path", "fields"), UNAUTHENTICATED, ids=[f"{m} {p}" for m, p, _ in UNAUTHENTICATED]
)
@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_api_key_is_required_before_anything_else(enforced_raw_server, tiny_llava, method, path, fields, key):
    """vLLM's authentication runs before modality-steer reads the request: a request without the key gets
    401, never a steering error (which would tell an anonymous client about the policy) or an answer."""
    body = None if fields is None else {"model": str(tiny_llava), "max_tokens": 2, **fields}
    status, _ = http_request(f"{enforced_raw_server.base_url}{path}", method, key, body, timeout=30)
    assert status == 401


def test_every_route_of_the_keyed_enforced_server_needs_the_key(enforced_raw_server, tiny_llava):
    """The route walk of tests/test_api_key.py on this server: an enforced policy, no root path."""
    assert_every_route_needs_the_key(enforced_raw_server, tiny_llava, API_KEY)


def test_state_endpoint_answers_with_the_key(enforced_raw_server):
    status, raw = http_request(
        f"{enforced_raw_server.base_url}/v1/modality_steer/state", key=API_KEY, timeout=30
    )
    assert status == 200
    state = json.loads(raw)
    assert [w["slots_in_use"] for w in state["workers"]] == [0]
