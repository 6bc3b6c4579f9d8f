"""A tiny random-weight Llama 4 (`Llama4ForConditionalGeneration`: mixture-of-experts language model
with chunked local attention, tiled images) with the toy vocabulary: architecture coverage for tests."""

from __future__ import annotations

from pathlib import Path

import torch

from ..tokenizer import CHAT_TEMPLATE, build_tokenizer
from .common import language_model_fields, save

IMAGE = "<|image|>"
PATCH = "<|patch|>"
LLAMA4_SPECIAL = (
    "<|image_start|>",
    "<|image_end|>",
    IMAGE,
    PATCH,
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
)
LLAMA4_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<image>\n", IMAGE + "\n")
# 32-pixel tiles in 2-pixel patches, pixel-shuffled by 0.5: 64 image tokens a tile. A 32x32 image is one
# tile (images are not upscaled); larger ones are split into up to 4 tiles plus a global view.
TILE_SIZE = 32
PATCH_SIZE = 2
MAX_TILES = 4
PIXEL_SHUFFLE_RATIO = 0.5
# vLLM needs a chunk that is a multiple of its KV-cache block size (128 on CPU); prompts with an image
# are longer than that, so their chunked layers attend within chunks.
ATTENTION_CHUNK_SIZE = 128
EXPERTS = 4


def build(
    out_dir: Path,
    *,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int | None = None,
    head_dim: int = 32,
    seed: int = 0,
) -> Path:
    """Write a random-weight Llama 4 checkpoint (config, fp32 weights, tokenizer, processor with chat
    template) to `out_dir` and return it.

    Language model: `layers` decoder layers (`language_model.model.layers`), `heads` query heads of
    `head_dim` (hidden `heads * head_dim`), `kv_heads` key/value heads (None: as many as `heads`). As in
    the family, every fourth layer is a global attention layer without RoPE and the others use RoPE
    with chunked local attention (here chunks of 128 tokens); every second layer's MLP is a mixture of 4
    experts (one routed plus the shared expert), the others are dense (MLPs twice the hidden size).
    Vision: a 2-layer tower of width 64 on 32-pixel tiles in 2-pixel patches; the pixel-shuffle adapter
    (ratio 0.5) leaves 64 tokens a tile. A 32x32 image is a single tile (64 image tokens), so a prompt
    with an image spans two attention chunks.

    Family facts (transformers `Llama4TextConfig`, `Llama4VisionPixelShuffleMLP`, `Llama4Processor`;
    vLLM `model_executor/models/mllama4.py`): the vision `intermediate_size` must be 4 x its hidden size
    (the pixel shuffle's output), image features go to `<|patch|>` tokens (the config's
    `image_token_index`) and the chat template's placeholder is `<|image|>`.
    """
    from transformers import (
        Llama4Config,
        Llama4ForConditionalGeneration,
        Llama4ImageProcessor,
        Llama4Processor,
    )

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(LLAMA4_SPECIAL, LLAMA4_CHAT_TEMPLATE, image_token=IMAGE)
    hidden = heads * head_dim
    vision_hidden = 64
    projector = 128
    config = Llama4Config(
        text_config={
            **language_model_fields(
                tokenizer, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim
            ),
            "intermediate_size_mlp": hidden * 2,
            "head_dim": head_dim,
            "num_local_experts": EXPERTS,
            "num_experts_per_tok": 1,
            "interleave_moe_layer_step": 2,
            "attention_chunk_size": ATTENTION_CHUNK_SIZE,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        },
        vision_config={
            "hidden_size": vision_hidden,
            "intermediate_size": 4 * vision_hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": TILE_SIZE,
            "patch_size": PATCH_SIZE,
            "pixel_shuffle_ratio": PIXEL_SHUFFLE_RATIO,
            "vision_output_dim": projector,
            "projector_input_dim": projector,
            "projector_output_dim": projector,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
        boi_token_index=tokenizer.convert_tokens_to_ids("<|image_start|>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<|image_end|>"),
        image_token_index=tokenizer.convert_tokens_to_ids(PATCH),
        tie_word_embeddings=False,
        architectures=["Llama4ForConditionalGeneration"],
    )
    model = Llama4ForConditionalGeneration(config).eval()
    image_processor = Llama4ImageProcessor(
        size={"height": TILE_SIZE, "width": TILE_SIZE}, max_patches=MAX_TILES
    )
    processor = Llama4Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        pixel_shuffle_ratio=PIXEL_SHUFFLE_RATIO,
        chat_template=LLAMA4_CHAT_TEMPLATE,
    )
    return save(model, processor, out_dir)
