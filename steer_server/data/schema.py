"""The one JSONL schema of conflict data and its loader.

Every consumer (training, analysis, eval, demo, tests) reads samples through :func:`load_samples`, so a
bad line fails in one place, with its line number and field.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .normalize import normalize_answer

Follow = Literal["image", "text"]
Kind = Literal["conflict", "control"]


class Sample(BaseModel):
    """One line of a data set. `image` is relative to the JSONL file; `None` only for text-only controls."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    image: str | None
    context: str
    question: str = Field(min_length=1)
    follow: Follow
    answer_image: list[str]
    answer_text: list[str]
    kind: Kind
    task: str | None = None
    # The instruction sentence when it is not the paper's (:data:`~.prompts.INSTRUCTIONS`): a paraphrase
    # (:data:`~.prompts.PARAPHRASES`), so that an analysis can report on wordings no choice saw.
    instruction: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _answers_fit_kind(self) -> Sample:
        followed = self.answer_image if self.follow == "image" else self.answer_text
        if not followed:
            raise ValueError(f"answer_{self.follow} must list at least one answer (follow={self.follow})")
        if self.kind == "conflict":
            if self.image is None or not self.context:
                raise ValueError("a conflict sample needs both an image and a context")
            if not self.answer_image or not self.answer_text:
                raise ValueError("a conflict sample needs both answer_image and answer_text")
            # Candidate lists may share surface forms (the paper's files do: synonyms of both answers);
            # an answer in the overlap counts as neither modality. The primary answers must differ.
            if normalize_answer(self.answer_image[0]) == normalize_answer(self.answer_text[0]):
                raise ValueError(
                    f"the image and text answers are the same ({normalize_answer(self.answer_image[0])!r}): no conflict"
                )
        if self.image is None and self.kind != "control":
            raise ValueError("only control samples may have no image")
        return self


@dataclass(frozen=True)
class LoadedSample:
    """A validated sample with its image path resolved against the data file."""

    sample: Sample
    image_path: Path | None
    line: int

    def content_digest(self) -> str:
        """SHA-256 of what a model sees and is graded on (every field but the id, and the image's
        bytes): equal for two samples that are the same question whatever their ids."""
        fields = self.sample.model_dump(exclude={"id", "image"})
        if (
            fields["instruction"] is None
        ):  # samples of the paper's wording keep their digest from before the field
            del fields["instruction"]
        image = hashlib.sha256(self.image_path.read_bytes()).hexdigest() if self.image_path else None
        return hashlib.sha256(json.dumps([fields, image], sort_keys=True).encode()).hexdigest()


class DataError(ValueError):
    """A data file that cannot be used as it is; the message names the file, line and field."""


def load_samples(path: str | Path, *, check_images: bool = True) -> list[LoadedSample]:
    """Read and validate a JSONL data set; fail on the first bad line, naming line and field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    loaded: list[LoadedSample] = []
    seen_ids: dict[str, int] = {}
    missing: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            try:
                sample = Sample.model_validate(record)
            except ValidationError as exc:
                first = exc.errors()[0]
                field = ".".join(str(p) for p in first["loc"]) or "(sample)"
                raise DataError(f"{path}:{number}: field '{field}': {first['msg']}") from exc
            if sample.id in seen_ids:
                raise DataError(
                    f"{path}:{number}: field 'id': '{sample.id}' repeats line {seen_ids[sample.id]}"
                )
            seen_ids[sample.id] = number
            image_path = (path.parent / sample.image) if sample.image is not None else None
            if check_images and image_path is not None and not image_path.is_file():
                missing.append(f"line {number} ({sample.id}): {sample.image}")
            loaded.append(LoadedSample(sample=sample, image_path=image_path, line=number))
    if missing:
        raise DataError(f"{path}: {len(missing)} image(s) missing, first: " + "; ".join(missing[:5]))
    if not loaded:
        raise DataError(f"{path}: the data set is empty")
    return loaded


def data_digest(path: str | Path) -> str:
    """SHA-256 of the data file, recorded in profiles and results for provenance."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_jsonl(samples: Sequence[Sample], path: Path) -> None:
    """Write samples atomically (a temp file renamed into place), so a failure leaves nothing half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    with tmp.open("w", encoding="utf-8") as handle:
        for sample in samples:
            handle.write(
                sample.model_dump_json(exclude={"instruction"} if sample.instruction is None else None) + "\n"
            )
    tmp.replace(path)
