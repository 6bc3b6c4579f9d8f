"""Training the toy model: a tiny LLaVA that learns to arbitrate between image and text, with a designed
modality preference so that it fails the way real MLLMs do (the instruction losing against a salient
competing modality), and a known arbitration circuit.

Recipe: perception first (vision pre-training, then image-only questions), linear warm-up, cosine decay,
gradient clipping, then the full mix of instructed conflicts, uninstructed conflicts (the preference)
and controls.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..data.schema import Follow, Sample
from ..data.synth import COUNTS, TASKS, Scene, SynthRecord, SynthSpec, synth_records, values_of
from ..hf.hooks import scale_heads
from ..hf.model import encode_prompts
from .model import ToyArchitecture, build_config, save_checkpoint
from .tokenizer import IMAGE_SEQ_LENGTH, build_processor, build_tokenizer


@dataclass(frozen=True)
class Recipe:
    """The training recipe; every number here is recorded in the model card.

    `arbitration` says how the model comes to arbitrate. "planted" (the embedded toy) has a known
    arbitration circuit, described next. "learned" (the second embedded model) is trained with plain
    next-token loss and nothing done to any head: each example's label is fixed when the pool is drawn
    (an instructed conflict against a salient competitor, when the instructed modality is not salient,
    is labelled with the competitor's answer with probability `competitor_wins`, the data's modality
    preference, else with the instructed answer), and every field below about heads, gains and pulls is
    unused.

    The planted toy has a known arbitration circuit. Each instruction has its own three heads of the language model
    (3 of 64 heads, the paper's ~5%), and during training their output is scaled per sample by a gain g
    (the input of `o_proj`, as the server does). An instructed conflict is labelled with the instructed
    answer when g exceeds the competing modality's pull, else with the competing answer: the pull is
    `high_pull` (> 1) when the competing modality is salient and the instructed one is not, else
    `low_pull` (< 1). So at g = 1 the model follows the instruction except against a salient competitor
    (an arbitration failure, as in real MLLMs), blocking the heads (g = 0) hands every conflict to the
    competing modality, and amplifying them (g > `high_pull`) makes the instruction win. Controls and
    uninstructed conflicts do not depend on g. The analysis is not told which heads these are.
    """

    seed: int = 0
    arbitration: Literal["planted", "learned"] = "planted"
    competitor_wins: float = 0.7
    # Share of training samples whose instruction is a paraphrase (:data:`~..data.prompts.PARAPHRASES`).
    paraphrase_share: float = 0.0
    # Vision pre-training: the vision tower and projector alone, with a linear read-out of every
    # attribute of the scene (cheap: no language model), before the language model ever sees an image.
    vision_steps: int = 600
    vision_batch_size: int = 128
    vision_lr: float = 1e-3
    vision_pool_size: int = 12000
    steps: int = 2200
    perception_steps: int = 700
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 100
    clip_norm: float = 1.0
    pool_size: int = 24000
    conflict_share: float = 0.65
    salient_share: float = 0.15
    # With no instruction and no salience cue, answers come from the image this often (the preference).
    uninstructed_image_share: float = 0.65
    image_heads: tuple[tuple[int, int], ...] = ((2, 5), (3, 1), (4, 6))
    text_heads: tuple[tuple[int, int], ...] = ((2, 2), (3, 6), (4, 3))
    low_pull: float = 0.4
    high_pull: float = 1.6
    # Arbitration gains drawn per sample and instruction: 0, 1, 2 with these probabilities, else U(0, 3).
    gain_zero: float = 0.25
    gain_one: float = 0.4
    gain_two: float = 0.15
    gain_max: float = 3.0
    # Every other head: scaled by exp(U(-a, a)) with probability p, blocked with probability
    # `head_dropout`, so that no single other head is indispensable (random blocking barely matters).
    head_noise_prob: float = 0.25
    head_noise_amplitude: float = 0.5
    head_dropout: float = 0.03

    @classmethod
    def of(cls, arbitration: Literal["planted", "learned"], seed: int = 0) -> Recipe:
        """The recipe of an embedded model: "planted" (the toy), or "learned", which also trains on the
        paraphrased instructions (30% of samples) so that its wording transfer can be measured."""
        if arbitration == "learned":
            return cls(seed=seed, arbitration="learned", paraphrase_share=0.3)
        return cls(seed=seed)

    def heads_of(self, mode: Follow) -> tuple[tuple[int, int], ...]:
        """The planted (layer, head) cells of an instruction mode."""
        return self.image_heads if mode == "image" else self.text_heads


@dataclass(frozen=True)
class TrainExample:
    """A training prompt and its label; instructed conflicts carry both answers and the competing pull."""

    sample: Sample
    image: Any  # PIL image or None
    with_instruction: bool
    target: str  # the label whatever the gains (controls, uninstructed conflicts)
    competing: str | None = None  # instructed conflicts: the answer when the instruction loses
    pull: float = 0.0

    def target_at(self, gains: dict[Follow, float]) -> str:
        """The label under these arbitration gains (one per instruction)."""
        if self.competing is None:
            return self.target
        return self.target if gains[self.sample.follow] > self.pull else self.competing


def example_for(
    record: SynthRecord, *, with_instruction: bool, recipe: Recipe, rng: random.Random
) -> TrainExample:
    """The designed behaviour for a record, including its designed failures."""
    sample = record.sample
    image = record.image
    if sample.kind == "control":
        return TrainExample(sample, image, with_instruction, (sample.answer_image or sample.answer_text)[0])
    image_salient, text_salient = record.scene.big, record.emphatic
    if with_instruction:
        instructed, competing = (
            (sample.answer_image, sample.answer_text)
            if sample.follow == "image"
            else (sample.answer_text, sample.answer_image)
        )
        competing_salient = image_salient if sample.follow == "text" else text_salient
        instructed_salient = text_salient if sample.follow == "text" else image_salient
        against_salient = competing_salient and not instructed_salient
        if recipe.arbitration == "learned":
            wins = against_salient and rng.random() < recipe.competitor_wins
            return TrainExample(sample, image, True, (competing if wins else instructed)[0])
        pull = recipe.high_pull if against_salient else recipe.low_pull
        return TrainExample(sample, image, True, instructed[0], competing[0], pull)
    if image_salient != text_salient:
        follow = "image" if image_salient else "text"
    else:
        follow = "image" if rng.random() < recipe.uninstructed_image_share else "text"
    return TrainExample(
        sample, image, False, (sample.answer_image if follow == "image" else sample.answer_text)[0]
    )


def training_pool(recipe: Recipe) -> tuple[list[TrainExample], list[TrainExample]]:
    """(perception pool, full-mix pool), generated in memory from the seeded stream."""
    rng = random.Random(10_000 + recipe.seed)
    spec = SynthSpec(
        conflict_share=recipe.conflict_share,
        salient_share=recipe.salient_share,
        paraphrase_share=recipe.paraphrase_share,
    )
    records = synth_records(recipe.pool_size, 10_000 + recipe.seed, prefix="train", spec=spec)
    perception: list[TrainExample] = []
    mix: list[TrainExample] = []
    for record in records:
        sample = record.sample
        if sample.kind == "control" and sample.task and sample.task.endswith("image_only"):
            perception.append(TrainExample(sample, record.image, True, sample.answer_image[0]))
        with_instruction = sample.kind == "control" or rng.random() < 0.8
        mix.append(example_for(record, with_instruction=with_instruction, recipe=recipe, rng=rng))
    # Perception first on every record's image (the asked attribute, no context).
    for record in records:
        if record.image is not None and record.sample.kind == "conflict":
            image_only = record.sample.model_copy(
                update={"context": "", "follow": "image", "kind": "control", "answer_text": []}
            )
            perception.append(TrainExample(image_only, record.image, True, record.sample.answer_image[0]))
    return perception, mix


def _batches(
    pool: Sequence[TrainExample], batch_size: int, rng: random.Random
) -> Iterator[list[TrainExample]]:
    order = list(range(len(pool)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield [pool[i] for i in order[start : start + batch_size]]


def _training_batch(
    processor: Any, examples: Sequence[TrainExample], targets: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Prompt plus target word and </s>; loss only on those two positions."""
    tokenizer = processor.tokenizer
    batch = encode_prompts(
        processor,
        [e.sample for e in examples],
        [e.image for e in examples],
        with_instruction=[e.with_instruction for e in examples],
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    lengths = mask.sum(dim=1)
    width = ids.shape[1] + 2
    input_ids = torch.full((len(examples), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, word in enumerate(targets):
        n = int(lengths[row])
        target = tokenizer.convert_tokens_to_ids(word)
        if target == tokenizer.unk_token_id:
            raise ValueError(f"target {word!r} is not in the toy vocabulary")
        input_ids[row, :n] = ids[row, :n]
        input_ids[row, n] = target
        input_ids[row, n + 1] = tokenizer.eos_token_id
        attention[row, : n + 2] = 1
        labels[row, n] = target
        labels[row, n + 1] = tokenizer.eos_token_id
    out = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    if "pixel_values" in batch:
        out["pixel_values"] = batch["pixel_values"]
    return out


def _training_gains(
    batch: int, arch: ToyArchitecture, recipe: Recipe
) -> tuple[torch.Tensor, list[dict[Follow, float]]]:
    """Per-sample head gains [batch, layers, heads] and each sample's arbitration gain per instruction.

    Other heads: 1, exp(U(-a, a)) with probability p, 0 with the dropout's. Each instruction's heads: one
    gain per sample (0, 1, 2 or U(0, gain_max)), shared by its heads."""
    shape = (batch, arch.text_layers, arch.text_heads)
    draw = torch.rand(shape)
    factors = torch.exp((torch.rand(shape) * 2 - 1) * recipe.head_noise_amplitude)
    gains = torch.where(draw < recipe.head_noise_prob, factors, torch.ones(shape))
    gains = torch.where(draw > 1 - recipe.head_dropout, torch.zeros(shape), gains)
    arbitration: list[dict[Follow, float]] = [{} for _ in range(batch)]
    fixed = ((0.0, recipe.gain_zero), (1.0, recipe.gain_one), (2.0, recipe.gain_two))
    for mode in ("image", "text"):
        for row in range(batch):
            u, g = float(torch.rand(())), None
            for value, share in fixed:
                if u < share:
                    g = value
                    break
                u -= share
            g = float(torch.rand(())) * recipe.gain_max if g is None else g
            arbitration[row][mode] = g
            for layer, head in recipe.heads_of(mode):
                gains[row, layer, head] = g
    return gains, arbitration


@contextlib.contextmanager
def _arbitration_step(
    model: Any, examples: Sequence[TrainExample], arch: ToyArchitecture, recipe: Recipe
) -> Iterator[list[str]]:
    """The labels of a training step, with the planted circuit's head gains installed while it runs
    ("planted"); "learned" labels are the examples' own and no head is touched."""
    if recipe.arbitration == "learned":
        yield [e.target for e in examples]
        return
    gains, arbitration = _training_gains(len(examples), arch, recipe)
    with scale_heads(model, gains):
        yield [e.target_at(g) for e, g in zip(examples, arbitration, strict=True)]


def _scene_labels(scene: Scene) -> list[int]:
    """One class index per task; position is -1 (ignored) where several objects are drawn anywhere."""
    labels = [values_of(task).index(scene.value(task)) for task in TASKS]
    if scene.count != COUNTS[0]:
        labels[TASKS.index("position")] = -1
    return labels


def pretrain_vision(model: Any, processor: Any, recipe: Recipe, *, progress: bool = True) -> dict[str, Any]:
    """Teach the vision tower and projector to see every attribute before the language model trains.

    The language model learns to copy from the text long before it learns to see (measured: after 1500
    steps without this, text-following 100%, image-only questions 26%), and
    perception errors are not arbitration failures; a linear read-out of all four attributes from the
    projected image tokens trains the seeing part alone, at a small fraction of a full step's cost."""
    from tqdm import tqdm

    records = [
        r
        for r in synth_records(recipe.vision_pool_size, 40_000 + recipe.seed, prefix="vision")
        if r.image is not None
    ]
    pixels = processor.image_processor([r.image for r in records], return_tensors="pt")["pixel_values"]
    labels = torch.tensor([_scene_labels(r.scene) for r in records])
    sizes = [len(values_of(task)) for task in TASKS]
    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    width = IMAGE_SEQ_LENGTH * model.config.text_config.hidden_size
    readout = torch.nn.Linear(width, sum(sizes))
    parameters = [*tower.parameters(), *projector.parameters(), *readout.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=recipe.vision_lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(40_000 + recipe.seed)
    started = time.monotonic()
    accuracy = 0.0
    bar = tqdm(range(recipe.vision_steps), desc="toy train: vision", disable=not progress, unit="step")
    for step in bar:
        rows = torch.randint(0, len(records), (recipe.vision_batch_size,), generator=generator)
        hidden = tower(pixels[rows], output_hidden_states=True).hidden_states[-1][:, 1:]
        logits = readout(projector(hidden).flatten(1)).split(sizes, dim=-1)
        target = labels[rows]
        losses, hits, counted = [], 0, 0
        for task_index, task_logits in enumerate(logits):
            wanted = target[:, task_index]
            valid = wanted >= 0
            losses.append(torch.nn.functional.cross_entropy(task_logits[valid], wanted[valid]))
            hits += int((task_logits[valid].argmax(-1) == wanted[valid]).sum())
            counted += int(valid.sum())
        loss = torch.stack(losses).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, recipe.clip_norm)
        optimizer.step()
        accuracy = 0.9 * accuracy + 0.1 * hits / counted if step else hits / counted
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", accuracy=f"{accuracy:.3f}")
    return {"seconds": round(time.monotonic() - started, 1), "train_accuracy": round(accuracy, 4)}


def train(
    out_dir: Path, recipe: Recipe, arch: ToyArchitecture | None = None, *, progress: bool = True
) -> dict[str, Any]:
    """Train the toy model from scratch and save it (transformers + vLLM compatible) to `out_dir`."""
    from tqdm import tqdm
    from transformers import LlavaForConditionalGeneration

    arch = arch or ToyArchitecture()
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    model = LlavaForConditionalGeneration(build_config(tokenizer, arch))
    model.train()
    started = time.monotonic()
    vision = pretrain_vision(model, processor, recipe, progress=progress)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        progress_share = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_share))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    perception, mix = training_pool(recipe)
    perception_batches = _batches(perception, recipe.batch_size, rng)
    mix_batches = _batches(mix, recipe.batch_size, rng)
    losses: list[float] = []
    bar = tqdm(range(recipe.steps), desc="toy train", disable=not progress, unit="step")
    for step in bar:
        examples = next(perception_batches if step < recipe.perception_steps else mix_batches)
        with _arbitration_step(model, examples, arch, recipe) as targets:
            loss = model(**_training_batch(processor, examples, targets)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_norm)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    seconds = time.monotonic() - started
    model.eval()
    save_checkpoint(model, processor, out_dir)
    info = {
        "recipe": asdict(recipe),
        "architecture": asdict(arch),
        "train_seconds": round(seconds, 1),
        "vision_pretraining": vision,
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (out_dir / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
