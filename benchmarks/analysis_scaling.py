"""What `modality-steer analyze` costs on CPU at three model sizes, measured beside its cost model.

    python benchmarks/analysis_scaling.py [--quick] [--sizes toy,bench,large] [--limit 8] [--top-frac 0.01]
                                          [--random-draws 2] [--knockout-samples 4] [--batch-size 8]
                                          [--workdir DIR] [--json OUT]

Sizes: ``toy`` (the shipped 5.8 M checkpoint, `steer_server/toy/checkpoint`), ``bench`` (a random-weight
LLaVA whose language model has 154 M parameters) and ``large`` (509 M), all with the toy's vision tower
and tokenizer (``bench_model.SIZES``). Data: the synthetic generator's validation split selects the
heads, its test split validates them, both cut to ``--limit`` samples (controls included); the same
settings for every size.

Per size, in its own process: ``modality-steer analyze`` runs as a child of a small wrapper process that
reports the child's peak resident memory (``getrusage(RUSAGE_CHILDREN).ru_maxrss``), its wall time, and
the analysis' own time (the profile's ``provenance.seconds``, from model load to the end); then the
wrapper times the two units of the cost model on a batch of the same conflict samples with the
analysis' own code: a scored pass (``Runner.score``: the greedy decode of the answer, `budget` forwards)
and the attribution pass (1 forward + 1 backward).

The cost model (:func:`forward_equivalents`) counts, from the `AnalysisConfig`, the data and the model's
geometry, the forwards and backwards of every stage of `steer_server/analysis/pipeline.py`; multiplied by
the measured time per forward and per backward it predicts the analysis' time, shown beside the
measurement. Keep it in step with the pipeline: it is the one place that counts.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench_model import SIZES, build_model, command_line, lm_parameters, progress, save_report

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = REPO / "build" / "bench"


# ---- the cost model ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataShape:
    """What the cost depends on besides the settings: the samples each of the pipeline's runners holds,
    in order, as ``(kind, follow)`` (the selection runner holds the selection split's conflicts, the
    report runner the whole report split); the answer budget each runner computes (forwards per scored
    sample, one per greedy answer token); the model's layers, those with attention heads, and the heads
    per layer; per report conflict, in order, its prompt's length in tokens and the first position of each
    of the knockout's token groups (``"image"``, ``"instruction"``, ...)."""

    selection: list[tuple[str, str]]
    report: list[tuple[str, str]]
    budget_selection: int
    budget_report: int
    budget_report_conflicts: int
    layers_with_heads: list[int]
    num_layers: int
    num_heads: int
    report_conflict_positions: list[dict[str, int]]


@dataclass(frozen=True)
class HeadLayers:
    """The decoder layers of the heads an analysis intervened on, per mode, which set where each of its
    passes starts (:meth:`steer_server.analysis.metric.Runner.score_many`): the exact-ablation candidates
    (one head each), the selected heads, and each random draw's heads. Read from a profile
    (:meth:`from_profile`); without one, the cost model takes heads drawn uniformly (:func:`_start_fraction`)."""

    candidates: dict[str, list[int]]
    selected: dict[str, list[int]]
    draws: dict[str, list[list[int]]]

    @classmethod
    def from_profile(cls, profile: dict[str, Any]) -> HeadLayers:
        modes = profile["modes"]
        return cls(
            candidates={
                m: [row[0] for row in rows] for m, rows in profile["scores"]["exact_ablation"].items()
            },
            selected={m: [h["layer"] for h in modes[m]["heads"]] for m in modes},
            draws={
                m: [[layer for layer, _ in draw] for draw in report["block_random_heads"]]
                for m, report in profile["validation"]["modes"].items()
            },
        )


def _start_fraction(shape: DataShape, layers: list[int] | None, count: int) -> float:
    """The share of a forward's decoder layers a pass runs when it starts at the first layer of the heads
    it changes: ``(L - min(layers)) / L``. Without `layers`: its expectation for `count` distinct heads
    drawn uniformly from the model's heads (``P(min >= l) = C(heads at or after l, count) / C(heads,
    count)``)."""
    from math import comb

    total = shape.num_layers
    if layers is not None:
        return (total - min(layers)) / total
    per_layer = [shape.num_heads if layer in shape.layers_with_heads else 0 for layer in range(total)]
    heads = sum(per_layer)
    expected = 0.0
    for first in range(total):
        at_or_after = sum(per_layer[first:])
        after = at_or_after - per_layer[first]
        chance = (comb(at_or_after, count) - comb(after, count)) / comb(heads, count)
        expected += chance * (total - first) / total
    return expected


