"""Intervals (steer_server.stats) and the MF-ratio estimates built on them, against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from steer_server.data.scoring import mf_ratio, mf_ratio_estimate, mf_ratio_over_draws, mf_relative_drop
from steer_server.stats import Estimate, bootstrap, mean_of_proportions, proportion, stratified_bootstrap


@pytest.mark.parametrize("n", [1, 7, 32, 500])
def test_clopper_pearson_at_the_edges_is_the_closed_form(n):
    """No success: [0, 1 - (alpha/2)^(1/n)]; all successes: [(alpha/2)^(1/n), 1]."""
    none, every = proportion(0, n), proportion(n, n)
    assert none.value == 0 and none.low == 0 and none.high == pytest.approx(1 - 0.025 ** (1 / n))
    assert every.value == 1 and every.high == 1 and every.low == pytest.approx(0.025 ** (1 / n))
    assert none.n == every.n == n and none.method == "clopper-pearson"


def test_clopper_pearson_is_wider_than_the_normal_approximation_and_contains_it_for_large_n():
    estimate = proportion(230, 320)
    p = 230 / 320
    half = 1.96 * math.sqrt(p * (1 - p) / 320)
    assert estimate.low < p - 0.9 * half and estimate.high > p + 0.9 * half
    assert estimate.high - estimate.low == pytest.approx(2 * half, rel=0.08)


@pytest.mark.parametrize(
    ("successes", "trials", "error"),
    [(-1, 4, "0 <= successes <= trials"), (5, 4, "0 <= successes <= trials")],
)
def test_bad_counts_are_refused(successes, trials, error):
    with pytest.raises(ValueError, match=error):
        proportion(successes, trials)


def test_no_trials_is_no_figure():
    assert proportion(0, 0) == Estimate(None, None, None, 0, "clopper-pearson")
    assert proportion(0, 0).percent() == "n/a (n=0)"


def test_bootstrap_of_a_mean_matches_the_standard_error_and_is_seeded():
    values = np.random.default_rng(5).normal(3.0, 2.0, 400)
    estimate = bootstrap(lambda x: float(x.mean()), [values])
    half = 1.96 * values.std(ddof=1) / math.sqrt(len(values))
    assert estimate.value == pytest.approx(values.mean())
    assert estimate.low == pytest.approx(values.mean() - half, abs=0.15 * half)
    assert estimate.high == pytest.approx(values.mean() + half, abs=0.15 * half)
    assert bootstrap(lambda x: float(x.mean()), [values]) == estimate
    assert bootstrap(lambda x: float(x.mean()), [values], seed=1) != estimate


def test_bootstrap_does_not_depend_on_the_order_of_the_samples():
    rng = np.random.default_rng(2)
    first, second = rng.random(60) > 0.3, rng.random(60) > 0.6
    order = rng.permutation(60)
    drop = mf_relative_drop
    follow = ["image", "text"] * 30
    a = drop(follow, first.tolist(), [second.tolist()])
    b = drop([follow[i] for i in order], first[order].tolist(), [second[order].tolist()])
    assert a == b


def test_paired_bootstrap_keeps_pairs_together():
    """A difference that is constant within pairs has a zero-width interval only when pairs are
    resampled together."""
    base = np.random.default_rng(1).normal(0, 5, 100)
    estimate = bootstrap(lambda a, b: float((a - b).mean()), [base + 1.0, base])
    assert estimate.low == pytest.approx(1.0) and estimate.high == pytest.approx(1.0)


def test_bootstrap_refuses_unequal_samples():
    with pytest.raises(ValueError, match="equal length"):
        bootstrap(lambda a, b: 0.0, [[1.0, 2.0], [1.0]])


def test_estimate_round_trips_and_prints_percentages():
    estimate = proportion(23, 32)
    back = Estimate.from_dict(estimate.as_dict(digits=12))
    assert (back.value, back.low, back.high) == pytest.approx((estimate.value, estimate.low, estimate.high))
    assert (back.n, back.method) == (32, "clopper-pearson")
    assert estimate.percent() == "72% [53, 86] (n=32)"


def test_mf_ratio_estimate_is_the_mean_over_instructions():
    follow = ["image"] * 10 + ["text"] * 30
    hits = [True] * 9 + [False] + [True] * 15 + [False] * 15
    estimate = mf_ratio_estimate(follow, hits)
    assert estimate.value == pytest.approx(mf_ratio({"image": 0.9, "text": 0.5}))
    assert estimate.low < estimate.value < estimate.high and estimate.n == 40
    assert estimate.method == "jeffreys-monte-carlo"
    assert mf_ratio_estimate(["text"] * 4, [True, False, True, True]) == proportion(3, 4)
    assert mf_ratio_estimate(list(reversed(follow)), list(reversed(hits))) == estimate


def test_mean_of_proportions_is_never_zero_width_at_the_edges():
    """All successes: the interval still has width, about as wide as each group's exact one allows."""
    every = mean_of_proportions([(20, 20), (20, 20)])
    assert every.value == 1 and every.high == 1 and 0.9 < every.low < 0.99
    none = mean_of_proportions([(0, 20), (0, 30)])
    assert none.value == 0 and none.low == 0 and 0.01 < none.high < 0.1


def test_mean_of_proportions_matches_the_normal_approximation_in_the_middle():
    estimate = mean_of_proportions([(300, 500), (200, 500)])
    half = 1.96 * math.sqrt(0.6 * 0.4 / 500 + 0.4 * 0.6 / 500) / 2
    assert estimate.low == pytest.approx(0.5 - half, abs=0.15 * half)
    assert estimate.high == pytest.approx(0.5 + half, abs=0.15 * half)


def test_stratified_bootstrap_never_loses_a_stratum():
    """One image conflict among ten text ones: every resample keeps it, so the MF ratio stays defined
    and the interval is about the text share's."""
    follow = ["image"] + ["text"] * 10
    draws = [[True] + [i % 2 == 0 for i in range(10)]] * 2
    estimate = mf_ratio_over_draws(follow, draws)
    assert estimate.low is not None and estimate.low >= 0.5  # the image share is 1 in every resample
    assert estimate.method == "stratified-bootstrap"


def test_interval_over_draws_covers_the_draws_variation():
    follow = ["image", "text"] * 100
    same = [[i % 10 != 0 for i in range(200)]] * 5
    varied = [[(i + shift) % (2 + shift) != 0 for i in range(200)] for shift in range(5)]
    narrow, wide = mf_ratio_over_draws(follow, same), mf_ratio_over_draws(follow, varied)
    assert (wide.high - wide.low) > 1.5 * (narrow.high - narrow.low)


def test_stratified_bootstrap_refuses_mismatched_arrays():
    with pytest.raises(ValueError, match="one value per stratum label"):
        stratified_bootstrap(lambda a, m: 0.0, [[1.0, 2.0]], ["x"])


def test_relative_drop_is_paired_over_conflicts():
    follow = ["image", "text"] * 50
    base = [True] * 100
    blocked = [i % 4 == 0 for i in range(100)]
    drop = mf_relative_drop(follow, base, [blocked])
    assert drop.value == pytest.approx(1 - 0.5 * (sum(blocked[0::2]) / 50 + sum(blocked[1::2]) / 50))
    assert drop.low < drop.value < drop.high
    with pytest.raises(ValueError, match="one outcome per conflict"):
        mf_relative_drop(follow, base, [blocked[:-1]])
