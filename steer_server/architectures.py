"""What modality-steer knows about each supported architecture, in one table.

Everything architecture-specific on the transformers side (where the language model's decoder layers
are, which module's input is the per-head attention output, where the text config and the image token
are) lives here and nowhere else. The serving side needs none of it: vLLM names every family's decoder
attention `...layers.N.self_attn.attn` (see :mod:`steer_server.serving.worker`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from typing import Any

from .geometry import ModelGeometry


@dataclass(frozen=True)
class ArchitectureSpec:
    """Attribute paths into a transformers model of one architecture.

    Attributes:
        layers_path: from the model object to the language model's decoder layers (a ModuleList).
        attention_path: from a decoder layer to its self-attention module.
        o_proj_path: from the self-attention module to the output projection; its input is the
            concatenation of the heads' outputs ``[..., heads * head_dim]`` (TransformerLens's `hook_z`).
        text_config_attr: attribute of the model config holding the language model's config.
        image_token_attr: attribute of the model config with the image placeholder token's id.
        attention_layer_types: for hybrid models, the entries of the text config's `layer_types` whose
            layers have attention heads (the others, e.g. linear attention, have none and no
            `attention_path` module); None: every layer has attention.
        pre_mlp_norm_path: from a decoder layer to the norm that reads the residual stream between the
            token mixer (attention) and the MLP; its input is that residual (Llama-style layers call it
            `post_attention_layernorm`; Gemma 3, whose `post_attention_layernorm` normalises the
            attention output, `pre_feedforward_layernorm`).
        mlp_path: from a decoder layer to its MLP (dense or mixture of experts); its input must be the
            pre-MLP norm's output (checked by the logit lens on every batch).
        final_norm_path: from the model object to the language model's final norm (its input is the last
            residual stream, its output what the unembedding reads); default: beside the decoder layers.
    """

    layers_path: str
    attention_path: str = "self_attn"
    o_proj_path: str = "o_proj"
    text_config_attr: str = "text_config"
    image_token_attr: str = "image_token_id"
    attention_layer_types: tuple[str, ...] | None = None
    pre_mlp_norm_path: str = "post_attention_layernorm"
    mlp_path: str = "mlp"
    final_norm_path: str | None = None

    @property
    def final_norm(self) -> str:
        """The final norm's path from the model object."""
        return self.final_norm_path or self.layers_path.rsplit(".", 1)[0] + ".norm"


_LLAVA = ArchitectureSpec(layers_path="model.language_model.layers", image_token_attr="image_token_index")
# Most transformers 5 multimodal classes keep the language model at `model.language_model`.
_LANGUAGE_MODEL = ArchitectureSpec(layers_path="model.language_model.layers")
# Qwen3.5: full attention on one layer in four, Gated DeltaNet (linear attention, no heads to scale)
# elsewhere (`transformers.models.qwen3_5`, `layer_types`).
_QWEN3_5 = ArchitectureSpec(
    layers_path="model.language_model.layers", attention_layer_types=("full_attention",)
)

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "LlavaForConditionalGeneration": _LLAVA,
    "LlavaNextForConditionalGeneration": _LLAVA,
    "LlavaOnevisionForConditionalGeneration": _LANGUAGE_MODEL,
    "Qwen2VLForConditionalGeneration": _LANGUAGE_MODEL,
    "Qwen2_5_VLForConditionalGeneration": _LANGUAGE_MODEL,
    "Qwen3VLForConditionalGeneration": _LANGUAGE_MODEL,
    "Qwen3VLMoeForConditionalGeneration": _LANGUAGE_MODEL,
    # Gemma 3 normalises each sublayer's output before adding it (`transformers.models.gemma3`,
    # `Gemma3DecoderLayer.forward`).
    "Gemma3ForConditionalGeneration": ArchitectureSpec(
        layers_path="model.language_model.layers", pre_mlp_norm_path="pre_feedforward_layernorm"
    ),
    "InternVLForConditionalGeneration": _LANGUAGE_MODEL,
    "Mistral3ForConditionalGeneration": _LANGUAGE_MODEL,
    "Qwen3_5ForConditionalGeneration": _QWEN3_5,
    "Qwen3_5MoeForConditionalGeneration": _QWEN3_5,
    "Glm4vForConditionalGeneration": _LANGUAGE_MODEL,
    "Glm4vMoeForConditionalGeneration": _LANGUAGE_MODEL,
    "Idefics3ForConditionalGeneration": ArchitectureSpec(layers_path="model.text_model.layers"),
    "SmolVLMForConditionalGeneration": ArchitectureSpec(layers_path="model.text_model.layers"),
    "Llama4ForConditionalGeneration": ArchitectureSpec(
        layers_path="language_model.model.layers", mlp_path="feed_forward"
    ),
}


# Families people deploy that the analysis cannot load, and why (the message names the way out).
NOT_ANALYSABLE: dict[str, str] = {
    "DeepseekVLV2ForCausalLM": (
        "DeepSeek-VL2 has no transformers 5 class (its remote code breaks on transformers >= 4.48), so it "
        "cannot be analysed here; vLLM serves it (Tiny: multi-head attention, steerable with a hand-written "
        "profile; Small and base use MLA, which the server refuses)"
    ),
    "InternVLChatModel": (
        "this is the original remote-code InternVL layout; analyse the transformers-native conversion "
        "(the '-hf' checkpoints, InternVLForConditionalGeneration), which vLLM serves too"
    ),
}


