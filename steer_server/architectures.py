"""What modality-steer knows about each supported architecture, in one table.

Everything architecture-specific (where the language model's decoder layers are, which module's input is
the per-head attention output, where the text config is) lives here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from typing import Any


@dataclass(frozen=True)
class ArchitectureSpec:
    # Attribute path from the transformers model object to the language model's decoder layers.
    layers_path: str
    # Attribute path from a decoder layer to the attention output projection; its input is the
    # concatenation of the heads' outputs ([..., heads * head_dim]), TransformerLens's `hook_z`.
    o_proj_path: str = "self_attn.o_proj"
    # Attribute of the model config that holds the language model's config.
    text_config_attr: str = "text_config"
    # Attribute of the model config with the id of the image placeholder token.
    image_token_attr: str = "image_token_id"


_LLAVA = ArchitectureSpec(layers_path="model.language_model.layers", image_token_attr="image_token_index")
_QWEN2_VL = ArchitectureSpec(layers_path="model.language_model.layers")

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "LlavaForConditionalGeneration": _LLAVA,
    "LlavaNextForConditionalGeneration": _LLAVA,
    "Qwen2VLForConditionalGeneration": _QWEN2_VL,
    "Qwen2_5_VLForConditionalGeneration": _QWEN2_VL,
}


class UnsupportedArchitectureError(ValueError):
    pass


@dataclass(frozen=True)
class ModelGeometry:
    """The language model's attention geometry, in global (unsharded) terms, as profiles record it."""

    architecture: str
    num_layers: int
    num_heads: int
    head_dim: int


def architecture_of(config: Any) -> tuple[str, ArchitectureSpec]:
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return name, ARCHITECTURES[name]
    raise UnsupportedArchitectureError(
        f"unsupported architecture {names or '(none in config)'}; supported: {', '.join(sorted(ARCHITECTURES))}"
    )


def geometry_of(config: Any) -> ModelGeometry:
    name, spec = architecture_of(config)
    text = getattr(config, spec.text_config_attr)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    return ModelGeometry(
        architecture=name, num_layers=int(text.num_hidden_layers), num_heads=heads, head_dim=head_dim
    )


def image_token_id(config: Any) -> int:
    _, spec = architecture_of(config)
    value = getattr(config, spec.image_token_attr, None)
    if value is None:
        raise UnsupportedArchitectureError(
            f"the config has no {spec.image_token_attr} (the image placeholder token)"
        )
    return int(value)


def _attr_path(root: Any, path: str) -> Any:
    return reduce(getattr, path.split("."), root)


def o_proj_modules(model: Any) -> list[Any]:
    """The language model's `o_proj` modules, by layer index."""
    _, spec = architecture_of(model.config)
    layers = _attr_path(model, spec.layers_path)
    return [_attr_path(layer, spec.o_proj_path) for layer in layers]