def knockout_forwards(shape: DataShape, config: Any, windows: list[int], more: int) -> float:
    """Forwards of the knockout's cut passes over its conflicts (the first ``knockout_samples`` report
    conflicts, in the runner's batches): each edge of each window starts at the window's first layer and,
    in each batch, at the first position of the edge's target group (the shortest prompt's last token for
    ``last``), so it costs ``(L - window) / L x (width - position) / width`` F per sample, ``width`` the
    batch's longest prompt (the attention over the earlier positions' cached keys is not counted); plus
    ``more`` whole forwards per sample for the further greedy answer tokens. This assumes the position
    shortcut, as the benchmark's LLaVAs take it; families whose cache keeps only a window or a state for
    some layers (Gemma 3, Qwen3.5, Llama 4), and prompts with an image token after the cut position, run
    the whole sequence from the window's layer."""
    from steer_server.analysis.knockout import KNOCKOUT_EDGES
    from steer_server.analysis.metric import group_batches

    knocked = min(config.knockout_samples, len(shape.report_conflict_positions))
    positions = shape.report_conflict_positions[:knocked]
    follows = [follow for kind, follow in shape.report if kind == "conflict"][:knocked]
    members = [SimpleNamespace(sample=SimpleNamespace(kind="conflict", follow=f)) for f in follows]
    total = 0.0
    for batch in group_batches(members, config.batch_size):
        width = max(positions[i]["length"] for i in batch)
        for _, target in KNOCKOUT_EDGES:
            if target == "last":
                first = min(positions[i]["length"] for i in batch) - 1
            else:
                first = min((positions[i][target] for i in batch if target in positions[i]), default=0)
            share = (width - first) / width
            total += len(batch) * sum(
                (shape.num_layers - window) / shape.num_layers * share + more for window in windows
            )
    return total


