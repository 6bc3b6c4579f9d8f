"""Build the toy's architecture (a tiny LLaVA: CLIP vision tower + Llama language model) and tiny
random-weight models of supported families for tests and benchmarks; save checkpoints in the layout
both transformers and vLLM load."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..data.synth import IMAGE_SIZE
from .tokenizer import (
    CHAT_TEMPLATE,
    IMAGE_SEQ_LENGTH,
    IMAGE_TOKEN,
    PATCH_SIZE,
    build_processor,
    build_tokenizer,
)


def toy_model_dir() -> Path:
    """Where the committed toy checkpoint lives inside the installed package."""
    return Path(str(resources.files("steer_server.toy") / "checkpoint"))


def learned_model_dir() -> Path:
    """Where the committed second embedded model lives (the toy's sibling trained with plain next-token
    loss and no head intervention; `modality-steer toy train --arbitration learned`)."""
    return Path(str(resources.files("steer_server.toy") / "checkpoint_learned"))


@dataclass(frozen=True)
class ToyArchitecture:
    """Sizes of the toy LLaVA: vision tower (hidden, layers, heads) and language model (hidden, layers,
    heads, head_dim, MLP width)."""

    vision_hidden: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 256
    text_layers: int = 8
    text_heads: int = 8
    head_dim: int = 32
    text_mlp: int = 512


def build_config(tokenizer: Any, arch: ToyArchitecture) -> Any:
    """The `LlavaConfig` of an architecture, for the toy tokenizer's vocabulary."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=arch.vision_hidden,
        intermediate_size=arch.vision_hidden * 2,
        num_hidden_layers=arch.vision_layers,
        num_attention_heads=arch.vision_heads,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=arch.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.text_hidden,
        intermediate_size=arch.text_mlp,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        num_key_value_heads=arch.text_heads,
        head_dim=arch.head_dim,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=IMAGE_SEQ_LENGTH,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        architectures=["LlavaForConditionalGeneration"],
    )


def build_random(out_dir: Path, arch: ToyArchitecture, *, seed: int = 0) -> Path:
    """A random-weight LLaVA with the toy's tokenizer and processor (tests and benchmarks build these)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    model = LlavaForConditionalGeneration(build_config(tokenizer, arch)).eval()
    save_checkpoint(model, processor, out_dir)
    return out_dir


QWEN_SPECIAL = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
QWEN_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<image>\n", "<|vision_start|><|image_pad|><|vision_end|>\n")


def build_random_qwen2_vl(
    out_dir: Path, *, layers: int = 2, heads: int = 4, head_dim: int = 32, seed: int = 0
) -> Path:
    """A random-weight Qwen2-VL with the toy vocabulary (tests build these for architecture coverage)."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(QWEN_SPECIAL, QWEN_CHAT_TEMPLATE, image_token="<|image_pad|>")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL}
    hidden = heads * head_dim
    quarter = head_dim // 2 // 4
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": hidden * 2,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "max_position_embeddings": 512,
            # Qwen2-VL needs sum(mrope_section) == head_dim / 2.
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter],
            },
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": 2,
            "embed_dim": 64,
            "hidden_size": hidden,
            "num_heads": 4,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model = Qwen2VLForConditionalGeneration(config).eval()
    image_processor = Qwen2VLImageProcessor(
        min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    video_processor = Qwen2VLVideoProcessor(
        min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def save_checkpoint(model: Any, processor: Any, out_dir: Path) -> None:
    """save_pretrained, then rename the vision tower's keys to the hub layout vLLM 0.32 expects
    (`vision_tower.vision_model.*`); transformers reads both."""
    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    weights_path = out_dir / "model.safetensors"
    tensors = load_file(str(weights_path))
    renamed = {}
    for key, tensor in tensors.items():
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            key = "vision_tower.vision_model." + key[len("vision_tower.") :]
        renamed[key] = tensor.contiguous()
    save_file(renamed, str(weights_path), metadata={"format": "pt"})
