"""Load a supported MLLM with transformers, encode samples, and read the first answer token.

Used by the toy model's training and card and by the offline analysis, so all of them encode and score
a sample the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.prompts import chat_messages
from ..data.schema import LoadedSample, Sample


@dataclass
class LoadedModel:
    """A transformers model in eval mode, its processor, and the device it lives on."""

    model: Any
    processor: Any
    device: torch.device


class ModelLoadError(ValueError):
    """A checkpoint that does not load as its config describes it."""


# Ways to place a model across devices that accelerate computes itself (`from_pretrained(device_map=...)`).
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def load_model(
    model_dir: str | Path,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    device_map: str | dict[str, Any] | None = None,
) -> LoadedModel:
    """Load model and processor in `dtype` (a `torch` dtype's name; float32 by default), eval mode, on
    `device`, or split across devices by `device_map` (one of :data:`DEVICE_MAP_STRATEGIES`, or module
    name -> device as accelerate takes it: a GPU index, "cpu" or "disk"; transformers' and accelerate's own
    placement, whose hooks move each module's inputs to its device). Weights placed on "disk" are kept in a
    temporary folder removed at exit. Inputs go to `LoadedModel.device`: the first GPU of the map, else
    the CPU.

    transformers re-initialises weights whose shapes disagree with the config and only warns; an analysis
    of such a model would be meaningless, so any missing or mismatched weight is an error here.

    Raises:
        ModelLoadError: weights missing from the checkpoint or shaped unlike the config (names them).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_dir))
    placement: dict[str, Any] = {}
    if device_map is not None:
        import atexit
        import shutil
        import tempfile

        offload = tempfile.mkdtemp(prefix="modality-steer-offload-")
        atexit.register(shutil.rmtree, offload, ignore_errors=True)
        placement = {"device_map": device_map, "offload_folder": offload}
    # ignore_mismatched_sizes only defers the refusal to the check below, which names the weights.
    loaded: Any = AutoModelForImageTextToText.from_pretrained(
        str(model_dir),
        dtype=getattr(torch, dtype),
        output_loading_info=True,
        ignore_mismatched_sizes=True,
        **placement,
    )
    model, info = loaded
    problems = [
        f"{key} (shape differs from the config: checkpoint {tuple(saved)}, config {tuple(built)})"
        for key, saved, built in info.get("mismatched_keys", [])
    ]
    problems += [f"{key} (missing from the checkpoint)" for key in info.get("missing_keys", [])]
    if problems:
        raise ModelLoadError(
            f"{model_dir}: the checkpoint does not match its config ({len(problems)} weights): "
            + "; ".join(sorted(problems)[:4])
        )
    if device_map is None:
        model.to(device)
    else:
        placed = [torch.device(d) for d in getattr(model, "hf_device_map", {}).values() if d != "disk"]
        gpus = sorted({d.index or 0 for d in placed if d.type == "cuda"})
        device = f"cuda:{gpus[0]}" if gpus else "cpu"
    model.eval()
    return LoadedModel(model=model, processor=processor, device=torch.device(device))


def to_bfloat16(
    loaded: LoadedModel,
    model_dir: str | Path | None = None,
    device_map: str | dict[str, Any] | None = None,
) -> LoadedModel:
    """The model in bfloat16: converted in place, or, where accelerate offloaded weights (they sit on the
    meta device between forwards and cannot be converted), loaded again from `model_dir` in bfloat16
    with `device_map`.

    Raises:
        ValueError: offloaded weights and no `model_dir` to load again from.
    """
    if any(parameter.device.type == "meta" for parameter in loaded.model.parameters()):
        if model_dir is None:
            raise ValueError("the model's weights are offloaded: converting it to bfloat16 needs its folder")
        return load_model(model_dir, dtype="bfloat16", device_map=device_map)
    loaded.model.to(torch.bfloat16)
    return loaded


def load_image(path: Path | None) -> Any:
    """The image file as an RGB PIL image (None for None)."""
    from PIL import Image

    if path is None:
        return None
    with Image.open(path) as image:
        return image.convert("RGB")


