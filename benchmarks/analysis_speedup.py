"""`modality-steer analyze` before and after a change, side by side: wall time, forward-equivalents, and
whether the profile is the same.

    python benchmarks/analysis_speedup.py --baseline REF [--sizes bench,large] [--repeats 3]
                                          [--settings reduced|defaults] [--limit 8] [--workdir DIR] [--json OUT]

The baseline is the project at git revision REF, checked out as a worktree under ``--workdir`` and run
with this checkout's virtual environment (``PYTHONPATH``); "current" is this checkout. Models and data
are those of `analysis_scaling.py` (the synthetic generator's validation split selects, its test split
reports, ``--limit`` samples each) at its reduced settings (``--settings reduced``) or at the analysis'
defaults (``--settings defaults``); canaries off, as they are measured from another load of the model. Per size, the two versions run alternately (the order flips every repeat) in
fresh processes; the analysis' own time (the profile's ``provenance.seconds``, from model load to the
end) of each pair gives a ratio, and the ratios' geometric mean gets a 95% t interval over the repeats.

Forward-equivalents per conflict are counted by each version's own cost model
(``analysis_scaling.forward_equivalents`` of that revision), at the run's settings and at the analysis'
defaults. The profiles are compared field by field: the same heads and default gain, and the largest
difference of any figure (timings aside).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from analysis_scaling import DEFAULT_WORKDIR, REPO, size_of
from bench_model import SIZES, build_model, command_line, lm_parameters, progress, save_report

# The settings of analysis_scaling.py's measured runs, and the analysis' defaults.
SETTINGS = {
    "reduced": ["--top-frac", "0.01", "--random-draws", "2", "--knockout-samples", "4", "--batch-size", "8"],
    "defaults": [],
}
TIMING_KEYS = ("seconds", "samples_per_second", "tool", "model_dir")

# Runs inside a version's checkout: its own cost model, at the run's settings and at the defaults.
COUNT = """
import json, sys
from dataclasses import replace
from pathlib import Path
sys.path.insert(0, "benchmarks")
import analysis_scaling as a
from steer_server.analysis.config import AnalysisConfig
model, selection, report, profile = (Path(p) for p in sys.argv[1:5])
limit, reduced = int(sys.argv[5]), sys.argv[6] == "reduced"
shape = a.data_shape(model, selection, report, limit)
defaults = replace(AnalysisConfig(), limit=limit)
small = dict(top_frac=0.01, batch_size=8, random_draws=2, knockout_samples=4)
run = replace(defaults, **small) if reduced else defaults
if hasattr(a, "HeadLayers"):
    heads = a.HeadLayers.from_profile(json.loads(profile.read_text()))
    counts = [a.forward_equivalents(run, shape, heads), a.forward_equivalents(defaults, shape)]
else:
    counts = [a.forward_equivalents(run, shape), a.forward_equivalents(defaults, shape)]
