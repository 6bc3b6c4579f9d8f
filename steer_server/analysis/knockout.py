"""Information flow: attention knockout between token groups over a sliding window of layers (the
paper's analysis, arXiv 2602.03677 §3: shallow layers move image and text cues into the instruction
tokens)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..architectures import image_token_id
from ..data.prompts import chat_messages, prompt_parts
from ..data.schema import LoadedSample
from ..data.scoring import mf_ratio_of
from ..geometry import ModelGeometry
from ..hf.hooks import knockout_attention
from ..hf.model import LoadedModel
from .config import AnalysisError
from .metric import BASELINE, Runner, Setting

GROUPS = ("image", "context", "instruction", "question", "last")
KNOCKOUT_EDGES = (
    ("image", "instruction"),
    ("context", "instruction"),
    ("image", "last"),
    ("context", "last"),
    ("instruction", "last"),
    ("question", "last"),
)


def token_groups(
    loaded: LoadedModel, samples: Sequence[LoadedSample], batch: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """[B, S] bool masks of each token group of a batch, located through the tokenizer's character
    offsets of the rendered prompt. The processor expands each image placeholder into image tokens,
    often with markers around them (Pixtral's `[IMG_BREAK]` / `[IMG_END]`, Gemma 3's
    `<start_of_image>`); every token the expansion inserted is an image token. The expanded ids are
    aligned with the plain tokenisation by longest common runs (`difflib.SequenceMatcher`).

    Raises:
        AnalysisError: the processor's tokens do not align with the prompt's (an inserted run without
            an image token).
    """
    processor = loaded.processor
    tokenizer = processor.tokenizer
    image_id = image_token_id(loaded.model.config)
    markers = set(tokenizer.added_tokens_decoder)  # special and added tokens (image markers among them)
    ids = batch["input_ids"].cpu()
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    groups = {name: torch.zeros_like(ids, dtype=torch.bool) for name in GROUPS}
    for row, loaded_sample in enumerate(samples):
        sample = loaded_sample.sample
        prompt = processor.apply_chat_template(
            chat_messages(sample), add_generation_prompt=True, tokenize=False
        )
        encoded = tokenizer(prompt, return_offsets_mapping=True)
        plain, offsets = encoded["input_ids"], encoded["offset_mapping"]
        spans = {name: _span(prompt, text) for name, text in prompt_parts(sample).items()}
        expanded = ids[row, : int(lengths[row])].tolist()
        for kind, plain_start, start, end in _aligned_runs(plain, expanded, image_id, markers):
            if kind == "image":
                groups["image"][row, start:end] = True
                continue
            if kind == "orphan":
                raise AnalysisError(
                    f"sample {sample.id}: cannot align the processor's tokens with the prompt's "
                    f"(positions {start}-{end - 1} are neither the prompt's nor an image's)"
                )
            for offset in range(end - start):
                if expanded[start + offset] == image_id:  # a placeholder the expansion kept in place
                    groups["image"][row, start + offset] = True
                    continue
                first, last = offsets[plain_start + offset]
                for name, span in spans.items():
                    if first < span[1] and last > span[0]:
                        groups[name][row, start + offset] = True
        groups["last"][row, int(lengths[row]) - 1] = True
    return groups


def _aligned_runs(
    plain: list[int], expanded: list[int], image_id: int, markers: set[int]
) -> list[tuple[str, int, int, int]]:
    """Runs of the expanded ids as (kind, start in `plain`, start, end in `expanded`): "text" (the
    prompt's own tokens), "image" (inserted by the image expansion: runs holding the image token, and the
    inserted or marker-only runs next to them, e.g. `<start_of_image>` and the line breaks a processor
    adds around it) or "orphan" (inserted, with no image next to it)."""
    from difflib import SequenceMatcher

    kinds: list[str] = []
    places: list[tuple[int, int, int]] = []
    for tag, plain_start, _, start, end in SequenceMatcher(
        None, plain, expanded, autojunk=False
    ).get_opcodes():
        if tag == "delete":
            continue
        tokens = expanded[start:end]
        if tag != "equal":
            kinds.append("image" if image_id in tokens else "orphan")
        elif all(t == image_id for t in tokens):
            kinds.append("image")
        else:
            kinds.append("marker" if all(t in markers for t in tokens) and image_id not in tokens else "text")
        places.append((plain_start, start, end))
    changed = True
    while changed:
        changed = False
        for index, kind in enumerate(kinds):
            neighbours = [kinds[i] for i in (index - 1, index + 1) if 0 <= i < len(kinds)]
            if kind in ("marker", "orphan") and "image" in neighbours:
                kinds[index] = "image"
                changed = True
    return [("text" if kind == "marker" else kind, *place) for kind, place in zip(kinds, places, strict=True)]


def _span(text: str, part: str) -> tuple[int, int]:
    start = text.find(part)
    if start < 0:
        raise AnalysisError(f"the prompt does not contain {part[:60]!r}")
    return start, start + len(part)


def knockout(runner: Runner, geometry: ModelGeometry, window: int, progress: bool) -> dict[str, Any]:
    """Effect of cutting attention source → target (every edge of :data:`KNOCKOUT_EDGES`) over each
    window of `window` consecutive layers: the mean change of the metric and the MF ratio, per window's
    first layer. Each cut's pass starts at its window's first layer from the uncut pass' residual stream
    (nothing below the window changes) and, where the model's KV cache allows, at the target group's first
    position (nothing before it changes)."""

    def mf(follows: torch.Tensor) -> float | None:
        return mf_ratio_of([s.sample for s in runner.samples], follows.tolist())

    # Windows without attention heads (only linear-attention layers of a hybrid model) cut nothing.
    starts = [
        start
        for start in range(0, geometry.num_layers - window + 1)
        if any(geometry.has_heads(layer) for layer in range(start, start + window))
    ]
    groups = {
        number: token_groups(runner.loaded, [runner.samples[i] for i in rows], runner.encoded(number))
        for number, rows in enumerate(runner.batches)
    }

    def cut(source: str, target: str, first: int) -> Setting:
        layers = set(range(first, first + window))

        def active(number: int) -> Any:
            blocked = groups[number][target][:, :, None] & groups[number][source][:, None, :]
            return knockout_attention(runner.loaded.model, layers, blocked)

        def first_position(number: int) -> int:
            # Only the target's queries are cut: no earlier position changes.
            rows = groups[number][target].any(dim=0).nonzero()
            return int(rows[0]) if len(rows) else 0

        return Setting(intervention=active, first_layer=first, first_position=first_position)

    cuts = [(source, target, first) for source, target in KNOCKOUT_EDGES for first in starts]
    base, *scored = runner.score_many(
        [BASELINE, *(cut(*edge) for edge in cuts)],
        progress=f"attention knockout ({len(cuts)} cuts)" if progress else None,
    )
    edges: dict[str, Any] = {}
    for (source, target, _), result in zip(cuts, scored, strict=True):
        edge = edges.setdefault(f"{source}->{target}", {"delta_metric": [], "mf_ratio": []})
        edge["delta_metric"].append(float((result.metric - base.metric).mean()))
        edge["mf_ratio"].append(mf(result.follows))
    return {
        "window": window,
        "samples": len(runner.samples),
        "layers": starts,
        "edges": edges,
        "baseline_mf_ratio": mf(base.follows),
    }
