"""The whole analysis, in order (arXiv 2602.03677's head analysis, made cheap and checked), per
instruction mode (`follow=image`, `follow=text`):

1. the metric (:mod:`.metric`): log p(instructed) - log p(competing) at the first answer token;
2. attribution of every head at once (:mod:`.attribution`): 1 forward + 1 backward per sample;
3. exact ablation of the best candidates (at least 3x the number to select) picks the heads
   (:mod:`.ablation`); the Spearman correlation of the two rankings is reported;
4. the default gain, swept on the same (selection) split (:func:`.validation.choose_default_gain`);
5. validation on the report split (:mod:`.validation`): `--eval-data`, or a seeded share of `--data`
   held out before anything was chosen; no choice sees it, and the profile's provenance says which split
   chose what and which figures come from where;
6. attention knockout between token groups (:mod:`.knockout`) and the semantic-inertia decomposition
   (:mod:`.logit_lens`), on the report split's conflicts;
7. the sparsity curve (:mod:`.sparsity`): the MF ratio as the top 1-20% of heads are blocked, beside
   random heads, on the report split;
8. with ``--transfer`` rules (:mod:`.transfer`): the samples they match are kept out of every choice and
   validated as transfer splits of their own, side by side with the within-distribution report split;
9. canaries (:mod:`.canaries`): report conflicts on which the profile's gains have a large measured
   effect, written into the profile with their inputs, for the deployment's check before it serves.

:func:`analyze` computes; :func:`write_outputs` writes the profile, the knockout and logit-lens JSON
and the plots only once everything has finished.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..architectures import geometry_of, o_proj_modules
from ..data.schema import LoadedSample, data_digest, load_samples
from ..geometry import ModelGeometry
from ..hf.model import load_model
from ..profile import MODES, PROFILE_FORMAT, CanarySet, Profile, model_fingerprint, save_profile
from .ablation import ModeResult, rank_mode
from .attribution import attribution, fit_batch_size
from .canaries import NoCanaries, measure_canaries
from .checkpoint import Checkpoint
from .config import AnalysisConfig, AnalysisError, TransferRule
from .knockout import knockout
from .logit_lens import semantic_inertia
from .metric import Runner
from .plots import plot_heatmaps, plot_knockout, plot_logit_lens, plot_sparsity
from .sparsity import ranking, sparsity_curve
from .transfer import side_by_side, split_by_rules
from .validation import choose_default_gain, validate

SELECTION_CHOICES = ("heads (attribution, exact ablation)", "default_gain (gain sweep)")
REPORTED_FIGURES = ("validation", "knockout", "logit_lens", "sparsity")


@dataclass
class AnalysisResult:
    """What :func:`analyze` found: the profile, the knockout curves, the semantic-inertia decomposition,
    the [L, H] attribution per mode and the run time (seconds)."""

    profile: Profile
    knockout: dict[str, Any]
    logit_lens: dict[str, Any]
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


def split_holdout(
    samples: list[LoadedSample], share: float, seed: int
) -> tuple[list[LoadedSample], list[LoadedSample]]:
    """(selection, report): `share` of each (kind, instruction) group, drawn with `seed`, is held out as
    the report split; both keep the file's order."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for index, loaded in enumerate(samples):
        groups[(loaded.sample.kind, loaded.sample.follow)].append(index)
    rng = random.Random(seed)
    held: set[int] = set()
    for key in sorted(groups):
        members = groups[key]
        held.update(rng.sample(members, round(share * len(members))))
    return (
        [s for i, s in enumerate(samples) if i not in held],
        [s for i, s in enumerate(samples) if i in held],
    )


def _check_disjoint(selection: list[LoadedSample], report: list[LoadedSample]) -> None:
    shared = {s.sample.id for s in selection} & {s.sample.id for s in report}
    if shared:
        raise AnalysisError(
            f"--eval-data shares {len(shared)} sample id(s) with --data (e.g. {sorted(shared)[0]}): the report "
            "split must hold samples that no choice saw"
        )


