"""What counts as a successful answer, and the modality-following (MF) ratio: one definition for the
analysis, the toy model's card, the served eval and the demo.

A conflict sample succeeds when the answer names the instructed modality's answer and not the competing
one (:func:`judge`, after :func:`~.normalize.normalize_answer`); a control when it names its answer. The
MF ratio is the mean over the two instructions ("rely on the image", "rely on the text") of each one's
share of successful conflicts, so that a data set with more samples of one instruction does not hide a
weak following of the other.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..stats import Estimate, mean_of_proportions, proportion, stratified_bootstrap
from .normalize import answer_matches
from .schema import Sample

Outcome = Literal["follow", "other", "neither", "both"]


def judge(sample: Sample, answer: str) -> Outcome:
    """Classify an answer: it follows the instruction when it matches the instructed list only."""
    instructed = sample.answer_image if sample.follow == "image" else sample.answer_text
    competing = sample.answer_text if sample.follow == "image" else sample.answer_image
    hit_instructed = answer_matches(answer, instructed)
    hit_competing = bool(competing) and answer_matches(answer, competing)
    if hit_instructed and hit_competing:
        return "both"
    if hit_instructed:
        return "follow"
    if hit_competing:
        return "other"
    return "neither"


def is_success(sample: Sample, answer: str) -> bool:
    """A conflict succeeds when it follows the instruction (instructed answer only); a control when it
    gives its answer (for an agreeing control both lists hold it)."""
    outcome = judge(sample, answer)
    return outcome == "follow" or (sample.kind == "control" and outcome == "both")


def _ratio(hits: int, total: int) -> float | None:
    return hits / total if total else None


def mf_ratio(by_follow: dict[str, float | None]) -> float | None:
    """The MF ratio: the mean of the per-instruction MF ratios that exist (None when none does)."""
    present = [value for value in by_follow.values() if value is not None]
    return sum(present) / len(present) if present else None


def mf_ratio_of(samples: Sequence[Sample], follows: Sequence[bool]) -> float | None:
    """The MF ratio of conflict samples given whether each one succeeded (controls are ignored)."""
    hits: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    for sample, ok in zip(samples, follows, strict=True):
        if sample.kind == "conflict":
            totals[sample.follow] += 1
            hits[sample.follow] += bool(ok)
    return mf_ratio({f: _ratio(hits[f], totals[f]) for f in totals})


def _mf(follow: np.ndarray, hits: np.ndarray) -> float:
    """:func:`mf_ratio` of arrays: follow (1.0 image, 0.0 text) and success per conflict."""
    by_follow = [float(hits[mask].mean()) for mask in (follow == 1, follow == 0) if mask.any()]
    return sum(by_follow) / len(by_follow) if by_follow else math.nan


def mf_ratio_estimate(follow: Sequence[str], hits: Sequence[bool]) -> Estimate:
    """The MF ratio (:func:`mf_ratio`) of conflicts given each one's instruction (`"image"`/`"text"`)
    and success, with its 95% interval: the exact binomial interval for one instruction, else the
    Jeffreys interval of the mean of the instructions' shares
    (:func:`steer_server.stats.mean_of_proportions`).

    Raises:
        ValueError: outcomes of another length than `follow`.
    """
    if len(hits) != len(follow):
        raise ValueError("every conflict needs one outcome")
    counts = {mode: [0, 0] for mode in sorted(set(follow))}
    for mode, hit in zip(follow, hits, strict=True):
        counts[mode][0] += bool(hit)
        counts[mode][1] += 1
    return mean_of_proportions([(k, n) for k, n in counts.values()])


def _mean_mf(flag: np.ndarray, matrix: np.ndarray) -> float:
    return sum(_mf(flag, matrix[:, d]) for d in range(matrix.shape[1])) / matrix.shape[1]


def mf_ratio_over_draws(follow: Sequence[str], draws: Sequence[Sequence[bool]]) -> Estimate:
    """The mean MF ratio of the same conflicts under several interventions (e.g. random-head draws; one
    outcome list per draw), with a two-level bootstrap over conflicts (within each instruction) and draws
    (:func:`steer_server.stats.stratified_bootstrap`): the interval covers the draws' variation.

    Raises:
        ValueError: no draw, or a draw of another length than `follow`.
    """
    if not draws or any(len(d) != len(follow) for d in draws):
        raise ValueError("every draw needs one outcome per conflict")
    flags = [1.0 if f == "image" else 0.0 for f in follow]
    return stratified_bootstrap(_mean_mf, [flags], follow, draws=np.asarray(draws, dtype=float).T.tolist())


def mf_relative_drop(
    follow: Sequence[str], base: Sequence[bool], blocked: Sequence[Sequence[bool]]
) -> Estimate:
    """``(MF(base) - mean over draws of MF(blocked draw)) / MF(base)``: the relative drop of the MF ratio
    under an intervention (`blocked`: one outcome list per draw, one draw for a fixed intervention),
    measured on the same conflicts, with a paired bootstrap over conflicts within each instruction and,
    with several draws, over the draws too (:func:`steer_server.stats.stratified_bootstrap`).

    Raises:
        ValueError: draws of another length than `base`.
    """
    if not blocked or any(len(arm) != len(base) for arm in blocked) or len(base) != len(follow):
        raise ValueError("every draw needs one outcome per conflict of the baseline")
    flags = [1.0 if f == "image" else 0.0 for f in follow]

    def drop(flag: np.ndarray, base_hits: np.ndarray, matrix: np.ndarray) -> float:
        before = _mf(flag, base_hits)
        return (before - _mean_mf(flag, matrix)) / before if before else math.nan

    matrix = np.asarray(blocked, dtype=float).T.tolist()
    return stratified_bootstrap(drop, [flags, [float(h) for h in base]], follow, draws=matrix)


@dataclass
class MFReport:
    """MF ratio (:func:`mf_ratio`) and per instruction and task, control accuracy (shares in [0, 1]; None
    where there is no sample), counts of each :data:`Outcome` over the conflicts, and the 95% intervals of
    the MF ratio, of each instruction's and of the control accuracy (`intervals`, by the same keys)."""

    mf_ratio: float | None
    mf_ratio_by_follow: dict[str, float | None]
    mf_ratio_by_task: dict[str, float | None]
    control_accuracy: float | None
    conflicts: int
    controls: int
    outcomes: dict[str, int] = field(default_factory=dict)
    intervals: dict[str, Estimate | dict[str, Estimate]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form (the keys of the dataclass; intervals as :meth:`Estimate.as_dict`)."""
        intervals = {
            key: value.as_dict()
            if isinstance(value, Estimate)
            else {k: v.as_dict() for k, v in value.items()}
            for key, value in self.intervals.items()
        }
        return {
            "mf_ratio": self.mf_ratio,
            "mf_ratio_by_follow": self.mf_ratio_by_follow,
            "mf_ratio_by_task": self.mf_ratio_by_task,
            "control_accuracy": self.control_accuracy,
            "conflicts": self.conflicts,
            "controls": self.controls,
            "outcomes": self.outcomes,
            "intervals": intervals,
        }


def mf_report(samples: Sequence[Sample], answers: Sequence[str]) -> MFReport:
    """Score every sample by :func:`is_success`.

    Raises:
        ValueError: `samples` and `answers` differ in length (a missing answer is an error for the
            caller, never a skipped row).
    """
    if len(samples) != len(answers):
        raise ValueError(f"{len(samples)} samples but {len(answers)} answers")
    outcomes: Counter[str] = Counter()
    follow_hits: Counter[str] = Counter()
    follow_total: Counter[str] = Counter()
    task_hits: Counter[str] = Counter()
    task_total: Counter[str] = Counter()
    control_hits = control_total = 0
    conflict_follow: list[str] = []
    conflict_hits: list[bool] = []
    for sample, answer in zip(samples, answers, strict=True):
        if sample.kind == "control":
            control_total += 1
            control_hits += is_success(sample, answer)
            continue
        outcomes[judge(sample, answer)] += 1
        hit = is_success(sample, answer)
        conflict_follow.append(sample.follow)
        conflict_hits.append(hit)
        follow_total[sample.follow] += 1
        follow_hits[sample.follow] += hit
        task = sample.task or "(none)"
        task_total[task] += 1
        task_hits[task] += hit
    by_follow = {f: _ratio(follow_hits[f], follow_total[f]) for f in sorted(follow_total)}
    return MFReport(
        mf_ratio=mf_ratio(by_follow),
        mf_ratio_by_follow=by_follow,
        mf_ratio_by_task={t: _ratio(task_hits[t], task_total[t]) for t in sorted(task_total)},
        control_accuracy=_ratio(control_hits, control_total),
        conflicts=sum(follow_total.values()),
        controls=control_total,
        outcomes=dict(outcomes),
        intervals={
            "mf_ratio": mf_ratio_estimate(conflict_follow, conflict_hits),
            "mf_ratio_by_follow": {
                f: proportion(follow_hits[f], follow_total[f]) for f in sorted(follow_total)
            },
            "control_accuracy": proportion(control_hits, control_total),
        },
    )


def preference_image_share(samples: Sequence[Sample], answers: Sequence[str]) -> float | None:
    """Share of conflict answers given without an instruction that come from the image (of those that
    name either modality's answer)."""
    image = text = 0
    for sample, answer in zip(samples, answers, strict=True):
        if sample.kind != "conflict":
            continue
        if answer_matches(answer, sample.answer_image):
            image += 1
        elif answer_matches(answer, sample.answer_text):
            text += 1
    return _ratio(image, image + text)
