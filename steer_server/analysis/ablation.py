"""Exact ablation of the best attributed heads: the measured drop of the metric when one head is
zeroed (1 forward per head from the head's layer on, :meth:`.metric.Runner.score_many`), which orders
the candidates and picks the heads of a mode."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..geometry import ModelGeometry
from ..spec import gains_matrix
from .metric import BASELINE, Runner, Setting


@dataclass
class ModeResult:
    """What the ranking found for one mode.

    Attributes:
        heads: the selected (layer, head), largest measured drop first.
        exact: measured mean drop of the metric per ablated candidate.
        attribution: [L, H] mean attributed drop over the mode's conflicts.
        spearman: rank correlation of attribution and exact drop over the candidates.
    """

    heads: list[tuple[int, int]]
    exact: dict[tuple[int, int], float]
    attribution: torch.Tensor
    spearman: float | None


def gain_table(geometry: ModelGeometry, heads: Sequence[tuple[int, int]], gain: float) -> torch.Tensor:
    """[L, H] gains: `gain` on `heads`, 1 elsewhere."""
    return gains_matrix(dict.fromkeys(heads, gain), geometry)


def rank_mode(
    runner: Runner,
    indices: list[int],
    scores: torch.Tensor,
    geometry: ModelGeometry,
    k: int,
    candidate_factor: int,
    progress: bool,
) -> ModeResult:
    """Ablate the `k * candidate_factor` best attributed heads one at a time on the samples `indices`
    (scores: [N, L, H] attribution) and keep the `k` with the largest measured drop."""
    mean_scores = scores[indices].mean(dim=0)  # [L, H]; NaN on layers without attention heads
    ranked = sorted(geometry.heads(), key=lambda lh: float(mean_scores[lh]), reverse=True)
    candidates = ranked[: max(k * candidate_factor, k)]
    settings = [BASELINE, *(Setting.of_gains(gain_table(geometry, [lh], 0.0)) for lh in candidates)]
    base, *ablated = runner.score_many(
        settings,
        indices,
        answers=False,
        progress=f"exact ablation ({len(candidates)} heads)" if progress else None,
    )
    exact = {
        lh: float((base.metric - scored.metric).mean())
        for lh, scored in zip(candidates, ablated, strict=True)
    }
    chosen = sorted(candidates, key=lambda lh: exact[lh], reverse=True)[:k]
    rho = spearman([float(mean_scores[lh]) for lh in candidates], [exact[lh] for lh in candidates])
    return ModeResult(heads=chosen, exact=exact, attribution=mean_scores, spearman=rho)


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None for fewer than 3 points or no spread."""
    if len(a) < 3:
        return None

    def ranks(values: Sequence[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2
            i = j + 1
        return result

    ra, rb = ranks(a), ranks(b)
    mean_a, mean_b = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(ra, rb, strict=True))
    var = math.sqrt(sum((x - mean_a) ** 2 for x in ra) * sum((y - mean_b) ** 2 for y in rb))
    return cov / var if var else None
