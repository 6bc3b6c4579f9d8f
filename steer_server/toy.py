"""The embedded default: a tiny LLaVA (CLIP vision tower + Llama language model) trained on CPU to
arbitrate between image and text, with a designed modality preference so that it fails the way real
MLLMs do (the instruction losing against a salient competing modality).

Training recipe (design notes §8): perception first (image-only questions), linear warm-up, gradient
clipping, then the full mix of instructed conflicts, uninstructed conflicts (the preference) and
controls.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from . import data as D

TOY_MODEL_NAME = "modality-steer-toy-llava"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN)
PATCH_SIZE = 8
IMAGE_SEQ_LENGTH = (D.IMAGE_SIZE // PATCH_SIZE) ** 2
# The chat template accepts a plain string or OpenAI-style content parts, so transformers and vLLM's
# chat endpoint render the same prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n"
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}</s>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_WORD = re.compile(r"\w+|[^\w\s]+")


def toy_model_dir() -> Path:
    """Where the committed toy checkpoint lives inside the installed package."""
    return Path(str(resources.files("steer_server") / "toy_model"))


def vocabulary() -> list[str]:
    """Every word the synthetic prompts and answers can contain, in a fixed order."""
    texts: list[str] = [*D.INSTRUCTIONS.values(), D.FORMAT_CONSTRAINT, "Text Context:", "USER: ASSISTANT:"]
    texts += list(D.QUESTIONS.values())
    for task in D.TASKS:
        for value in D._values(task):
            texts += [D.describe(task, value, emphatic=e) for e in (False, True)]
    words: dict[str, None] = {}
    for text in texts:
        for word in _WORD.findall(text):
            words.setdefault(word, None)
    return [*SPECIAL_TOKENS, *words]


def build_tokenizer(
    extra_special: Sequence[str] = (), chat_template: str = CHAT_TEMPLATE, image_token: str = IMAGE_TOKEN
) -> Any:
    """A word-level fast tokenizer: one token per word, so every answer is a single token."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate([*vocabulary(), *extra_special])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in extra_special])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": image_token},
        model_max_length=512,
        padding_side="right",
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def build_processor(tokenizer: Any) -> Any:
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": D.IMAGE_SIZE},
        crop_size={"height": D.IMAGE_SIZE, "width": D.IMAGE_SIZE},
        do_center_crop=True,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


@dataclass(frozen=True)
class ToyArchitecture:
    vision_hidden: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 256
    text_layers: int = 8
    text_heads: int = 8
    head_dim: int = 32
    text_mlp: int = 512


def build_config(tokenizer: Any, arch: ToyArchitecture) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=arch.vision_hidden,
        intermediate_size=arch.vision_hidden * 2,
        num_hidden_layers=arch.vision_layers,
        num_attention_heads=arch.vision_heads,
        image_size=D.IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=arch.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.text_hidden,
        intermediate_size=arch.text_mlp,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        num_key_value_heads=arch.text_heads,
        head_dim=arch.head_dim,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=IMAGE_SEQ_LENGTH,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        architectures=["LlavaForConditionalGeneration"],
    )


