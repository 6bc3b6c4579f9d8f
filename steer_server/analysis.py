"""Offline analysis: find the heads that arbitrate between image and text, check them, write a profile.

Pipeline (design notes §3, §7), per instruction mode (`follow=image`, `follow=text`):
1. metric m = log p(instructed answer) - log p(competing answer) at the first answer token, each answer's
   surface forms pooled with logsumexp over their first tokens; a sample follows when its greedy first
   token is an instructed first token and not a competing one;
2. cheap ranking of every head at once: gradient x activation on the head's slice of the `o_proj` input,
   summed over positions (the first-order effect of zeroing the head): 1 forward + 1 backward per sample;
3. exact ablation (zero the head's slice) of the best candidates (at least 3x the number to select)
   orders them; the Spearman correlation of the two rankings is reported;
4. validation: blocking the selected heads vs as many random unselected heads, a gain sweep on the
   failures, control accuracy;
5. information flow: attention knockout between token groups over a sliding window of layers.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__, hf
from . import data as D
from .architectures import ModelGeometry, geometry_of, image_token_id, o_proj_modules
from .profile import MODES, PROFILE_FORMAT, Profile, model_fingerprint, save_profile
from .steering import gains_matrix

DEFAULT_GAINS = (1.5, 2.0, 3.0, 4.0, 6.0)
MAX_BROKEN_SHARE = 0.05
KNOCKOUT_EDGES = (
    ("image", "instruction"),
    ("context", "instruction"),
    ("image", "last"),
    ("context", "last"),
    ("instruction", "last"),
    ("question", "last"),
)
GROUPS = ("image", "context", "instruction", "question", "last")


class AnalysisError(ValueError):
    """Input the analysis cannot work with; the message says what and where."""


@dataclass(frozen=True)
class AnalysisConfig:
    top_frac: float = 0.05
    device: str = "cpu"
    batch_size: int = 32
    limit: int | None = None
    gains: tuple[float, ...] = DEFAULT_GAINS
    random_draws: int = 5
    candidate_factor: int = 3
    knockout_samples: int = 128
    knockout_window: int | None = None  # default: max(1, layers // 8)
    seed: int = 0
    progress: bool = True

    def check(self) -> None:
        if not 0 < self.top_frac <= 1:
            raise AnalysisError(f"--top-frac must lie in (0, 1], got {self.top_frac}")
        if self.batch_size < 1:
            raise AnalysisError(f"--batch-size must be positive, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise AnalysisError(f"--limit must be positive, got {self.limit}")
        if self.random_draws < 1:
            raise AnalysisError("at least one random draw is needed")
        if any(not math.isfinite(g) or g < 0 for g in self.gains):
            raise AnalysisError(f"gains must be finite and >= 0, got {self.gains}")


# --------------------------------------------------------------------------------------------------
# Samples, answers' first tokens, and the metric.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    """Per-sample metric and whether the greedy first token follows the instruction."""

    metric: torch.Tensor  # [N] float
    follows: torch.Tensor  # [N] bool


@dataclass
class AnswerTokens:
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


def answer_tokens(tokenizer: Any, samples: Sequence[D.LoadedSample]) -> AnswerTokens:
    instructed, competing = [], []
    for loaded in samples:
        sample = loaded.sample
        wanted = sample.answer_image if sample.follow == "image" else sample.answer_text
        other = sample.answer_text if sample.follow == "image" else sample.answer_image
        inst = first_tokens(tokenizer, wanted)
        # A control is answered correctly by its own answer; there is no competing one.
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
) -> Scored:
    """Metric and following from last-position logits [B, V]."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    greedy = logits.argmax(dim=-1).tolist()
    metric, follows = [], []
    for row, (inst, comp) in enumerate(zip(instructed, competing, strict=True)):
        pos = torch.logsumexp(logprobs[row, inst], dim=0)
        neg = torch.logsumexp(logprobs[row, comp], dim=0) if comp else logprobs.new_tensor(-math.inf)
        metric.append(pos - neg if comp else pos)
        follows.append(greedy[row] in inst and greedy[row] not in comp)
    return Scored(metric=torch.stack(metric), follows=torch.tensor(follows, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------
# Batched passes.
# --------------------------------------------------------------------------------------------------


class Runner:
    """Encodes each batch once and reuses it for every intervention."""

    def __init__(self, loaded: hf.LoadedModel, samples: Sequence[D.LoadedSample], batch_size: int) -> None:
        self.loaded = loaded
        self.samples = list(samples)
        self.batch_size = batch_size
        self.tokens = answer_tokens(loaded.processor.tokenizer, self.samples)
        self._batches: dict[int, dict[str, torch.Tensor]] = {}

    def batch(self, start: int) -> dict[str, torch.Tensor]:
        if start not in self._batches:
            self._batches[start] = hf.encode(self.loaded, self.samples[start : start + self.batch_size])
        return self._batches[start]

    def starts(self) -> range:
        return range(0, len(self.samples), self.batch_size)

    def score(self, gains: torch.Tensor | None = None, indices: Sequence[int] | None = None) -> Scored:
        """Forward every sample (or `indices`) under head gains [L, H] (None: unsteered)."""
        wanted = set(range(len(self.samples))) if indices is None else set(indices)
        metrics, follows = [], []
        for start in self.starts():
            rows = [i for i in range(start, min(start + self.batch_size, len(self.samples))) if i in wanted]
            if not rows:
                continue
            with torch.inference_mode(), _gains(self.loaded.model, gains):
                logits = hf.last_position_logits(self.loaded, self.batch(start))
            local = [i - start for i in rows]
            scored = score_logits(
                logits[local],
                [self.tokens.instructed[i] for i in rows],
                [self.tokens.competing[i] for i in rows],
            )
            metrics.append(scored.metric)
            follows.append(scored.follows)
        return Scored(metric=torch.cat(metrics), follows=torch.cat(follows))


@contextmanager
def _gains(model: Any, gains: torch.Tensor | None) -> Iterator[None]:
    if gains is None:
        yield
        return
    with hf.HeadGains(model, gains):
        yield


def attribution(runner: Runner, geometry: ModelGeometry, progress: bool) -> torch.Tensor:
    """[N, L, H] predicted drop of the metric when each head is zeroed, to first order: m - m(a_h = 0)
    ~ sum_pos a_h . dm/da_h (also exactly d m / d gain_h at gain 1).

    The `o_proj` inputs are held only for the batch in flight, and reduced to [B, L, H] in the backward.
    """
    from tqdm import tqdm

    model = runner.loaded.model
    modules = o_proj_modules(model)
    embeddings = model.get_input_embeddings()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    scores = []
    for start in tqdm(runner.starts(), desc="attribution (1F+1B)", disable=not progress, unit="batch"):
        captured: list[torch.Tensor] = []

        def keep(
            module: Any, args: tuple[torch.Tensor, ...], captured: list[torch.Tensor] = captured
        ) -> None:
            args[0].retain_grad()
            captured.append(args[0])

        def leaf(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
            return output.detach().requires_grad_(True)

        handles = [m.register_forward_pre_hook(keep) for m in modules]
        handles.append(embeddings.register_forward_hook(leaf))
        try:
            batch = runner.batch(start)
            with torch.enable_grad():
                logits = hf.last_position_logits(runner.loaded, batch)
                rows = range(start, start + logits.shape[0])
                scored = score_logits(
                    logits,
                    [runner.tokens.instructed[i] for i in rows],
                    [runner.tokens.competing[i] for i in rows],
                )
                scored.metric.sum().backward()
        finally:
            for handle in handles:
                handle.remove()
        if len(captured) != geometry.num_layers:
            raise AnalysisError(
                f"expected {geometry.num_layers} o_proj inputs per forward, saw {len(captured)}"
            )
        per_layer = []
        for z in captured:
            assert z.grad is not None
            product = (z * z.grad).unflatten(-1, (geometry.num_heads, geometry.head_dim))  # [B, S, H, D]
            per_layer.append(product.sum(dim=(1, 3)))
        scores.append(torch.stack(per_layer, dim=1).detach().cpu())
        model.zero_grad(set_to_none=True)
    return torch.cat(scores)


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None for fewer than 3 points."""
    if len(a) < 3:
        return None

    def ranks(values: Sequence[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2
            i = j + 1
        return result

    ra, rb = ranks(a), ranks(b)
    mean_a, mean_b = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(ra, rb, strict=True))
    var = math.sqrt(sum((x - mean_a) ** 2 for x in ra) * sum((y - mean_b) ** 2 for y in rb))
    return cov / var if var else None


# --------------------------------------------------------------------------------------------------
# Information flow: attention knockout between token groups.
# --------------------------------------------------------------------------------------------------

_KNOCKOUT_NAME = "modality_steer_knockout"


@dataclass
class _KnockoutState:
    modules: set[int] = field(default_factory=set)
    layers: set[int] = field(default_factory=set)
    blocked: torch.Tensor | None = None  # [B, Q, K] True where attention is cut


_KNOCKOUT = _KnockoutState()


def _knockout_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    **kwargs: Any,
) -> Any:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = getattr(module, "layer_idx", None)
    if _KNOCKOUT.blocked is None or id(module) not in _KNOCKOUT.modules or layer not in _KNOCKOUT.layers:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    q_len, k_len = query.shape[2], key.shape[2]
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    allowed = allowed[None] & ~_KNOCKOUT.blocked[:, :q_len, :k_len].to(query.device)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
        allowed = allowed & attention_mask[:, 0]
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, allowed[:, None], is_causal=False, **kwargs)


def _install_knockout(model: Any) -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_KNOCKOUT_NAME, _knockout_attention)
    _KNOCKOUT.modules = {id(m) for m in _lm_attention_modules(model)}
    model.set_attn_implementation(_KNOCKOUT_NAME)


def _lm_attention_modules(model: Any) -> list[Any]:
    # The attention module is the parent of each o_proj.
    wanted = {id(m) for m in o_proj_modules(model)}
    return [module for module in model.modules() if any(id(child) in wanted for child in module.children())]


def token_groups(
    loaded: hf.LoadedModel, samples: Sequence[D.LoadedSample], batch: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """[B, S] masks of each token group, located through the tokenizer's character offsets."""
    processor = loaded.processor
    tokenizer = processor.tokenizer
    image_id = image_token_id(loaded.model.config)
    ids = batch["input_ids"].cpu()
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    groups = {name: torch.zeros_like(ids, dtype=torch.bool) for name in GROUPS}
    for row, loaded_sample in enumerate(samples):
        sample = loaded_sample.sample
        prompt = processor.apply_chat_template(
            D.chat_messages(sample), add_generation_prompt=True, tokenize=False
        )
        encoded = tokenizer(prompt, return_offsets_mapping=True)
        plain, offsets = encoded["input_ids"], encoded["offset_mapping"]
        spans = {
            "context": _span(prompt, f"Text Context: {sample.context}") if sample.context else None,
            "instruction": _span(prompt, D.INSTRUCTIONS[sample.follow]),
            "question": _span(prompt, f"{sample.question} {D.FORMAT_CONSTRAINT}"),
        }
        expanded = ids[row, : int(lengths[row])].tolist()
        j = 0
        for pos, token in enumerate(expanded):
            if j >= len(plain) or (token != plain[j] and token != image_id):
                raise AnalysisError(
                    f"sample {sample.id}: cannot align the processor's tokens with the prompt's"
                )
            if token == image_id:
                groups["image"][row, pos] = True
                run_continues = pos + 1 < len(expanded) and expanded[pos + 1] == image_id
                if plain[j] == image_id and run_continues:
                    continue
            start, end = offsets[j]
            for name, span in spans.items():
                if span is not None and start < span[1] and end > span[0]:
                    groups[name][row, pos] = True
            j += 1
        groups["last"][row, int(lengths[row]) - 1] = True
    return groups


def _span(text: str, part: str) -> tuple[int, int]:
    start = text.find(part)
    if start < 0:
        raise AnalysisError(f"the prompt does not contain {part[:60]!r}")
    return start, start + len(part)


def knockout(runner: Runner, geometry: ModelGeometry, window: int, progress: bool) -> dict[str, Any]:
    """Effect on the metric of cutting attention source → target over each window of layers."""
    from tqdm import tqdm

    model = runner.loaded.model
    base = runner.score()
    starts = list(range(0, geometry.num_layers - window + 1))
    results: dict[str, Any] = {
        "window": window,
        "samples": len(runner.samples),
        "layers": starts,
        "edges": {},
    }
    previous = model.config._attn_implementation
    _install_knockout(model)
    try:
        masks = {
            start: token_groups(
                runner.loaded, runner.samples[start : start + runner.batch_size], runner.batch(start)
            )
            for start in runner.starts()
        }
        total = len(KNOCKOUT_EDGES) * len(starts)
        bar = tqdm(total=total, desc="attention knockout", disable=not progress, unit="window")
        for source, target in KNOCKOUT_EDGES:
            deltas, ratios = [], []
            for first in starts:
                _KNOCKOUT.layers = set(range(first, first + window))
                metrics, follows = [], []
                for start in runner.starts():
                    groups = masks[start]
                    _KNOCKOUT.blocked = groups[target][:, :, None] & groups[source][:, None, :]
                    rows = range(start, start + groups["last"].shape[0])
                    with torch.inference_mode():
                        logits = hf.last_position_logits(runner.loaded, runner.batch(start))
                    scored = score_logits(
                        logits,
                        [runner.tokens.instructed[i] for i in rows],
                        [runner.tokens.competing[i] for i in rows],
                    )
                    metrics.append(scored.metric)
                    follows.append(scored.follows)
                metric = torch.cat(metrics)
                deltas.append(float((metric - base.metric).mean()))
                ratios.append(float(torch.cat(follows).float().mean()))
                bar.update(1)
            results["edges"][f"{source}->{target}"] = {"delta_metric": deltas, "mf_ratio": ratios}
        bar.close()
    finally:
        _KNOCKOUT.blocked = None
        _KNOCKOUT.layers = set()
        model.set_attn_implementation(previous)
    results["baseline_mf_ratio"] = float(base.follows.float().mean())
    return results


# --------------------------------------------------------------------------------------------------
# The whole analysis.
# --------------------------------------------------------------------------------------------------


@dataclass
class ModeResult:
    heads: list[tuple[int, int]]
    exact: dict[tuple[int, int], float]
    attribution: torch.Tensor  # [L, H] mean predicted drop
    spearman: float | None


def _gain_table(geometry: ModelGeometry, heads: Sequence[tuple[int, int]], gain: float) -> torch.Tensor:
    return gains_matrix(dict.fromkeys(heads, gain), geometry.num_layers, geometry.num_heads)


def rank_mode(
    runner: Runner,
    indices: list[int],
    scores: torch.Tensor,
    geometry: ModelGeometry,
    k: int,
    config: AnalysisConfig,
) -> ModeResult:
    from tqdm import tqdm

    mean_scores = scores[indices].mean(dim=0)  # [L, H]
    order = torch.argsort(mean_scores.flatten(), descending=True).tolist()
    candidates = [
        (i // geometry.num_heads, i % geometry.num_heads)
        for i in order[: max(k * config.candidate_factor, k)]
    ]
    base = runner.score(indices=indices).metric
    exact: dict[tuple[int, int], float] = {}
    for layer, head in tqdm(candidates, desc="exact ablation", disable=not config.progress, unit="head"):
        ablated = runner.score(_gain_table(geometry, [(layer, head)], 0.0), indices=indices).metric
        exact[(layer, head)] = float((base - ablated).mean())
    chosen = sorted(candidates, key=lambda lh: exact[lh], reverse=True)[:k]
    rho = spearman([float(mean_scores[lh]) for lh in candidates], [exact[lh] for lh in candidates])
    return ModeResult(heads=chosen, exact=exact, attribution=mean_scores, spearman=rho)


def validate(
    runner: Runner,
    geometry: ModelGeometry,
    selected: dict[str, list[tuple[int, int]]],
    config: AnalysisConfig,
) -> dict[str, Any]:
    """The profile's evidence: block top vs random, gain sweep on failures, controls."""
    from tqdm import tqdm

    rng = random.Random(config.seed)
    samples = runner.samples
    excluded = {lh for heads in selected.values() for lh in heads}
    pool = [
        (layer, head)
        for layer in range(geometry.num_layers)
        for head in range(geometry.num_heads)
        if (layer, head) not in excluded
    ]
    report: dict[str, Any] = {"modes": {}, "gains": list(config.gains)}
    sweep_totals = {g: [0, 0, 0, 0] for g in config.gains}  # rescued, failed, broken, correct
    for mode in MODES:
        heads = selected[mode]
        conflict = [
            i for i, s in enumerate(samples) if s.sample.kind == "conflict" and s.sample.follow == mode
        ]
        control = [i for i, s in enumerate(samples) if s.sample.kind == "control" and s.sample.follow == mode]
        if not conflict:
            raise AnalysisError(f"no conflict samples with follow={mode} to validate on")
        base = runner.score(indices=conflict).follows
        blocked = runner.score(_gain_table(geometry, heads, 0.0), indices=conflict).follows
        random_ratios: list[float] = []
        random_heads: list[list[list[int]]] = []
        for _ in tqdm(
            range(config.random_draws),
            desc=f"random heads ({mode})",
            disable=not config.progress,
            unit="draw",
        ):
            drawn = rng.sample(pool, len(heads))
            random_heads.append([[layer, head] for layer, head in drawn])
            random_ratios.append(
                float(
                    runner.score(_gain_table(geometry, drawn, 0.0), indices=conflict).follows.float().mean()
                )
            )
        failed = [i for i, ok in zip(conflict, base.tolist(), strict=True) if not ok]
        correct = [i for i, ok in zip(conflict, base.tolist(), strict=True) if ok]
        sweep = {}
        for gain in tqdm(config.gains, desc=f"gain sweep ({mode})", disable=not config.progress, unit="gain"):
            table = _gain_table(geometry, heads, gain)
            rescued = int(runner.score(table, indices=failed).follows.sum()) if failed else 0
            broken = int((~runner.score(table, indices=correct).follows).sum()) if correct else 0
            sweep[str(gain)] = {
                "rescued_share": rescued / len(failed) if failed else None,
                "broken_share": broken / len(correct) if correct else None,
            }
            totals = sweep_totals[gain]
            totals[0] += rescued
            totals[1] += len(failed)
            totals[2] += broken
            totals[3] += len(correct)
        control_base = control_blocked = None
        if control:
            control_base = float(runner.score(indices=control).follows.float().mean())
            control_blocked = float(
                runner.score(_gain_table(geometry, heads, 0.0), indices=control).follows.float().mean()
            )
        report["modes"][mode] = {
            "conflicts": len(conflict),
            "controls": len(control),
            "mf_ratio_baseline": float(base.float().mean()),
            "mf_ratio_block_top": float(blocked.float().mean()),
            "mf_ratio_block_random": sum(random_ratios) / len(random_ratios),
            "mf_ratio_block_random_draws": random_ratios,
            "block_random_heads": random_heads,
            "gain_sweep": sweep,
            "control_accuracy_baseline": control_base,
            "control_accuracy_block_top": control_blocked,
        }
    modes = report["modes"]
    baseline = sum(modes[m]["mf_ratio_baseline"] for m in MODES) / 2
    block_top = sum(modes[m]["mf_ratio_block_top"] for m in MODES) / 2
    block_random = sum(modes[m]["mf_ratio_block_random"] for m in MODES) / 2
    sweep_all = {
        str(g): {
            "rescued_share": t[0] / t[1] if t[1] else None,
            "broken_share": t[2] / t[3] if t[3] else None,
        }
        for g, t in sweep_totals.items()
    }
    report["summary"] = {
        "mf_ratio_baseline": baseline,
        "mf_ratio_block_top": block_top,
        "mf_ratio_block_random": block_random,
        "block_top_relative_drop": (baseline - block_top) / baseline if baseline else None,
        "block_random_relative_drop": (baseline - block_random) / baseline if baseline else None,
        "gain_sweep": sweep_all,
    }
    report["default_gain"] = choose_gain(sweep_all)
    chosen = sweep_all[str(report["default_gain"])]
    report["summary"]["amplify_rescued_share"] = chosen["rescued_share"]
    report["summary"]["amplify_broken_share"] = chosen["broken_share"]
    return report


def choose_gain(sweep: dict[str, dict[str, float | None]]) -> float:
    """The gain that rescues most failures while breaking at most 5% of correct samples (else the best
    rescued-minus-broken); ties go to the smaller gain."""

    def value(key: str) -> tuple[float, float, float]:
        rescued = sweep[key]["rescued_share"] or 0.0
        broken = sweep[key]["broken_share"] or 0.0
        return (
            1.0 if broken <= MAX_BROKEN_SHARE else 0.0,
            rescued - (0 if broken <= MAX_BROKEN_SHARE else broken),
            -float(key),
        )

    return float(max(sweep, key=value))


@dataclass
class AnalysisResult:
    profile: Profile
    knockout: dict[str, Any]
    scores: dict[str, torch.Tensor]
    seconds: float


def analyze(
    model_dir: Path, data_path: Path, config: AnalysisConfig, *, eval_data: Path | None = None
) -> AnalysisResult:
    """Run the whole analysis; nothing is written here (see write_outputs)."""
    config.check()
    started = time.monotonic()
    samples = D.load_samples(data_path)
    if config.limit is not None:
        samples = samples[: config.limit]
    conflicts = [s for s in samples if s.sample.kind == "conflict"]
    if not conflicts:
        raise AnalysisError(f"{data_path}: no conflict samples (kind=conflict) to analyse")
    for mode in MODES:
        if not any(s.sample.follow == mode for s in conflicts):
            raise AnalysisError(f"{data_path}: no conflict samples with follow={mode}")
    loaded = hf.load_model(model_dir, device=config.device)
    geometry = geometry_of(loaded.model.config)
    _check_heads(loaded.model, geometry)
    total_heads = geometry.num_layers * geometry.num_heads
    k = max(1, round(config.top_frac * total_heads))

    runner = Runner(loaded, conflicts, config.batch_size)
    scores = attribution(runner, geometry, config.progress)
    results: dict[str, ModeResult] = {}
    for mode in MODES:
        indices = [i for i, s in enumerate(conflicts) if s.sample.follow == mode]
        results[mode] = rank_mode(runner, indices, scores, geometry, k, config)
    selected = {mode: results[mode].heads for mode in MODES}

    eval_samples = D.load_samples(eval_data) if eval_data else samples
    if config.limit is not None and eval_data:
        eval_samples = eval_samples[: config.limit]
    eval_runner = Runner(loaded, eval_samples, config.batch_size)
    validation = validate(eval_runner, geometry, selected, config)
    window = config.knockout_window or max(1, geometry.num_layers // 8)
    flow_runner = Runner(loaded, conflicts[: config.knockout_samples], config.batch_size)
    flow = knockout(flow_runner, geometry, window, config.progress)
    seconds = time.monotonic() - started

    profile = Profile.model_validate(
        {
            "format": PROFILE_FORMAT,
            "model": {
                "architecture": geometry.architecture,
                "num_layers": geometry.num_layers,
                "num_heads": geometry.num_heads,
                "head_dim": geometry.head_dim,
                "fingerprint": model_fingerprint(model_dir),
            },
            "default_gain": validation["default_gain"],
            "modes": {
                mode: {
                    "heads": [
                        {"layer": la, "head": h, "score": round(results[mode].exact[(la, h)], 6)}
                        for la, h in selected[mode]
                    ],
                    "attribution_spearman": results[mode].spearman,
                    "candidates_ablated": len(results[mode].exact),
                }
                for mode in MODES
            },
            "scores": {
                "attribution": {mode: results[mode].attribution.tolist() for mode in MODES},
                "exact_ablation": {
                    mode: [[la, h, round(v, 6)] for (la, h), v in results[mode].exact.items()]
                    for mode in MODES
                },
                "meaning": "attribution: mean predicted drop of the log-prob difference when the head is zeroed "
                "(gradient x activation); exact_ablation and heads[].score: the measured mean drop",
            },
            "validation": validation,
            "provenance": {
                "tool": f"modality-steer {__version__}",
                "model_dir": str(model_dir),
                "data": str(data_path),
                "data_sha256": D.data_digest(data_path),
                "eval_data": str(eval_data) if eval_data else str(data_path),
                "eval_data_sha256": D.data_digest(eval_data) if eval_data else D.data_digest(data_path),
                "conflict_samples": len(conflicts),
                "top_frac": config.top_frac,
                "heads_per_mode": k,
                "device": config.device,
                "seconds": round(seconds, 1),
                "samples_per_second": round(len(conflicts) / seconds, 2),
            },
        }
    )
    return AnalysisResult(
        profile=profile,
        knockout=flow,
        scores={mode: results[mode].attribution for mode in MODES},
        seconds=seconds,
    )


def _check_heads(model: Any, geometry: ModelGeometry) -> None:
    width = geometry.num_heads * geometry.head_dim
    for layer, module in enumerate(o_proj_modules(model)):
        if module.in_features != width:
            raise AnalysisError(
                f"layer {layer}: o_proj reads {module.in_features} features but the config says "
                f"{geometry.num_heads} heads x {geometry.head_dim} = {width}"
            )


# --------------------------------------------------------------------------------------------------
# Outputs: profile, knockout JSON, plots. Written only once the analysis has finished.
# --------------------------------------------------------------------------------------------------


def plot_heatmaps(result: AnalysisResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    profile = result.profile
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), constrained_layout=True)
    for axis, mode in zip(axes, MODES, strict=True):
        scores = result.scores[mode].numpy()
        limit = float(abs(scores).max()) or 1.0
        image = axis.imshow(scores, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
        for entry in profile.modes[mode].heads:  # type: ignore[index]
            axis.add_patch(
                Rectangle(
                    (entry.head - 0.5, entry.layer - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2.2
                )
            )
        axis.set_title(f'"rely on the {mode}": head attribution (boxes: selected)')
        axis.set_xlabel("head")
        axis.set_ylabel("layer")
        axis.set_xticks(range(scores.shape[1]))
        axis.set_yticks(range(scores.shape[0]))
        fig.colorbar(image, ax=axis, label="predicted drop of log p(instructed) - log p(competing)")
    fig.suptitle(
        f"{profile.model.architecture}: arbitration heads ({len(profile.heads('image'))} + {len(profile.heads('text'))} selected)"
    )
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_knockout(flow: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for edge, values in flow["edges"].items():
        style = "-" if edge.endswith("instruction") else "--"
        axes[0].plot(flow["layers"], values["delta_metric"], style, marker="o", label=edge)
        axes[1].plot(flow["layers"], values["mf_ratio"], style, marker="o", label=edge)
    axes[0].axhline(0, color="grey", linewidth=0.8)
    axes[0].set_ylabel("change of log p(instructed) - log p(competing)")
    axes[1].axhline(flow["baseline_mf_ratio"], color="grey", linewidth=0.8, label="no knockout")
    axes[1].set_ylabel("MF ratio")
    axes[1].set_ylim(0, 1.02)
    for axis in axes:
        axis.set_xlabel(f"first layer of the knocked-out window ({flow['window']} layer(s))")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Attention knockout between token groups ({flow['samples']} conflict samples)")
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_outputs(result: AnalysisResult, out: Path, plots: Path | None) -> list[Path]:
    """Write the profile (atomically), the knockout JSON beside it, and the plots."""
    import json

    written = []
    flow_path = out.with_name(out.stem + ".knockout.json")
    if plots is not None:
        plots.mkdir(parents=True, exist_ok=True)
        heatmap, curves = plots / f"{out.stem}.heads.png", plots / f"{out.stem}.knockout.png"
        plot_heatmaps(result, heatmap)
        plot_knockout(result.knockout, curves)
        written += [heatmap, curves]
    tmp = flow_path.with_suffix(".partial")
    tmp.write_text(json.dumps(result.knockout, indent=2) + "\n")
    tmp.replace(flow_path)
    save_profile(result.profile, out)
    return [out, flow_path, *written]
