"""Modality-following figures from (sample, answer) pairs: one computation for transformers and served runs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import data as D


def _ratio(hits: int, total: int) -> float | None:
    return hits / total if total else None


@dataclass
class MFReport:
    """MF ratio overall and per instruction and task, control accuracy, outcome counts."""

    mf_ratio: float | None
    mf_ratio_by_follow: dict[str, float | None]
    mf_ratio_by_task: dict[str, float | None]
    control_accuracy: float | None
    conflicts: int
    controls: int
    outcomes: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "mf_ratio": self.mf_ratio,
            "mf_ratio_by_follow": self.mf_ratio_by_follow,
            "mf_ratio_by_task": self.mf_ratio_by_task,
            "control_accuracy": self.control_accuracy,
            "conflicts": self.conflicts,
            "controls": self.controls,
            "outcomes": self.outcomes,
        }


def mf_report(samples: Sequence[D.Sample], answers: Sequence[str]) -> MFReport:
    """Score every sample; a sample with no answer is an error for the caller, not a skipped row."""
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
            control_hits += D.is_success(sample, answer)
            continue
        outcomes[D.judge(sample, answer)] += 1
        hit = D.is_success(sample, answer)
        follow_total[sample.follow] += 1
        follow_hits[sample.follow] += hit
        task = sample.task or "(none)"
        task_total[task] += 1
        task_hits[task] += hit
    conflicts = sum(follow_total.values())
    return MFReport(
        mf_ratio=_ratio(sum(follow_hits.values()), conflicts),
        mf_ratio_by_follow={f: _ratio(follow_hits[f], follow_total[f]) for f in sorted(follow_total)},
        mf_ratio_by_task={t: _ratio(task_hits[t], task_total[t]) for t in sorted(task_total)},
        control_accuracy=_ratio(control_hits, control_total),
        conflicts=conflicts,
        controls=control_total,
        outcomes=dict(outcomes),
    )


def preference_image_share(samples: Sequence[D.Sample], answers: Sequence[str]) -> float | None:
    """Share of conflict answers given without an instruction that come from the image (of those that
    name either modality's answer)."""
    image = text = 0
    for sample, answer in zip(samples, answers, strict=True):
        if sample.kind != "conflict":
            continue
        if D.answer_matches(answer, sample.answer_image):
            image += 1
        elif D.answer_matches(answer, sample.answer_text):
            text += 1
    return _ratio(image, image + text)
