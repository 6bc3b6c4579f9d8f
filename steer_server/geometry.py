"""The language model's attention geometry: the one type that says how many layers and heads a model
has, used by profiles (their `model` block), request validation, the analysis and the serving checks.

Indices are global (unsharded): layer ``l`` in ``[0, num_layers)`` and head ``h`` in ``[0, num_heads)``
name query head ``h`` of decoder layer ``l``; its output is the slice ``[h * head_dim, (h + 1) * head_dim)``
of the input of that layer's attention output projection (`o_proj`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


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
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    architecture: str
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    fingerprint: str | None = None

    @property
    def total_heads(self) -> int:
        """Heads over all layers (`num_layers * num_heads`)."""
        return self.num_layers * self.num_heads

    def shape(self) -> tuple[int, int, int]:
        """(num_layers, num_heads, head_dim): what two geometries must share to use one profile."""
        return (self.num_layers, self.num_heads, self.head_dim)
