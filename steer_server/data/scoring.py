"""What counts as a successful answer, and the modality-following (MF) ratio: one definition for the
analysis, the toy model's card, the served eval and the demo.

A conflict sample succeeds when the answer names the instructed modality's answer and not the competing
one (:func:`judge`, after :func:`~.normalize.normalize_answer`); a control when it names its answer. The
MF ratio is the mean over the two instructions ("rely on the image", "rely on the text") of each one's
share of successful conflicts, so that a data set with more samples of one instruction does not hide a
weak following of the other.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

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


@dataclass
class MFReport:
    """MF ratio (:func:`mf_ratio`) and per instruction and task, control accuracy (shares in [0, 1]; None
    where there is no sample), and counts of each :data:`Outcome` over the conflicts."""

    mf_ratio: float | None
    mf_ratio_by_follow: dict[str, float | None]
    mf_ratio_by_task: dict[str, float | None]
    control_accuracy: float | None
    conflicts: int
    controls: int
    outcomes: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form (the keys of the dataclass)."""
        return {
            "mf_ratio": self.mf_ratio,
            "mf_ratio_by_follow": self.mf_ratio_by_follow,
            "mf_ratio_by_task": self.mf_ratio_by_task,
            "control_accuracy": self.control_accuracy,
            "conflicts": self.conflicts,
            "controls": self.controls,
            "outcomes": self.outcomes,
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
    for sample, answer in zip(samples, answers, strict=True):
        if sample.kind == "control":
            control_total += 1
            control_hits += is_success(sample, answer)
            continue
        outcomes[judge(sample, answer)] += 1
        hit = is_success(sample, answer)
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