def encode_prompts(
    processor: Any,
    samples: Sequence[Sample],
    images: Sequence[Any],
    *,
    with_instruction: bool | Sequence[bool] = True,
) -> dict[str, torch.Tensor]:
    """Right-padded batch (input_ids [B, S], attention_mask [B, S], pixel_values when any image) of the
    samples' chat prompts (:func:`~steer_server.data.prompts.chat_messages` through the processor's chat
    template, with the generation prompt). Right padding keeps each row's position ids those of a lone
    prompt."""
    flags = (
        [with_instruction] * len(samples) if isinstance(with_instruction, bool) else list(with_instruction)
    )
    prompts = [
        processor.apply_chat_template(
            chat_messages(s, with_instruction=f), add_generation_prompt=True, tokenize=False
        )
        for s, f in zip(samples, flags, strict=True)
    ]
    # One list of images per prompt: processors that accept a flat list (LLaVA, Qwen) take this too, and
    # Gemma 3's reads a flat list as one prompt's images (`make_nested_list_of_images`).
    per_prompt = [[] if image is None else [image] for image in images]
    processor.tokenizer.padding_side = "right"
    batch = processor(
        text=prompts, images=per_prompt if any(per_prompt) else None, padding=True, return_tensors="pt"
    )
    return dict(batch)


def encode(
    loaded: LoadedModel, samples: Sequence[LoadedSample], *, with_instruction: bool = True
) -> dict[str, torch.Tensor]:
    """:func:`encode_prompts` of loaded samples (images read from disk), on the model's device."""
    images = [load_image(s.image_path) for s in samples]
    batch = encode_prompts(
        loaded.processor, [s.sample for s in samples], images, with_instruction=with_instruction
    )
    # Some image processors return bf16 pixels (Llama 4's); the model runs in its own dtype.
    dtype = loaded.model.dtype
    return {
        key: value.to(loaded.device, dtype=dtype) if value.is_floating_point() else value.to(loaded.device)
        for key, value in batch.items()
    }