def _split_record(
    samples: list[LoadedSample], data: str, sha256: str, used_for: tuple[str, ...]
) -> dict[str, Any]:
    return {
        "data": data,
        "sha256": sha256,
        "samples": len(samples),
        "conflicts": sum(s.sample.kind == "conflict" for s in samples),
        "used_for": list(used_for),
    }


def content_overlap(selection: list[LoadedSample], report: list[LoadedSample]) -> dict[str, int]:
    """How many report samples are content-identical (:meth:`LoadedSample.content_digest`) to a
    selection sample, by kind: a generator with a small space of questions repeats some across splits."""
    seen = {s.content_digest() for s in selection}
    repeated = [s for s in report if s.content_digest() in seen]
    return {
        "samples": len(repeated),
        "conflicts": sum(s.sample.kind == "conflict" for s in repeated),
    }


def _check_heads(model: Any, geometry: ModelGeometry) -> None:
    width = geometry.num_heads * geometry.head_dim
    for layer, module in o_proj_modules(model).items():
        if module.in_features != width:
            raise AnalysisError(
                f"layer {layer}: o_proj reads {module.in_features} features but the config says "
                f"{geometry.num_heads} heads x {geometry.head_dim} = {width}"
            )


STAGES = [
    "attribution",
    *(f"heads.{mode}" for mode in MODES),
    "default_gain",
    "validation",
    "knockout",
    "logit_lens",
    "sparsity",
    "transfer",
    "canaries",
]


def run_key(
    model_dir: Path, data_path: Path, eval_data: Path | None, config: AnalysisConfig
) -> dict[str, Any]:
    """What makes two runs the same run, for :class:`~.checkpoint.Checkpoint`: the model's fingerprint,
    the data's digests, every setting but the progress bars, the tool's version."""
    settings = {k: v for k, v in asdict(config).items() if k != "progress"}
    return {
        "tool": __version__,
        "model": model_fingerprint(model_dir),
        "data": data_digest(data_path),
        "eval_data": data_digest(eval_data) if eval_data is not None else None,
        "settings": json.loads(json.dumps(settings, default=list)),
    }


