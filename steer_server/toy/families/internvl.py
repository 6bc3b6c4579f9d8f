"""A tiny random-weight InternVL (HF-native `InternVLForConditionalGeneration`, the `-hf` checkpoint
layout) with the toy vocabulary: architecture coverage for tests; vLLM serves it with its InternS1
class."""

from __future__ import annotations

from pathlib import Path

import torch

from ..tokenizer import CHAT_TEMPLATE, build_tokenizer
from .common import language_model_fields, save

START_IMAGE = "<img>"
END_IMAGE = "</img>"
CONTEXT_IMAGE = "<IMG_CONTEXT>"
VIDEO = "<video>"
INTERNVL_SPECIAL = (START_IMAGE, END_IMAGE, CONTEXT_IMAGE, VIDEO)
# The processor expands each context token into `<img>`, the image's tokens, `</img>`.
INTERNVL_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<image>\n", CONTEXT_IMAGE + "\n")
IMAGE_SIZE = 64
PATCH_SIZE = 8
DOWNSAMPLE_RATIO = 0.5
IMAGE_SEQ_LENGTH = int((IMAGE_SIZE // PATCH_SIZE) ** 2 * DOWNSAMPLE_RATIO**2)


def build(
    out_dir: Path,
    *,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    head_dim: int = 32,
    seed: int = 0,
) -> Path:
    """Write a random-weight InternVL checkpoint (config, fp32 weights, tokenizer, processor with chat
    template) to `out_dir` and return it.

    Language model: Qwen2 with `layers` decoder layers, `heads` query heads of `head_dim` (hidden
    `heads * head_dim`, MLP twice that), `kv_heads` key/value heads (None: as many as `heads`).
    Vision: a 2-layer InternViT of width 64 on 64x64 images in 8-pixel patches; the pixel shuffle
    (downsample ratio 0.5) leaves 16 image tokens per image, and crop_to_patches=False keeps one tile.

    Family facts (transformers `InternVLProcessor`, `GotOcr2ImageProcessor`; vLLM
    `model_executor/models/interns1.py`): the processor reads `start_image_token`, `end_image_token`,
    `context_image_token` and `video_token` from the tokenizer, and the chat template's image placeholder
    is the context token.
    """
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(INTERNVL_SPECIAL, INTERNVL_CHAT_TEMPLATE, image_token=CONTEXT_IMAGE)
    # Named special tokens the processor reads as tokenizer attributes (saved in tokenizer_config.json);
    # transformers 5.19 has no public setter for them.
    tokenizer._set_model_specific_special_tokens(
        {
            "start_image_token": START_IMAGE,
            "end_image_token": END_IMAGE,
            "context_image_token": CONTEXT_IMAGE,
            "video_token": VIDEO,
        }
    )
    config = InternVLConfig(
        text_config={
            "model_type": "qwen2",
            **language_model_fields(
                tokenizer, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim
            ),
        },
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
        },
        image_token_id=tokenizer.convert_tokens_to_ids(CONTEXT_IMAGE),
        image_seq_length=IMAGE_SEQ_LENGTH,
        downsample_ratio=DOWNSAMPLE_RATIO,
        tie_word_embeddings=False,
        architectures=["InternVLForConditionalGeneration"],
    )
    model = InternVLForConditionalGeneration(config).eval()
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=False),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size=size),
        image_seq_length=IMAGE_SEQ_LENGTH,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    return save(model, processor, out_dir)