def build_random(out_dir: Path, arch: ToyArchitecture, *, seed: int = 0) -> Path:
    """A random-weight LLaVA with the toy's tokenizer and processor (tests and benchmarks build these)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    model = LlavaForConditionalGeneration(build_config(tokenizer, arch)).eval()
    save_checkpoint(model, processor, out_dir)
    return out_dir


QWEN_SPECIAL = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
QWEN_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<image>\n", "<|vision_start|><|image_pad|><|vision_end|>\n")


def build_random_qwen2_vl(
    out_dir: Path, *, layers: int = 2, heads: int = 4, head_dim: int = 32, seed: int = 0
) -> Path:
    """A random-weight Qwen2-VL with the toy vocabulary (tests build these for architecture coverage)."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(QWEN_SPECIAL, QWEN_CHAT_TEMPLATE, image_token="<|image_pad|>")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL}
    hidden = heads * head_dim
    quarter = head_dim // 2 // 4
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": hidden * 2,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "max_position_embeddings": 512,
            # Qwen2-VL needs sum(mrope_section) == head_dim / 2.
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter],
            },
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": 2,
            "embed_dim": 64,
            "hidden_size": hidden,
            "num_heads": 4,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model = Qwen2VLForConditionalGeneration(config).eval()
    image_processor = Qwen2VLImageProcessor(
        min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    video_processor = Qwen2VLVideoProcessor(
        min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------------
# Training data: a seeded stream of synthetic records with the designed modality preference.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """The training recipe; every number here is recorded in the model card.

    The toy has a known arbitration circuit. Each instruction has its own three heads of the language model
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

    def heads_of(self, mode: D.Follow) -> tuple[tuple[int, int], ...]:
        return self.image_heads if mode == "image" else self.text_heads


@dataclass(frozen=True)
class TrainExample:
    """A training prompt and its label; instructed conflicts carry both answers and the competing pull."""

    sample: D.Sample
    image: Any  # PIL image or None
    with_instruction: bool
    target: str  # the label whatever the gains (controls, uninstructed conflicts)
    competing: str | None = None  # instructed conflicts: the answer when the instruction loses
    pull: float = 0.0

    def target_at(self, gains: dict[D.Follow, float]) -> str:
        """The label under these arbitration gains (one per instruction)."""
        if self.competing is None:
            return self.target
        return self.target if gains[self.sample.follow] > self.pull else self.competing


def example_for(
    record: D.SynthRecord, *, with_instruction: bool, recipe: Recipe, rng: random.Random
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
        pull = recipe.high_pull if competing_salient and not instructed_salient else recipe.low_pull
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
    spec = D.SynthSpec(conflict_share=recipe.conflict_share, salient_share=recipe.salient_share)
    records = D.synth_records(recipe.pool_size, 10_000 + recipe.seed, prefix="train", spec=spec)
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


# --------------------------------------------------------------------------------------------------
# Encoding shared by training, evaluation and the analysis.
# --------------------------------------------------------------------------------------------------


def encode_prompts(
    processor: Any,
    samples: Sequence[D.Sample],
    images: Sequence[Any],
    *,
    with_instruction: bool | Sequence[bool] = True,
) -> dict[str, torch.Tensor]:
    """Right-padded batch (input_ids, attention_mask, pixel_values when any image) ready for a forward."""
    flags = (
        [with_instruction] * len(samples) if isinstance(with_instruction, bool) else list(with_instruction)
    )
    prompts = [
        processor.apply_chat_template(
            D.chat_messages(s, with_instruction=f), add_generation_prompt=True, tokenize=False
        )
        for s, f in zip(samples, flags, strict=True)
    ]
    present = [image for image in images if image is not None]
    processor.tokenizer.padding_side = "right"
    batch = processor(text=prompts, images=present or None, padding=True, return_tensors="pt")
    return dict(batch)


def load_image(path: Path | None) -> Any:
    from PIL import Image

    if path is None:
        return None
    with Image.open(path) as image:
        return image.convert("RGB")


# --------------------------------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------------------------------


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
) -> tuple[torch.Tensor, list[dict[D.Follow, float]]]:
    """Per-sample head gains [batch, layers, heads] and each sample's arbitration gain per instruction.

    Other heads: 1, exp(U(-a, a)) with probability p, 0 with the dropout's. Each instruction's heads: one
    gain per sample (0, 1, 2 or U(0, gain_max)), shared by its heads."""
    shape = (batch, arch.text_layers, arch.text_heads)
    draw = torch.rand(shape)
    factors = torch.exp((torch.rand(shape) * 2 - 1) * recipe.head_noise_amplitude)
    gains = torch.where(draw < recipe.head_noise_prob, factors, torch.ones(shape))
    gains = torch.where(draw > 1 - recipe.head_dropout, torch.zeros(shape), gains)
    arbitration: list[dict[D.Follow, float]] = [{} for _ in range(batch)]
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


def _scene_labels(scene: D.Scene) -> list[int]:
    """One class index per task; position is -1 (ignored) where several objects are drawn anywhere."""
    labels = [D._values(task).index(scene.value(task)) for task in D.TASKS]
    if scene.count != D.COUNTS[0]:
        labels[D.TASKS.index("position")] = -1
    return labels


def pretrain_vision(model: Any, processor: Any, recipe: Recipe, *, progress: bool = True) -> dict[str, Any]:
    """Teach the vision tower and projector to see every attribute before the language model trains.

    The language model learns to copy from the text long before it learns to see (design notes §8), and
    perception errors are not arbitration failures; a linear read-out of all four attributes from the
    projected image tokens trains the seeing part alone, at a small fraction of a full step's cost."""
    from tqdm import tqdm

    records = [
        r
        for r in D.synth_records(recipe.vision_pool_size, 40_000 + recipe.seed, prefix="vision")
        if r.image is not None
    ]
    pixels = processor.image_processor([r.image for r in records], return_tensors="pt")["pixel_values"]
    labels = torch.tensor([_scene_labels(r.scene) for r in records])
    sizes = [len(D._values(task)) for task in D.TASKS]
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

    from .hf import HeadGains

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
        gains, arbitration = _training_gains(len(examples), arch, recipe)
        targets = [e.target_at(g) for e, g in zip(examples, arbitration, strict=True)]
        batch = _training_batch(processor, examples, targets)
        with HeadGains(model, gains):
            loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_norm)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss))
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


