"""Validation of the selected heads (the paper's head interventions, arXiv 2602.03677 §4), with the
choices and the reported figures on different samples:

- :func:`choose_default_gain` sweeps the amplification gains on the *selection* split (the data the heads
  were chosen on) and picks `default_gain`;
- :func:`validate` measures everything reported on the *report* split, which no choice saw: the MF ratio
  at baseline, with the selected heads blocked and with as many random unselected heads blocked, the
  gain sweep and the default gain's rescued and broken shares on the baseline failures and successes,
  and control accuracy; every figure with its 95% interval (:mod:`steer_server.stats`) and sample count.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..data.normalize import normalize_answer
from ..data.schema import LoadedSample
from ..data.scoring import mf_ratio_estimate, mf_ratio_over_draws, mf_relative_drop
from ..geometry import ModelGeometry
from ..profile import MODES
from ..stats import proportion
from .ablation import gain_table
from .config import AnalysisConfig, AnalysisError
from .metric import BASELINE, Runner, Scored, Setting

# Amplification may break at most this share of correctly answered samples at the default gain.
MAX_BROKEN_SHARE = 0.05


@dataclass
class _SweepCounts:
    rescued: int = 0
    failed: int = 0
    broken: int = 0
    correct: int = 0

    def add(self, other: _SweepCounts) -> None:
        self.rescued += other.rescued
        self.failed += other.failed
        self.broken += other.broken
        self.correct += other.correct

    def estimates(self) -> dict[str, Any]:
        return {
            "rescued_share": proportion(self.rescued, self.failed).as_dict(),
            "broken_share": proportion(self.broken, self.correct).as_dict(),
        }


@dataclass
class _Outcomes:
    """Per conflict of one mode, in sample order: success at baseline, with the selected heads blocked,
    with each random draw blocked."""

    base: list[bool]
    block_top: list[bool]
    block_random: list[list[bool]]


class _Validator:
    def __init__(self, runner: Runner, geometry: ModelGeometry, config: AnalysisConfig) -> None:
        self.runner = runner
        self.geometry = geometry
        self.config = config

    def indices(self, kind: str, mode: str) -> list[int]:
        return [
            i for i, s in enumerate(self.runner.samples) if s.sample.kind == kind and s.sample.follow == mode
        ]

    def setting(self, heads: list[tuple[int, int]], gain: float) -> Setting:
        return Setting.of_gains(gain_table(self.geometry, heads, gain))

    def scored(self, settings: list[Setting], indices: list[int], what: str) -> list[Scored]:
        """Each setting's scores of `indices` (one pass over their batches for all)."""
        return self.runner.score_many(
            settings, indices, progress=f"{what} ({len(settings)} settings)" if self.config.progress else None
        )

    def follows(self, settings: list[Setting], indices: list[int], what: str) -> list[list[bool]]:
        """Success of each of `indices` under each setting (one pass over their batches for all)."""
        return [s.hits for s in self.scored(settings, indices, what)]

    @staticmethod
    def sweep(base: list[bool], amplified: dict[float, list[bool]]) -> dict[float, _SweepCounts]:
        """Per gain: baseline failures rescued and baseline successes broken (`amplified`: each gain's
        success per conflict, in the order of `base`)."""
        failed, correct = base.count(False), base.count(True)
        return {
            gain: _SweepCounts(
                rescued=sum(ok and not was for ok, was in zip(hits, base, strict=True)),
                failed=failed,
                broken=sum(was and not ok for ok, was in zip(hits, base, strict=True)),
                correct=correct,
            )
            for gain, hits in amplified.items()
        }

    def pooled_sweep(self, selected: dict[str, list[tuple[int, int]]]) -> dict[float, _SweepCounts]:
        """The sweep of both modes (each mode's own heads on its own conflicts), pooled."""
        pooled = {gain: _SweepCounts() for gain in self.config.gains}
        for mode in MODES:
            conflict = self.indices("conflict", mode)
            if not conflict:
                raise AnalysisError(f"no conflict samples with follow={mode}")
            gains = self.config.gains
            base, *hits = self.follows(
                [BASELINE, *(self.setting(selected[mode], g) for g in gains)],
                conflict,
                f"gain sweep ({mode})",
            )
            for gain, count in self.sweep(base, dict(zip(gains, hits, strict=True))).items():
                pooled[gain].add(count)
        return pooled

    def mode(
        self,
        mode: str,
        heads: list[tuple[int, int]],
        pool: list[tuple[int, int]],
        rng: random.Random,
        default_gain: float,
    ) -> tuple[dict[str, Any], _Outcomes, dict[float, _SweepCounts]]:
        conflict = self.indices("conflict", mode)
        control = self.indices("control", mode)
        if not conflict:
            raise AnalysisError(f"no conflict samples with follow={mode} to validate on")
        drawn = [rng.sample(pool, len(heads)) for _ in range(self.config.random_draws)]
        gains = tuple(dict.fromkeys((*self.config.gains, default_gain)))
        settings = [
            BASELINE,
            self.setting(heads, 0.0),
            *(self.setting(heads_drawn, 0.0) for heads_drawn in drawn),
            *(self.setting(heads, gain) for gain in gains),
        ]
        outcomes = self.follows(settings, conflict, f"validation ({mode})")
        base, block_top = outcomes[0], outcomes[1]
        random_outcomes = outcomes[2 : 2 + len(drawn)]
        counts = self.sweep(base, dict(zip(gains, outcomes[2 + len(drawn) :], strict=True)))
        controls = (
            self.scored(
                [BASELINE, self.setting(heads, 0.0), self.setting(heads, default_gain)],
                control,
                f"controls ({mode})",
            )
            if control
            else None
        )

        def share(hits: list[bool]) -> dict[str, Any]:
            return proportion(sum(hits), len(hits)).as_dict()

        draws = [sum(o) / len(o) for o in random_outcomes]
        report = {
            "conflicts": len(conflict),
            "controls": len(control),
            "failed_at_baseline": base.count(False),
            "mf_ratio_baseline": share(base),
            "mf_ratio_block_top": share(block_top),
            "mf_ratio_block_random": mf_ratio_over_draws([mode] * len(conflict), random_outcomes).as_dict(),
            "mf_ratio_block_random_draws": draws,
            "block_random_heads": [[[layer, head] for layer, head in heads_drawn] for heads_drawn in drawn],
            "gain_sweep": {str(gain): counts[gain].estimates() for gain in self.config.gains},
            "amplify_rescued_share": counts[default_gain].estimates()["rescued_share"],
            "amplify_broken_share": counts[default_gain].estimates()["broken_share"],
            "control_accuracy_baseline": share(controls[0].hits) if controls else None,
            "control_accuracy_block_top": share(controls[1].hits) if controls else None,
            "collateral": collateral([self.runner.samples[i] for i in control], controls)
            if controls
            else None,
        }
        return report, _Outcomes(base, block_top, random_outcomes), counts


