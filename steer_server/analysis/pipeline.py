"""The whole analysis, in order (arXiv 2602.03677's head analysis, made cheap and checked), per
instruction mode (`follow=image`, `follow=text`):

1. the metric (:mod:`.metric`): log p(instructed) - log p(competing) at the first answer token;
2. attribution of every head at once (:mod:`.attribution`): 1 forward + 1 backward per sample;
3. exact ablation of the best candidates (at least 3x the number to select) picks the heads
   (:mod:`.ablation`); the Spearman correlation of the two rankings is reported;
4. validation on the evaluation data (:mod:`.validation`);
5. attention knockout between token groups (:mod:`.knockout`).

:func:`analyze` computes; :func:`write_outputs` writes the profile, the knockout JSON and the plots only
once everything has finished.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..architectures import geometry_of, o_proj_modules
from ..data.schema import LoadedSample, data_digest, load_samples
from ..geometry import ModelGeometry
from ..hf.model import load_model
from ..profile import MODES, PROFILE_FORMAT, Profile, model_fingerprint, save_profile
from .ablation import ModeResult, rank_mode
from .attribution import attribution
from .config import AnalysisConfig, AnalysisError
from .knockout import knockout
from .metric import Runner
from .plots import plot_heatmaps, plot_knockout
from .validation import validate


@dataclass
class AnalysisResult:
    """What :func:`analyze` found: the profile, the knockout curves, the [L, H] attribution per mode and
    the run time (seconds)."""

    profile: Profile
    knockout: dict[str, Any]
    scores: dict[str, torch.Tensor]
    seconds: float


def _load(path: Path, limit: int | None) -> list[LoadedSample]:
    samples = load_samples(path)
    return samples[:limit] if limit is not None else samples


def _conflicts(samples: list[LoadedSample], path: Path) -> list[LoadedSample]:
    conflicts = [s for s in samples if s.sample.kind == "conflict"]
    if not conflicts:
        raise AnalysisError(f"{path}: no conflict samples (kind=conflict) to analyse")
    for mode in MODES:
        if not any(s.sample.follow == mode for s in conflicts):
            raise AnalysisError(f"{path}: no conflict samples with follow={mode}")
    return conflicts


def _check_heads(model: Any, geometry: ModelGeometry) -> None:
    width = geometry.num_heads * geometry.head_dim
    for layer, module in o_proj_modules(model).items():
        if module.in_features != width:
            raise AnalysisError(
                f"layer {layer}: o_proj reads {module.in_features} features but the config says "
                f"{geometry.num_heads} heads x {geometry.head_dim} = {width}"
            )


def analyze(
    model_dir: Path, data_path: Path, config: AnalysisConfig, *, eval_data: Path | None = None
) -> AnalysisResult:
    """Run the whole analysis: heads are selected on `data_path`, validated on `eval_data` (default: the
    same file). Nothing is written here (see :func:`write_outputs`).

    Raises:
        AnalysisError: bad settings, or data without conflicts of both modes.
        steer_server.data.schema.DataError: a data file that does not load.
        steer_server.architectures.UnsupportedArchitectureError: a model outside the table.
        steer_server.hf.model.ModelLoadError: a checkpoint that does not match its config.
    """
    config.check()
    started = time.monotonic()
    samples = _load(data_path, config.limit)
    conflicts = _conflicts(samples, data_path)
    loaded = load_model(model_dir, device=config.device)
    geometry = geometry_of(loaded.model.config)
    _check_heads(loaded.model, geometry)
    k = max(1, round(config.top_frac * geometry.total_heads))

    runner = Runner(loaded, conflicts, config.batch_size)
    scores = attribution(runner, geometry, config.progress)
    results = {
        mode: rank_mode(
            runner,
            [i for i, s in enumerate(conflicts) if s.sample.follow == mode],
            scores,
            geometry,
            k,
            config.candidate_factor,
            config.progress,
        )
        for mode in MODES
    }
    eval_samples = _load(eval_data, config.limit) if eval_data else samples
    validation = validate(
        Runner(loaded, eval_samples, config.batch_size),
        geometry,
        {mode: results[mode].heads for mode in MODES},
        config,
    )
    window = config.knockout_window or max(1, geometry.num_layers // 8)
    flow = knockout(
        Runner(loaded, conflicts[: config.knockout_samples], config.batch_size),
        geometry,
        window,
        config.progress,
    )
    seconds = time.monotonic() - started
    provenance = {
        "tool": f"modality-steer {__version__}",
        "model_dir": str(model_dir),
        "data": str(data_path),
        "data_sha256": data_digest(data_path),
        "eval_data": str(eval_data or data_path),
        "eval_data_sha256": data_digest(eval_data or data_path),
        "conflict_samples": len(conflicts),
        "top_frac": config.top_frac,
        "heads_per_mode": k,
        "device": config.device,
        "seconds": round(seconds, 1),
        "samples_per_second": round(len(conflicts) / seconds, 2),
    }
    profile = build_profile(
        geometry.model_copy(update={"fingerprint": model_fingerprint(model_dir)}),
        results,
        validation,
        provenance,
    )
    return AnalysisResult(
        profile=profile,
        knockout=flow,
        scores={mode: results[mode].attribution for mode in MODES},
        seconds=seconds,
    )


def build_profile(
    geometry: ModelGeometry,
    results: dict[str, ModeResult],
    validation: dict[str, Any],
    provenance: dict[str, Any],
) -> Profile:
    """The profile of an analysis: selected heads with their measured drop, all scores, the validation
    and where everything came from.

    Raises:
        pydantic.ValidationError: the result does not make a valid profile.
    """
    return Profile.model_validate(
        {
            "format": PROFILE_FORMAT,
            "model": geometry.model_dump(mode="json"),
            "default_gain": validation["default_gain"],
            "modes": {
                mode: {
                    "heads": [
                        {"layer": la, "head": h, "score": round(results[mode].exact[(la, h)], 6)}
                        for la, h in results[mode].heads
                    ],
                    "attribution_spearman": results[mode].spearman,
                    "candidates_ablated": len(results[mode].exact),
                }
                for mode in MODES
            },
            "scores": {
                "attribution": {mode: _json_table(results[mode].attribution) for mode in MODES},
                "exact_ablation": {
                    mode: [[la, h, round(v, 6)] for (la, h), v in results[mode].exact.items()]
                    for mode in MODES
                },
                "meaning": "attribution: mean predicted drop of the log-prob difference when the head is zeroed "
                "(gradient x activation; null on layers without attention heads); exact_ablation and "
                "heads[].score: the measured mean drop",
            },
            "validation": validation,
            "provenance": provenance,
        }
    )


def _json_table(table: torch.Tensor) -> list[list[float | None]]:
    """[L, H] as nested lists, NaN (layers without attention heads) as null."""
    return [[None if math.isnan(v) else v for v in row] for row in table.tolist()]


def write_outputs(result: AnalysisResult, out: Path, plots: Path | None) -> list[Path]:
    """Write the plots (when `plots` is a folder), the knockout JSON beside the profile, and the profile
    (atomically, last); returns the paths written."""
    written = []
    flow_path = out.with_name(out.stem + ".knockout.json")
    if plots is not None:
        plots.mkdir(parents=True, exist_ok=True)
        heatmap, curves = plots / f"{out.stem}.heads.png", plots / f"{out.stem}.knockout.png"
        plot_heatmaps(result.profile, result.scores, heatmap)
        plot_knockout(result.knockout, curves)
        written += [heatmap, curves]
    tmp = flow_path.with_suffix(".partial")
    tmp.write_text(json.dumps(result.knockout, indent=2) + "\n")
    tmp.replace(flow_path)
    save_profile(result.profile, out)
    return [out, flow_path, *written]