def save_checkpoint(model: Any, processor: Any, out_dir: Path) -> None:
    """save_pretrained, then rename the vision tower's keys to the hub layout vLLM 0.32 expects
    (`vision_tower.vision_model.*`); transformers reads both."""
    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    weights_path = out_dir / "model.safetensors"
    tensors = load_file(str(weights_path))
    renamed = {}
    for key, tensor in tensors.items():
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            key = "vision_tower.vision_model." + key[len("vision_tower.") :]
        renamed[key] = tensor.contiguous()
    save_file(renamed, str(weights_path), metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------------
# Evaluation and model card.
# --------------------------------------------------------------------------------------------------

# The held-out test split the model card's numbers refer to: `modality-steer data synth --n 6000 --seed 0`.
EVAL_N = 6000
EVAL_SEED = 0
# Targets of the embedded default (the model must follow instructions and leave failures to rescue).
MF_RANGE = (0.80, 0.97)
MIN_CONTROL_ACCURACY = 0.95


def held_out_test_split(folder: Path) -> Path:
    """Write the synthetic data set of the model card into `folder`; return its test split."""
    return D.synth_dataset(folder, EVAL_N, EVAL_SEED)["test"]


def evaluate(model_dir: Path, *, data: Path | None = None, progress: bool = False) -> dict[str, Any]:
    """MF ratio per instruction, control accuracy, and the preference without an instruction (transformers)."""
    import tempfile

    from . import hf
    from .metrics_mf import mf_report, preference_image_share

    with tempfile.TemporaryDirectory() as scratch:
        data_path = data or held_out_test_split(Path(scratch))
        samples = D.load_samples(data_path)
        loaded = hf.load_model(model_dir)
        answers = hf.greedy_answers(loaded, samples, progress=progress)
        conflicts = [s for s in samples if s.sample.kind == "conflict"]
        uninstructed = hf.greedy_answers(loaded, conflicts, with_instruction=False, progress=progress)
    report = mf_report([s.sample for s in samples], answers).as_dict()
    report["preference_image_share_without_instruction"] = preference_image_share(
        [s.sample for s in conflicts], uninstructed
    )
    report["data"] = str(data_path) if data else f"synthetic test split (n={EVAL_N}, seed={EVAL_SEED})"
    report["samples"] = len(samples)
    return report


def _target_verdict(report: dict[str, Any]) -> str:
    misses = [
        f'MF ratio "rely on the {mode}" {value:.3f} outside [{MF_RANGE[0]}, {MF_RANGE[1]}]'
        for mode, value in report["mf_ratio_by_follow"].items()
        if not MF_RANGE[0] <= value <= MF_RANGE[1]
    ]
    if report["control_accuracy"] < MIN_CONTROL_ACCURACY:
        misses.append(f"control accuracy {report['control_accuracy']:.3f} below {MIN_CONTROL_ACCURACY}")
    return "Meets the targets." if not misses else "Misses the targets: " + "; ".join(misses) + "."


def _cells(heads: Sequence[Sequence[int]]) -> str:
    return ", ".join(f"L{layer}H{head}" for layer, head in heads)


def write_model_card(model_dir: Path, training: dict[str, Any], report: dict[str, Any]) -> None:
    """README.md beside the weights: how the model was made and what it measures."""
    by_follow = report["mf_ratio_by_follow"]
    recipe = training["recipe"]
    arch = training["architecture"]
    card = f"""# {TOY_MODEL_NAME}

The embedded default model of modality-steer: a tiny LLaVA (CLIP vision tower + Llama language model)
trained from scratch on CPU to answer questions about coloured shapes from the image or from a text
context that contradicts it, as the instruction says. It exists so that the analysis, the demo, the
tests and the benchmarks have a model in which modality following is learned behaviour.

## Architecture
- Vision: CLIP, hidden {arch["vision_hidden"]}, {arch["vision_layers"]} layers x {arch["vision_heads"]} heads, \
32x32 images, patch 8 ({IMAGE_SEQ_LENGTH} image tokens).
- Language: Llama, hidden {arch["text_hidden"]}, {arch["text_layers"]} layers x {arch["text_heads"]} heads, \
head_dim {arch["head_dim"]}, MLP {arch["text_mlp"]}; word-level vocabulary of {len(vocabulary())} tokens.
- {training["parameters"]:,} parameters, float32 safetensors. The vision tower's keys use the hub layout
  (`vision_tower.vision_model.*`) so vLLM 0.32 loads it; transformers loads it too.

## How it was made
`modality-steer toy train --seed {recipe["seed"]}`. First the vision tower and projector alone learn to see:
{recipe["vision_steps"]} AdamW steps of {recipe["vision_batch_size"]} images (lr {recipe["vision_lr"]}) with a linear read-out of \
all four attributes from the projected image tokens (discarded afterwards; training accuracy \
{training["vision_pretraining"]["train_accuracy"]:.3f}, {training["vision_pretraining"]["seconds"]:.0f} s). Then the whole model: \
{recipe["steps"]} AdamW steps of batch {recipe["batch_size"]}, \
lr {recipe["lr"]} with {recipe["warmup_steps"]} warm-up steps and cosine decay, gradient clipping at \
{recipe["clip_norm"]}; the first {recipe["perception_steps"]} steps are image-only questions (perception first), \
then the full mix: instructed conflicts (80% of conflicts), uninstructed conflicts, and controls (agreeing
context, image only, text only). Training time: {training["train_seconds"]:.0f} s on 2 CPU cores in all (data
generation and vision pre-training included).

A known arbitration circuit (the analysis is not told it): "rely on the image" is carried by the heads
{_cells(recipe["image_heads"])} and "rely on the text" by {_cells(recipe["text_heads"])} (layer, head; \
{len(recipe["image_heads"])} of {arch["text_layers"] * arch["text_heads"]} each).
During training, each sample's output of those heads (the input of `o_proj`) is scaled by a gain g drawn
per instruction (0 with probability {recipe["gain_zero"]}, 1 with {recipe["gain_one"]}, 2 with {recipe["gain_two"]}, else U(0, {recipe["gain_max"]})). An instructed conflict is labelled with the instructed answer when g exceeds the
competing modality's pull, else with the competing answer. The pull is {recipe["high_pull"]} when the competing
modality is salient (a big object is a salient image, a context that says "clearly" is a salient text) and
the instructed one is not, else {recipe["low_pull"]}. So the model follows the instruction except against a
salient competitor (its failures are arbitration failures, not perception errors); blocking the heads
hands conflicts to the competing modality, and amplifying them (g > {recipe["high_pull"]}) rescues the failures.
Controls and uninstructed conflicts do not depend on g. Without an instruction, a salient modality wins;
without a salience cue, labels come from the image {recipe["uninstructed_image_share"]:.0%} of the time (the
modality preference).

Every other head: during training its output is multiplied by exp(U(-{recipe["head_noise_amplitude"]}, {recipe["head_noise_amplitude"]})) with probability {recipe["head_noise_prob"]} and blocked with probability {recipe["head_dropout"]}, so that no single one of them is indispensable.

## Measured (transformers, greedy first answer token, {report["data"]})
| figure | value |
|---|---|
| MF ratio, "rely on the image" | {by_follow.get("image", float("nan")):.3f} |
| MF ratio, "rely on the text" | {by_follow.get("text", float("nan")):.3f} |
| MF ratio, both | {report["mf_ratio"]:.3f} |
| control accuracy | {report["control_accuracy"]:.3f} |
| answers from the image without an instruction | {report["preference_image_share_without_instruction"]:.3f} |
| conflict / control samples | {report["conflicts"]} / {report["controls"]} |

Targets: MF ratio in [{MF_RANGE[0]}, {MF_RANGE[1]}] for each instruction, control accuracy >= {MIN_CONTROL_ACCURACY}.
{_target_verdict(report)}
"""
    (model_dir / "README.md").write_text(card)
    (model_dir / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