def control_type(loaded: LoadedSample) -> str:
    """What kind of non-conflict sample a control is: the part of its task after "/" (the synthetic
    data's "agree", "image_only", "text_only"), else "control"."""
    task = loaded.sample.task or ""
    return task.rsplit("/", 1)[1] if "/" in task else "control"


def collateral(controls: Sequence[LoadedSample], scored: Sequence[Scored]) -> dict[str, Any]:
    """Answers changed on controls (samples without a conflict: an agreeing context, one modality only)
    by a mode's steering: the share whose greedy answer (normalised) differs from the unsteered one,
    with the heads blocked (`scored[1]`) and amplified at the default gain (`scored[2]`; `scored[0]`: the
    baseline), over all controls and per :func:`control_type`, each with its 95% interval and count."""
    base = [normalize_answer(a) for a in scored[0].answers]
    types = [control_type(c) for c in controls]
    report: dict[str, Any] = {}
    for name, arm in (("block", scored[1]), ("amplify", scored[2])):
        changed = [normalize_answer(a) != b for a, b in zip(arm.answers, base, strict=True)]
        report[f"{name}_changed_share"] = proportion(sum(changed), len(changed)).as_dict()
        report[f"{name}_changed_by_type"] = {
            kind: proportion(
                sum(c for c, t in zip(changed, types, strict=True) if t == kind), types.count(kind)
            ).as_dict()
            for kind in sorted(set(types))
        }
    return report


