"""A tiny random-weight LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`) with the toy
vocabulary, for architecture coverage in tests: SigLIP vision tower, AnyRes tiling with image-newline
tokens, a Qwen2 language model."""

from __future__ import annotations

from pathlib import Path

import torch

from ..model import save_checkpoint
from ..tokenizer import CHAT_TEMPLATE, IMAGE_TOKEN, build_tokenizer
from .common import language_model_fields

VIDEO_TOKEN = "<video>"
TILE_SIZE = 16
PATCH_SIZE = 4
# Tilings of 16 px tiles up to 2 x 2: the synthetic 32 px images take a base tile and four tiles.
GRID_PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32]]


def build(
    out_dir: Path,
    *,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    head_dim: int = 32,
    seed: int = 0,
) -> Path:
    """Write a random-weight LLaVA-OneVision checkpoint (config, fp32 weights, tokenizer, processor with
    chat template) to `out_dir` and return it.

    Text model: a Qwen2 of `layers` decoder layers, `heads` query heads and `kv_heads` KV heads (default
    `heads`) of `head_dim`, hidden `heads * head_dim`, MLP twice as wide. Vision: a 2-layer SigLIP on
    16x16 tiles (4x4 patches of 4 px, all kept: strategy "full"); a 32x32 image becomes a base tile and a
    2x2 tiling, 16 + 8 x 8 + 8 newline = 88 image tokens. Family facts from transformers'
    `LlavaOnevisionConfig`, `LlavaOnevisionProcessor` and `LlavaOnevisionImageProcessor`, and vLLM's
    `llava_onevision.LlavaOnevisionMultiModalProcessor` (which also needs a video token and processor).
    """
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    torch.manual_seed(seed)
    tokenizer = build_tokenizer((VIDEO_TOKEN,), CHAT_TEMPLATE, image_token=IMAGE_TOKEN)
    # What transformers' tokenizer __init__ does with model-specific `*_token` arguments; saved with it.
    tokenizer._set_model_specific_special_tokens({"video_token": VIDEO_TOKEN})
    config = LlavaOnevisionConfig(
        text_config={
            "model_type": "qwen2",
            **language_model_fields(
                tokenizer, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim
            ),
            "head_dim": head_dim,
        },
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": TILE_SIZE,
            "patch_size": PATCH_SIZE,
            "vision_use_head": False,
        },
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=GRID_PINPOINTS,
        tie_word_embeddings=False,
        architectures=["LlavaOnevisionForConditionalGeneration"],
    )
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": TILE_SIZE, "width": TILE_SIZE}, image_grid_pinpoints=GRID_PINPOINTS
    )
    video_processor = LlavaOnevisionVideoProcessor(size={"height": TILE_SIZE, "width": TILE_SIZE})
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=(TILE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        video_token=VIDEO_TOKEN,
    )
    save_checkpoint(model, processor, out_dir)
    return out_dir
