"""Tiny random-weight models of the multimodal families in the architecture table, built in code (toy
vocabulary, no downloads) so that tests can serve and analyse every family on a CPU.

Adding a family takes two things: a row in :data:`steer_server.architectures.ARCHITECTURES` (where its
decoder layers are) and a builder module here with ``build(out_dir, *, layers, heads, kv_heads,
head_dim, seed) -> Path``, listed in :data:`FAMILIES`. The tests (`tests/test_families.py`) then serve it
with vLLM against a transformers reference of the same gains and run the analysis on it.

LLaVA and Qwen2-VL, the first two families, are built by :mod:`steer_server.toy.model` and tested in
`tests/test_serving.py` and `tests/test_serving_qwen.py`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Family:
    """One family's tiny-model builder.

    Attributes:
        name: the family as people call it ("Qwen3-VL").
        architecture: the transformers class name (`config.architectures[0]`), a key of the table.
        builder: ``"module:function"`` in this package.
        serve_dtype: the dtype vLLM's CPU backend serves it in (Qwen3.5's linear attention needs bf16).
        default_layers: the builder's default depth.
    """

    name: str
    architecture: str
    builder: str
    serve_dtype: str = "float32"
    default_layers: int = 2

    def build(self, out_dir: Path, **geometry: Any) -> Path:
        """Write the tiny checkpoint to `out_dir` (geometry keywords: layers, heads, kv_heads, head_dim,
        seed) and return it."""
        module, _, function = self.builder.partition(":")
        build: Callable[..., Path] = getattr(importlib.import_module(f"{__name__}.{module}"), function)
        return build(out_dir, **geometry)


FAMILIES: tuple[Family, ...] = (
    Family("Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl:build"),
    Family("Qwen3-VL", "Qwen3VLForConditionalGeneration", "qwen3_vl:build"),
    Family("Qwen3-VL-MoE", "Qwen3VLMoeForConditionalGeneration", "qwen3_vl:build_moe"),
    Family(
        "Qwen3.5",
        "Qwen3_5ForConditionalGeneration",
        "qwen3_5:build",
        serve_dtype="bfloat16",
        default_layers=4,
    ),
    Family("Gemma 3", "Gemma3ForConditionalGeneration", "gemma3:build"),
    Family("InternVL", "InternVLForConditionalGeneration", "internvl:build"),
    Family("LLaVA-OneVision", "LlavaOnevisionForConditionalGeneration", "llava_onevision:build"),
    Family("Idefics3", "Idefics3ForConditionalGeneration", "idefics3:build"),
    Family("SmolVLM", "SmolVLMForConditionalGeneration", "idefics3:build_smolvlm"),
    Family("Mistral 3", "Mistral3ForConditionalGeneration", "mistral3:build"),
    Family("Llama 4", "Llama4ForConditionalGeneration", "llama4:build", default_layers=4),
    Family("GLM-4.1V", "Glm4vForConditionalGeneration", "glm4v:build"),
)


def family(architecture: str) -> Family:
    """The family of a transformers architecture name.

    Raises:
        KeyError: no builder for it.
    """
    for entry in FAMILIES:
        if entry.architecture == architecture:
            return entry
    raise KeyError(f"no tiny-model builder for {architecture}; families: {[f.name for f in FAMILIES]}")