def last_position_logits(loaded: LoadedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, vocab] float32 logits at each prompt's last real token: the first answer token's distribution."""
    return at_last_position(loaded.model(**batch, use_cache=False).logits, batch["attention_mask"])


def at_last_position(logits: torch.Tensor, mask: torch.Tensor, first: int = 0) -> torch.Tensor:
    """[B, vocab] float32 rows of logits [B, S - first, vocab] (positions `first` on) at each row's last
    real token (attention mask [B, S], right padding)."""
    last = mask.sum(dim=1) - 1 - first
    return logits[torch.arange(logits.shape[0], device=logits.device), last].float()


def prompt_cache(outputs: Any) -> Any | None:
    """The KV cache a forward returned (``use_cache=True``) when :func:`suffix_last_logits` can reuse it:
    every layer a plain :class:`transformers.DynamicLayer`, which keeps every position (sliding-window
    and linear-attention layers keep a window or a running state instead); else None."""
    from transformers.cache_utils import DynamicLayer

    cache = getattr(outputs, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    return cache


def suffix_last_logits(
    loaded: LoadedModel, batch: dict[str, torch.Tensor], cache: Any, position: int
) -> torch.Tensor:
    """[B, vocab] float32 logits at each prompt's last real token from a forward of positions
    `position` on only, the earlier ones read from `cache` (:func:`prompt_cache` of a forward of the
    same batch; not modified). Per-token inputs are cut to those positions and image inputs left out, so
    the positions must hold no image token and each row's last real token must be among them. Position
    ids are the column index (right padding keeps each row's own); a model whose layers take rotary
    embeddings gets exact ones from :func:`~steer_server.hf.hooks.start_at_layer`.
    """
    import copy

    ids, mask = batch["input_ids"], batch["attention_mask"]
    size = ids.shape[1]
    inputs = {
        key: value[:, position:]
        for key, value in batch.items()
        if isinstance(value, torch.Tensor) and value.shape == ids.shape and key != "attention_mask"
    }
    past = copy.copy(cache)
    past.layers = [copy.copy(layer) for layer in cache.layers]  # cropping re-slices; the tensors stay shared
    past.crop(position - size)
    positions = torch.arange(position, size, device=ids.device).expand(ids.shape[0], -1)
    logits = loaded.model(
        **inputs, attention_mask=mask, past_key_values=past, position_ids=positions, use_cache=True
    ).logits
    return at_last_position(logits, mask, position)


# Longest answer a greedy decode reads, in tokens (answers are "a single word or phrase").
MAX_ANSWER_TOKENS = 8


def answer_budget(tokenizer: Any, samples: Sequence[LoadedSample]) -> int:
    """Tokens the longest candidate answer of the samples takes (after a space), at most
    :data:`MAX_ANSWER_TOKENS`: how far a greedy answer must be decoded to be judged."""
    budget = 1
    for loaded in samples:
        for form in [*loaded.sample.answer_image, *loaded.sample.answer_text]:
            budget = max(budget, len(tokenizer(" " + form, add_special_tokens=False)["input_ids"]))
    return min(budget, MAX_ANSWER_TOKENS)


def greedy_decode(
    loaded: LoadedModel, batch: dict[str, torch.Tensor], max_tokens: int, first: torch.Tensor | None = None
) -> tuple[torch.Tensor, list[str]]:
    """Greedy answers of a right-padded batch: the first answer token's logits [B, V] float32, and each
    row's answer of up to `max_tokens` tokens (stopping at end of sequence), decoded and stripped.

    Runs `max_tokens` forward passes without a KV cache (each new token goes at its row's end), so any
    hook active around the call applies to every step; `first`, the first token's logits when the caller
    already has them (:func:`last_position_logits` under the same hooks), saves the first of them.
    """
    tokenizer = loaded.processor.tokenizer
    if first is None:
        first = last_position_logits(loaded, batch)
    tokens = [[t] for t in first.argmax(dim=-1).tolist()]
    current = batch
    for _ in range(1, max_tokens):
        current = _append(current, [row[-1] for row in tokens], tokenizer.pad_token_id)
        step = last_position_logits(loaded, current).argmax(dim=-1).tolist()
        for row, token in zip(tokens, step, strict=True):
            row.append(token)
    texts = []
    for row in tokens:
        ended = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
        texts.append(tokenizer.decode(row[:ended], skip_special_tokens=True).strip())
    return first, texts


def _append(batch: dict[str, torch.Tensor], tokens: list[int], pad: int) -> dict[str, torch.Tensor]:
    """The batch with one more column: `tokens` at each row's end, every other per-token tensor
    ([B, S], e.g. token type ids) extended with zeros."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    lengths = mask.sum(dim=1)
    rows = torch.arange(ids.shape[0], device=ids.device)
    grown = {
        key: torch.cat([value, torch.zeros_like(value[:, :1])], dim=1)
        for key, value in batch.items()
        if isinstance(value, torch.Tensor) and value.shape == ids.shape
    }
    grown["input_ids"][:, -1] = pad
    grown["input_ids"][rows, lengths] = torch.tensor(tokens, device=ids.device)
    grown["attention_mask"][rows, lengths] = 1
    return {**batch, **grown}


def greedy_answers(
    loaded: LoadedModel,
    samples: Sequence[LoadedSample],
    *,
    with_instruction: bool = True,
    batch_size: int = 64,
    progress: bool = False,
) -> list[str]:
    """Each sample's greedy answer text (:func:`greedy_decode` up to :func:`answer_budget` tokens)."""
    from tqdm import tqdm

    budget = answer_budget(loaded.processor.tokenizer, samples)
    answers: list[str] = []
    starts = range(0, len(samples), batch_size)
    for start in tqdm(starts, desc="greedy answers", disable=not progress, unit="batch"):
        chunk = samples[start : start + batch_size]
        with torch.inference_mode():
            _, texts = greedy_decode(loaded, encode(loaded, chunk, with_instruction=with_instruction), budget)
        answers += texts
    return answers