def choose_default_gain(
    runner: Runner,
    geometry: ModelGeometry,
    selected: dict[str, list[tuple[int, int]]],
    config: AnalysisConfig,
) -> tuple[float, dict[str, Any]]:
    """Sweep the config's gains on the selection split (`runner`: the samples the heads were chosen on)
    and pick the default gain (:func:`choose_gain` on the pooled sweep); returns it and the sweep (shares
    with their intervals, and the sample counts).

    Raises:
        AnalysisError: a mode has no conflict sample.
    """
    pooled = _Validator(runner, geometry, config).pooled_sweep(selected)
    gain = choose_gain({str(g): c for g, c in pooled.items()})
    return gain, {
        "gain_sweep": {str(g): c.estimates() for g, c in pooled.items()},
        "failed_at_baseline": pooled[config.gains[0]].failed,
        "correct_at_baseline": pooled[config.gains[0]].correct,
        "default_gain": gain,
    }


def validate(
    runner: Runner,
    geometry: ModelGeometry,
    selected: dict[str, list[tuple[int, int]]],
    default_gain: float,
    config: AnalysisConfig,
) -> dict[str, Any]:
    """The profile's evidence on the report split (`runner`), per mode and summarised, at the
    `default_gain` chosen elsewhere: figures as :meth:`steer_server.stats.Estimate.as_dict` (value, 95%
    interval, n, method); MF ratios as :func:`~steer_server.data.scoring.mf_ratio` aggregates them.

    Raises:
        AnalysisError: a mode has no conflict sample to validate on.
    """
    rng = random.Random(config.seed)
    excluded = {lh for heads in selected.values() for lh in heads}
    pool = [lh for lh in geometry.heads() if lh not in excluded]
    validator = _Validator(runner, geometry, config)
    modes: dict[str, Any] = {}
    outcomes: dict[str, _Outcomes] = {}
    pooled = {gain: _SweepCounts() for gain in dict.fromkeys((*config.gains, default_gain))}
    for mode in MODES:
        modes[mode], outcomes[mode], counts = validator.mode(mode, selected[mode], pool, rng, default_gain)
        for gain, count in counts.items():
            pooled[gain].add(count)
    follow = [mode for mode in MODES for _ in outcomes[mode].base]
    base = [hit for mode in MODES for hit in outcomes[mode].base]
    block_top = [hit for mode in MODES for hit in outcomes[mode].block_top]
    draws = [
        [hit for mode in MODES for hit in outcomes[mode].block_random[draw]]
        for draw in range(config.random_draws)
    ]

    def mf(hits: list[bool]) -> dict[str, Any]:
        return mf_ratio_estimate(follow, hits).as_dict()

    summary = {
        "conflicts": len(base),
        "failed_at_baseline": pooled[default_gain].failed,
        "correct_at_baseline": pooled[default_gain].correct,
        "mf_ratio_baseline": mf(base),
        "mf_ratio_block_top": mf(block_top),
        "mf_ratio_block_random": mf_ratio_over_draws(follow, draws).as_dict(),
        "block_top_relative_drop": mf_relative_drop(follow, base, [block_top]).as_dict(),
        "block_random_relative_drop": mf_relative_drop(follow, base, draws).as_dict(),
        "gain_sweep": {str(gain): pooled[gain].estimates() for gain in config.gains},
        "amplify_rescued_share": pooled[default_gain].estimates()["rescued_share"],
        "amplify_broken_share": pooled[default_gain].estimates()["broken_share"],
    }
    return {"modes": modes, "gains": list(config.gains), "summary": summary, "default_gain": default_gain}


def choose_gain(sweep: dict[str, _SweepCounts]) -> float:
    """The gain that rescues most failures while breaking at most 5% of correct samples (else the best
    rescued-minus-broken); ties go to the smaller gain."""

    def value(key: str) -> tuple[float, float, float]:
        counts = sweep[key]
        rescued = counts.rescued / counts.failed if counts.failed else 0.0
        broken = counts.broken / counts.correct if counts.correct else 0.0
        return (
            1.0 if broken <= MAX_BROKEN_SHARE else 0.0,
            rescued - (0 if broken <= MAX_BROKEN_SHARE else broken),
            -float(key),
        )

    return float(max(sweep, key=value))
