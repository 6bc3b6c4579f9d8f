"""Tiny random-weight Qwen3-VL models with the toy vocabulary, for architecture coverage in tests and
benchmarks: dense (`Qwen3VLForConditionalGeneration`, :func:`build`) and mixture-of-experts
(`Qwen3VLMoeForConditionalGeneration`, :func:`build_moe`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..model import QWEN_CHAT_TEMPLATE, QWEN_SPECIAL
from ..tokenizer import build_tokenizer
from .common import language_model_fields, save

VISION_DEPTH = 2
PATCH_SIZE = 16
# Images are resized to exactly 64 x 64: 4 x 4 patches of 16, merged 2 x 2 into 4 image tokens.
IMAGE_PIXELS = 64 * 64
EXPERTS = 4
EXPERTS_PER_TOKEN = 2


def build(
    out_dir: Path,
    *,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    head_dim: int = 32,
    seed: int = 0,
) -> Path:
    """Write a random-weight dense Qwen3-VL checkpoint (fp32 safetensors, config, toy tokenizer, processor
    with chat template) to `out_dir` and return it.

    Language model: `layers` decoder layers of `heads` query heads and `kv_heads` key/value heads (None:
    as many as query heads) of `head_dim` with QK-norm, hidden `heads * head_dim`, MLP twice as wide,
    interleaved M-RoPE, 512 positions, untied embeddings. Vision tower: 2 blocks of width 64 with 4 heads,
    16-pixel patches merged 2 x 2 into the language model's width, an 8 x 8 grid of learned position
    embeddings, and DeepStack features from the first blocks added to the first decoder layers.

    Family facts, from transformers' `Qwen3VLConfig` / `modeling_qwen3_vl` / `Qwen3VLProcessor` and
    vLLM's `vllm/model_executor/models/qwen3_vl.py`: the text config's `head_dim` is explicit (default
    128); `sum(mrope_section)` must be `head_dim / 2` with `mrope_interleaved`; DeepStack feeds decoder
    layer `i` from vision block `deepstack_visual_indexes[i]`; `num_position_embeddings` is a square grid;
    images go through `Qwen2VLImageProcessor` with 16-pixel patches, sized by `size["shortest_edge"]` /
    `size["longest_edge"]` (in pixels), which vLLM reads.
    """
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    return _build(
        out_dir, Qwen3VLConfig, Qwen3VLForConditionalGeneration, {}, layers, heads, kv_heads, head_dim, seed
    )


def build_moe(
    out_dir: Path,
    *,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    head_dim: int = 32,
    seed: int = 0,
) -> Path:
    """Write a random-weight Qwen3-VL-MoE checkpoint to `out_dir` and return it: :func:`build`'s model with
    every decoder layer's MLP replaced by 4 experts of width `2 * heads * head_dim` (2 routed per token).

    Family facts, from transformers' `Qwen3VLMoeTextConfig` / `modeling_qwen3_vl_moe` /
    `conversion_mapping.py` and vLLM's `vllm/model_executor/models/qwen3_vl_moe.py` /
    `layers/fused_moe/routed_experts.py`: attention is Qwen3-VL's, only the MLPs differ;
    `tie_word_embeddings` defaults to true in the text config, so it is set false there too; vLLM's
    `Qwen3MoeSparseMoeBlock` reads `norm_topk_prob`, which transformers neither defines nor needs (its
    router always renormalises the top-k weights), so it is written into the text config. The experts
    are fused tensors, `[experts, 2 * width, hidden]` (gate, then up) and `[experts, hidden, width]` in
    transformers, but the hub layout, which vLLM reads (`is_fused_checkpoint_transposed`), swaps the
    last two dimensions; transformers' `save_pretrained` writes its own layout, so the saved tensors are
    transposed here. transformers loads either layout, choosing by shape, hence an expert width that
    differs from both `hidden` and `hidden / 2`.
    """
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    moe = {
        "num_experts": EXPERTS,
        "num_experts_per_tok": EXPERTS_PER_TOKEN,
        "moe_intermediate_size": 2 * heads * head_dim,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        # transformers always renormalises the routed weights; vLLM reads this flag, which the
        # transformers config does not define.
        "norm_topk_prob": True,
    }
    _build(
        out_dir,
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
        moe,
        layers,
        heads,
        kv_heads,
        head_dim,
        seed,
    )
    _transpose_experts(out_dir)
    return out_dir


def _transpose_experts(out_dir: Path) -> None:
    """Rewrite the saved fused expert tensors in the hub layout (last two dimensions swapped)."""
    from safetensors.torch import load_file, save_file

    for path in sorted(out_dir.glob("*.safetensors")):
        tensors = load_file(str(path))
        for key, tensor in tensors.items():
            if key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
                tensors[key] = tensor.transpose(1, 2).contiguous()
        save_file(tensors, str(path), metadata={"format": "pt"})


def _build(
    out_dir: Path,
    config_class: Any,
    model_class: Any,
    text_extra: dict[str, Any],
    layers: int,
    heads: int,
    kv_heads: int | None,
    head_dim: int,
    seed: int,
) -> Path:
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(QWEN_SPECIAL, QWEN_CHAT_TEMPLATE, image_token="<|image_pad|>")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL}
    hidden = heads * head_dim
    half = head_dim // 2
    # The proportions of the released models' [24, 20, 20] (head_dim 128).
    section = half * 5 // 16
    config = config_class(
        text_config={
            **language_model_fields(
                tokenizer, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim
            ),
            "head_dim": head_dim,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [half - 2 * section, section, section],
                "mrope_interleaved": True,
            },
            **text_extra,
        },
        vision_config={
            "depth": VISION_DEPTH,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 4,
            "out_hidden_size": hidden,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": list(range(min(VISION_DEPTH, layers))),
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model = model_class(config).eval()
    sizes = {"patch_size": PATCH_SIZE, "merge_size": 2, "temporal_patch_size": 2}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            size={"shortest_edge": IMAGE_PIXELS, "longest_edge": IMAGE_PIXELS}, **sizes
        ),
        tokenizer=tokenizer,
        # The video budget counts both frames of a temporal patch.
        video_processor=Qwen3VLVideoProcessor(
            size={"shortest_edge": 2 * IMAGE_PIXELS, "longest_edge": 2 * IMAGE_PIXELS}, **sizes
        ),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    return save(model, processor, out_dir)
