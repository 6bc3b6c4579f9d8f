"""A tiny random-weight Gemma 3 (`Gemma3ForConditionalGeneration`) with the toy vocabulary, for
architecture coverage in tests: SigLIP vision tower, average-pooled soft tokens, a Gemma 3 text model
with QK-norm, alternating sliding-window and global layers, and bidirectional attention over image
tokens."""

from __future__ import annotations

from pathlib import Path

import torch

from ..model import save_checkpoint
from ..tokenizer import CHAT_TEMPLATE, build_tokenizer
from .common import language_model_fields

BOI_TOKEN = "<start_of_image>"
EOI_TOKEN = "<end_of_image>"
IMAGE_TOKEN = "<image_soft_token>"
# vLLM's Gemma 3 processor looks these up in the vocabulary to merge the newlines around an image.
NEWLINES = ("\n", "\n\n", "\n\n\n", "\n\n\n\n")
SPECIAL = (BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN, *NEWLINES)
# The processor expands the placeholder to "\n\n<boi><soft tokens><eoi>\n\n", so the template adds no
# newline of its own after it.
CHAT_TEMPLATE_GEMMA3 = CHAT_TEMPLATE.replace("<image>\n", BOI_TOKEN)
IMAGE_SIZE = 64
PATCH_SIZE = 8
TOKENS_PER_IMAGE = 16
SLIDING_WINDOW = 64


def build(
    out_dir: Path,
    *,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    head_dim: int = 32,
    seed: int = 0,
) -> Path:
    """Write a random-weight Gemma 3 checkpoint (config, fp32 weights, tokenizer, processor with chat
    template) to `out_dir` and return it.

    Text model: `layers` decoder layers of `heads` query heads and `kv_heads` KV heads (default `heads`)
    of `head_dim`, hidden `heads * head_dim`, MLP twice as wide; every second layer global, the others
    sliding-window (64 tokens). Vision: a 2-layer SigLIP on 64x64 images (8x8 patches of 8 px),
    average-pooled to 16 soft tokens per image. Family facts from transformers' `Gemma3Config`,
    `Gemma3MultiModalProjector`, `Gemma3Processor` and vLLM's `gemma3_mm.Gemma3MultiModalProcessor`
    (the tokenizer's `boi_token`, `eoi_token`, `image_token`, and the newline tokens).

    transformers attends bidirectionally within each image (the processor's `token_type_ids`); vLLM's
    CPU attention backend has no multimodal-prefix support and attends causally there, so on CPU the
    two agree on image prompts only when transformers gets no `token_type_ids`.
    """
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
    )

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(SPECIAL, CHAT_TEMPLATE_GEMMA3, image_token=IMAGE_TOKEN)
    # What transformers' tokenizer __init__ does with model-specific `*_token` arguments; saved with it.
    tokenizer._set_model_specific_special_tokens({"boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN})
    config = Gemma3Config(
        text_config={
            **language_model_fields(
                tokenizer, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim
            ),
            "head_dim": head_dim,
            "query_pre_attn_scalar": head_dim,
            "sliding_window": SLIDING_WINDOW,
            "layer_types": ["full_attention" if i % 2 else "sliding_attention" for i in range(layers)],
        },
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "vision_use_head": False,
        },
        mm_tokens_per_image=TOKENS_PER_IMAGE,
        boi_token_index=tokenizer.convert_tokens_to_ids(BOI_TOKEN),
        eoi_token_index=tokenizer.convert_tokens_to_ids(EOI_TOKEN),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        tie_word_embeddings=False,
        architectures=["Gemma3ForConditionalGeneration"],
    )
    model = Gemma3ForConditionalGeneration(config).eval()
    # transformers initialises the image projection to zeros, which would make every image invisible.
    projection = model.model.multi_modal_projector.mm_input_projection_weight
    with torch.no_grad():
        projection.normal_(std=config.initializer_range)
    image_processor = Gemma3ImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_pan_and_scan=False
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE_GEMMA3,
        image_seq_length=TOKENS_PER_IMAGE,
    )
    save_checkpoint(model, processor, out_dir)
    return out_dir
