"""Real vLLM engines (CPU here): the installed stack serves a tiny LLaVA the test built, and the committed
toy model gives the same greedy answers in vLLM as in transformers."""

from __future__ import annotations

import base64
import io
import math

import pytest
from PIL import Image

from steer_server.data.prompts import openai_messages
from steer_server.data.schema import LoadedSample
from steer_server.hf.model import encode, last_position_logits, load_model
from steer_server.toy.model import toy_model_dir
from steer_server.toy.tokenizer import IMAGE_SEQ_LENGTH

pytestmark = pytest.mark.vllm


def _image_url(colour: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_tiny_random_llava_generates(tiny_llava_server, tiny_llava):
    client = tiny_llava_server.client()
    chat = client.chat.completions.create(
        model=str(tiny_llava),
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _image_url((200, 30, 30))}},
                    {"type": "text", "text": "What colour is the object?"},
                ],
            }
        ],
        max_tokens=6,
        temperature=0,
    )
    assert chat.choices[0].message.content.strip()
    assert chat.usage.completion_tokens == 6
    # USER : <image> x16 (the placeholder expanded to the vision tower's patches), 6 words, ASSISTANT :
    assert chat.usage.prompt_tokens == 2 + IMAGE_SEQ_LENGTH + 6 + 2
    text = client.completions.create(
        model=str(tiny_llava),
        prompt="USER: What shape is the object? ASSISTANT:",
        max_tokens=4,
        temperature=0,
    )
    assert text.choices[0].text.strip() and text.usage.completion_tokens == 4


def _vllm_first_token(server, loaded: LoadedSample) -> tuple[str, dict[str, float]]:
    reply = server.client().chat.completions.create(
        model=str(toy_model_dir()),
        messages=openai_messages(loaded),
        max_tokens=1,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
    )
    first = reply.choices[0].logprobs.content[0]
    return first.token.strip(), {t.token.strip(): t.logprob for t in first.top_logprobs}


def test_toy_vllm_and_transformers_agree(toy_server, toy_test_samples):
    chosen = toy_test_samples[:48]
    loaded = load_model(toy_model_dir())
    import torch

    with torch.inference_mode():
        logits = last_position_logits(loaded, encode(loaded, chosen))
    reference = torch.log_softmax(logits, dim=-1)
    tokenizer = loaded.processor.tokenizer
    for row, sample in enumerate(chosen):
        token, top = _vllm_first_token(toy_server, sample)
        expected = tokenizer.decode([int(reference[row].argmax())]).strip()
        assert token == expected, sample.sample.id
        top5 = torch.topk(reference[row], 5)
        for logprob, index in zip(top5.values.tolist(), top5.indices.tolist(), strict=True):
            word = tokenizer.decode([index]).strip()
            assert math.isclose(top[word], logprob, abs_tol=1e-3), (sample.sample.id, word)
