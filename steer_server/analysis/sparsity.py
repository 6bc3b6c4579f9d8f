"""The sparsity curve: how far modality following falls as more of the analysis' best-ranked heads are
blocked, beside as many random heads, on the report split.

The paper (arXiv 2602.03677 §4) reports one operating point (about 5% of heads); whether head steering
suits a model depends on the curve (arXiv 2606.28273 reports 2.5-4.8% of heads flipping 68-96% of target
answers). A model whose arbitration concentrates shows a steep top-head curve far above the random one
at small fractions; one that spreads it shows two curves that rise together.
"""

from __future__ import annotations

import math
import random
from typing import Any

from ..data.scoring import mf_ratio_estimate, mf_ratio_over_draws, mf_relative_drop
from ..geometry import ModelGeometry
from ..profile import MODES
from .ablation import ModeResult, gain_table
from .config import AnalysisConfig, AnalysisError
from .metric import BASELINE, Runner, Setting

# Shares of all heads blocked at the curve's points (issue #28: 1, 2, 5, 10, 20%).
CURVE_FRACTIONS = (0.01, 0.02, 0.05, 0.10, 0.20)
RANKING = (
    "the exact-ablation candidates by measured drop (the selected heads first), then every other head by "
    "attribution"
)


def ranking(result: ModeResult, geometry: ModelGeometry) -> list[tuple[int, int]]:
    """Every head of the geometry in the analysis' order for one mode (:data:`RANKING`): the selected heads
    first (in their order), then the other ablated candidates by measured drop, then the rest by
    attribution."""

    def attributed(lh: tuple[int, int]) -> float:
        value = float(result.attribution[lh])
        return -math.inf if math.isnan(value) else value

    ablated = sorted((lh for lh in result.exact if lh not in result.heads), key=lambda lh: -result.exact[lh])
    rest = sorted((lh for lh in geometry.heads() if lh not in result.exact), key=attributed, reverse=True)
    return [*result.heads, *ablated, *rest]


def _random_pool(
    ranked: list[tuple[int, int]], n: int, rankings: dict[str, list[tuple[int, int]]]
) -> list[tuple[int, int]]:
    """The heads random draws of `n` come from: outside this mode's top `n` and, as in the validation, outside
    every mode's top `n` where enough heads are left; else outside this mode's top `n` only."""
    others = {lh for heads in rankings.values() for lh in heads[:n]}
    pool = [lh for lh in ranked[n:] if lh not in others]
    return pool if len(pool) >= n else ranked[n:]


def head_counts(total_heads: int) -> dict[float, int]:
    """Heads blocked at each of :data:`CURVE_FRACTIONS` of `total_heads` (at least one)."""
    return {fraction: max(1, round(fraction * total_heads)) for fraction in CURVE_FRACTIONS}


def sparsity_curve(
    runner: Runner,
    geometry: ModelGeometry,
    rankings: dict[str, list[tuple[int, int]]],
    config: AnalysisConfig,
) -> dict[str, Any]:
    """The curve on the report split (`runner`), per mode and pooled: at each fraction, the MF ratio with
    the mode's top-ranked heads blocked and with as many random heads blocked (`config.random_draws`
    seeded draws from outside every mode's top at that size, :func:`_random_pool`; fewer heads when a
    geometry has too few left), and the relative drops from the baseline, each with
    its 95% interval (:mod:`steer_server.data.scoring`). One pass over each mode's conflicts scores every
    point.

    Raises:
        AnalysisError: a mode without conflicts on the report split.
    """
    rng = random.Random(f"sparsity-{config.seed}")
    counts = head_counts(geometry.total_heads)
    sizes = sorted(set(counts.values()))
    outcomes: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        conflicts = [
            i for i, s in enumerate(runner.samples) if s.sample.kind == "conflict" and s.sample.follow == mode
        ]
        if not conflicts:
            raise AnalysisError(f"no conflict samples with follow={mode} on the report split")
        ranked = rankings[mode]
        pools = {n: _random_pool(ranked, n, rankings) for n in sizes}
        drawn = {
            n: [rng.sample(pools[n], min(n, len(pools[n]))) for _ in range(config.random_draws)]
            for n in sizes
        }
        settings = [BASELINE]
        for n in sizes:
            settings.append(Setting.of_gains(gain_table(geometry, ranked[:n], 0.0)))
            settings += [Setting.of_gains(gain_table(geometry, heads, 0.0)) for heads in drawn[n]]
        scored = runner.score_many(
            settings,
            conflicts,
            progress=f"sparsity curve ({mode}, {len(settings)} settings)" if config.progress else None,
        )
        hits = [s.hits for s in scored]
        per_size, position = {}, 1
        for n in sizes:
            per_size[n] = (hits[position], hits[position + 1 : position + 1 + config.random_draws])
            position += 1 + config.random_draws
        outcomes[mode] = {"base": hits[0], "sizes": per_size, "drawn": drawn}

    def point(modes: tuple[str, ...], n: int) -> dict[str, Any]:
        follow = [mode for mode in modes for _ in outcomes[mode]["base"]]
        base = [hit for mode in modes for hit in outcomes[mode]["base"]]
        top = [hit for mode in modes for hit in outcomes[mode]["sizes"][n][0]]
        draws = [
            [hit for mode in modes for hit in outcomes[mode]["sizes"][n][1][d]]
            for d in range(config.random_draws)
        ]
        return {
            "mf_ratio_block_top": mf_ratio_estimate(follow, top).as_dict(),
            "mf_ratio_block_random": mf_ratio_over_draws(follow, draws).as_dict(),
            "relative_drop_top": mf_relative_drop(follow, base, [top]).as_dict(),
            "relative_drop_random": mf_relative_drop(follow, base, draws).as_dict(),
        }

    points = []
    for fraction, n in counts.items():
        points.append(
            {
                "fraction": fraction,
                "heads": n,
                "heads_share": round(n / geometry.total_heads, 6),
                **point(MODES, n),
                "modes": {
                    mode: {
                        **point((mode,), n),
                        "top_heads": [list(lh) for lh in rankings[mode][:n]],
                        "random_heads": [[list(lh) for lh in heads] for heads in outcomes[mode]["drawn"][n]],
                    }
                    for mode in MODES
                },
            }
        )
    follow = [mode for mode in MODES for _ in outcomes[mode]["base"]]
    return {
        "split": "report",
        "ranking": RANKING,
        "total_heads": geometry.total_heads,
        "random_draws": config.random_draws,
        "conflicts": {mode: len(outcomes[mode]["base"]) for mode in MODES},
        "mf_ratio_baseline": mf_ratio_estimate(
            follow, [hit for mode in MODES for hit in outcomes[mode]["base"]]
        ).as_dict(),
        "points": points,
    }
