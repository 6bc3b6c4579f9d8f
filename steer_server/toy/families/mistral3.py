"""A tiny random-weight Mistral 3 (`Mistral3ForConditionalGeneration`) with the toy vocabulary, for
architecture coverage in tests: Pixtral vision tower (2-D RoPE, images at their own size), a patch
merger, and a Mistral language model."""

from __future__ import annotations

from pathlib import Path

import torch

from ..tokenizer import CHAT_TEMPLATE, build_tokenizer
from .common import language_model_fields, save

IMAGE_TOKEN = "[IMG]"
IMAGE_BREAK_TOKEN = "[IMG_BREAK]"
IMAGE_END_TOKEN = "[IMG_END]"
SPECIAL = (IMAGE_TOKEN, IMAGE_BREAK_TOKEN, IMAGE_END_TOKEN)
CHAT_TEMPLATE_MISTRAL3 = CHAT_TEMPLATE.replace("<image>\n", IMAGE_TOKEN + "\n")
IMAGE_SIZE = 32
PATCH_SIZE = 4
SPATIAL_MERGE = 2


def build(
    out_dir: Path,
    *,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    head_dim: int = 32,
    seed: int = 0,
) -> Path:
    """Write a random-weight Mistral 3 checkpoint (config, fp32 weights, tokenizer, processor with chat
    template) to `out_dir` and return it.

    Text model: a Mistral (no sliding window) of `layers` decoder layers, `heads` query heads and
    `kv_heads` KV heads (default `heads`) of `head_dim`, hidden `heads * head_dim`, MLP twice as wide.
    Vision: a 2-layer Pixtral on images up to 32 px (patches of 4 px), 2x2 patches merged into one token:
    a 32x32 image becomes 4 rows of 4 `[IMG]` tokens, each row ended by `[IMG_BREAK]` and the last by
    `[IMG_END]`. Family facts from transformers' `Mistral3Config`, `PixtralVisionConfig`,
    `PixtralProcessor` and vLLM's `mistral3.Mistral3MultiModalProcessor`.
    """
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        PixtralImageProcessor,
        PixtralProcessor,
    )

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(SPECIAL, CHAT_TEMPLATE_MISTRAL3, image_token=IMAGE_TOKEN)
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            **language_model_fields(
                tokenizer, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim
            ),
            "head_dim": head_dim,
            "sliding_window": None,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "head_dim": 32,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
        },
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        spatial_merge_size=SPATIAL_MERGE,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
        architectures=["Mistral3ForConditionalGeneration"],
    )
    model = Mistral3ForConditionalGeneration(config).eval()
    image_processor = PixtralImageProcessor(
        size={"longest_edge": IMAGE_SIZE}, patch_size={"height": PATCH_SIZE, "width": PATCH_SIZE}
    )
    processor = PixtralProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        spatial_merge_size=SPATIAL_MERGE,
        chat_template=CHAT_TEMPLATE_MISTRAL3,
        image_token=IMAGE_TOKEN,
        image_break_token=IMAGE_BREAK_TOKEN,
        image_end_token=IMAGE_END_TOKEN,
    )
    return save(model, processor, out_dir)
