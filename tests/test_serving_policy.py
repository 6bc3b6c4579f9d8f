"""`--enforce-steer`: every request steered as enforced; anything else refused with 403."""

from __future__ import annotations

import json

import openai
import pytest
from helpers import (
    assert_same_steps,
    chat,
    reference_steps,
    serve,
    served_steps,
)

from steer_server import data as D
from steer_server import hf, toy
from steer_server.profile import load_profile

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def enforced_server(tiny_llava, llava_profile):
    with serve(
        tiny_llava, llava_profile, "--enforce-eager", steer_args=["--enforce-steer", "text"]
    ) as server:
        yield server


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
            messages=D.openai_messages(serve_samples[0]),
            max_tokens=2,
            extra_body=extra,
        )
    assert caught.value.body["param"] == "modality_steer" and "enforces" in caught.value.body["message"]


def test_enforced_policy_steers_requests_without_a_field(
    enforced_server, tiny_llava, llava_profile, serve_samples
):
    enforced = served_steps(chat(enforced_server.client(), str(tiny_llava), serve_samples[1]))
    expected = reference_steps(
        hf.load_model(tiny_llava), load_profile(llava_profile), serve_samples[1], "text"
    )
    assert_same_steps(enforced, expected, 1e-3)
    raw = enforced_server.client().chat.completions.with_raw_response.create(
        model=str(tiny_llava), messages=D.openai_messages(serve_samples[1]), max_tokens=2
    )
    assert raw.headers["x-modality-steer"].startswith("mode=text; gain=3")
    same = enforced_server.client().chat.completions.with_raw_response.create(
        model=str(tiny_llava),
        messages=D.openai_messages(serve_samples[1]),
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
    messages = D.openai_messages(serve_samples[2], with_instruction=False)

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
    sentence_tokens = len(
        toy.build_tokenizer()(D.INSTRUCTIONS["image"], add_special_tokens=False)["input_ids"]
    )
    assert defaulted.parse().usage.prompt_tokens == off.parse().usage.prompt_tokens + sentence_tokens
