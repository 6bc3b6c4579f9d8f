"""Transformers side: load a supported MLLM, encode samples, and read the first answer token.

Used by the toy model's evaluation and by the offline analysis, so both score a sample the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import data as D
from .toy import encode_prompts, load_image


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    device: torch.device


class ModelLoadError(ValueError):
    """A checkpoint that does not load as its config describes it."""


def load_model(model_dir: str | Path, *, device: str = "cpu") -> LoadedModel:
    """Load model and processor in float32, eval mode, on `device`.

    transformers re-initialises weights whose shapes disagree with the config and only warns; an analysis
    of such a model would be meaningless, so any missing or mismatched weight is an error here.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_dir))
    # ignore_mismatched_sizes only defers the refusal to the check below, which names the weights.
    loaded: Any = AutoModelForImageTextToText.from_pretrained(
        str(model_dir), dtype=torch.float32, output_loading_info=True, ignore_mismatched_sizes=True
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
    model.to(device).eval()
    return LoadedModel(model=model, processor=processor, device=torch.device(device))


def encode(
    loaded: LoadedModel, samples: Sequence[D.LoadedSample], *, with_instruction: bool = True
) -> dict[str, torch.Tensor]:
    """Right-padded batch on the model's device (right padding keeps position ids those of a lone prompt)."""
    images = [load_image(s.image_path) for s in samples]
    batch = encode_prompts(
        loaded.processor, [s.sample for s in samples], images, with_instruction=with_instruction
    )
    return {key: value.to(loaded.device) for key, value in batch.items()}


def last_position_logits(loaded: LoadedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, vocab] float32 logits at each prompt's last real token: the first answer token's distribution."""
    logits = loaded.model(**batch).logits
    last = batch["attention_mask"].sum(dim=1) - 1
    return logits[torch.arange(logits.shape[0], device=logits.device), last].float()


def greedy_answers(
    loaded: LoadedModel,
    samples: Sequence[D.LoadedSample],
    *,
    with_instruction: bool = True,
    batch_size: int = 64,
    progress: bool = False,
) -> list[str]:
    """The greedy first answer token of each sample, decoded (answers of the toy are one token)."""
    from tqdm import tqdm

    answers: list[str] = []
    starts = range(0, len(samples), batch_size)
    for start in tqdm(starts, desc="greedy answers", disable=not progress, unit="batch"):
        chunk = samples[start : start + batch_size]
        with torch.inference_mode():
            logits = last_position_logits(loaded, encode(loaded, chunk, with_instruction=with_instruction))
        tokens = logits.argmax(dim=-1).tolist()
        answers += [loaded.processor.tokenizer.decode([t]).strip() for t in tokens]
    return answers


class HeadGains:
    """Scale heads' outputs at the input of each language-model layer's `o_proj` (forward pre-hooks).

    `gains` is [layers, heads] (one setting for the batch) or [batch, layers, heads] (one per row);
    1 leaves a head alone, 0 blocks it. This is the transformers reference of what the server applies.
    """

    def __init__(self, model: Any, gains: torch.Tensor) -> None:
        from .architectures import geometry_of, o_proj_modules

        self.geometry = geometry_of(model.config)
        expected = (self.geometry.num_layers, self.geometry.num_heads)
        if tuple(gains.shape[-2:]) != expected:
            raise ValueError(f"gains must end in {expected} (layers, heads), got {tuple(gains.shape)}")
        self.gains = gains.float()
        self.modules = o_proj_modules(model)
        self.handles: list[Any] = []

    def _hook(self, layer: int) -> Any:
        def scale(module: Any, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            z = args[0]
            heads = z.unflatten(-1, (self.geometry.num_heads, self.geometry.head_dim))
            gains = self.gains[..., layer, :].to(z.device)
            # [H] → [H, 1]; per batch row [B, H] → [B, 1, H, 1] (batch, positions, heads, head_dim)
            shape = (gains.shape[0], 1, -1, 1) if gains.dim() == 2 else (-1, 1)
            return ((heads.float() * gains.reshape(shape)).to(z.dtype).flatten(-2), *args[1:])

        return scale

    def __enter__(self) -> HeadGains:
        # Every layer is hooked, even at gain 1, so that "gain 1 is an exact no-op" is a property of the
        # hook's arithmetic and can be tested as such.
        for layer, module in enumerate(self.modules):
            self.handles.append(module.register_forward_pre_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
