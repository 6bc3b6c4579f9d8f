"""A tiny random-weight Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) with the toy vocabulary, for
architecture coverage in tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import torch

from ..model import QWEN_CHAT_TEMPLATE, QWEN_SPECIAL
from ..tokenizer import build_tokenizer
from .common import language_model_fields, save

# Images are resized to exactly 56 x 56: 4 x 4 patches of 14, merged 2 x 2 into 4 image tokens.
IMAGE_PIXELS = 56 * 56


def build(
    out_dir: Path,
    *,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    head_dim: int = 32,
    seed: int = 0,
) -> Path:
    """Write a random-weight Qwen2.5-VL checkpoint (fp32 safetensors, config, toy tokenizer, processor with
    chat template) to `out_dir` and return it.

    Language model: `layers` decoder layers of `heads` query heads and `kv_heads` key/value heads (None:
    as many as query heads) of `head_dim`, hidden `heads * head_dim`, MLP twice as wide, M-RoPE, 512
    positions, untied embeddings. Vision tower: 2 blocks of width 64 with 4 heads, window attention in the
    first and full attention in the last, 14-pixel patches merged 2 x 2 into the language model's width.

    Family facts, from transformers' `Qwen2_5_VLConfig` / `modeling_qwen2_5_vl` and vLLM's
    `vllm/model_executor/models/qwen2_5_vl.py`: the text config has no `head_dim` (it is
    `hidden_size / num_attention_heads`); `sum(mrope_section)` must be `head_dim / 2`; the vision
    tower's `out_hidden_size` is the language model's hidden size; `Qwen2_5_VLProcessor` uses
    `Qwen2VLImageProcessor` and the `<|vision_start|><|image_pad|><|vision_end|>` placeholder.
    """
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(QWEN_SPECIAL, QWEN_CHAT_TEMPLATE, image_token="<|image_pad|>")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL}
    hidden = heads * head_dim
    quarter = head_dim // 8
    config = Qwen2_5_VLConfig(
        text_config={
            **language_model_fields(
                tokenizer, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim
            ),
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter],
            },
        },
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 4,
            "out_hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    sizes = {"min_pixels": IMAGE_PIXELS, "max_pixels": IMAGE_PIXELS, "patch_size": 14, "merge_size": 2}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes, temporal_patch_size=2),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**sizes, temporal_patch_size=2),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    return save(model, processor, out_dir)
