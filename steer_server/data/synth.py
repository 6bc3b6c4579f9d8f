"""Synthetic conflict data: coloured shapes on 32x32 images, a context sentence that contradicts the
image on the asked attribute, and controls (agreeing context, image only, text only).

Salience cues (a big object, a context that says "clearly") are recorded per sample so that the toy
model can be trained with a designed modality preference (:mod:`steer_server.toy.training`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .prompts import PARAPHRASES
from .schema import DataError, Follow, Kind, Sample, write_jsonl

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
        """The scene's value of one attribute (task)."""
        return str(getattr(self, task))


def values_of(task: str) -> tuple[str, ...]:
    """The values an attribute (task) can take, in a fixed order."""
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
    # Share of samples whose instruction is one of the held-out paraphrases (:data:`~.prompts.PARAPHRASES`)
    # instead of the paper's sentence; 0 draws nothing, so the streams of earlier data sets are unchanged.
    paraphrase_share: float = 0.0


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
            stated = rng.choice([v for v in values_of(task) if v != seen])
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
        instruction = None
        if spec.paraphrase_share and rng.random() < spec.paraphrase_share:
            instruction = rng.choice(PARAPHRASES[follow])
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
            instruction=instruction,
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
