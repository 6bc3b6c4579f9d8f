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

from ..stats import Estimate, bootstrap, proportion
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


def _mf_of_arrays(is_image: np.ndarray, hits: np.ndarray) -> float:
    by_follow = [float(hits[mask].mean()) for mask in (is_image == 1, is_image == 0) if mask.any()]
    return sum(by_follow) / len(by_follow) if by_follow else math.nan


def mf_ratio_estimate(follow: Sequence[str], *arms: Sequence[bool]) -> Estimate:
    """The MF ratio (:func:`mf_ratio`) of conflicts given each one's instruction (`"image"`/`"text"`) and
    success, with its 95% interval. Several arms (the same conflicts under several interventions, e.g.
    random-head draws): the mean of their MF ratios, with a paired bootstrap over the conflicts.
    One arm of one instruction: that share, with its exact binomial interval; else a bootstrap over the
    conflicts (:func:`steer_server.stats.bootstrap`).

    Raises:
        ValueError: no arm, or an arm of another length than `follow`.
    """
    if not arms or any(len(arm) != len(follow) for arm in arms):
        raise ValueError("every arm needs one outcome per conflict")
    if len(arms) == 1 and len(set(follow)) == 1:
        return proportion(sum(map(bool, arms[0])), len(follow))
    is_image = [1.0 if f == "image" else 0.0 for f in follow]

    def mean_mf(flags: np.ndarray, *hits: np.ndarray) -> float:
        return sum(_mf_of_arrays(flags, h) for h in hits) / len(hits)

    return bootstrap(mean_mf, [is_image, *[[float(h) for h in arm] for arm in arms]])


def mf_relative_drop(follow: Sequence[str], base: Sequence[bool], arms: Sequence[Sequence[bool]]) -> Estimate:
    """``(MF(base) - mean over arms of MF(arm)) / MF(base)``: the relative drop of the MF ratio under an
    intervention (several arms: e.g. random-head draws, averaged), measured on the same conflicts, with a
    paired 95% bootstrap interval over the conflicts.

    Raises:
        ValueError: arms of another length than `base`.
    """
    if any(len(arm) != len(base) for arm in arms) or not arms:
        raise ValueError("every arm needs one outcome per conflict of the baseline")
    is_image = [1.0 if f == "image" else 0.0 for f in follow]

    def drop(flags: np.ndarray, base_hits: np.ndarray, *arm_hits: np.ndarray) -> float:
        before = _mf_of_arrays(flags, base_hits)
        after = sum(_mf_of_arrays(flags, hits) for hits in arm_hits) / len(arm_hits)
        return (before - after) / before if before else math.nan

    return bootstrap(drop, [is_image, [float(h) for h in base], *[[float(h) for h in arm] for arm in arms]])


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
