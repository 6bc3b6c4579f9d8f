"""Semantic inertia: what each layer's attention and MLP write toward the instructed or the competing
answer (arXiv 2602.03677: shallow attention moves the cues into the instruction, deep heads arbitrate,
deep MLPs pull toward the model's prior; the paper shows the last part with a logit lens of failed
samples).

At the last prompt position (the one that predicts the first answer token), the residual stream is a
sum: the embedding, then per decoder layer the token mixer's output (attention; linear attention on a
hybrid's other layers) and the MLP's output, each added by the layer (TransformerLens's `resid_pre`,
`resid_mid`, `resid_post`). The logit difference ``D = mean logit(instructed first tokens) - mean
logit(competing first tokens)`` is linear in the final norm's output; freezing the final norm's scale at
the one the final residual gets (TransformerLens's convention for direct logit attribution; exact for
RMSNorm, whose output is the input times a per-feature factor), ``D`` splits exactly into the
contributions of those terms (:func:`decompose`). The logit lens reads ``D`` off the residual after each
layer, each normalised by the final norm with its own scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from ..architectures import ResidualModules, residual_modules
from ..hf.hooks import capture_residual_stream
from ..hf.model import LoadedModel
from ..stats import bootstrap
from .config import AnalysisError
from .metric import Runner

MEANING = (
    "logit difference D = mean logit of the instructed answer's first tokens - mean logit of the competing "
    "answer's, at the last prompt position; embed / attention[l] / mlp[l] / between: direct contributions "
    "to D of the embedding, layer l's token mixer (attention) and MLP outputs, and anything added between "
    "layers, through the final norm frozen at the final residual's scale (they sum to D); lens[l]: D read "
    "off the residual after l layers (lens[num_layers] = D). Positive: toward the instructed answer. "
    "Means over conflicts with 95% bootstrap intervals, split by whether the greedy answer followed the "
    "instruction."
)


@dataclass(frozen=True)
class Decomposition:
    """Per sample of a batch (float32, logit units).

    Attributes:
        logit_diff: [B] D from the model's own logits.
        embed: [B] the embedding's contribution.
        attention: [B, L] each layer's token-mixer (attention) contribution.
        mlp: [B, L] each layer's MLP contribution.
        between: [B] what was added to the residual outside the decoder layers (zero for most models).
        lens: [B, L + 1] D read off the residual after 0..L layers (the logit lens).
    """

    logit_diff: torch.Tensor
    embed: torch.Tensor
    attention: torch.Tensor
    mlp: torch.Tensor
    between: torch.Tensor
    lens: torch.Tensor

    def total(self) -> torch.Tensor:
        """[B] the sum of all contributions (equals :attr:`logit_diff` up to rounding)."""
        return self.embed + self.attention.sum(1) + self.mlp.sum(1) + self.between


def answer_directions(
    unembedding: torch.Tensor, instructed: Sequence[list[int]], competing: Sequence[list[int]]
) -> torch.Tensor:
    """[B, hidden] float64: mean unembedding row of each sample's instructed first tokens minus the mean
    of its competing ones (`unembedding` [vocab, hidden]; only those rows are read and cast).

    Raises:
        AnalysisError: a sample without competing tokens (a control: D needs two answers).
    """
    rows = []
    for inst, comp in zip(instructed, competing, strict=True):
        if not comp:
            raise AnalysisError("the logit lens needs conflict samples (two answers), got a control")
        weight = unembedding.detach()
        rows.append(weight[inst].double().mean(0) - weight[comp].double().mean(0))
    return torch.stack(rows)


def _check_mlp_reads_the_norm(modules: ResidualModules, stream: dict[str, dict[int, torch.Tensor]]) -> None:
    """The split between attention and MLP is right only if the hooked pre-MLP norm is the one whose
    output the MLP reads (the architecture table's `pre_mlp_norm_path` and `mlp_path`)."""
    for index, norm in modules.pre_mlp_norms.items():
        expected, found = norm(stream["resid_mid"][index]).float(), stream["mlp_in"][index].float()
        scale = float(found.abs().max()) or 1.0
        if not torch.allclose(expected, found, rtol=1e-3, atol=1e-3 * scale):
            raise AnalysisError(
                f"layer {index}: the MLP does not read the pre-MLP norm of the residual stream; the "
                "architecture table's pre_mlp_norm_path / mlp_path do not describe this model"
            )


def decompose(
    loaded: LoadedModel,
    batch: dict[str, torch.Tensor],
    instructed: Sequence[list[int]],
    competing: Sequence[list[int]],
) -> Decomposition:
    """The decomposition of D for one encoded batch (see the module docstring); only the last prompt
    position's residual stream is kept.

    Raises:
        AnalysisError: see :func:`answer_directions`; the forward did not pass every decoder layer and the
            final norm; or the table's pre-MLP norm is not what the model's MLPs read.
    """
    model = loaded.model
    modules = residual_modules(model)
    last = batch["attention_mask"].sum(dim=1) - 1
    with torch.inference_mode():
        with capture_residual_stream(model, positions=last) as stream:
            logits = model(**batch).logits
        # Below, outside the hooks: calling the norms again must not overwrite what was captured.
        layers = len(modules.layers)
        if (
            any(len(stream[k]) != layers for k in ("resid_pre", "resid_mid", "mlp_in", "resid_post"))
            or not stream["ln_final"]
        ):
            raise AnalysisError("the forward did not pass through every decoder layer and the final norm")
        _check_mlp_reads_the_norm(modules, stream)
        pre, mid, post = (
            [stream[k][i].double() for i in range(layers)] for k in ("resid_pre", "resid_mid", "resid_post")
        )
        final = stream["ln_final"][0].double()
        norm = modules.final_norm
        normed = norm(final.float()).double()
        directions = answer_directions(modules.unembedding.weight, instructed, competing).to(final.device)
        rows = torch.arange(logits.shape[0], device=logits.device)
        own = torch.stack(
            [
                logits[row, last[row], inst].double().mean() - logits[row, last[row], comp].double().mean()
                for row, inst, comp in zip(rows.tolist(), instructed, competing, strict=True)
            ]
        )
        # The final norm's per-feature factor at the final residual (exact for RMSNorm).
        factor = torch.where(final != 0, normed / torch.where(final != 0, final, 1.0), 0.0)
        weights = directions * factor

        def contribution(vector: torch.Tensor) -> torch.Tensor:
            return (weights * vector).sum(-1)

        attention = torch.stack([contribution(m - p) for p, m in zip(pre, mid, strict=True)], dim=1)
        mlp = torch.stack([contribution(o - m) for m, o in zip(mid, post, strict=True)], dim=1)
        gaps = (
            final - post[-1] + sum((pre[i + 1] - post[i] for i in range(layers - 1)), torch.zeros_like(final))
        )
        lens = torch.stack([(directions * norm(r.float()).double()).sum(-1) for r in [*pre, final]], dim=1)
    return Decomposition(
        logit_diff=own.float().cpu(),
        embed=contribution(pre[0]).float().cpu(),
        attention=attention.float().cpu(),
        mlp=mlp.float().cpu(),
        between=contribution(gaps).float().cpu(),
        lens=lens.float().cpu(),
    )


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values))


