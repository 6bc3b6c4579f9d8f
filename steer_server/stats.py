"""Intervals for every reported figure: the one place that says how uncertainty is computed.

- a share of independent trials (one instruction's MF ratio, failures rescued, correct answers broken,
  control accuracy): the exact (Clopper-Pearson) binomial interval, :func:`proportion`
  (`scipy.stats.binomtest`);
- the mean of several instructions' shares (the MF ratio): the Jeffreys interval of the mean of
  independent binomials, by seeded Monte Carlo over their Beta(k + 1/2, n - k + 1/2) posteriors,
  :func:`mean_of_proportions` (never zero-width at 0% or 100%);
- a statistic of paired outcomes grouped by instruction (a relative drop, a mean over random-head
  draws): a seeded bootstrap that resamples samples within each group and, when there are draws, the
  draws too (two levels), percentile interval, :func:`stratified_bootstrap`;
- any other statistic of samples or repeats (a mean, a ratio of two arms over interleaved repeats):
  SciPy's seeded, paired BCa bootstrap, :func:`bootstrap`.

Figures are fractions (not percent); :meth:`Estimate.percent` formats them for people. Every estimate
is independent of the order its samples come in.
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
        method: ``"clopper-pearson"``, ``"jeffreys-monte-carlo"``, ``"stratified-bootstrap"`` or
            ``"bootstrap-bca"`` (``"bootstrap-percentile"`` where BCa is undefined, e.g. every resample
            equal).
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

    def percent(self, digits: int = 0) -> str:
        """``"72% [55, 85] (n=32)"`` (`digits` decimals)."""
        if self.value is None or self.low is None or self.high is None:
            return f"n/a (n={self.n})"
        return (
            f"{100 * self.value:.{digits}f}% [{100 * self.low:.{digits}f}, {100 * self.high:.{digits}f}] "
            f"(n={self.n})"
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
        statistic: takes one 1-D array per entry of `samples` and returns a float (NaN where
            undefined; an interval with undefined resamples is not given: low and high are None).
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
                batch=64,  # bounds memory (BCa's jackknife is n x n otherwise)
            )
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high):
            return Estimate(value, low, high, n, name)
        distribution = result.bootstrap_distribution
        if np.all(distribution == distribution.flat[0]):  # every resample gives the same figure
            return Estimate(value, value, value, n, "bootstrap-percentile")
    return Estimate(value, None, None, n, "bootstrap-percentile")


def mean_of_proportions(
    counts: Sequence[tuple[int, int]],
    *,
    seed: int = SEED,
    resamples: int = RESAMPLES * 10,
    confidence: float = CONFIDENCE,
) -> Estimate:
    """The mean of the shares ``k / n`` of independent binomials (`counts`: one ``(k, n)`` per group;
    groups with n = 0 are left out) with its Jeffreys interval, by seeded Monte Carlo over the groups'
    Beta(k + 1/2, n - k + 1/2) posteriors. One group: its exact interval (:func:`proportion`).

    Raises:
        ValueError: counts outside ``0 <= k <= n``.
    """
    from scipy.stats import beta

    present = [(k, n) for k, n in counts if n]
    for k, n in present:
        if not 0 <= k <= n:
            raise ValueError(f"need 0 <= successes <= trials, got {k} of {n}")
    total = sum(n for _, n in present)
    if len(present) <= 1:
        k, n = present[0] if present else (0, 0)
        return proportion(k, n, confidence)
    rng = np.random.default_rng(seed)
    draws = np.mean(
        [beta.rvs(k + 0.5, n - k + 0.5, size=resamples, random_state=rng) for k, n in sorted(present)], axis=0
    )
    alpha = 1 - confidence
    low, high = (float(x) for x in np.quantile(draws, [alpha / 2, 1 - alpha / 2]))
    value = sum(k / n for k, n in present) / len(present)
    return Estimate(value, min(low, value), max(high, value), total, "jeffreys-monte-carlo")


def stratified_bootstrap(
    statistic: Callable[..., float],
    samples: Sequence[Sequence[float]],
    strata: Sequence[str],
    *,
    draws: Sequence[Sequence[float]] | None = None,
    seed: int = SEED,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
) -> Estimate:
    """`statistic(*samples, draws)` with a seeded percentile bootstrap that resamples the samples within
    each stratum (index i of every array belongs to sample i; each stratum keeps its size) and, when
    `draws` ([samples, D]: each sample's outcome under D random draws) is given, the D draws as well, so
    that the interval covers the draws' variation too.

    Args:
        statistic: takes the resampled 1-D arrays and the resampled [samples, D] draws (or None) and
            returns a float (NaN where undefined; with any undefined resample, no interval is given).

    Raises:
        ValueError: arrays, strata and draws of different lengths.
    """
    arrays = [np.asarray(s, dtype=np.float64) for s in samples]
    labels = np.asarray(list(strata))
    matrix = None if draws is None else np.asarray(draws, dtype=np.float64).reshape(len(labels), -1)
    n = len(labels)
    if any(a.shape != (n,) for a in arrays):
        raise ValueError("every sample array needs one value per stratum label")
    if n == 0:
        return Estimate(None, None, None, 0, "stratified-bootstrap")
    keys = [*(matrix.T[::-1] if matrix is not None else []), *arrays[::-1], labels]
    order = np.lexsort(keys)
    arrays, labels = [a[order] for a in arrays], labels[order]
    matrix = None if matrix is None else matrix[order]
    value = float(statistic(*arrays, matrix))
    if not math.isfinite(value):
        return Estimate(None, None, None, n, "stratified-bootstrap")
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(labels == label) for label in np.unique(labels)]
    replicates = np.empty(resamples)
    for r in range(resamples):
        rows = np.concatenate([rng.choice(group, size=len(group)) for group in groups])
        resampled = None
        if matrix is not None:
            columns = rng.integers(0, matrix.shape[1], matrix.shape[1])
            resampled = matrix[rows][:, columns]
        replicates[r] = statistic(*(a[rows] for a in arrays), resampled)
    if not np.all(np.isfinite(replicates)):
        return Estimate(value, None, None, n, "stratified-bootstrap")
    alpha = 1 - confidence
    low, high = (float(x) for x in np.quantile(replicates, [alpha / 2, 1 - alpha / 2]))
    return Estimate(value, low, high, n, "stratified-bootstrap")