class UnsupportedArchitectureError(ValueError):
    """A model whose architecture is not in :data:`ARCHITECTURES`; the message lists the supported ones."""


def architecture_of(config: Any) -> tuple[str, ArchitectureSpec]:
    """The first of `config.architectures` found in the table, and its spec.

    Raises:
        UnsupportedArchitectureError: none of them is in the table.
    """
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return name, ARCHITECTURES[name]
    for name in names:
        if name in NOT_ANALYSABLE:
            raise UnsupportedArchitectureError(f"unsupported architecture {name}: {NOT_ANALYSABLE[name]}")
    raise UnsupportedArchitectureError(
        f"unsupported architecture {names or '(none in config)'}; supported: {', '.join(sorted(ARCHITECTURES))}"
    )


def geometry_of(config: Any) -> ModelGeometry:
    """The language model's geometry read from a transformers config (`head_dim` from the text config,
    else `hidden_size // num_attention_heads`).

    Raises:
        UnsupportedArchitectureError: the architecture is not in the table.
    """
    name, spec = architecture_of(config)
    text = getattr(config, spec.text_config_attr)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    num_layers = int(text.num_hidden_layers)
    attention_layers = None
    if spec.attention_layer_types is not None:
        types = list(text.layer_types)[:num_layers]
        attention_layers = tuple(i for i, kind in enumerate(types) if kind in spec.attention_layer_types)
    return ModelGeometry(
        architecture=name,
        num_layers=num_layers,
        num_heads=heads,
        head_dim=head_dim,
        attention_layers=attention_layers,
    )


def image_token_id(config: Any) -> int:
    """The id of the image placeholder token.

    Raises:
        UnsupportedArchitectureError: unsupported architecture, or the config has no such attribute.
    """
    _, spec = architecture_of(config)
    value = getattr(config, spec.image_token_attr, None)
    if value is None:
        raise UnsupportedArchitectureError(
            f"the config has no {spec.image_token_attr} (the image placeholder token)"
        )
    return int(value)


def _attr_path(root: Any, path: str) -> Any:
    return reduce(getattr, path.split("."), root)


def attention_modules(model: Any) -> dict[int, Any]:
    """The language model's self-attention modules by decoder layer index (only the layers that have
    attention, :attr:`ModelGeometry.layers`).

    Raises:
        UnsupportedArchitectureError: the model's layers with attention modules are not those its config
            describes.
    """
    _, spec = architecture_of(model.config)
    path = spec.attention_path.split(".")
    found = {}
    for index, layer in enumerate(_attr_path(model, spec.layers_path)):
        if hasattr(layer, path[0]):
            found[index] = _attr_path(layer, spec.attention_path)
    expected = geometry_of(model.config).layers
    if tuple(found) != expected:
        raise UnsupportedArchitectureError(
            f"the model has attention modules on layers {list(found)}, its config describes {list(expected)}"
        )
    return found


def o_proj_modules(model: Any) -> dict[int, Any]:
    """The language model's attention output projections by decoder layer index: their input is
    `hook_z`."""
    _, spec = architecture_of(model.config)
    return {
        layer: _attr_path(attention, spec.o_proj_path)
        for layer, attention in attention_modules(model).items()
    }


@dataclass(frozen=True)
class ResidualModules:
    """The modules whose inputs are the language model's residual stream (the residual decomposition of
    :mod:`steer_server.analysis.logit_lens`).

    Attributes:
        layers: decoder layer modules by index; a layer's input is the residual before it, its output
            (first element when a tuple) the residual after it.
        pre_mlp_norms: per layer, the norm whose input is the residual between the token mixer and the MLP.
        mlps: per layer, the MLP (its input: that norm's output).
        final_norm: the norm whose input is the last residual stream.
        unembedding: the output projection (`model.get_output_embeddings()`), [vocab, hidden] weight.
    """

    layers: dict[int, Any]
    pre_mlp_norms: dict[int, Any]
    mlps: dict[int, Any]
    final_norm: Any
    unembedding: Any


def residual_modules(model: Any) -> ResidualModules:
    """:class:`ResidualModules` of a supported model.

    Raises:
        UnsupportedArchitectureError: unsupported architecture, or a layer without the table's pre-MLP norm.
    """
    _, spec = architecture_of(model.config)
    layers = dict(enumerate(_attr_path(model, spec.layers_path)))
    norms: dict[int, Any] = {}
    mlps: dict[int, Any] = {}
    for index, layer in layers.items():
        for found, path, what in (
            (norms, spec.pre_mlp_norm_path, "pre-MLP norm"),
            (mlps, spec.mlp_path, "MLP"),
        ):
            try:
                found[index] = _attr_path(layer, path)
            except AttributeError as exc:
                raise UnsupportedArchitectureError(
                    f"decoder layer {index} has no {path} (the {what})"
                ) from exc
    return ResidualModules(
        layers=layers,
        pre_mlp_norms=norms,
        mlps=mlps,
        final_norm=_attr_path(model, spec.final_norm),
        unembedding=model.get_output_embeddings(),
    )
