"""Cheap ranking of every head at once: gradient x activation at `hook_z` (1 forward + 1 backward per
sample), the first-order effect of zeroing a head."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..data.prompts import user_text
from ..data.schema import LoadedSample
from ..geometry import ModelGeometry
from ..hf.hooks import capture_head_outputs
from ..hf.model import LoadedModel, encode, last_position_logits
from .config import AnalysisError
from .metric import Runner


@contextmanager
def _frozen_parameters(model: Any) -> Iterator[None]:
    """Parameters need no gradient for attribution; restore each one's `requires_grad` afterwards."""
    previous = [(p, p.requires_grad) for p in model.parameters()]
    for parameter, _ in previous:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in previous:
            parameter.requires_grad_(flag)


@contextmanager
def _embeddings_as_leaf(model: Any) -> Iterator[None]:
    """Make the input embeddings a leaf that requires grad, so the backward reaches every `hook_z`."""

    def leaf(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output.detach().requires_grad_(True)

    handle = model.get_input_embeddings().register_forward_hook(leaf)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _differentiable_heads(model: Any) -> Iterator[None]:
    """A backward reaches every `hook_z` and no parameter (both restored on exit)."""
    with _frozen_parameters(model), _embeddings_as_leaf(model):
        yield


def attribution(runner: Runner, geometry: ModelGeometry, progress: bool) -> torch.Tensor:
    """[N, L, H] predicted drop of the metric when each head is zeroed, to first order:
    m - m(z_h = 0) ~ sum over positions of z_h . dm/dz_h, which is also exactly dm/dgain_h at gain 1.
    Layers without attention heads (hybrid models) are NaN.

    `hook_z` is held only for the batch in flight and reduced to [B, L, H] after the backward, in float32
    (the forward and backward run in the model's dtype).

    Raises:
        AnalysisError: the forward did not pass through every attention layer's `o_proj` once.
    """
    from tqdm import tqdm

    model = runner.loaded.model
    scores = torch.full((len(runner.samples), geometry.num_layers, geometry.num_heads), math.nan)
    with _differentiable_heads(model):
        for number, rows in enumerate(
            tqdm(runner.batches, desc="attribution (1F+1B)", disable=not progress, unit="batch")
        ):
            with capture_head_outputs(model) as captured, torch.enable_grad():
                logits = last_position_logits(runner.loaded, runner.encoded(number))
                runner.metric(rows, logits).sum().backward()
            if [layer for layer, _ in captured] != list(geometry.layers):
                raise AnalysisError(
                    f"expected one o_proj input per attention layer {list(geometry.layers)} per forward, "
                    f"saw layers {[layer for layer, _ in captured]}"
                )
            for layer, z in captured:
                assert z.grad is not None
                # Products and sums in float32, whatever the forward's dtype (--dtype).
                product = (z.float() * z.grad.float()).unflatten(-1, (geometry.num_heads, geometry.head_dim))
                scores[rows, layer] = product.sum(dim=(1, 3)).detach().cpu()
    return scores


def fit_batch_size(loaded: LoadedModel, samples: Sequence[LoadedSample], cap: int) -> int:
    """The largest batch size, `cap` halved until it fits, at which the attribution's pass (the analysis'
    largest in memory: every layer's activations are kept for its backward) over the samples with the
    longest prompts (images first, then by text length) runs without running out of accelerator memory
    (`torch.OutOfMemoryError`).

    Raises:
        AnalysisError: not even one sample fits.
    """
    model = loaded.model
    longest = sorted(
        samples, key=lambda s: (s.image_path is not None, len(user_text(s.sample))), reverse=True
    )
    size = min(cap, len(longest))
    while size >= 1:
        try:
            with _differentiable_heads(model), capture_head_outputs(model), torch.enable_grad():
                logits = last_position_logits(loaded, encode(loaded, longest[:size]))
                logits.logsumexp(dim=-1).sum().backward()
            return size
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            size //= 2
    raise AnalysisError("the attribution of a single sample does not fit the accelerator's memory")
