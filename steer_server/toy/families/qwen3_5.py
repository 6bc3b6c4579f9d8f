"""A tiny random-weight Qwen3.5 (`Qwen3_5ForConditionalGeneration`) with the toy vocabulary, for
architecture coverage in tests: a hybrid language model (full attention on some layers, Gated DeltaNet
linear attention on the others) under a Qwen3.5 vision tower."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..model import QWEN_CHAT_TEMPLATE, QWEN_SPECIAL
from ..tokenizer import SPECIAL_TOKENS, vocabulary
from .common import language_model_fields, save

# Images are resized to exactly 64 x 64: 4 x 4 patches of 16, merged 2 x 2 into 4 image tokens.
IMAGE_PIXELS = 64 * 64
PATCH_SIZE = 16
# vLLM's CPU `chunk_gated_delta_rule_cpu` (`_custom_ops.py`) rejects smaller linear-attention heads
# ("Unexpected head dim size, 32").
LINEAR_HEAD_DIM = 128


def build(
    out_dir: Path,
    *,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int | None = None,
    head_dim: int = 32,
    seed: int = 0,
    full_attention_interval: int = 2,
) -> Path:
    """Write a random-weight Qwen3.5 checkpoint (config, float32 safetensors, a byte-level BPE tokenizer
    over the toy vocabulary (:func:`build_tokenizer`), processor with chat template) to `out_dir` and
    return it.

    Language model: `layers` decoder layers, hidden `heads * head_dim`, MLP twice as wide, untied
    embeddings. Layer `i` has full attention when `(i + 1) % full_attention_interval == 0` (the defaults
    put it on layers 1 and 3), with `heads` query heads and `kv_heads` key/value heads (None: as many as
    query heads) of `head_dim`, QK-norm and a sigmoid output gate per head; the other layers have Gated
    DeltaNet linear attention with 2 key and 2 value heads of 128. Partial (1/4) interleaved M-RoPE.
    Vision tower: 2 blocks of width 64 with 4 heads, 16-pixel patches merged 2 x 2 into the language
    model's width. The weights are float32 values that bfloat16 represents exactly, so a bfloat16 serve
    (the only dtype vLLM's CPU Gated DeltaNet kernel takes) runs the same weights as a float32 reference.

    Family facts, from transformers' `Qwen3_5TextConfig` / `modeling_qwen3_5` and vLLM's
    `vllm/model_executor/models/qwen3_5.py` and `layers/mamba/ops/cpu/gdn_attention.py`: `layer_types`
    names each layer `full_attention` or `linear_attention` and only the former have `self_attn`;
    `sum(mrope_section)` is half the rotary dimension `head_dim * partial_rotary_factor`; the vision
    tower's `out_hidden_size` is the language model's hidden size; the processor is `Qwen3VLProcessor`
    with `Qwen2VLImageProcessor` and the `<|vision_start|><|image_pad|><|vision_end|>` placeholder.
    """
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3_5Config,
        Qwen3_5ForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL}
    hidden = heads * head_dim
    partial_rotary = 0.25
    half_rotary = int(head_dim * partial_rotary) // 2
    spatial = half_rotary // 4
    config = Qwen3_5Config(
        text_config={
            **language_model_fields(
                tokenizer, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim
            ),
            "head_dim": head_dim,
            "layer_types": [
                "full_attention" if (i + 1) % full_attention_interval == 0 else "linear_attention"
                for i in range(layers)
            ],
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 2,
            "linear_key_head_dim": LINEAR_HEAD_DIM,
            "linear_value_head_dim": LINEAR_HEAD_DIM,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": partial_rotary,
                "mrope_interleaved": True,
                "mrope_section": [half_rotary - 2 * spatial, spatial, spatial],
            },
        },
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 4,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": hidden,
            "num_position_embeddings": 16,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        architectures=["Qwen3_5ForConditionalGeneration"],
    )
    model = Qwen3_5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(tensor.to(torch.bfloat16))
    sizes = {
        "size": {"shortest_edge": IMAGE_PIXELS, "longest_edge": IMAGE_PIXELS},
        "patch_size": PATCH_SIZE,
        "merge_size": 2,
        "temporal_patch_size": 2,
    }
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(**sizes),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    return save(model, processor, out_dir)


def build_tokenizer() -> Any:
    """A `Qwen3_5Tokenizer` (byte-level BPE) over the toy vocabulary: every toy word, alone or after a
    space, is one token; the Qwen vision tokens are special; the chat template is the toy's with the Qwen
    image placeholder.

    transformers' `AutoTokenizer` (which vLLM also uses) loads any `qwen3_5` checkpoint's tokenizer as
    `Qwen3_5Tokenizer`, which rebuilds a byte-level BPE from the saved vocabulary and merges whatever the
    saved tokenizer was, so the toy's word-level tokenizer
    (:func:`~steer_server.toy.tokenizer.build_tokenizer`) would load as a different one. Merges learnt on
    the toy words until none is left make each word one token.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen3_5.tokenization_qwen3_5 import Qwen3_5Tokenizer

    words = [word for word in vocabulary() if word not in SPECIAL_TOKENS]
    pipeline = Qwen3_5Tokenizer().backend_tokenizer
    backend = Tokenizer(models.BPE())
    backend.normalizer = pipeline.normalizer
    backend.pre_tokenizer = pipeline.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000,
        min_frequency=0,
        show_progress=False,
        special_tokens=[*SPECIAL_TOKENS, *QWEN_SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator([form for word in words for form in (word, " " + word)], trainer)
    model = json.loads(backend.to_str())["model"]
    # Pairs, as transformers passes them when it loads a tokenizer.json (the annotation says strings).
    merges: list[Any] = [tuple(merge) for merge in model["merges"]]
    tokenizer = Qwen3_5Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<|image_pad|>"},
        model_max_length=512,
        padding_side="right",
    )
    tokenizer.add_tokens(
        [AddedToken(token, special=True, normalized=False) for token in QWEN_SPECIAL], special_tokens=True
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer
