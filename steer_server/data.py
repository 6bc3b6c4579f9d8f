"""Conflict data: the one JSONL schema, its loader, the prompt layout, the synthetic generator and the
importer from the paper's released files.

Every consumer (training, analysis, eval, demo, tests) reads samples through :func:`load_samples`, so a
bad line fails in one place with its line number and field, and the prompt a sample becomes is built by
:func:`user_text` alone: the analysis and the served eval see exactly the same words.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Follow = Literal["image", "text"]
Kind = Literal["conflict", "control"]

# The paper's instruction sentences (arXiv 2602.03677, released modality-following files).
INSTRUCTIONS: dict[str, str] = {
    "image": (
        "In case there is an inconsistency between the Text Context and the input image content, "
        "you must rely on the image content rather than the text context."
    ),
    "text": (
        "In case there is an inconsistency between the Text Context and the input image content, "
        "you must rely on the text context rather than the input image content."
    ),
}
FORMAT_CONSTRAINT = "Answer the question using a single word or phrase."


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


def user_text(sample: Sample, *, with_instruction: bool = True) -> str:
    """The text part of the user turn, in the paper's layout: context, instruction, question, format.

    The image (if any) goes before it, as the chat template's image placeholder.
    """
    parts = []
    if sample.context:
        parts.append(f"Text Context: {sample.context}")
    if with_instruction:
        parts.append(INSTRUCTIONS[sample.follow])
    parts.append(f"{sample.question} {FORMAT_CONSTRAINT}")
    return "\n".join(parts)


def chat_messages(sample: Sample, *, with_instruction: bool = True) -> list[dict[str, Any]]:
    """The user turn as chat content parts (an image placeholder, then the text): what processors'
    chat templates render."""
    content: list[dict[str, Any]] = []
    if sample.image is not None:
        content.append({"type": "image"})
    content.append({"type": "text", "text": user_text(sample, with_instruction=with_instruction)})
    return [{"role": "user", "content": content}]


def openai_messages(loaded: LoadedSample, *, with_instruction: bool = True) -> list[dict[str, Any]]:
    """The same turn for an OpenAI-compatible endpoint: the image travels inline as a data URL."""
    messages = chat_messages(loaded.sample, with_instruction=with_instruction)
    if loaded.image_path is not None:
        encoded = base64.b64encode(loaded.image_path.read_bytes()).decode("ascii")
        mime = "image/png" if loaded.image_path.suffix.lower() == ".png" else "image/jpeg"
        messages[0]["content"][0] = {
            "type": "image_url",
            "image_url": {"url": f"data:{mime};base64,{encoded}"},
        }
    return messages


_PUNCT = re.compile(r"[^\w\s]", flags=re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation and articles, and reduce simple inflections (plural, -ing, -ed)."""
    words = _PUNCT.sub(" ", text.lower()).split()
    words = [w for w in words if w not in {"a", "an", "the"}]
    return " ".join(_stem(w) for w in words)


def _stem(word: str) -> str:
    """Undo simple English inflection: plural -s/-es/-ies, -ing, -ed (both sides are stemmed alike)."""
    if len(word) <= 3 or word.endswith("ss"):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    for plural in ("sses", "shes", "ches", "xes", "zes"):
        if word.endswith(plural):
            return word[:-2]
    for suffix in ("ing", "ed", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def answer_matches(answer: str, candidates: Iterable[str]) -> bool:
    """Whether a model's answer names one of the candidate surface forms (after normalisation)."""
    said = f" {normalize_answer(answer)} "
    for candidate in candidates:
        norm = normalize_answer(candidate)
        if norm and f" {norm} " in said:
            return True
    return False


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


def write_jsonl(samples: Sequence[Sample], path: Path) -> None:
    """Write samples atomically (a temp file renamed into place), so a failure leaves nothing half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    with tmp.open("w", encoding="utf-8") as handle:
        for sample in samples:
            handle.write(sample.model_dump_json(exclude_none=False) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------------------------------
# Synthetic conflict data: coloured shapes.
# --------------------------------------------------------------------------------------------------

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 45),
    "blue": (35, 70, 220),
    "yellow": (235, 210, 30),
    "purple": (140, 45, 175),
}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three")
POSITIONS = ("left", "right", "top", "bottom")
TASKS = ("colour", "shape", "count", "position")
QUESTIONS = {
    "colour": "What colour is the object?",
    "shape": "What shape is the object?",
    "count": "How many objects are there?",
    "position": "Where is the object?",
}
IMAGE_SIZE = 32
# Salience: how strongly a modality states its evidence. A big object is a salient image; a context
# that says "clearly" is a salient text. The toy model is trained so that a salient competing modality
# sometimes beats the instruction: its failures are arbitration failures, like a real model's
# modality preference, not perception errors.
EMPHASIS = "clearly"


@dataclass(frozen=True)
class Scene:
    """What an image shows: one attribute value per task."""

    colour: str
    shape: str
    count: str
    position: str
    big: bool

    def value(self, task: str) -> str:
        return str(getattr(self, task))


def _values(task: str) -> tuple[str, ...]:
    return {"colour": tuple(COLOURS), "shape": SHAPES, "count": COUNTS, "position": POSITIONS}[task]


def describe(task: str, value: str, *, emphatic: bool) -> str:
    """A context sentence stating `value` for the asked attribute."""
    adverb = f" {EMPHASIS}" if emphatic else ""
    if task == "colour":
        return f"The object in the picture is{adverb} {value}."
    if task == "shape":
        return f"The object in the picture is{adverb} a {value}."
    if task == "count":
        return f"There are{adverb} {value} objects in the picture."
    return f"The object is{adverb} at the {value} of the picture."


def render_scene(scene: Scene, rng: random.Random) -> Any:
    """Draw the scene as a 32x32 RGB PIL image (count > 1 draws small copies in distinct cells)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    fill = COLOURS[scene.colour]
    n = COUNTS.index(scene.count) + 1
    if n == 1:
        size = rng.randint(17, 20) if scene.big else rng.randint(11, 13)
        centre = {
            "left": (size // 2 + 1, IMAGE_SIZE // 2),
            "right": (IMAGE_SIZE - size // 2 - 2, IMAGE_SIZE // 2),
            "top": (IMAGE_SIZE // 2, size // 2 + 1),
            "bottom": (IMAGE_SIZE // 2, IMAGE_SIZE - size // 2 - 2),
        }[scene.position]
        jitter = 2
        centres = [
            (
                centre[0] + rng.randint(-jitter, jitter) * (scene.position in ("top", "bottom")),
                centre[1] + rng.randint(-jitter, jitter) * (scene.position in ("left", "right")),
            )
        ]
        sizes = [size]
    else:
        cells = [(8, 8), (24, 8), (8, 24), (24, 24)]
        rng.shuffle(cells)
        centres = [(x + rng.randint(-1, 1), y + rng.randint(-1, 1)) for x, y in cells[:n]]
        sizes = [rng.randint(12, 14) if scene.big else rng.randint(9, 11) for _ in range(n)]
    for (cx, cy), size in zip(centres, sizes, strict=True):
        half = size // 2
        box = (cx - half, cy - half, cx - half + size - 1, cy - half + size - 1)
        if scene.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif scene.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    return image


def _random_scene(task: str, rng: random.Random, *, big: bool) -> Scene:
    # Position questions need a single object; count questions draw small copies anywhere.
    count = rng.choice(COUNTS) if task == "count" else "one"
    return Scene(
        colour=rng.choice(tuple(COLOURS)),
        shape=rng.choice(SHAPES),
        count=count,
        position=rng.choice(POSITIONS),
        big=big,
    )


@dataclass(frozen=True)
class SynthSpec:
    """Shares of each sample kind and salience, so tests and training can ask for other mixes."""

    conflict_share: float = 0.7
    salient_share: float = 0.15


@dataclass(frozen=True)
class SynthRecord:
    """A generated sample with what the generator knows beyond the schema (the toy's training uses the
    salience cues) and its image in memory (`None` for text-only controls)."""

    sample: Sample
    scene: Scene
    emphatic: bool
    image: Any


def synth_records(n: int, seed: int, *, prefix: str, spec: SynthSpec | None = None) -> list[SynthRecord]:
    """Generate `n` records (conflicts and controls), balanced over task and instruction."""
    spec = spec or SynthSpec()
    rng = random.Random(seed)
    records: list[SynthRecord] = []
    for index in range(n):
        task = TASKS[index % len(TASKS)]
        follow: Follow = "image" if (index // len(TASKS)) % 2 == 0 else "text"
        kind: Kind = "conflict" if rng.random() < spec.conflict_share else "control"
        image_big = rng.random() < spec.salient_share
        emphatic = rng.random() < spec.salient_share
        scene = _random_scene(task, rng, big=image_big)
        seen = scene.value(task)
        sid = f"{prefix}-{index:05d}"
        image_rel: str | None = f"images-{prefix}/{sid}.png"
        control = None
        if kind == "conflict":
            stated = rng.choice([v for v in _values(task) if v != seen])
            context = describe(task, stated, emphatic=emphatic)
            answer_image, answer_text = [seen], [stated]
        else:
            control = rng.choice(("agree", "image_only", "text_only"))
            if control == "agree":
                context = describe(task, seen, emphatic=emphatic)
                answer_image, answer_text = [seen], [seen]
            elif control == "image_only":
                context, answer_image, answer_text, follow = "", [seen], [], "image"
            else:
                context = describe(task, seen, emphatic=emphatic)
                answer_image, answer_text, image_rel, follow = [], [seen], None, "text"
        image = render_scene(scene, rng) if image_rel is not None else None
        sample = Sample(
            id=sid,
            image=image_rel,
            context=context,
            question=QUESTIONS[task],
            follow=follow,
            answer_image=answer_image,
            answer_text=answer_text,
            kind=kind,
            task=task if control is None else f"{task}/{control}",
        )
        records.append(SynthRecord(sample=sample, scene=scene, emphatic=emphatic, image=image))
    return records


SPLITS = {"train": 0.8, "validation": 0.1, "test": 0.1}


def synth_dataset(out: Path, n: int, seed: int, spec: SynthSpec | None = None) -> dict[str, Path]:
    """Write train/validation/test JSONL files (and their images) under `out`; deterministic per seed."""
    if n < len(SPLITS) * len(TASKS) * 2:
        raise DataError(f"--n must be at least {len(SPLITS) * len(TASKS) * 2} to fill every split and task")
    paths: dict[str, Path] = {}
    for split_index, (split, share) in enumerate(SPLITS.items()):
        count = max(len(TASKS) * 2, round(n * share))
        records = synth_records(count, seed * 1000 + split_index, prefix=split, spec=spec)
        (out / f"images-{split}").mkdir(parents=True, exist_ok=True)
        for record in records:
            if record.sample.image is not None:
                record.image.save(out / record.sample.image)
        paths[split] = out / f"{split}.jsonl"
        write_jsonl([record.sample for record in records], paths[split])
    return paths


# --------------------------------------------------------------------------------------------------
# Importer for the paper's released modality-following files (images: a folder of COCO-2014 files).
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportReport:
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
    import os

    return os.path.relpath(target.resolve(), start.resolve())
