"""The language model's attention geometry: the one type that says how many layers and heads a model
has, used by profiles (their `model` block), request validation, the analysis and the serving checks.

Indices are global (unsharded): layer ``l`` in ``[0, num_layers)`` and head ``h`` in ``[0, num_heads)``
name query head ``h`` of decoder layer ``l``; its output is the slice ``[h * head_dim, (h + 1) * head_dim)``
of the input of that layer's attention output projection (`o_proj`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelGeometry(BaseModel):
    """Attention geometry of a model's language model (frozen; extra keys are kept, as profiles may add
    some).

    Attributes:
        architecture: the transformers class name of the whole model (`config.architectures[0]`).
        num_layers: decoder layers of the language model.
        num_heads: query heads per layer (all tensor-parallel ranks together).
        head_dim: features per head.
        fingerprint: optional identity of the checkpoint the geometry was read from
            (:func:`steer_server.profile.model_fingerprint`); a profile that carries one is applied to
            that checkpoint only.
        attention_layers: the decoder layers that have attention heads, when not all do (hybrid models
            such as Qwen3.5 put full attention on one layer in four and linear attention elsewhere);
            None: every layer. Layer indices stay those of the whole decoder.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    architecture: str
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    fingerprint: str | None = None
    attention_layers: tuple[int, ...] | None = None

    @model_validator(mode="after")
    def _attention_layers_in_range(self) -> ModelGeometry:
        layers = self.attention_layers
        if layers is not None:
            if not layers:
                raise ValueError("attention_layers must name at least one layer")
            if list(layers) != sorted(set(layers)) or not 0 <= layers[0] <= layers[-1] < self.num_layers:
                raise ValueError(
                    f"attention_layers must be increasing layer indices in [0, {self.num_layers}), got {list(layers)}"
                )
        return self

    @property
    def layers(self) -> tuple[int, ...]:
        """The decoder layers with attention heads, in order."""
        return tuple(range(self.num_layers)) if self.attention_layers is None else self.attention_layers

    def has_heads(self, layer: int) -> bool:
        """Whether decoder layer `layer` exists and has attention heads."""
        return 0 <= layer < self.num_layers and (
            self.attention_layers is None or layer in self.attention_layers
        )

    def heads(self) -> list[tuple[int, int]]:
        """Every (layer, head) of the model, by layer then head."""
        return [(layer, head) for layer in self.layers for head in range(self.num_heads)]

    @property
    def total_heads(self) -> int:
        """Attention heads over all layers (`len(layers) * num_heads`)."""
        return len(self.layers) * self.num_heads

    def shape(self) -> tuple[int, tuple[int, ...], int, int]:
        """(num_layers, layers with attention, num_heads, head_dim): what two geometries must share to
        use one profile."""
        return (self.num_layers, self.layers, self.num_heads, self.head_dim)

    def describe(self) -> str:
        """``"8 layers x 8 heads x head_dim 32"`` (attention layers named when not all have heads)."""
        attention = "" if self.attention_layers is None else f" (attention on {list(self.attention_layers)})"
        return f"{self.num_layers} layers{attention} x {self.num_heads} heads x head_dim {self.head_dim}"
