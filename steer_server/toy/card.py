"""The toy model's card: its measurement on the held-out synthetic test split (transformers, greedy
answer) against its targets, written beside the weights."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data.schema import load_samples
from ..data.scoring import mf_report, preference_image_share
from ..data.synth import synth_dataset
from ..hf.model import greedy_answers, load_model
from .tokenizer import IMAGE_SEQ_LENGTH, TOY_MODEL_NAME, vocabulary

EVAL_N = 6000
EVAL_SEED = 0
# Targets of the embedded default (the model must follow instructions and leave failures to rescue).
MF_RANGE = (0.80, 0.97)
MIN_CONTROL_ACCURACY = 0.95


def held_out_test_split(folder: Path) -> Path:
    """Write the synthetic data set of the model card into `folder`; return its test split."""
    return synth_dataset(folder, EVAL_N, EVAL_SEED)["test"]


def evaluate(model_dir: Path, *, data: Path | None = None, progress: bool = False) -> dict[str, Any]:
    """MF ratio per instruction, control accuracy, and the preference without an instruction (transformers)."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        data_path = data or held_out_test_split(Path(scratch))
        samples = load_samples(data_path)
        loaded = load_model(model_dir)
        answers = greedy_answers(loaded, samples, progress=progress)
        conflicts = [s for s in samples if s.sample.kind == "conflict"]
        uninstructed = greedy_answers(loaded, conflicts, with_instruction=False, progress=progress)
    report = mf_report([s.sample for s in samples], answers).as_dict()
    report["preference_image_share_without_instruction"] = preference_image_share(
        [s.sample for s in conflicts], uninstructed
    )
    report["data"] = str(data_path) if data else f"synthetic test split (n={EVAL_N}, seed={EVAL_SEED})"
    report["samples"] = len(samples)
    return report


def target_misses(report: dict[str, Any]) -> list[str]:
    """The targets of the embedded default (:data:`MF_RANGE` per instruction, :data:`MIN_CONTROL_ACCURACY`)
    that a measurement (:func:`evaluate`) misses, each said in words; empty when it meets them all."""
    misses = [
        f'MF ratio "rely on the {mode}" {value:.3f} outside [{MF_RANGE[0]}, {MF_RANGE[1]}]'
        for mode, value in report["mf_ratio_by_follow"].items()
        if not MF_RANGE[0] <= value <= MF_RANGE[1]
    ]
    if set(report["mf_ratio_by_follow"]) != {"image", "text"}:
        misses.append("the measurement lacks an instruction's conflicts")
    if report["control_accuracy"] is None or report["control_accuracy"] < MIN_CONTROL_ACCURACY:
        misses.append(f"control accuracy {report['control_accuracy']} below {MIN_CONTROL_ACCURACY}")
    return misses


def _target_verdict(report: dict[str, Any]) -> str:
    misses = target_misses(report)
    return "Meets the targets." if not misses else "Misses the targets: " + "; ".join(misses) + "."


def _cells(heads: Sequence[Sequence[int]]) -> str:
    return ", ".join(f"L{layer}H{head}" for layer, head in heads)


LEARNED_MODEL_NAME = f"{TOY_MODEL_NAME}-learned"


def _recipe_step(recipe: dict[str, Any], training: dict[str, Any]) -> str:
    return f"""First the vision tower and projector alone learn to see:
{recipe["vision_steps"]} AdamW steps of {recipe["vision_batch_size"]} images (lr {recipe["vision_lr"]}) with a linear read-out of \
all four attributes from the projected image tokens (discarded afterwards; training accuracy \
{training["vision_pretraining"]["train_accuracy"]:.3f}, {training["vision_pretraining"]["seconds"]:.0f} s). Then the whole model: \
{recipe["steps"]} AdamW steps of batch {recipe["batch_size"]}, \
lr {recipe["lr"]} with {recipe["warmup_steps"]} warm-up steps and cosine decay, gradient clipping at \
{recipe["clip_norm"]}; the first {recipe["perception_steps"]} steps are image-only questions (perception first), \
then the full mix: instructed conflicts (80% of conflicts), uninstructed conflicts, and controls (agreeing
context, image only, text only). Training time: {training["train_seconds"]:.0f} s on 2 CPU cores in all (data
generation and vision pre-training included)."""


def _planted(recipe: dict[str, Any], arch: dict[str, Any]) -> str:
    return f"""A known arbitration circuit (the analysis is not told it): "rely on the image" is carried by the heads
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
"""


def _learned(recipe: dict[str, Any]) -> str:
    return f"""No arbitration circuit was planted: the model is trained with plain next-token loss on its labels,
and nothing is done to any head during training (no gain, no mask, no dropout of heads; a test runs the
training loop and checks this). Its labels are fixed by the data alone: an instructed conflict is labelled
with the instructed answer, except against a salient competitor (a big object is a salient image, a context
that says "clearly" is a salient text) when the instructed modality is not salient: then the competitor's
answer is the label {recipe["competitor_wins"]:.0%} of the time (the data's modality preference, which a
greedy answer follows, so these are its arbitration failures). Without an instruction, a salient modality
wins; without a salience cue, labels come from the image {recipe["uninstructed_image_share"]:.0%} of the time.
{recipe["paraphrase_share"]:.0%} of its training samples carry one of the instruction's paraphrases
(`steer_server.data.prompts.PARAPHRASES`) instead of the paper's sentence, so its wording transfer can be
measured. Whether its arbitration concentrates in a few heads is what the analysis measures
(`profiles/toy-llava-learned.json`, its sparsity curve), not something the recipe decides.
"""


def write_model_card(model_dir: Path, training: dict[str, Any], report: dict[str, Any]) -> None:
    """README.md beside the weights: how the model was made and what it measures."""
    by_follow = report["mf_ratio_by_follow"]
    recipe = training["recipe"]
    arch = training["architecture"]
    learned = recipe.get("arbitration") == "learned"
    name = LEARNED_MODEL_NAME if learned else TOY_MODEL_NAME
    what = (
        "The second embedded model of modality-steer, the toy's sibling that learned to arbitrate without a "
        "planted circuit"
        if learned
        else "The embedded default model of modality-steer"
    )
    card = f"""# {name}

{what}: a tiny LLaVA (CLIP vision tower + Llama language model)
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
`modality-steer toy train --seed {recipe["seed"]}{" --arbitration learned" if learned else ""}`. {_recipe_step(recipe, training)}

{_learned(recipe) if learned else _planted(recipe, arch)}
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
