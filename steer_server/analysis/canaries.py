"""Canaries: a handful of report-split conflicts, written into the profile with their inputs and with what
the profile's gains measurably do to them in transformers, so that a deployment can check, before it
serves, that its steering does what the profile records (`steer_server.serving.canary`).

For every report conflict the metric (:mod:`.metric`) is measured under each of
:data:`~steer_server.profile.CANARY_SETTINGS` (unsteered; each mode's heads blocked and at the default
gain). The candidates are the conflicts on which blocking the instructed mode's heads moves the metric
most; they are measured again with the model in bfloat16, and the tolerance is derived from the largest
float32 / bfloat16 difference among them (a served figure differs from transformers' by the serving
precision's rounding, which bfloat16 bounds for bf16 and fp32 serving). Canaries are then the candidates
whose own block effect is at least :data:`EFFECT_OVER_TOLERANCE` tolerances, so that steering with no
effect fails the check by a wide margin.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data.prompts import openai_messages
from ..data.schema import LoadedSample
from ..hf.model import LoadedModel, to_bfloat16
from ..profile import CANARY_SETTINGS, Canary, CanarySet, Profile
from ..spec import effective_gains, gains_matrix, parse_spec
from .config import AnalysisError
from .metric import BASELINE, Runner, Setting

# The tolerance is this many times the largest float32 / bfloat16 difference of a canary's figures (a
# margin for serving kernels that round differently from transformers' bfloat16 path), and at least
# MIN_TOLERANCE (float32 serving agrees with transformers to about 1e-3 on the toy).
BF16_MARGIN = 3.0
MIN_TOLERANCE = 0.05
# A canary's own block effect must be this many tolerances: steering with no effect then misses it by at
# least (EFFECT_OVER_TOLERANCE - 1) tolerances.
EFFECT_OVER_TOLERANCE = 4.0


def _measure(runner: Runner, profile: Profile, indices: Sequence[int]) -> dict[str, list[float]]:
    """The metric of the samples `indices` under every canary setting (setting -> values, in order), in
    one pass over their batches (the first answer token only)."""
    geometry = profile.model
    settings = []
    for wire in CANARY_SETTINGS.values():
        spec = parse_spec(wire, geometry=geometry, max_gain=max(profile.default_gain, 1.0))
        gains = effective_gains(spec, profile)
        settings.append(Setting.of_gains(gains_matrix(gains, geometry)) if gains else BASELINE)
    scored = runner.score_many(settings, indices, answers=False)
    return {name: [float(v) for v in s.metric] for name, s in zip(CANARY_SETTINGS, scored, strict=True)}


class NoCanaries(AnalysisError):
    """No report conflict of an instruction moves enough under the profile's gains to serve as a canary."""


def measure_canaries(
    loaded: LoadedModel,
    profile: Profile,
    report_conflicts: Sequence[LoadedSample],
    per_mode: int,
    batch_size: int,
    *,
    model_dir: Path | None = None,
    device_map: str | dict[str, Any] | None = None,
) -> CanarySet:
    """Choose and measure `per_mode` canaries per instruction from the report split's conflicts, in
    float32 (the model as loaded) and bfloat16 (:func:`~steer_server.hf.model.to_bfloat16`: the model
    converted in place, or loaded again from `model_dir` with `device_map` where accelerate offloaded
    weights). Leaves the model in bfloat16 (call it last).

    Raises:
        NoCanaries: an instruction without a conflict whose own block effect clears the threshold (the
            profile's gains do not measurably move any report conflict of that instruction).
    """
    runner = Runner(loaded, report_conflicts, batch_size)
    everything = _measure(runner, profile, range(len(report_conflicts)))
    candidates: list[int] = []
    effect: dict[int, float] = {}
    for mode in ("image", "text"):
        own = [i for i, s in enumerate(report_conflicts) if s.sample.follow == mode]
        for i in own:
            effect[i] = everything[f"{mode}_block"][i] - everything["off"][i]
        candidates += sorted(own, key=lambda i: (-abs(effect[i]), report_conflicts[i].sample.id))[
            : 3 * per_mode
        ]
    fp32 = {name: [everything[name][i] for i in candidates] for name in CANARY_SETTINGS}
    loaded = to_bfloat16(loaded, model_dir, device_map)
    bf16 = _measure(
        Runner(loaded, [report_conflicts[i] for i in candidates], batch_size), profile, range(len(candidates))
    )
    deviation = max(
        abs(a - b) for name in CANARY_SETTINGS for a, b in zip(fp32[name], bf16[name], strict=True)
    )
    tolerance = max(MIN_TOLERANCE, BF16_MARGIN * deviation)
    chosen: list[Canary] = []
    for mode in ("image", "text"):
        ranked = [
            (row, i)
            for row, i in enumerate(candidates)
            if report_conflicts[i].sample.follow == mode
            and abs(effect[i]) >= EFFECT_OVER_TOLERANCE * tolerance
        ][:per_mode]
        if not ranked:
            raise NoCanaries(
                f"no report conflict of instruction {mode!r} moves by {EFFECT_OVER_TOLERANCE:g} x the tolerance "
                f"({tolerance:.3f}) when its heads are blocked: the profile's effect cannot be checked at deployment"
            )
        for row, i in ranked:
            loaded_sample = report_conflicts[i]
            chosen.append(
                Canary(
                    id=loaded_sample.sample.id,
                    follow=mode,  # type: ignore[arg-type]
                    messages=openai_messages(loaded_sample),
                    instructed_token_ids=runner.tokens.instructed[i],
                    competing_token_ids=runner.tokens.competing[i],
                    recorded={name: round(fp32[name][row], 6) for name in CANARY_SETTINGS},
                    recorded_bf16={name: round(bf16[name][row], 6) for name in CANARY_SETTINGS},
                )
            )
    return CanarySet(
        tolerance=round(tolerance, 6),
        tolerance_basis=(
            f"{BF16_MARGIN:g} x the largest |float32 - bfloat16| difference of a candidate's figure in "
            f"transformers ({deviation:.4f}, over {len(candidates)} candidates x {len(CANARY_SETTINGS)} settings), "
            f"at least {MIN_TOLERANCE:g}"
        ),
        samples=chosen,
    )
