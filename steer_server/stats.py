"""Intervals for every reported figure: the one place that says how uncertainty is computed.

- a share of independent trials (MF ratio, share of failures rescued, share of correct answers broken):
  the exact (Clopper-Pearson) binomial interval, :func:`proportion`;
- any other statistic of samples (a relative drop, a ratio of two arms measured on the same samples or
  the same interleaved repeats): a seeded bootstrap over the samples, paired across arms, bias-corrected
  and accelerated (BCa), :func:`bootstrap`.

Both come from SciPy (`scipy.stats.binomtest`, `scipy.stats.bootstrap`). Figures are fractions (not
percent); :meth:`Estimate.percent` formats them for people.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 0


@dataclass(frozen=True)
class Estimate:
    """A figure with its 95% interval.

    Attributes:
        value: the point estimate (None when there is no sample to estimate from).
        low, high: the interval's bounds (None likewise).
        n: how many samples (trials, or repeats) it rests on.
        method: ``"clopper-pearson"`` or ``"bootstrap-bca"`` (``"bootstrap-percentile"`` where BCa is
            undefined, e.g. every resample equal).
    """

    value: float | None
    low: float | None
    high: float | None
    n: int
    method: str

    def as_dict(self, digits: int = 6) -> dict[str, Any]:
        """JSON form: ``{"value", "ci95": [low, high], "n", "method"}``."""

        def rounded(x: float | None) -> float | None:
            return None if x is None else round(x, digits)

        return {
            "value": rounded(self.value),
            "ci95": [rounded(self.low), rounded(self.high)],
            "n": self.n,
            "method": self.method,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Estimate:
        """Inverse of :meth:`as_dict`."""
        low, high = data["ci95"]
        return cls(data["value"], low, high, int(data["n"]), str(data["method"]))

    def percent(self, signed: bool = False, digits: int = 0) -> str:
        """``"72% [55, 85] (n=32)"``; ``signed`` prefixes a sign (for changes)."""
        if self.value is None or self.low is None or self.high is None:
            return f"n/a (n={self.n})"
        sign = "+" if signed else ""
        return (
            f"{100 * self.value:{sign}.{digits}f}% "
            f"[{100 * self.low:{sign}.{digits}f}, {100 * self.high:{sign}.{digits}f}] (n={self.n})"
        )


def proportion(successes: int, trials: int, confidence: float = CONFIDENCE) -> Estimate:
    """`successes / trials` with its exact binomial (Clopper-Pearson) interval.

    Raises:
        ValueError: counts outside ``0 <= successes <= trials``.
    """
    from scipy.stats import binomtest

    if not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    if trials == 0:
        return Estimate(None, None, None, 0, "clopper-pearson")
    interval = binomtest(successes, trials).proportion_ci(confidence_level=confidence, method="exact")
    return Estimate(successes / trials, float(interval.low), float(interval.high), trials, "clopper-pearson")


def bootstrap(
    statistic: Callable[..., float],
    samples: Sequence[Sequence[float]],
    *,
    seed: int = SEED,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
) -> Estimate:
    """`statistic(*samples)` with a seeded, paired bootstrap interval: the arrays in `samples` are
    resampled together (index i of each belongs to the same sample or repeat). The result does not
    depend on the order of the samples.

    Args:
        statistic: takes one 1-D array per entry of `samples` and returns a float (may be NaN where
            undefined, e.g. a ratio to zero; such resamples are left out of the interval).
        samples: equal-length sequences of floats.

    Raises:
        ValueError: empty or unequal sample sequences.
    """
    from scipy.stats import bootstrap as scipy_bootstrap

    arrays = [np.asarray(s, dtype=np.float64) for s in samples]
    if not arrays or len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1:
        raise ValueError("bootstrap needs one or more 1-D samples of equal length")
    n = int(arrays[0].shape[0])
    if n == 0:
        return Estimate(None, None, None, 0, "bootstrap-bca")
    # Rows in a canonical order: the same samples give the same interval whatever order they came in
    # (a profile's validation and the demo's served run list the same conflicts differently).
    order = np.lexsort(arrays[::-1])
    arrays = [a[order] for a in arrays]
    value = float(statistic(*arrays))
    if n == 1 or not math.isfinite(value):
        return Estimate(value if math.isfinite(value) else None, None, None, n, "bootstrap-bca")

    def vectorized(*resampled: np.ndarray, axis: int = -1) -> np.ndarray:
        moved = [np.moveaxis(a, axis, -1) for a in resampled]
        flat = [m.reshape(-1, m.shape[-1]) for m in moved]
        out = np.array([statistic(*rows) for rows in zip(*flat, strict=True)], dtype=np.float64)
        return out.reshape(moved[0].shape[:-1])

    for method, name in (("BCa", "bootstrap-bca"), ("percentile", "bootstrap-percentile")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = scipy_bootstrap(
                tuple(arrays),
                vectorized,
                n_resamples=resamples,
                paired=True,
                vectorized=True,
                confidence_level=confidence,
                method=method,
                rng=np.random.default_rng(seed),
            )
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high):
            return Estimate(value, low, high, n, name)
        distribution = result.bootstrap_distribution
        if np.all(distribution == distribution.flat[0]):  # every resample gives the same figure
            return Estimate(value, value, value, n, "bootstrap-percentile")
    return Estimate(value, None, None, n, "bootstrap-percentile")
