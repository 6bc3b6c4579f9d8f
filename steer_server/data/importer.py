"""Importer for the paper's released modality-following files (arXiv 2602.03677); images come from a
folder of COCO-2014 files."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from .prompts import INSTRUCTIONS
from .schema import DataError, Follow, Sample, write_jsonl


@dataclass(frozen=True)
class ImportReport:
    """What an import wrote: samples written, image ids not found, records in the source."""

    written: int
    missing_images: list[str]
    total: int


def _follow_of(question: str) -> Follow:
    first_line = question.split("\n", 1)[0].strip()
    for follow, sentence in INSTRUCTIONS.items():
        if first_line == sentence:
            return follow  # type: ignore[return-value]
    raise DataError(f"unrecognised instruction sentence: {first_line[:80]!r}")


def _question_of(question: str) -> str:
    lines = question.split("\n")
    if len(lines) < 2:
        raise DataError(f"question1 has no question line after the instruction: {question[:80]!r}")
    return lines[1].strip()


def _candidates(primary: str, extra: Sequence[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in [primary, *extra]:
        if item and item not in seen:
            seen[item] = None
    return list(seen)


def _find_image(images: Path, image_id: str) -> Path | None:
    for name in (f"COCO_val2014_{image_id}.jpg", f"{image_id}.jpg", f"COCO_train2014_{image_id}.jpg"):
        candidate = images / name
        if candidate.is_file():
            return candidate
    return None


def import_mf(source: Path, images: Path, out: Path, *, skip_missing: bool = False) -> ImportReport:
    """Convert one released file into the project's JSONL. Missing images fail the import unless
    `skip_missing`; either way they are counted and the first ids reported."""
    try:
        records = json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{source}: not valid JSON ({exc.msg})") from exc
    if not isinstance(records, list) or not records:
        raise DataError(f"{source}: expected a non-empty JSON list of samples")
    samples: list[Sample] = []
    missing: list[str] = []
    for index, record in enumerate(records):
        where = f"{source} record {index}"
        try:
            image_id = str(record["image_id"])
            follow = _follow_of(record["question1"])
            image_path = _find_image(images, image_id)
            if image_path is None:
                missing.append(image_id)
                continue
            samples.append(
                Sample(
                    id=f"{source.stem}-{index:05d}",
                    image=str(Path(_relpath(image_path, out.parent))),
                    context=record["context"],
                    question=_question_of(record["question1"]),
                    follow=follow,
                    answer_image=_candidates(record["answer_img"], record["answer_img_candidate_list"]),
                    answer_text=_candidates(record["answer_text"], record["answer_text_candidate_list"]),
                    kind="conflict",
                    task=record.get("task"),
                )
            )
        except KeyError as exc:
            raise DataError(f"{where}: missing field {exc.args[0]!r}") from exc
        except ValidationError as exc:
            first = exc.errors()[0]
            raise DataError(f"{where}: field '{'.'.join(map(str, first['loc']))}': {first['msg']}") from exc
    report = ImportReport(written=len(samples), missing_images=missing, total=len(records))
    if missing and not skip_missing:
        raise DataError(
            f"{source}: {len(missing)} of {len(records)} images not found in {images} "
            f"(first ids: {', '.join(missing[:5])}); nothing written. Pass --skip-missing to write the rest."
        )
    write_jsonl(samples, out)
    return report


def _relpath(target: Path, start: Path) -> str:
    return os.path.relpath(target.resolve(), start.resolve())