n = len(shape.selection)
print(json.dumps([{k: v / n for k, v in c["total"].items()} for c in counts]))
"""


def worktree(ref: str, workdir: Path) -> Path:
    """A checkout of `ref` (resolved to its commit) under `workdir`, made once."""
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", ref], capture_output=True, text=True, check=True
    ).stdout.strip()
    path = workdir / f"baseline-{commit[:12]}"
    if not path.exists():
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), commit],
            capture_output=True,
            check=True,
        )
    return path


def analyse(source: Path, model_dir: Path, data: Path, out: Path, flags: list[str]) -> dict[str, Any]:
    """Run `modality-steer analyze` with `flags` from the checkout `source`; returns the profile."""
    command = [sys.executable, "-m", "steer_server.cli", "analyze", str(model_dir)]
    command += ["--data", str(data / "validation.jsonl"), "--eval-data", str(data / "test.jsonl")]
    command += ["--out", str(out), "--no-resume", "--canaries", "0", *flags]
    env = {**os.environ, "PYTHONPATH": str(source), "TQDM_DISABLE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=source, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"analyze from {source} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def counts(
    source: Path, model_dir: Path, data: Path, profile: Path, limit: int, settings: str
) -> list[dict[str, float]]:
    """Forward-equivalents per conflict by `source`'s own cost model: [at the run's settings, at the
    defaults], each ``{"F": ..., "B": ...}``."""
    arguments = [str(model_dir), str(data / "validation.jsonl"), str(data / "test.jsonl"), str(profile)]
    arguments += [str(limit), settings]
    env = {**os.environ, "PYTHONPATH": str(source)}
    done = subprocess.run(
        [sys.executable, "-c", COUNT, *arguments],
        capture_output=True,
        text=True,
        env=env,
        cwd=source,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the cost model of {source} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def difference(before: Any, after: Any, path: str = "") -> tuple[float, list[str]]:
    """The largest difference of a number between two profiles and the paths of anything else that
    differs (timings and provenance fields only one of them records aside)."""
    if isinstance(before, dict) and isinstance(after, dict):
        # A provenance field one version has not (the placement and batch size are recorded since) is no
        # difference in what the analysis found.
        added = set(before) ^ set(after)
        worst, other = 0.0, [] if path == "/provenance" else [f"{path}/{k}" for k in added]
        for key in set(before) & set(after):
            if path == "/provenance" and key in TIMING_KEYS:
                continue
            found, rest = difference(before[key], after[key], f"{path}/{key}")
            worst, other = max(worst, found), other + rest
        return worst, other
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        pairs = [difference(b, a, f"{path}/{i}") for i, (b, a) in enumerate(zip(before, after, strict=True))]
        return max((p[0] for p in pairs), default=0.0), [x for p in pairs for x in p[1]]
    numbers = (int, float)
    if isinstance(before, numbers) and isinstance(after, numbers) and not isinstance(before, bool):
        return abs(float(before) - float(after)), []
    return 0.0, [] if before == after else [path]


def ratio_interval(ratios: list[float]) -> dict[str, Any]:
    """Geometric mean of the ratios with a 95% t interval on their logarithms (None with one repeat)."""
    from scipy import stats

    logs = [math.log(r) for r in ratios]
    mean = sum(logs) / len(logs)
    if len(logs) < 2:
        return {"value": math.exp(mean), "low": None, "high": None, "n": len(logs)}
    spread = stats.t.ppf(0.975, len(logs) - 1) * stats.sem(logs)
    return {
        "value": math.exp(mean),
        "low": math.exp(mean - spread),
        "high": math.exp(mean + spread),
        "n": len(logs),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", required=True, help="git revision of the version to compare against")
    parser.add_argument("--sizes", default="bench,large", help="comma-separated: toy, bench, large")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each version per size")
    parser.add_argument(
        "--settings", choices=sorted(SETTINGS), default="reduced", help="the analysis' settings"
    )
    parser.add_argument("--limit", type=int, default=8, help="samples per data file (controls included)")
    parser.add_argument(
        "--workdir", type=Path, default=DEFAULT_WORKDIR, help="models, data, the baseline's checkout"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    from steer_server.data.synth import synth_dataset
    from steer_server.toy.model import toy_model_dir

    folder = args.workdir / "speedup"
    folder.mkdir(parents=True, exist_ok=True)
    synth_dataset(folder / "data", 480, seed=3)
    versions = {"baseline": worktree(args.baseline, args.workdir), "current": REPO}
    results = []
    for name in [s for s in args.sizes.split(",") if s]:
        if name == "toy":
            model_dir, params = toy_model_dir(), lm_parameters(size_of(toy_model_dir()))
        elif name in SIZES:
            built = build_model(args.workdir / name, name)
            model_dir, params = built.model_dir, built.lm_parameters
        else:
            parser.error(f"unknown size {name}")
        seconds: dict[str, list[float]] = {"baseline": [], "current": []}
        profiles: dict[str, Any] = {}
        for repeat in range(args.repeats):
            order = ["baseline", "current"] if repeat % 2 == 0 else ["current", "baseline"]
            for version in order:
                out = folder / f"{name}.{version}.json"
                flags = ["--limit", str(args.limit), *SETTINGS[args.settings]]
                profiles[version] = analyse(versions[version], model_dir, folder / "data", out, flags)
                seconds[version].append(float(profiles[version]["provenance"]["seconds"]))
                progress(f"{name} {version} #{repeat + 1}: {seconds[version][-1]:.1f} s")
        worst, other = difference(profiles["baseline"], profiles["current"])
        cost = {
            version: counts(
                source,
                model_dir,
                folder / "data",
                folder / f"{name}.{version}.json",
                args.limit,
                args.settings,
            )
            for version, source in versions.items()
        }
        ratio = ratio_interval([b / c for b, c in zip(seconds["baseline"], seconds["current"], strict=True)])
        results.append(
            {
                "size": name,
                "lm_parameters": params,
                "seconds": seconds,
                "time_ratio_baseline_over_current": ratio,
                "forward_equivalents_per_conflict": {
                    version: {"run": c[0], "defaults": c[1]} for version, c in cost.items()
                },
                "same_heads_and_gain": not other,
                "differences": other,
                "max_figure_difference": worst,
            }
        )
        progress(
            f"{name}: {ratio['value']:.2f}x faster; F/conflict {cost['baseline'][0]['F']:.1f} -> "
            f"{cost['current'][0]['F']:.1f}; profile differences {other or 'none'}, max |figure diff| {worst:.2g}"
        )
    report = {
        "command": command_line(),
        "baseline": args.baseline,
        "settings": ["--limit", str(args.limit), *SETTINGS[args.settings], "--canaries", "0"],
        "repeats": args.repeats,
        "sizes": results,
    }
    save_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
