"""Tiny random-weight Idefics3 and SmolVLM models (`Idefics3ForConditionalGeneration`,
`SmolVLMForConditionalGeneration`: the same layout) with the toy vocabulary: architecture coverage for
tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..tokenizer import CHAT_TEMPLATE, build_tokenizer
from .common import language_model_fields, save

FAKE_IMAGE = "<fake_token_around_image>"
GLOBAL_IMAGE = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"
VIDEO = "<video>"
# The processors look every tile tag up in the vocabulary (6 x 6 of them), used or not.
TILE_TAGS = tuple(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7))
IDEFICS3_SPECIAL = (FAKE_IMAGE, GLOBAL_IMAGE, END_OF_UTTERANCE, *TILE_TAGS)
SMOLVLM_SPECIAL = (*IDEFICS3_SPECIAL, VIDEO)
# A 32-pixel tile in 8-pixel patches, pixel-shuffled by 2: 4 image tokens per tile. Images are resized to
# a longest edge of 64 and split into 2 x 2 tiles, then a global view follows them: 5 tiles an image.
TILE_SIZE = 32
PATCH_SIZE = 8
SCALE_FACTOR = 2
RESIZED_EDGE = 2 * TILE_SIZE
IMAGE_SEQ_LEN = (TILE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2


def build(
    out_dir: Path,
    *,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    head_dim: int = 32,
    seed: int = 0,
) -> Path:
    """Write a random-weight Idefics3 checkpoint (config, fp32 weights, tokenizer, processor with chat
    template) to `out_dir` and return it.

    Language model: Llama with `layers` decoder layers (`model.text_model.layers`), `heads` query heads
    of `head_dim` (hidden `heads * head_dim`, MLP twice that), `kv_heads` key/value heads (None: as many
    as `heads`). Vision: a 2-layer SigLIP-style tower of width 64 on 32-pixel tiles in 8-pixel patches;
    the connector's pixel shuffle (scale factor 2) leaves 4 tokens a tile. A 32x32 image is resized to
    64x64 and split into 2 x 2 tiles plus a global view: 20 image tokens between `<row_i_col_j>`,
    `<global-img>` and `<fake_token_around_image>` tags.

    Family facts (transformers `Idefics3Processor`, `Idefics3ImageProcessor`; vLLM
    `model_executor/models/idefics3.py`): the processor looks up `<row_i_col_j>` for i, j in 1..6, so
    every such token must be in the vocabulary before the model is built.
    """
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(IDEFICS3_SPECIAL, CHAT_TEMPLATE)
    config = Idefics3Config(**_config_kwargs(tokenizer, layers, heads, kv_heads, head_dim))
    config.architectures = ["Idefics3ForConditionalGeneration"]
    model = Idefics3ForConditionalGeneration(config).eval()
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(do_image_splitting=True, **_sizes()),
        tokenizer=tokenizer,
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=CHAT_TEMPLATE,
    )
    return save(model, processor, out_dir)


def build_smolvlm(
    out_dir: Path,
    *,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    head_dim: int = 32,
    seed: int = 0,
) -> Path:
    """Write a random-weight SmolVLM checkpoint to `out_dir` and return it: the geometry, tiling and
    image tokens of :func:`build`, with SmolVLM's classes.

    Family facts (transformers `SmolVLMProcessor`, `SmolVLMVideoProcessor`; vLLM
    `model_executor/models/smolvlm.py`): the processor also needs a video processor and a `<video>` token,
    and it imports `num2words` (it refuses to start without that package).
    """
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(SMOLVLM_SPECIAL, CHAT_TEMPLATE)
    config = SmolVLMConfig(**_config_kwargs(tokenizer, layers, heads, kv_heads, head_dim))
    config.architectures = ["SmolVLMForConditionalGeneration"]
    model = SmolVLMForConditionalGeneration(config).eval()
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(do_image_splitting=True, **_sizes()),
        tokenizer=tokenizer,
        video_processor=SmolVLMVideoProcessor(**_sizes()),
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=CHAT_TEMPLATE,
    )
    return save(model, processor, out_dir)


def _config_kwargs(
    tokenizer: Any, layers: int, heads: int, kv_heads: int | None, head_dim: int
) -> dict[str, Any]:
    """Keyword arguments of `Idefics3Config` and `SmolVLMConfig` (the same fields)."""
    return {
        "text_config": {
            "model_type": "llama",
            **language_model_fields(
                tokenizer, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim
            ),
            "head_dim": head_dim,
        },
        "vision_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": TILE_SIZE,
            "patch_size": PATCH_SIZE,
        },
        "image_token_id": tokenizer.convert_tokens_to_ids(tokenizer.image_token),
        "scale_factor": SCALE_FACTOR,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }


def _sizes() -> dict[str, Any]:
    """Image (and video frame) processor sizes: resize to :data:`RESIZED_EDGE`, tiles of :data:`TILE_SIZE`."""
    return {"size": {"longest_edge": RESIZED_EDGE}, "max_image_size": {"longest_edge": TILE_SIZE}}