def analyze(
    model_dir: Path,
    data_path: Path,
    config: AnalysisConfig,
    *,
    eval_data: Path | None = None,
    checkpoint: Path | None = None,
) -> AnalysisResult:
    """Run the whole analysis: heads and the default gain are chosen on `data_path` (the selection split),
    every reported figure is measured on `eval_data` (the report split; default: `config.holdout` of
    `data_path`, held out first). Nothing is written here (see :func:`write_outputs`) but the finished
    stages, to `checkpoint` when given (a rerun with the same model, data and settings resumes from them,
    :mod:`.checkpoint`).

    Raises:
        AnalysisError: bad settings, data without conflicts of both modes, or report data that shares
            sample ids with the selection data.
        steer_server.data.schema.DataError: a data file that does not load.
        steer_server.architectures.UnsupportedArchitectureError: a model outside the table.
        steer_server.hf.model.ModelLoadError: a checkpoint that does not match its config.
    """
    config.check()
    started = time.monotonic()
    samples = _load(data_path, config.limit)
    if eval_data is not None:
        report_samples = _load(eval_data, config.limit)
        _check_disjoint(samples, report_samples)
        report_name, report_sha = str(eval_data), data_digest(eval_data)
    else:
        samples, report_samples = split_holdout(samples, config.holdout, config.seed)
        report_name = (
            f"{data_path} (held out: {config.holdout:g} of each kind and instruction, seed {config.seed})"
        )
        report_sha = data_digest(data_path)
    rules = [TransferRule.parse(text) for text in config.transfer]
    for rule in rules:
        if not any(rule.matches(s) for s in [*samples, *report_samples]):
            raise AnalysisError(f"--transfer {rule.name} matches no sample of {data_path} or the report data")
    samples, kept_out = split_by_rules(samples, rules)
    report_samples, transfer_samples = split_by_rules(report_samples, rules)
    conflicts = _conflicts(samples, data_path)
    report_conflicts = _conflicts(report_samples, eval_data or data_path)
    for name, members in transfer_samples.items():
        _conflicts(members, Path(f"{eval_data or data_path} (transfer split {name})"))
    loaded = load_model(model_dir, device=config.device, dtype=config.dtype, device_map=config.placement())
    geometry = geometry_of(loaded.model.config)
    _check_heads(loaded.model, geometry)
    stages = Checkpoint(checkpoint, run_key(model_dir, data_path, eval_data, config), STAGES, config.progress)
    if loaded.device.type == "cuda":
        # The batch size is the most; what fits the GPU memory is measured (recorded in the provenance; a
        # resumed run is keyed on the batch size asked for).
        config = replace(
            config,
            batch_size=fit_batch_size(
                loaded,
                [*conflicts, *report_samples, *(s for members in transfer_samples.values() for s in members)],
                config.batch_size,
            ),
        )
    k = max(1, round(config.top_frac * geometry.total_heads))

    runner = Runner(loaded, conflicts, config.batch_size)
    scores = stages.stage("attribution", lambda: attribution(runner, geometry, config.progress))
    results = {
        mode: stages.stage(
            f"heads.{mode}",
            lambda mode=mode: rank_mode(  # type: ignore[misc]
                runner,
                [i for i, s in enumerate(conflicts) if s.sample.follow == mode],
                scores,
                geometry,
                k,
                config.candidate_factor,
                config.progress,
            ),
        )
        for mode in MODES
    }
    selected = {mode: results[mode].heads for mode in MODES}
    default_gain, selection_sweep = stages.stage(
        "default_gain", lambda: choose_default_gain(runner, geometry, selected, config)
    )
    validation = stages.stage(
        "validation",
        lambda: validate(
            Runner(loaded, report_samples, config.batch_size), geometry, selected, default_gain, config
        ),
    )
    window = config.knockout_window or max(1, geometry.num_layers // 8)
    flow = stages.stage(
        "knockout",
        lambda: knockout(
            Runner(loaded, report_conflicts[: config.knockout_samples], config.batch_size),
            geometry,
            window,
            config.progress,
        ),
    )
    lens = stages.stage(
        "logit_lens",
        lambda: semantic_inertia(Runner(loaded, report_conflicts, config.batch_size), config.progress),
    )
    curve = stages.stage(
        "sparsity",
        lambda: sparsity_curve(
            Runner(loaded, report_samples, config.batch_size),
            geometry,
            {mode: ranking(results[mode], geometry) for mode in MODES},
            config,
        ),
    )
    transferred = stages.stage(
        "transfer",
        lambda: {
            name: {
                "split": f"transfer {name}",
                **validate(
                    Runner(loaded, members, config.batch_size), geometry, selected, default_gain, config
                ),
            }
            for name, members in transfer_samples.items()
        },
    )
    seconds = time.monotonic() - started
    transfer_records = {
        name: _split_record(members, report_name, report_sha, ("transfer",))
        for name, members in transfer_samples.items()
    }
    provenance = {
        "tool": f"modality-steer {__version__}",
        "model_dir": str(model_dir),
        "data": str(data_path),
        "data_sha256": data_digest(data_path),
        "splits": {
            "selection": _split_record(samples, str(data_path), data_digest(data_path), SELECTION_CHOICES),
            "report": _split_record(report_samples, report_name, report_sha, REPORTED_FIGURES),
            **({"transfer": transfer_records} if rules else {}),
            "transfer_rules": [rule.name for rule in rules],
            "kept_out_of_selection": {name: len(members) for name, members in kept_out.items()},
            "disjoint_sample_ids": True,
            "report_samples_identical_to_selection_samples": content_overlap(samples, report_samples),
        },
        "conflict_samples": len(conflicts),
        "top_frac": config.top_frac,
        "heads_per_mode": k,
        "device": config.device,
        "device_map": getattr(loaded.model, "hf_device_map", None),
        "dtype": config.dtype,
        "batch_size": config.batch_size,
        "seconds": round(seconds, 1),
        "samples_per_second": round(len(conflicts) / seconds, 2),
    }
    validation = {"split": "report", **validation}
    selection = {"split": "selection", **selection_sweep}
    profile = build_profile(
        geometry.model_copy(update={"fingerprint": model_fingerprint(model_dir)}),
        results,
        validation,
        provenance,
        selection,
        sparsity=curve,
        transfer={
            "rules": [rule.name for rule in rules],
            "splits": transferred,
            "side_by_side": side_by_side(validation, transferred),
        }
        if rules
        else None,
    )
    canaries = stages.stage(
        "canaries", lambda: _canaries(model_dir, loaded, profile, report_conflicts, config)
    )
    if isinstance(canaries, str):
        # The profile is still the analysis' result; a deployment serves it only unverified.
        warnings.warn(f"the profile carries no canaries: {canaries}", stacklevel=2)
        profile = Profile.model_validate(
            {**profile.model_dump(mode="json"), "provenance": {**provenance, "canaries": f"none: {canaries}"}}
        )
    elif canaries is not None:
        profile = Profile.model_validate(
            {**profile.model_dump(mode="json"), "canaries": canaries.model_dump(mode="json")}
        )
    stages.close()
    return AnalysisResult(
        profile=profile,
        knockout=flow,
        logit_lens=lens,
        scores={mode: results[mode].attribution for mode in MODES},
        seconds=seconds,
    )


def _canaries(
    model_dir: Path,
    loaded: Any,
    profile: Profile,
    report_conflicts: list[LoadedSample],
    config: AnalysisConfig,
) -> CanarySet | str | None:
    """The profile's canaries (None: `--canaries 0`; a string: why none qualified). They are measured in
    float32 and bfloat16 whatever `--dtype` (a model loaded in a smaller dtype is loaded again in float32
    for them); this leaves the model in bfloat16, so it runs last."""
    if not config.canaries:
        return None
    placement = config.placement()
    if config.dtype != "float32":
        loaded = load_model(model_dir, device=config.device, device_map=placement)
    try:
        return measure_canaries(
            loaded,
            profile,
            report_conflicts,
            config.canaries,
            config.batch_size,
            model_dir=model_dir,
            device_map=placement,
        )
    except NoCanaries as exc:
        return str(exc)


def build_profile(
    geometry: ModelGeometry,
    results: dict[str, ModeResult],
    validation: dict[str, Any],
    provenance: dict[str, Any],
    selection: dict[str, Any],
    *,
    sparsity: dict[str, Any] | None = None,
    transfer: dict[str, Any] | None = None,
) -> Profile:
    """The profile of an analysis: selected heads with their measured drop, all scores, the choice of
    the default gain (`selection`, on the selection split), the validation (on the report split), the
    sparsity curve and the transfer splits' figures (when measured) and where everything came from.

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
            "selection": selection,
            "validation": validation,
            **({"sparsity": sparsity} if sparsity is not None else {}),
            **({"transfer": transfer} if transfer is not None else {}),
            "provenance": provenance,
        }
    )


def _json_table(table: torch.Tensor) -> list[list[float | None]]:
    """[L, H] as nested lists, NaN (layers without attention heads) as null."""
    return [[None if math.isnan(v) else v for v in row] for row in table.tolist()]


def write_outputs(result: AnalysisResult, out: Path, plots: Path | None) -> list[Path]:
    """Write the plots (when `plots` is a folder), the knockout and logit-lens JSON beside the profile,
    and the profile (atomically, last); returns the paths written."""
    written = []
    if plots is not None:
        plots.mkdir(parents=True, exist_ok=True)
        heatmap, curves = plots / f"{out.stem}.heads.png", plots / f"{out.stem}.knockout.png"
        lens_plot = plots / f"{out.stem}.logit_lens.png"
        plot_heatmaps(result.profile, result.scores, heatmap)
        plot_knockout(result.knockout, curves)
        plot_logit_lens(result.logit_lens, lens_plot)
        written += [heatmap, curves, lens_plot]
        curve = (result.profile.model_extra or {}).get("sparsity")
        if curve is not None:
            written.append(plots / f"{out.stem}.sparsity.png")
            plot_sparsity(curve, written[-1], title=out.stem)
    for suffix, payload in ((".knockout.json", result.knockout), (".logit_lens.json", result.logit_lens)):
        path = out.with_name(out.stem + suffix)
        tmp = path.with_suffix(".partial")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.replace(path)
        written.append(path)
    save_profile(result.profile, out)
    return [out, *written]
