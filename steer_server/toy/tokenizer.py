"""The toy model's vocabulary, word-level tokenizer, chat template and LLaVA processor (built in code:
no downloads)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ..data.prompts import CONTEXT_LABEL, FORMAT_CONSTRAINT, INSTRUCTIONS
from ..data.synth import IMAGE_SIZE, QUESTIONS, TASKS, describe, values_of

TOY_MODEL_NAME = "modality-steer-toy-llava"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN)
PATCH_SIZE = 8
IMAGE_SEQ_LENGTH = (IMAGE_SIZE // PATCH_SIZE) ** 2
# The chat template accepts a plain string or OpenAI-style content parts, so transformers and vLLM's
# chat endpoint render the same prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n"
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}</s>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_WORD = re.compile(r"\w+|[^\w\s]+")


def vocabulary() -> list[str]:
    """Every word the synthetic prompts and answers can contain, in a fixed order."""
    texts: list[str] = [*INSTRUCTIONS.values(), FORMAT_CONSTRAINT, CONTEXT_LABEL, "USER: ASSISTANT:"]
    texts += list(QUESTIONS.values())
    for task in TASKS:
        for value in values_of(task):
            texts += [describe(task, value, emphatic=e) for e in (False, True)]
    words: dict[str, None] = {}
    for text in texts:
        for word in _WORD.findall(text):
            words.setdefault(word, None)
    return [*SPECIAL_TOKENS, *words]


def build_tokenizer(
    extra_special: Sequence[str] = (), chat_template: str = CHAT_TEMPLATE, image_token: str = IMAGE_TOKEN
) -> Any:
    """A word-level fast tokenizer: one token per word, so every answer is a single token."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate([*vocabulary(), *extra_special])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in extra_special])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": image_token},
        model_max_length=512,
        padding_side="right",
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def build_processor(tokenizer: Any) -> Any:
    """A `LlavaProcessor` for 32x32 images (patch 8: 16 image tokens) around the toy tokenizer."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
