"""Arbitration-head profiles: the versioned JSON the analysis writes and the server applies.

Required fields (exactly so named): `format`, `model` (a :class:`~steer_server.geometry.ModelGeometry`:
architecture, num_layers, num_heads, head_dim, optional fingerprint), `default_gain`, `modes` {image, text}
each with `heads` [{layer, head, score}]. Everything else (`scores`, `validation`, `provenance`, ...) is
optional and kept as written, except `canaries` (:class:`CanarySet`), which is validated: the inputs and
recorded effects a deployment checks before it serves (`steer_server.serving.canary`). `layer` and `head`
are global indices in the language model (0-based, unsharded).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .geometry import ModelGeometry

PROFILE_FORMAT = "modality-steer.profile/v1"
MODES = ("image", "text")


class ProfileError(ValueError):
    """A profile that cannot be used; the message names the file and the problem."""


class HeadEntry(BaseModel):
    """One selected head: global `layer` and `head`, and its `score` (the measured mean drop of the
    analysis metric when the head is blocked; log-probability units)."""

    model_config = ConfigDict(extra="forbid")

    layer: int = Field(ge=0)
    head: int = Field(ge=0)
    score: float

    @field_validator("score")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("score must be finite")
        return value


class ModeHeads(BaseModel):
    """The heads of one instruction mode ("image" or "text"); extra keys are kept."""

    model_config = ConfigDict(extra="allow")

    heads: list[HeadEntry]


# The steering settings every canary is measured under, by name: unsteered, and each mode's heads blocked
# (gain 0) and at the profile's default gain. Values are `modality_steer` wire strings
# (`steer_server.spec.SteerSpec.to_wire`).
CANARY_SETTINGS = {
    "off": "off",
    "image_block": '{"follow":"image","gain":0.0}',
    "image_default": "image",
    "text_block": '{"follow":"text","gain":0.0}',
    "text_default": "text",
}


def _finite_values(values: dict[str, float]) -> dict[str, float]:
    if set(values) != set(CANARY_SETTINGS) or not all(math.isfinite(v) for v in values.values()):
        raise ValueError(f"needs a finite value for each of {', '.join(CANARY_SETTINGS)}")
    return values


class Canary(BaseModel):
    """One conflict of the analysis' report split, as a client sends it, with what the analysis measured
    on it in transformers: the metric (log p(instructed answer) - log p(competing answer) at the first
    answer token, each answer's first tokens pooled with logsumexp; arXiv 2602.03677 §3) under each of
    :data:`CANARY_SETTINGS`, in float32 (`recorded`) and in bfloat16 (`recorded_bf16`)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    follow: Literal["image", "text"]
    messages: list[dict[str, Any]]  # OpenAI chat messages; the image inline as a data URL
    instructed_token_ids: list[int] = Field(min_length=1)
    competing_token_ids: list[int] = Field(min_length=1)
    recorded: dict[str, float]
    recorded_bf16: dict[str, float]

    @field_validator("recorded", "recorded_bf16")
    @classmethod
    def _all_settings(cls, values: dict[str, float]) -> dict[str, float]:
        return _finite_values(values)


class CanarySet(BaseModel):
    """The canaries of a profile and the tolerance a served figure is held to.

    Attributes:
        tolerance: log-probability units; a served metric (fingerprint match) or a served effect (geometry
            match) may differ from the recorded one by this much plus `relative` x the recorded effect.
        tolerance_basis: how the tolerance was derived (from the float32 / bfloat16 measurement).
        samples: the canaries.
    """

    model_config = ConfigDict(extra="forbid")

    tolerance: float = Field(gt=0)
    tolerance_basis: str
    samples: list[Canary] = Field(min_length=1)


class Profile(BaseModel):
    """A validated profile: every head lies inside `model`, no head is listed twice in a mode, both modes
    are present, `default_gain` is finite and >= 0. Unknown top-level keys are kept (`model_extra`)."""

    model_config = ConfigDict(extra="allow")

    format: Literal["modality-steer.profile/v1"]
    model: ModelGeometry
    default_gain: float = Field(ge=0)
    modes: dict[Literal["image", "text"], ModeHeads]
    canaries: CanarySet | None = None

    @field_validator("default_gain")
    @classmethod
    def _finite_gain(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("default_gain must be finite")
        return value

    @model_validator(mode="after")
    def _heads_in_range(self) -> Profile:
        missing = [m for m in MODES if m not in self.modes]
        if missing:
            raise ValueError(f"modes must include both 'image' and 'text' (missing: {', '.join(missing)})")
        for mode, entry in self.modes.items():
            seen: set[tuple[int, int]] = set()
            for item in entry.heads:
                where = f"modes.{mode}.heads: layer {item.layer} head {item.head}"
                if not self.model.has_heads(item.layer) or item.head >= self.model.num_heads:
                    raise ValueError(f"{where} is outside the model ({self.model.describe()})")
                if (item.layer, item.head) in seen:
                    raise ValueError(f"{where} is listed twice")
                seen.add((item.layer, item.head))
        return self

    def heads(self, mode: str) -> list[tuple[int, int]]:
        """(layer, head) of every head of `mode` ("image" or "text"), in the profile's order.

        Raises:
            KeyError: `mode` is not one of the profile's modes.
        """
        return [(h.layer, h.head) for h in self.modes[mode].heads]  # type: ignore[index]

    @property
    def profile_id(self) -> str:
        """A short content hash (12 hex digits): names the profile in logs, headers and metrics."""
        # `attention_layers` is left out when unset, so that profiles written before it existed keep
        # their id.
        # `canaries` likewise, for profiles written before canaries existed.
        unset: dict[str, Any] = {}
        if self.model.attention_layers is None:
            unset["model"] = {"attention_layers"}
        if self.canaries is None:
            unset["canaries"] = True
        canonical = json.dumps(
            self.model_dump(mode="json", exclude=unset or None), sort_keys=True, separators=(",", ":")
        )
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile file.

    Raises:
        ProfileError: the file is missing, is not JSON (NaN and Infinity literals included), or fails
            validation; the message names the file, the field and the problem.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except FileNotFoundError as exc:
        raise ProfileError(f"{path}: no such profile") from exc
    except (json.JSONDecodeError, ValueError) as exc:
        raise ProfileError(f"{path}: not valid JSON ({exc})") from exc
    try:
        return Profile.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(profile)"
        raise ProfileError(f"{path}: {where}: {first['msg']}") from exc


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in a profile")


def save_profile(profile: Profile, path: str | Path) -> None:
    """Validate, then write atomically (a temporary file renamed into place): a failure never leaves a
    half-written profile.

    Raises:
        pydantic.ValidationError: the profile does not validate.
    """
    path = Path(path)
    Profile.model_validate(profile.model_dump(mode="json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    tmp.write_text(
        json.dumps(profile.model_dump(mode="json", exclude_none=True), indent=2, allow_nan=False) + "\n"
    )
    tmp.replace(path)


def model_fingerprint(model_dir: str | Path) -> str:
    """``"sha256:<32 hex>"`` of a checkpoint folder's `config.json` and weight layout (names and shapes),
    not of the weights' bytes: cheap, and it changes whenever the architecture or checkpoint layout does.

    Raises:
        FileNotFoundError: the folder has no `config.json`.
    """
    folder = Path(model_dir)
    config = json.loads((folder / "config.json").read_text())
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        digest.update(json.dumps(sorted(json.loads(index.read_text())["weight_map"])).encode())
    else:
        from safetensors import safe_open

        for weights in sorted(folder.glob("*.safetensors")):
            with safe_open(str(weights), "pt") as handle:
                for key in sorted(handle.keys()):
                    digest.update(f"{key}:{handle.get_slice(key).get_shape()}".encode())
    return "sha256:" + digest.hexdigest()[:32]