def _summary(values: torch.Tensor) -> dict[str, Any]:
    return bootstrap(_mean, [values.tolist()]).as_dict(4)


def semantic_inertia(runner: Runner, progress: bool) -> dict[str, Any]:
    """The decomposition over the runner's samples (conflicts only), averaged over those whose greedy
    answer followed the instruction and those that did not (means with 95% bootstrap intervals), and the
    largest gap between D and the sum of its contributions.

    Raises:
        AnalysisError: see :func:`decompose`; or the runner holds a sample that is not a conflict.
    """
    from tqdm import tqdm

    if not runner.samples or any(s.sample.kind != "conflict" for s in runner.samples):
        raise AnalysisError("the logit lens needs conflict samples only")
    follows = runner.score().follows
    parts: list[Decomposition] = []
    for number, rows in enumerate(
        tqdm(runner.batches, desc="logit lens", disable=not progress, unit="batch")
    ):
        parts.append(
            decompose(
                runner.loaded,
                runner.encoded(number),
                [runner.tokens.instructed[i] for i in rows],
                [runner.tokens.competing[i] for i in rows],
            )
        )
    whole = Decomposition(
        *(torch.cat([getattr(part, f.name) for part in parts]) for f in fields(Decomposition))
    )
    follows = follows[torch.tensor([i for rows in runner.batches for i in rows])]  # batch order, like `whole`
    error = float((whole.total() - whole.logit_diff).abs().max())
    groups: dict[str, Any] = {}
    for name, mask in (("failed", ~follows), ("followed", follows)):
        groups[name] = {"samples": int(mask.sum())}
        if not bool(mask.any()):
            continue
        groups[name] |= {
            "logit_diff": _summary(whole.logit_diff[mask]),
            "embed": _summary(whole.embed[mask]),
            "attention": [_summary(column) for column in whole.attention[mask].T],
            "mlp": [_summary(column) for column in whole.mlp[mask].T],
            "between": _summary(whole.between[mask]),
            "lens": [_summary(column) for column in whole.lens[mask].T],
        }
    return {
        "meaning": MEANING,
        "num_layers": int(whole.attention.shape[1]),
        "conflicts": len(runner.samples),
        "max_additivity_error": error if math.isfinite(error) else None,
        "groups": groups,
    }
