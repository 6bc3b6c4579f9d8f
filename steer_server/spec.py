"""The `modality_steer` request parameter, its parsing and the gains it means: the one source of truth
for the API server, the EngineCore, the workers, the analysis and the transformers reference.

Accepted forms (a JSON value, or that value as a string, as in `vllm_xargs`):
- ``"off"``; ``"image"`` / ``"text"``: the profile's heads for that mode get the profile's `default_gain`;
- ``{"follow": "image" | "text", "gain": G}``: those heads get gain G (0 blocks; 0 <= G <= max_gain);
- ``{"heads": [[layer, head, gain], ...]}``: explicit gains (research; needs `allow_raw_heads`).

:func:`parse_spec` validates a request's value; :func:`effective_gains` turns a spec into the
(layer, head) → gain map that the analysis, the transformers reference and the server all apply.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from .geometry import ModelGeometry
from .profile import Profile

Mode = Literal["off", "image", "text", "heads"]
DEFAULT_MAX_GAIN = 8.0


class SpecError(ValueError):
    """A `modality_steer` value that cannot be accepted; the message says what is wrong."""


@dataclass(frozen=True)
class SteerSpec:
    """A parsed, validated `modality_steer` value.

    Attributes:
        mode: "off", "image", "text", or "heads" (explicit gains).
        gain: the gain of the mode's heads; None means the profile's `default_gain`.
        heads: for mode "heads", (layer, head, gain) triples in global indices.
    """

    mode: Mode
    gain: float | None = None  # None: the profile's default_gain (modes image/text)
    heads: tuple[tuple[int, int, float], ...] = ()

    def to_wire(self) -> str:
        """Canonical string form (what travels in `vllm_xargs` / `extra_args`; parse_spec reads it back)."""
        if self.mode == "heads":
            return json.dumps({"heads": [list(h) for h in self.heads]}, separators=(",", ":"))
        if self.gain is None:
            return self.mode
        return json.dumps({"follow": self.mode, "gain": self.gain}, separators=(",", ":"))


OFF = SteerSpec(mode="off")


def _gain(value: Any, where: str, max_gain: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{where} must be a number, got {type(value).__name__}")
    try:
        gain = float(value)
    except OverflowError as exc:
        raise SpecError(f"{where} must be finite, got an integer of {len(str(value))} digits") from exc
    if not math.isfinite(gain):
        raise SpecError(f"{where} must be finite, got {value!r}")
    if gain < 0 or gain > max_gain:
        raise SpecError(f"{where} must lie in [0, {max_gain:g}] (the server's --max-gain), got {gain:g}")
    return gain


def parse_spec(
    value: Any, *, geometry: ModelGeometry, max_gain: float = DEFAULT_MAX_GAIN, allow_raw_heads: bool = False
) -> SteerSpec:
    """Validate one request's `modality_steer` value (a JSON value, or a string as in `vllm_xargs`).

    Raw heads are checked against `geometry` (global indices); every gain must be finite and lie in
    ``[0, max_gain]``.

    Raises:
        SpecError: the value is malformed, out of range, or raw heads are not allowed; the message is
            written for the client.
    """
    if isinstance(value, str):
        text = value.strip()
        if text in ("off", "image", "text"):
            return SteerSpec(mode=text)  # type: ignore[arg-type]
        if text.startswith("{"):
            try:
                value = json.loads(text, parse_constant=lambda c: float(c))
            except json.JSONDecodeError as exc:
                raise SpecError(f"not valid JSON: {exc.msg}") from exc
            except RecursionError as exc:
                raise SpecError("nested too deeply") from exc
        else:
            raise SpecError(f"unknown mode {value!r}; use 'off', 'image', 'text' or an object")
    if not isinstance(value, dict):
        raise SpecError(f"must be 'off', 'image', 'text' or an object, got {type(value).__name__}")
    keys = set(value)
    if keys == {"follow", "gain"} or keys == {"follow"}:
        follow = value["follow"]
        if follow not in ("image", "text"):
            raise SpecError(f"follow must be 'image' or 'text', got {follow!r}")
        gain = _gain(value["gain"], "gain", max_gain) if "gain" in value else None
        return SteerSpec(mode=follow, gain=gain)
    if keys == {"heads"}:
        if not allow_raw_heads:
            raise SpecError("raw heads are not allowed on this server (start it with --allow-raw-heads)")
        return SteerSpec(mode="heads", heads=_raw_heads(value["heads"], geometry, max_gain))
    raise SpecError(f"unknown keys {sorted(keys)}; use {{'follow', 'gain'}} or {{'heads'}}")


def _raw_heads(items: Any, geometry: ModelGeometry, max_gain: float) -> tuple[tuple[int, int, float], ...]:
    limit = geometry.total_heads
    if not isinstance(items, list) or not items:
        raise SpecError("heads must be a non-empty list of [layer, head, gain]")
    if len(items) > limit:
        raise SpecError(f"heads lists {len(items)} entries; the model has only {limit} heads")
    seen: set[tuple[int, int]] = set()
    parsed = []
    for index, item in enumerate(items):
        where = f"heads[{index}]"
        if not isinstance(item, list) or len(item) != 3:
            raise SpecError(f"{where} must be [layer, head, gain]")
        layer, head, gain = item
        for name, number, bound in (
            ("layer", layer, geometry.num_layers),
            ("head", head, geometry.num_heads),
        ):
            if isinstance(number, bool) or not isinstance(number, int):
                raise SpecError(f"{where}: {name} must be an integer, got {number!r}")
            if not 0 <= number < bound:
                raise SpecError(f"{where}: {name} {number} is out of range [0, {bound})")
        if not geometry.has_heads(layer):
            raise SpecError(
                f"{where}: layer {layer} has no attention heads (attention on {list(geometry.layers)})"
            )
        if (layer, head) in seen:
            raise SpecError(f"{where}: layer {layer} head {head} is listed twice")
        seen.add((layer, head))
        parsed.append((layer, head, _gain(gain, f"{where}: gain", max_gain)))
    return tuple(parsed)


def spec_json_schema(*, geometry: ModelGeometry, max_gain: float, allow_raw_heads: bool) -> dict[str, Any]:
    """JSON Schema of the `modality_steer` request field on this server (for its OpenAPI document)."""
    follow = {
        "type": "object",
        "properties": {
            "follow": {"type": "string", "enum": ["image", "text"]},
            "gain": {"type": "number", "minimum": 0, "maximum": max_gain},
        },
        "required": ["follow"],
        "additionalProperties": False,
    }
    forms: list[dict[str, Any]] = [{"type": "string", "enum": ["off", "image", "text"]}, follow]
    if allow_raw_heads:
        limit = geometry.total_heads
        head = {
            "type": "array",
            "prefixItems": [
                {"type": "integer", "minimum": 0, "maximum": geometry.num_layers - 1},
                {"type": "integer", "minimum": 0, "maximum": geometry.num_heads - 1},
                {"type": "number", "minimum": 0, "maximum": max_gain},
            ],
            "minItems": 3,
            "maxItems": 3,
        }
        forms.append(
            {
                "type": "object",
                "properties": {"heads": {"type": "array", "items": head, "minItems": 1, "maxItems": limit}},
                "required": ["heads"],
                "additionalProperties": False,
            }
        )
    forms.append({"type": "string", "description": "one of the objects above as a JSON string"})
    return {
        "title": "modality_steer",
        "description": (
            "Which modality to answer from, by scaling the profile's arbitration heads: 'image' / 'text' "
            "(the profile's default gain), {'follow': ..., 'gain': G} (0 blocks), 'off'"
            + (", or explicit {'heads': [[layer, head, gain], ...]}" if allow_raw_heads else "")
            + ". Also accepted as vllm_xargs.modality_steer (a string)."
        ),
        "anyOf": forms,
    }


def effective_gains(spec: SteerSpec, profile: Profile | None) -> dict[tuple[int, int], float]:
    """(layer, head) → gain for every head the spec changes (heads at gain 1 are left out).

    Raises:
        SpecError: mode "image" or "text" without a profile.
    """
    if spec.mode == "off":
        return {}
    if spec.mode == "heads":
        return {(layer, head): gain for layer, head, gain in spec.heads if gain != 1.0}
    if profile is None:
        raise SpecError(f"mode {spec.mode!r} needs a profile, and none is loaded")
    gain = profile.default_gain if spec.gain is None else spec.gain
    if gain == 1.0:
        return {}
    return {(layer, head): gain for layer, head in profile.heads(spec.mode)}


def gains_digest(gains: dict[tuple[int, int], float]) -> str:
    """16 hex digits of SHA-256 over the canonical (sorted) gains: equal for equal gains, whatever the
    spec's form; used for prefix-cache salts and slot sharing."""
    canonical = ";".join(f"{layer}.{head}={gain!r}" for (layer, head), gain in sorted(gains.items()))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def gains_matrix(gains: dict[tuple[int, int], float], geometry: ModelGeometry) -> Any:
    """A `torch.Tensor` [num_layers, num_heads] float32 of the gains, ones elsewhere.

    Raises:
        IndexError: a (layer, head) outside `geometry`.
    """
    import torch

    table = torch.ones(geometry.num_layers, geometry.num_heads, dtype=torch.float32)
    for (layer, head), gain in gains.items():
        table[layer, head] = gain
    return table
