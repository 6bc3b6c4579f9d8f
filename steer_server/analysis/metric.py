"""The analysis metric and batched scoring under interventions.

Per sample, at the first answer token: m = log p(instructed answer) - log p(competing answer), each
answer's surface forms pooled with logsumexp over their first tokens (the paper's logit-difference
metric, arXiv 2602.03677 §3; for a control, m = log p(its answer)). Whether a sample succeeds is decided
by :func:`steer_server.data.scoring.is_success` on the greedy answer's text, as in every other figure of
the project.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from ..data.schema import LoadedSample
from ..data.scoring import is_success
from ..hf.hooks import scale_heads
from ..hf.model import LoadedModel, answer_budget, encode, greedy_decode
from .config import AnalysisError


@dataclass(frozen=True)
class Scored:
    """Per-sample metric [N] float32 (log-probability units) and success [N] bool."""

    metric: torch.Tensor
    follows: torch.Tensor


@dataclass
class AnswerTokens:
    """Per sample: the first token ids of the instructed answer's surface forms and of the competing
    one's (empty for controls), without ids that start forms of both."""

    instructed: list[list[int]]
    competing: list[list[int]]


def first_tokens(tokenizer: Any, candidates: Sequence[str]) -> list[int]:
    """First token ids of every surface form, written bare and after a space (tokenizers differ)."""
    ids: dict[int, None] = {}
    for candidate in candidates:
        for text in (candidate, " " + candidate):
            encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
            if encoded and encoded[0] != tokenizer.unk_token_id:
                ids.setdefault(int(encoded[0]), None)
    return list(ids)


def answer_tokens(tokenizer: Any, samples: Sequence[LoadedSample]) -> AnswerTokens:
    """:class:`AnswerTokens` of the samples.

    Raises:
        AnalysisError: a sample whose instructed (or, for a conflict, competing) answer has no first token
            in the vocabulary distinct from the other answer's.
    """
    instructed, competing = [], []
    for loaded in samples:
        sample = loaded.sample
        wanted = sample.answer_image if sample.follow == "image" else sample.answer_text
        other = sample.answer_text if sample.follow == "image" else sample.answer_image
        inst = first_tokens(tokenizer, wanted)
        comp = first_tokens(tokenizer, other) if sample.kind == "conflict" else []
        # A first token that starts forms of both answers says nothing about which one the model chose.
        shared = set(inst) & set(comp)
        inst, comp = [t for t in inst if t not in shared], [t for t in comp if t not in shared]
        if not inst:
            raise AnalysisError(
                f"sample {sample.id} (line {loaded.line}): no first token of the instructed answer is in the "
                "vocabulary and distinct from the competing answer's"
            )
        if sample.kind == "conflict" and not comp:
            raise AnalysisError(
                f"sample {sample.id} (line {loaded.line}): no first token of the competing answer is in the "
                "vocabulary and distinct from the instructed answer's"
            )
        instructed.append(inst)
        competing.append(comp)
    return AnswerTokens(instructed, competing)


def score_logits(
    logits: torch.Tensor, instructed: Sequence[list[int]], competing: Sequence[list[int]]
) -> torch.Tensor:
    """The metric [B] from last-position logits [B, V] (a control, with no competing ids: log p of its
    answer)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    metric = []
    for row, (inst, comp) in enumerate(zip(instructed, competing, strict=True)):
        pos = torch.logsumexp(logprobs[row, inst], dim=0)
        metric.append(pos - torch.logsumexp(logprobs[row, comp], dim=0) if comp else pos)
    return torch.stack(metric)


Intervention = Callable[[int], AbstractContextManager[Any]]


class Runner:
    """Samples encoded once per batch and scored under any intervention.

    Args:
        loaded: the model.
        samples: the samples, in a fixed order (indices below refer to it).
        batch_size: samples per forward pass.

    Raises:
        AnalysisError: see :func:`answer_tokens`.
    """

    def __init__(self, loaded: LoadedModel, samples: Sequence[LoadedSample], batch_size: int) -> None:
        self.loaded = loaded
        self.samples = list(samples)
        self.batch_size = batch_size
        self.tokens = answer_tokens(loaded.processor.tokenizer, self.samples)
        self.budget = answer_budget(loaded.processor.tokenizer, self.samples)
        self._batches: dict[int, dict[str, torch.Tensor]] = {}

    def batch(self, start: int) -> dict[str, torch.Tensor]:
        """The encoded batch of samples [start, start + batch_size) (cached)."""
        if start not in self._batches:
            self._batches[start] = encode(self.loaded, self.samples[start : start + self.batch_size])
        return self._batches[start]

    def starts(self) -> range:
        """First sample index of every batch."""
        return range(0, len(self.samples), self.batch_size)

    def metric(self, start: int, logits: torch.Tensor) -> torch.Tensor:
        """The metric of the batch at `start` from its last-position logits [B, V]."""
        rows = range(start, start + logits.shape[0])
        return score_logits(
            logits, [self.tokens.instructed[i] for i in rows], [self.tokens.competing[i] for i in rows]
        )

    def score(
        self,
        gains: torch.Tensor | None = None,
        indices: Sequence[int] | None = None,
        intervention: Intervention | None = None,
    ) -> Scored:
        """Forward every sample (or only `indices`, in sample order) under head gains [L, H] (None:
        unsteered) and/or an intervention (a context manager per batch start), and score it."""
        wanted = set(range(len(self.samples))) if indices is None else set(indices)
        metrics, follows = [], []
        for start in self.starts():
            rows = [i for i in range(start, min(start + self.batch_size, len(self.samples))) if i in wanted]
            if not rows:
                continue
            with (
                torch.inference_mode(),
                nullcontext() if gains is None else scale_heads(self.loaded.model, gains),
                nullcontext() if intervention is None else intervention(start),
            ):
                logits, texts = greedy_decode(self.loaded, self.batch(start), self.budget)
            local = [i - start for i in rows]
            metrics.append(self.metric(start, logits)[local])
            follows += [is_success(self.samples[i].sample, texts[i - start]) for i in rows]
        return Scored(metric=torch.cat(metrics), follows=torch.tensor(follows, dtype=torch.bool))
