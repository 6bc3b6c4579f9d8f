"""Validation of the selected heads on held-out samples: blocking them vs as many random unselected
heads, a gain sweep on the failures, and control accuracy (the paper's head interventions,
arXiv 2602.03677 §4)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from ..data.scoring import mf_ratio
from ..geometry import ModelGeometry
from ..profile import MODES
from .ablation import gain_table
from .config import AnalysisConfig, AnalysisError
from .metric import Runner

# Amplification may break at most this share of correctly answered samples at the default gain.
MAX_BROKEN_SHARE = 0.05


def _share(hits: int, total: int) -> float | None:
    return hits / total if total else None


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

    def shares(self) -> dict[str, float | None]:
        return {
            "rescued_share": _share(self.rescued, self.failed),
            "broken_share": _share(self.broken, self.correct),
        }


class _Validator:
    def __init__(self, runner: Runner, geometry: ModelGeometry, config: AnalysisConfig) -> None:
        self.runner = runner
        self.geometry = geometry
        self.config = config

    def mf(self, heads: list[tuple[int, int]], gain: float, indices: list[int]) -> float:
        """Share of `indices` that succeed with `heads` at `gain`."""
        follows = self.runner.score(gain_table(self.geometry, heads, gain), indices=indices).follows
        return float(follows.float().mean())

    def random_control(
        self, pool: list[tuple[int, int]], count: int, conflict: list[int], rng: random.Random, mode: str
    ) -> tuple[list[float], list[list[list[int]]]]:
        from tqdm import tqdm

        ratios, drawn_heads = [], []
        for _ in tqdm(
            range(self.config.random_draws),
            desc=f"random heads ({mode})",
            disable=not self.config.progress,
            unit="draw",
        ):
            drawn = rng.sample(pool, count)
            drawn_heads.append([[layer, head] for layer, head in drawn])
            ratios.append(self.mf(drawn, 0.0, conflict))
        return ratios, drawn_heads

    def sweep(
        self, heads: list[tuple[int, int]], failed: list[int], correct: list[int], mode: str
    ) -> dict[float, _SweepCounts]:
        from tqdm import tqdm

        counts = {}
        for gain in tqdm(
            self.config.gains, desc=f"gain sweep ({mode})", disable=not self.config.progress, unit="gain"
        ):
            table = gain_table(self.geometry, heads, gain)
            rescued = int(self.runner.score(table, indices=failed).follows.sum()) if failed else 0
            broken = int((~self.runner.score(table, indices=correct).follows).sum()) if correct else 0
            counts[gain] = _SweepCounts(rescued, len(failed), broken, len(correct))
        return counts

    def mode(
        self, mode: str, heads: list[tuple[int, int]], pool: list[tuple[int, int]], rng: random.Random
    ) -> tuple[dict[str, Any], dict[float, _SweepCounts]]:
        samples = self.runner.samples
        conflict = [
            i for i, s in enumerate(samples) if s.sample.kind == "conflict" and s.sample.follow == mode
        ]
        control = [i for i, s in enumerate(samples) if s.sample.kind == "control" and s.sample.follow == mode]
        if not conflict:
            raise AnalysisError(f"no conflict samples with follow={mode} to validate on")
        base = self.runner.score(indices=conflict).follows.tolist()
        random_ratios, random_heads = self.random_control(pool, len(heads), conflict, rng, mode)
        failed = [i for i, ok in zip(conflict, base, strict=True) if not ok]
        correct = [i for i, ok in zip(conflict, base, strict=True) if ok]
        counts = self.sweep(heads, failed, correct, mode)
        report = {
            "conflicts": len(conflict),
            "controls": len(control),
            "mf_ratio_baseline": sum(base) / len(base),
            "mf_ratio_block_top": self.mf(heads, 0.0, conflict),
            "mf_ratio_block_random": sum(random_ratios) / len(random_ratios),
            "mf_ratio_block_random_draws": random_ratios,
            "block_random_heads": random_heads,
            "gain_sweep": {str(gain): c.shares() for gain, c in counts.items()},
            "control_accuracy_baseline": self.mf([], 1.0, control) if control else None,
            "control_accuracy_block_top": self.mf(heads, 0.0, control) if control else None,
        }
        return report, counts


def validate(
    runner: Runner,
    geometry: ModelGeometry,
    selected: dict[str, list[tuple[int, int]]],
    config: AnalysisConfig,
) -> dict[str, Any]:
    """The profile's evidence, per mode and summarised (MF ratios as :func:`~steer_server.data.scoring.mf_ratio`
    aggregates them), with the default gain :func:`choose_gain` picks from the pooled sweep.

    Raises:
        AnalysisError: a mode has no conflict sample to validate on.
    """
    rng = random.Random(config.seed)
    excluded = {lh for heads in selected.values() for lh in heads}
    pool = [lh for lh in geometry.heads() if lh not in excluded]
    validator = _Validator(runner, geometry, config)
    modes: dict[str, Any] = {}
    pooled = {gain: _SweepCounts() for gain in config.gains}
    for mode in MODES:
        modes[mode], counts = validator.mode(mode, selected[mode], pool, rng)
        for gain, count in counts.items():
            pooled[gain].add(count)
    sweep = {str(gain): count.shares() for gain, count in pooled.items()}
    default_gain = choose_gain(sweep)

    def aggregate(key: str) -> float:
        value = mf_ratio({mode: modes[mode][key] for mode in MODES})
        assert value is not None
        return value

    baseline, block_top, block_random = (
        aggregate(key) for key in ("mf_ratio_baseline", "mf_ratio_block_top", "mf_ratio_block_random")
    )
    summary = {
        "mf_ratio_baseline": baseline,
        "mf_ratio_block_top": block_top,
        "mf_ratio_block_random": block_random,
        "block_top_relative_drop": (baseline - block_top) / baseline if baseline else None,
        "block_random_relative_drop": (baseline - block_random) / baseline if baseline else None,
        "gain_sweep": sweep,
        "amplify_rescued_share": sweep[str(default_gain)]["rescued_share"],
        "amplify_broken_share": sweep[str(default_gain)]["broken_share"],
    }
    return {"modes": modes, "gains": list(config.gains), "summary": summary, "default_gain": default_gain}


def choose_gain(sweep: dict[str, dict[str, float | None]]) -> float:
    """The gain that rescues most failures while breaking at most 5% of correct samples (else the best
    rescued-minus-broken); ties go to the smaller gain."""

    def value(key: str) -> tuple[float, float, float]:
        rescued = sweep[key]["rescued_share"] or 0.0
        broken = sweep[key]["broken_share"] or 0.0
        return (
            1.0 if broken <= MAX_BROKEN_SHARE else 0.0,
            rescued - (0 if broken <= MAX_BROKEN_SHARE else broken),
            -float(key),
        )

    return float(max(sweep, key=value))
