"""A tiny random-weight GLM-4.1V (`Glm4vForConditionalGeneration`) with the toy vocabulary, for
architecture coverage in tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import torch

from ..tokenizer import CHAT_TEMPLATE, build_tokenizer
from .common import language_model_fields, save

GLM_SPECIAL = (
    "<|begin_of_image|>",
    "<|image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|video|>",
    "<|end_of_video|>",
)
GLM_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<image>\n", "<|begin_of_image|><|image|><|end_of_image|>\n")
# smart_resize's minimum, which vLLM assumes when it sizes images: a 32 x 32 image becomes 84 x 84,
# 6 x 6 patches of 14 merged 2 x 2 into 9 image tokens.
IMAGE_PIXELS = 112 * 112


def build(
    out_dir: Path,
    *,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    head_dim: int = 32,
    seed: int = 0,
) -> Path:
    """Write a random-weight GLM-4.1V checkpoint (fp32 safetensors, config, toy tokenizer, processor with
    chat template) to `out_dir` and return it.

    Language model: `layers` decoder layers of `heads` query heads and `kv_heads` key/value heads (None:
    as many as query heads) of `head_dim`, hidden `heads * head_dim`, MLP twice as wide, 3-D M-RoPE on
    half of each head, 512 positions, untied embeddings. Vision tower: 2 blocks of width 64 with 4 heads,
    14-pixel patches, a 6 x 6 grid of learned position embeddings, a 2 x 2 convolution down to the
    language model's width and a merger MLP as wide as the language model's.

    Family facts, from transformers' `Glm4vConfig` / `modeling_glm4v` / `Glm4vProcessor` /
    `image_processing_glm4v.smart_resize` and vLLM's `vllm/model_executor/models/glm4_1v.py`: the text
    config has no `head_dim` (it is `hidden_size / num_attention_heads`); rotary covers
    `partial_rotary_factor` (0.5) of a head, so `sum(mrope_section)` must be `head_dim / 4`; the vision
    MLP is `out_hidden_size` wide and the merger `intermediate_size` wide; the processor's
    `size["longest_edge"]` and `size["shortest_edge"]` are pixel areas counting both frames of a
    temporal patch, and vLLM sizes images with smart_resize's default minimum (112 x 112) and the
    configured `longest_edge`; the placeholder is `<|begin_of_image|><|image|><|end_of_image|>`, and
    vLLM's video path looks up `<|begin_of_video|>`, `<|video|>`, `<|end_of_video|>` in the vocabulary.
    """
    from transformers import (
        Glm4vConfig,
        Glm4vForConditionalGeneration,
        Glm4vImageProcessor,
        Glm4vProcessor,
        Glm4vVideoProcessor,
    )

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(GLM_SPECIAL, GLM_CHAT_TEMPLATE, image_token="<|image|>")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in GLM_SPECIAL}
    hidden = heads * head_dim
    rotary_half = head_dim // 4
    # The proportions of the released model's [8, 12, 12] (head_dim 128).
    section = rotary_half * 3 // 8
    config = Glm4vConfig(
        text_config={
            **language_model_fields(
                tokenizer, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim
            ),
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "mrope_section": [rotary_half - 2 * section, section, section],
            },
        },
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": hidden * 2,
            "num_heads": 4,
            "out_hidden_size": hidden,
            "image_size": 84,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image|>"],
        video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"],
        video_end_token_id=ids["<|end_of_video|>"],
        tie_word_embeddings=False,
    )
    model = Glm4vForConditionalGeneration(config).eval()
    size = {"shortest_edge": IMAGE_PIXELS, "longest_edge": IMAGE_PIXELS}
    sizes = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}
    processor = Glm4vProcessor(
        image_processor=Glm4vImageProcessor(size=size, **sizes),
        tokenizer=tokenizer,
        video_processor=Glm4vVideoProcessor(size=size, **sizes),
        chat_template=GLM_CHAT_TEMPLATE,
    )
    return save(model, processor, out_dir)
