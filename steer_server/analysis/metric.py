"""The analysis metric and batched scoring under interventions.

Per sample, at the first answer token: m = log p(instructed answer) - log p(competing answer), each
answer's surface forms pooled with logsumexp over their first tokens (the paper's logit-difference
metric, arXiv 2602.03677 §3; for a control, m = log p(its answer)). Whether a sample succeeds is decided
by :func:`steer_server.data.scoring.is_success` on the greedy answer's text, as in every other figure of
the project.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..architectures import image_token_id
from ..data.schema import LoadedSample
from ..data.scoring import is_success
from ..hf.hooks import ResidualCapture, capture_resid_pre, scale_heads, start_at_layer
from ..hf.model import (
    LoadedModel,
    answer_budget,
    at_last_position,
    encode,
    greedy_decode,
    last_position_logits,
    prompt_cache,
    suffix_last_logits,
)
from .config import AnalysisError


@dataclass(frozen=True)
class Scored:
    """Per-sample metric [N] float32 (log-probability units), success [N] bool and the greedy answer text
    (both empty when scored without answers)."""

    metric: torch.Tensor
    follows: torch.Tensor
    answers: list[str]

    @property
    def hits(self) -> list[bool]:
        """`follows` as a list of bools (empty when scored without answers)."""
        return [bool(x) for x in self.follows.tolist()]


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


# An intervention on one of the runner's batches (its number), active around that batch's passes.
Intervention = Callable[[int], AbstractContextManager[Any]]


@dataclass(frozen=True)
class Setting:
    """What one scored pass runs under: head gains [L, H] (None: none), an intervention (None: none), the
    first decoder layer either changes (0: unknown or the first; a later one lets the pass start from the
    unintervened pass' residual stream there, :func:`~steer_server.hf.hooks.start_at_layer`), and, per
    batch number, the first position it changes (None: unknown or the first; a later one lets the pass
    run the positions from there only, against the unintervened pass' KV cache,
    :func:`~steer_server.hf.model.suffix_last_logits`)."""

    gains: torch.Tensor | None = None
    intervention: Intervention | None = None
    first_layer: int = 0
    first_position: Callable[[int], int] | None = None

    @classmethod
    def of_gains(cls, gains: torch.Tensor) -> Setting:
        """Head gains [L, H], starting at the first layer with a gain other than 1 (none: the baseline)."""
        changed = (gains != 1).any(dim=-1).nonzero()
        return cls(gains=gains, first_layer=int(changed[0])) if len(changed) else BASELINE

    @property
    def is_baseline(self) -> bool:
        return self.gains is None and self.intervention is None

    @contextmanager
    def active(self, model: Any, batch: int) -> Iterator[None]:
        """The setting's hooks on `model` for the runner's batch number `batch` (removed on exit, also
        when installing one of them fails)."""
        with ExitStack() as stack:
            if self.gains is not None:
                stack.enter_context(scale_heads(model, self.gains))
            if self.intervention is not None:
                stack.enter_context(self.intervention(batch))
            yield


BASELINE = Setting()


def group_batches(samples: Sequence[LoadedSample], batch_size: int) -> list[list[int]]:
    """Sample indices in batches of at most `batch_size`, each of one (kind, instruction) only, in order of
    appearance: a pass over one instruction's conflicts (or controls) forwards no other sample."""
    groups: dict[tuple[str, str], list[int]] = {}
    for index, loaded in enumerate(samples):
        groups.setdefault((loaded.sample.kind, loaded.sample.follow), []).append(index)
    return [
        members[start : start + batch_size]
        for members in groups.values()
        for start in range(0, len(members), batch_size)
    ]


class Runner:
    """Samples encoded once per batch and scored under any :class:`Setting`.

    Args:
        loaded: the model.
        samples: the samples, in a fixed order (indices below refer to it).
        batch_size: samples per forward pass (:func:`group_batches`).

    Raises:
        AnalysisError: see :func:`answer_tokens`.
    """

    def __init__(self, loaded: LoadedModel, samples: Sequence[LoadedSample], batch_size: int) -> None:
        self.loaded = loaded
        self.samples = list(samples)
        self.batch_size = batch_size
        self.tokens = answer_tokens(loaded.processor.tokenizer, self.samples)
        self.budget = answer_budget(loaded.processor.tokenizer, self.samples)
        self.batches = group_batches(self.samples, batch_size)
        self._encoded: dict[int, dict[str, torch.Tensor]] = {}

    def encoded(self, batch: int) -> dict[str, torch.Tensor]:
        """The encoded batch number `batch` (of :attr:`batches`; cached)."""
        if batch not in self._encoded:
            self._encoded[batch] = encode(self.loaded, [self.samples[i] for i in self.batches[batch]])
        return self._encoded[batch]

    def metric(self, rows: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        """The metric [B] of the samples `rows` from their first answer token's logits [B, V]."""
        return score_logits(
            logits, [self.tokens.instructed[i] for i in rows], [self.tokens.competing[i] for i in rows]
        )

    def _suffix_start(self, setting: Setting, batch: int) -> int:
        """Where the setting's pass over batch number `batch` may start (0: at the first position): its
        first changed position, when every row's last real token lies at or after it and no image token
        does (image inputs are not rerun)."""
        if setting.first_position is None:
            return 0
        position = setting.first_position(batch)
        encoded = self.encoded(batch)
        shortest = int(encoded["attention_mask"].sum(dim=1).min())
        images = encoded["input_ids"][:, position:] == image_token_id(self.loaded.model.config)
        return position if 0 < position < shortest and not bool(images.any()) else 0

    def score(
        self,
        gains: torch.Tensor | None = None,
        indices: Sequence[int] | None = None,
        intervention: Intervention | None = None,
    ) -> Scored:
        """:meth:`score_many` of one setting: head gains [L, H] (None: unsteered) and/or an intervention."""
        return self.score_many([Setting(gains, intervention)], indices)[0]

    def score_many(
        self,
        settings: Sequence[Setting],
        indices: Sequence[int] | None = None,
        *,
        answers: bool = True,
        progress: str | None = None,
    ) -> list[Scored]:
        """Score every sample (or only `indices`; results in sample order) under each setting, batch by
        batch. With :data:`BASELINE` among the settings, its pass keeps the residual stream at every later
        setting's first layer and those start there (exact, :func:`~steer_server.hf.hooks.start_at_layer`);
        a setting with a first changed position also runs only the positions from there, against the
        baseline pass' KV cache, where the model's cache keeps every position (:func:`prompt_cache`).
        Only the first answer token's forward is shortened; further greedy steps (when `answers` and the
        answer budget is over 1 token) rerun the whole sequence. `answers=False` scores the metric only:
        `follows` is then empty, and no answer is decoded past its first token. `progress`: a progress
        bar's description (None: none)."""
        from tqdm import tqdm

        wanted = set(range(len(self.samples))) if indices is None else set(indices)
        starts = sorted({s.first_layer for s in settings if s.first_layer > 0})
        reuse = any(s.is_baseline for s in settings)
        suffixes = reuse and any(s.first_position is not None for s in settings)
        per_setting: list[dict[int, tuple[float, bool, str]]] = [{} for _ in settings]
        model = self.loaded.model
        todo = [(n, members) for n, members in enumerate(self.batches) if wanted.intersection(members)]
        for number, members in tqdm(todo, desc=progress, disable=progress is None, unit="batch"):
            rows = [i for i in members if i in wanted]
            local = [members.index(i) for i in rows]
            batch = self.encoded(number)
            with torch.inference_mode():
                baseline: torch.Tensor | None = None
                captured, cache = ResidualCapture(), None
                if reuse:
                    with capture_resid_pre(model, starts) as captured:
                        outputs = model(**batch, use_cache=suffixes)
                    baseline = at_last_position(outputs.logits, batch["attention_mask"])
                    cache = prompt_cache(outputs) if suffixes else None
                    del outputs
                for setting, results in zip(settings, per_setting, strict=True):
                    position = self._suffix_start(setting, number) if cache is not None else 0
                    with setting.active(model, number):
                        if setting.is_baseline and baseline is not None:
                            first = baseline
                        elif position > 0:
                            layer = setting.first_layer
                            with start_at_layer(model, layer, captured, from_position=position):
                                first = suffix_last_logits(self.loaded, batch, cache, position)
                        elif setting.first_layer in captured.resid_pre:
                            with start_at_layer(model, setting.first_layer, captured):
                                first = last_position_logits(self.loaded, batch)
                        else:
                            first = last_position_logits(self.loaded, batch)
                        texts = (
                            greedy_decode(self.loaded, batch, self.budget, first=first)[1] if answers else []
                        )
                    metric = self.metric(members, first)
                    for i, row in zip(rows, local, strict=True):
                        ok = is_success(self.samples[i].sample, texts[row]) if answers else False
                        results[i] = (float(metric[row]), ok, texts[row] if answers else "")
        order = sorted(wanted)
        return [
            Scored(
                metric=torch.tensor([results[i][0] for i in order]),
                follows=torch.tensor([results[i][1] for i in order] if answers else [], dtype=torch.bool),
                answers=[results[i][2] for i in order] if answers else [],
            )
            for results in per_setting
        ]