def forward_equivalents(
    config: Any, shape: DataShape, heads: HeadLayers | None = None
) -> dict[str, dict[str, float]]:
    """Forwards (``F``) and backwards (``B``) of one sample's prompt that `modality-steer analyze` runs,
    per stage, counted from `steer_server/analysis/pipeline.py` (the one place that counts; keep it in
    step with the pipeline), the `config` (`steer_server.analysis.config.AnalysisConfig`) and the layers of
    the heads intervened on (`heads`; None: their expectation for uniformly drawn heads).

    A scored pass (`Runner.score_many`) forwards only the samples it scores (batches hold one kind and
    instruction each). Its first answer token costs 1 F for the baseline and ``(L - l) / L`` F for a
    setting whose first changed layer is l (it starts from the baseline's residual stream there; the
    embeddings, the vision tower and the unembedding are not counted); each further greedy answer token
    (``budget - 1``) costs 1 F (the whole sequence again); a pass scored for the metric only decodes no
    further token.

    On the selection split (its conflicts):

    - attribution: 1 F + 1 B per conflict (gradient x activation of every head at once);
    - exact ablation, per mode: the baseline and each candidate (the ``max(k * candidate_factor, k)`` best
      attributed heads, ``k = round(top_frac * heads)``), metric only;
    - default gain, per mode: the baseline and each gain of ``gains`` with the selected heads;

    on the report split:

    - validation, per mode: on the conflicts the baseline, the selected heads blocked, each random draw
      blocked (``random_draws``), each gain (the default gain is one of them); on the controls, baseline
      and blocked;
    - knockout: over ``min(knockout_samples, conflicts)`` conflicts the baseline and each edge (6) of each
      window of ``knockout_window`` layers (default ``max(1, layers // 8)``) holding heads, starting at the
      window's first layer and the target group's first position (:func:`knockout_forwards`);
    - logit lens: a scored pass over the conflicts and one plain forward each (the decomposition).

    Returns ``{stage: {"F": forwards, "B": backwards}}`` with a ``"total"`` row.
    """
    from steer_server.profile import MODES

    total_heads = len(shape.layers_with_heads) * shape.num_heads
    k = max(1, round(config.top_frac * total_heads))
    candidates = min(total_heads, max(k * config.candidate_factor, k))
    gains = len(config.gains)

    def count(samples: list[tuple[str, str]], kind: str, mode: str) -> int:
        return sum(s == (kind, mode) for s in samples)

    def fraction(layers: list[int] | None, count: int) -> float:
        return _start_fraction(shape, layers, count)

    def candidates_f(mode: str) -> float:
        if heads is None:
            return candidates * fraction(None, 1)
        return sum(fraction([layer], 1) for layer in heads.candidates[mode])

    def selected_f(mode: str) -> float:
        return fraction(heads.selected[mode] if heads else None, k)

    def draws_f(mode: str) -> float:
        if heads is None:
            return config.random_draws * fraction(None, k)
        return sum(fraction(draw, len(draw)) for draw in heads.draws[mode])

    report_conflicts = sum(kind == "conflict" for kind, _ in shape.report)
    window = config.knockout_window or max(1, shape.num_layers // 8)
    windows = [
        first
        for first in range(0, shape.num_layers - window + 1)
        if any(layer in shape.layers_with_heads for layer in range(first, first + window))
    ]
    knocked = min(config.knockout_samples, report_conflicts)
    b_sel, b_rep, b_conf = shape.budget_selection, shape.budget_report, shape.budget_report_conflicts
    chosen = {m: count(shape.selection, "conflict", m) for m in MODES}
    reported = {m: count(shape.report, "conflict", m) for m in MODES}
    controls = {m: count(shape.report, "control", m) for m in MODES}
    # Per setting, the greedy steps after the first answer token.
    more_sel, more_rep, more_conf = b_sel - 1, b_rep - 1, b_conf - 1

    def validation(mode: str) -> float:
        settings = 1 + config.random_draws + gains
        conflict = reported[mode] * (
            b_rep + selected_f(mode) * (1 + gains) + draws_f(mode) + settings * more_rep
        )
        return conflict + controls[mode] * (b_rep + selected_f(mode) + more_rep)

    knockout_f = knockout_forwards(shape, config, windows, more_conf)
    selection = len(shape.selection)
    stages: dict[str, dict[str, float]] = {
        "attribution": {"F": selection, "B": selection},
        "exact ablation": {"F": sum(chosen[m] * (1 + candidates_f(m)) for m in MODES), "B": 0},
        "default gain": {
            "F": sum(chosen[m] * (b_sel + gains * (selected_f(m) + more_sel)) for m in MODES),
            "B": 0,
        },
        "validation": {"F": sum(validation(m) for m in MODES), "B": 0},
        "knockout": {"F": knocked * b_conf + knockout_f, "B": 0},
        "logit lens": {"F": (b_conf + 1) * report_conflicts, "B": 0},
    }
    stages["total"] = {
        "F": sum(s["F"] for s in stages.values()),
        "B": sum(s["B"] for s in stages.values()),
    }
    return stages


def data_shape(model_dir: Path, selection: Path, report: Path, limit: int | None) -> DataShape:
    """The :class:`DataShape` of an analysis of `model_dir` with ``--data selection --eval-data report``
    (as the pipeline loads them). The report conflicts' token positions come from the model's own
    processor and the knockout's token groups (`steer_server.analysis.knockout.token_groups`)."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoConfig, AutoProcessor

    from steer_server.analysis.knockout import token_groups
    from steer_server.architectures import geometry_of
    from steer_server.data.schema import load_samples
    from steer_server.hf.model import answer_budget, encode_prompts, load_image

    def cut(path: Path) -> list[Any]:
        samples = load_samples(path)
        return samples[:limit] if limit is not None else samples

    conflicts = [s for s in cut(selection) if s.sample.kind == "conflict"]
    held_out = cut(report)
    report_conflicts = [s for s in held_out if s.sample.kind == "conflict"]
    config = AutoConfig.from_pretrained(model_dir)
    geometry = geometry_of(config)
    processor = AutoProcessor.from_pretrained(model_dir)
    tokenizer = processor.tokenizer
    positions = []
    for loaded in report_conflicts:
        batch = encode_prompts(processor, [loaded.sample], [load_image(loaded.image_path)])
        groups = token_groups(
            SimpleNamespace(processor=processor, model=SimpleNamespace(config=config)), [loaded], batch
        )
        length = int(batch["attention_mask"].sum())
        firsts = {name: int(torch.nonzero(mask[0])[0]) for name, mask in groups.items() if bool(mask.any())}
        positions.append({"length": length, **firsts})
    return DataShape(
        selection=[(s.sample.kind, s.sample.follow) for s in conflicts],
        report=[(s.sample.kind, s.sample.follow) for s in held_out],
        budget_selection=answer_budget(tokenizer, conflicts),
        budget_report=answer_budget(tokenizer, held_out),
        budget_report_conflicts=answer_budget(tokenizer, report_conflicts),
        layers_with_heads=[layer for layer in geometry.layers if geometry.has_heads(layer)],
        num_layers=geometry.num_layers,
        num_heads=geometry.num_heads,
        report_conflict_positions=positions,
    )


def size_of(model_dir: Path) -> dict[str, int]:
    """The language model's sizes (as in ``bench_model.SIZES``) from a LLaVA checkpoint's config."""
    text = json.loads((model_dir / "config.json").read_text())["text_config"]
    heads = int(text["num_attention_heads"])
    return {
        "text_hidden": int(text["hidden_size"]),
        "text_layers": int(text["num_hidden_layers"]),
        "text_heads": heads,
        "head_dim": int(text.get("head_dim") or text["hidden_size"] // heads),
        "text_mlp": int(text["intermediate_size"]),
    }


# ---- one size, in its own wrapper process -----------------------------------------------------------


def unit_times(model_dir: Path, selection: Path, samples: int, batch_size: int) -> dict[str, float]:
    """Seconds per forward and per backward of one sample, measured with the analysis' own code on the
    first `samples` conflicts of `selection` (after one untimed pass of each)."""
    from steer_server.analysis.attribution import attribution
    from steer_server.analysis.metric import Runner
    from steer_server.architectures import geometry_of
    from steer_server.data.schema import load_samples
    from steer_server.hf.model import load_model

    loaded = load_model(model_dir, device="cpu")
    geometry = geometry_of(loaded.model.config)
    conflicts = [s for s in load_samples(selection) if s.sample.kind == "conflict"][:samples]
    runner = Runner(loaded, conflicts, batch_size)
    runner.score()
    attribution(runner, geometry, False)
    started = time.perf_counter()
    runner.score()
    scored = time.perf_counter() - started
    started = time.perf_counter()
    attribution(runner, geometry, False)
    attributed = time.perf_counter() - started
    forward = scored / (len(conflicts) * runner.budget)
    return {"forward_s": forward, "backward_s": max(0.0, attributed / len(conflicts) - forward)}


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Analyse one model as a child process; its peak memory and times; then the unit times."""
    out = Path(spec["out"])
    command = [
        sys.executable,
        "-m",
        "steer_server.cli",
        "analyze",
        spec["model_dir"],
        "--data",
        spec["selection"],
        "--eval-data",
        spec["evaluation"],
        "--out",
        str(out),
        *spec["flags"],
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(
            f"analyze failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        )
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    provenance = json.loads(out.read_text())["provenance"]
    units = unit_times(
        Path(spec["model_dir"]), Path(spec["selection"]), spec["unit_samples"], spec["batch_size"]
    )
    return {
        "wall_s": wall,
        "analysis_s": float(provenance["seconds"]),
        "conflict_samples": int(provenance["conflict_samples"]),
        "peak_rss_mib": peak_kib / 1024,
        **units,
    }


# ---- the whole benchmark ------------------------------------------------------------------------------


def measure_size(
    name: str, model_dir: Path, lm_params: int, paths: dict[str, Path], args: argparse.Namespace, folder: Path
) -> dict[str, Any]:
    from steer_server.analysis.config import AnalysisConfig

    config = AnalysisConfig(
        top_frac=args.top_frac,
        batch_size=args.batch_size,
        limit=args.limit,
        random_draws=args.random_draws,
        knockout_samples=args.knockout_samples,
        progress=False,
    )
    flags = [
        "--top-frac",
        str(config.top_frac),
        "--batch-size",
        str(config.batch_size),
        "--limit",
        str(config.limit),
        "--random-draws",
        str(config.random_draws),
        "--knockout-samples",
        str(config.knockout_samples),
    ]
    spec = {
        "model_dir": str(model_dir),
        "selection": str(paths["validation"]),
        "evaluation": str(paths["test"]),
        "out": str(folder / f"{name}.profile.json"),
        "flags": flags,
        "unit_samples": min(args.batch_size, args.limit),
        "batch_size": args.batch_size,
    }
    progress(f"{name}: analysing ({lm_params / 1e6:.0f} M parameters in the language model)")
    done = subprocess.run(
        [sys.executable, __file__, "--run-one", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"{name}: the measurement failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    measured = json.loads(line.removeprefix("RESULT "))
    shape = data_shape(model_dir, paths["validation"], paths["test"], args.limit)
    run_cost = forward_equivalents(
        config, shape, HeadLayers.from_profile(json.loads(Path(spec["out"]).read_text()))
    )
    default_cost = forward_equivalents(replace(AnalysisConfig(), limit=args.limit), shape)
    conflicts = len(shape.selection)
    f_s, b_s = measured["forward_s"], measured["backward_s"]

    def predicted(cost: dict[str, dict[str, float]]) -> float:
        """Compute only: forwards and backwards at their measured unit times."""
        return cost["total"]["F"] * f_s + cost["total"]["B"] * b_s

    def equivalents(cost: dict[str, dict[str, float]]) -> float:
        """Forward-equivalents: a backward counts as its measured time in forwards."""
        return cost["total"]["F"] + cost["total"]["B"] * b_s / f_s

    # Everything the analysis spends (loading, encoding, Python), per forward-equivalent it runs.
    per_equivalent = measured["analysis_s"] / equivalents(run_cost)

    result = {
        "size": name,
        "lm_parameters": lm_params,
        "layers": shape.num_layers,
        "heads": shape.num_heads,
        "settings": {key: value for key, value in asdict(config).items() if key != "progress"},
        "data": asdict(shape),
        **measured,
        "samples_per_second": conflicts / measured["analysis_s"],
        "cost_model": {
            "run": run_cost,
            "defaults": default_cost,
            "run_per_conflict": {k: v / conflicts for k, v in run_cost["total"].items()},
            "defaults_per_conflict": {k: v / conflicts for k, v in default_cost["total"].items()},
            "predicted_s": predicted(run_cost),
            "predicted_over_measured": predicted(run_cost) / measured["analysis_s"],
            "measured_per_forward_equivalent_s": per_equivalent,
            "defaults_predicted_samples_per_second": conflicts / (equivalents(default_cost) * per_equivalent),
        },
    }
    progress(
        f"{name}: {result['samples_per_second']:.3f} conflict samples/s, peak {measured['peak_rss_mib']:.0f} MiB, "
        f"analysis {measured['analysis_s']:.0f} s (cost model: {predicted(run_cost):.0f} s from "
        f"{run_cost['total']['F']:.0f} F x {1e3 * f_s:.1f} ms + {run_cost['total']['B']:.0f} B x {1e3 * b_s:.1f} ms)"
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-one", help=argparse.SUPPRESS)  # internal: the per-size wrapper process
    parser.add_argument("--quick", action="store_true", help="the toy and the 154 M model only (smoke run)")
    parser.add_argument("--sizes", default="toy,bench,large", help="comma-separated: toy, bench, large")
    parser.add_argument("--limit", type=int, default=8, help="samples per data file (controls included)")
    parser.add_argument("--top-frac", type=float, default=0.01, help="share of heads selected per mode")
    parser.add_argument("--random-draws", type=int, default=2, help="random-head draws of the control")
    parser.add_argument("--knockout-samples", type=int, default=4, help="conflict samples of the knockout")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward pass")
    parser.add_argument(
        "--workdir", type=Path, default=DEFAULT_WORKDIR, help="where models and data are kept"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.run_one:
        print("RESULT " + json.dumps(run_one(json.loads(args.run_one))), flush=True)
        return 0
    sizes = ["toy", "bench"] if args.quick else [s for s in args.sizes.split(",") if s]
    from steer_server.data.synth import synth_dataset
    from steer_server.toy.model import toy_model_dir

    folder = args.workdir / "analysis"
    folder.mkdir(parents=True, exist_ok=True)
    paths = synth_dataset(folder / "data", 480, seed=3)
    started = time.perf_counter()
    results = []
    for name in sizes:
        if name == "toy":
            model_dir = toy_model_dir()
            params = lm_parameters(size_of(model_dir))
        else:
            if name not in SIZES:
                parser.error(f"unknown size {name}")
            built = build_model(args.workdir / name, name)
            model_dir, params = built.model_dir, built.lm_parameters
        results.append(measure_size(name, model_dir, params, paths, args, folder))
    report = {
        "quick": args.quick,
        "command": command_line(),
        "limit": args.limit,
        "seconds": round(time.perf_counter() - started, 1),
        "sizes": results,
    }
    save_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
