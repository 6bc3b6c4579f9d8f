"""`modality-steer demo` (`make demo`): the embedded toy model and its shipped profile, served by vLLM with
steering, measured through the endpoint like the paper's head interventions, beside the transformers
figures recorded in the profile's validation.

Arms (each sample steered by its own instruction's heads):
- baseline: no steering;
- block top: the profile's heads for the sample's instruction at gain 0;
- block random: as many random heads outside the profile at gain 0 (the draws the analysis used);
- amplify: the profile's heads at its default gain, on the samples that failed at baseline (rescued) and
  on those that succeeded (broken).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from ..analysis.config import TransferRule
from ..analysis.transfer import split_by_rules
from ..data.schema import LoadedSample, Sample, data_digest, load_samples
from ..data.scoring import is_success, mf_ratio_estimate, mf_ratio_over_draws, mf_relative_drop
from ..data.synth import SynthSpec, synth_dataset
from ..profile import MODES, Profile, load_profile
from ..serving.launcher import VllmServer
from ..stats import Estimate, proportion
from ..toy.model import toy_model_dir
from .endpoint import ExtraBody, served_answers

TOY_PROFILE = "toy-llava.json"
LEARNED_PROFILE = "toy-llava-learned.json"
# The synthetic data both shipped profiles are analysed on (`make profiles`: the data's --n, --seed and
# --paraphrase-share, and the analysis' --transfer rules).
SHIPPED_PROFILE_DATA: dict[str, float] = {"n": 6000, "seed": 0, "paraphrase_share": 0.3}
SHIPPED_TRANSFER_RULES = ("task:position", "wording:paraphrase")


def toy_profile_path() -> Path:
    """The shipped profile of the embedded toy model (package data)."""
    return Path(str(resources.files("steer_server.profiles") / TOY_PROFILE))


def learned_profile_path() -> Path:
    """The shipped profile of the second embedded model, which learned to arbitrate (package data)."""
    return Path(str(resources.files("steer_server.profiles") / LEARNED_PROFILE))


def shipped_report_split(profile: Profile, folder: Path) -> list[LoadedSample]:
    """The samples the shipped toy profile's validation figures come from: the test split of
    :data:`SHIPPED_PROFILE_DATA` (written into `folder`, checked against the digest the profile records),
    without the samples its transfer rules keep apart.

    Raises:
        RuntimeError: the regenerated split is not the one the profile records.
    """
    spec = SynthSpec(paraphrase_share=SHIPPED_PROFILE_DATA["paraphrase_share"])
    test = synth_dataset(folder, int(SHIPPED_PROFILE_DATA["n"]), int(SHIPPED_PROFILE_DATA["seed"]), spec)[
        "test"
    ]
    splits = (profile.model_extra or {}).get("provenance", {}).get("splits", {})
    if data_digest(test) != splits.get("report", {}).get("sha256"):
        raise RuntimeError(
            f"the synthetic test split ({SHIPPED_PROFILE_DATA}) is not the report split the profile records: "
            "regenerate the profile (make toy-profile)"
        )
    rules = [TransferRule.parse(rule) for rule in splits.get("transfer_rules", [])]
    return split_by_rules(load_samples(test), rules)[0]


def _follows(samples: Sequence[LoadedSample], answers: dict[str, str]) -> dict[str, bool]:
    return {s.sample.id: is_success(s.sample, answers[s.sample.id]) for s in samples}


def _hits(samples: Sequence[LoadedSample], follows: dict[str, bool]) -> list[bool]:
    return [follows[s.sample.id] for s in samples]


class _Arms:
    def __init__(self, server: VllmServer, model: str, concurrency: int) -> None:
        self.client = server.client()
        self.model = model
        self.concurrency = concurrency

    def run(self, samples: Sequence[LoadedSample], body: ExtraBody, name: str) -> dict[str, str]:
        """Greedy answers by sample id for one arm; any failed request raises RuntimeError."""
        if not samples:
            return {}
        result = served_answers(
            self.client,
            self.model,
            samples,
            concurrency=self.concurrency,
            extra_body=body,
            progress=True,
            desc=name,
        )
        if result.errors:
            first = next(iter(result.errors.items()))
            raise RuntimeError(
                f"{name}: {len(result.errors)} of {len(samples)} requests failed, first {first}"
            )
        return result.answers


def _own_heads(gain: float) -> ExtraBody:
    def body(sample: Sample) -> dict[str, Any]:
        return {"modality_steer": {"follow": sample.follow, "gain": gain}}

    return body


def _raw_heads(heads_by_mode: dict[str, list[list[int]]]) -> ExtraBody:
    def body(sample: Sample) -> dict[str, Any]:
        return {
            "modality_steer": {"heads": [[layer, head, 0.0] for layer, head in heads_by_mode[sample.follow]]}
        }

    return body


def measure(
    server: VllmServer, model: str, samples: Sequence[LoadedSample], profile: Profile, concurrency: int
) -> dict[str, Any]:
    """The demo's served figures: every arm of the module docstring through the endpoint, MF ratios as
    :func:`~steer_server.data.scoring.mf_ratio` aggregates them.

    Raises:
        RuntimeError: a request failed (named with its sample).
    """
    arms = _Arms(server, model, concurrency)
    conflicts = [s for s in samples if s.sample.kind == "conflict"]
    controls = [s for s in samples if s.sample.kind == "control"]
    validation = (profile.model_extra or {}).get("validation", {})
    draws = [validation["modes"][m]["block_random_heads"] for m in MODES]

    baseline = _follows(conflicts, arms.run(conflicts, None, "baseline"))
    block_top = _follows(conflicts, arms.run(conflicts, _own_heads(0.0), "block top"))
    random_hits = []
    for draw in range(len(draws[0])):
        heads = {mode: draws[index][draw] for index, mode in enumerate(MODES)}
        answers = arms.run(conflicts, _raw_heads(heads), f"block random {draw + 1}")
        random_hits.append(_hits(conflicts, _follows(conflicts, answers)))
    failed = [s for s in conflicts if not baseline[s.sample.id]]
    correct = [s for s in conflicts if baseline[s.sample.id]]
    amplify_failed = _follows(failed, arms.run(failed, _own_heads(profile.default_gain), "amplify (failed)"))
    amplify_correct = _follows(
        correct, arms.run(correct, _own_heads(profile.default_gain), "amplify (correct)")
    )
    control_base = _follows(controls, arms.run(controls, None, "controls"))
    control_block = _follows(controls, arms.run(controls, _own_heads(0.0), "controls, block top"))

    follow = [s.sample.follow for s in conflicts]
    base_hits, top_hits = _hits(conflicts, baseline), _hits(conflicts, block_top)

    def share(hits: dict[str, bool]) -> dict[str, Any]:
        return proportion(sum(hits.values()), len(hits)).as_dict()

    return {
        "baseline": {"mf_ratio": mf_ratio_estimate(follow, base_hits).as_dict()},
        "block_top": {
            "mf_ratio": mf_ratio_estimate(follow, top_hits).as_dict(),
            "relative_drop": mf_relative_drop(follow, base_hits, [top_hits]).as_dict(),
        },
        "block_random": {
            "mf_ratio": mf_ratio_over_draws(follow, random_hits).as_dict(),
            "relative_drop": mf_relative_drop(follow, base_hits, random_hits).as_dict(),
            "draws": len(random_hits),
        },
        "amplify": {
            "gain": profile.default_gain,
            "recovered_share": share(amplify_failed),
            "broken_share": proportion(
                len(amplify_correct) - sum(amplify_correct.values()), len(amplify_correct)
            ).as_dict(),
        },
        "control": {"baseline_accuracy": share(control_base), "block_top_accuracy": share(control_block)},
        "conflicts": len(conflicts),
        "controls": len(controls),
    }


def offline_figures(profile: Profile) -> dict[str, Any]:
    """The same figures from the profile's validation (transformers, on the report split)."""
    validation = (profile.model_extra or {})["validation"]
    summary, modes = validation["summary"], validation["modes"]

    def controls(key: str) -> dict[str, Any] | None:
        present = [modes[m][key] for m in MODES if modes[m][key] is not None]
        if not present:
            return None
        hits = sum(round(e["value"] * e["n"]) for e in present)
        return proportion(hits, sum(e["n"] for e in present)).as_dict()

    return {
        "baseline": {"mf_ratio": summary["mf_ratio_baseline"]},
        "block_top": {
            "mf_ratio": summary["mf_ratio_block_top"],
            "relative_drop": summary["block_top_relative_drop"],
        },
        "block_random": {
            "mf_ratio": summary["mf_ratio_block_random"],
            "relative_drop": summary["block_random_relative_drop"],
        },
        "amplify": {
            "recovered_share": summary["amplify_rescued_share"],
            "broken_share": summary["amplify_broken_share"],
        },
        "control": {
            "baseline_accuracy": controls("control_accuracy_baseline"),
            "block_top_accuracy": controls("control_accuracy_block_top"),
        },
    }


ROWS = [
    ("MF ratio, no intervention", ("baseline", "mf_ratio")),
    ("MF ratio, block arbitration heads", ("block_top", "mf_ratio")),
    ("  relative drop", ("block_top", "relative_drop")),
    ("MF ratio, block random heads", ("block_random", "mf_ratio")),
    ("  relative drop", ("block_random", "relative_drop")),
    ("failures rescued by amplifying", ("amplify", "recovered_share")),
    ("correct answers broken by amplifying", ("amplify", "broken_share")),
    ("control accuracy", ("control", "baseline_accuracy")),
    ("control accuracy, heads blocked", ("control", "block_top_accuracy")),
]


def splits_statement(profile: Profile) -> str:
    """Which split chose what and which one every figure comes from (the profile's provenance)."""
    splits = ((profile.model_extra or {}).get("provenance") or {}).get("splits")
    if not splits:
        return "the profile does not record its splits (made before modality-steer recorded them)"
    selection, report = splits["selection"], splits["report"]
    overlap = splits.get("report_samples_identical_to_selection_samples", {}).get("samples", 0)
    repeated = f"; {overlap} of them content-identical to selection samples" if overlap else ""
    return (
        f"chosen on the selection split ({selection['data']}, {selection['samples']} samples): "
        f"{', '.join(selection['used_for'])}; every figure below comes from the report split "
        f"({report['data']}, {report['samples']} samples{repeated}), which no choice saw"
    )


def table(offline: dict[str, Any], served: dict[str, Any]) -> str:
    """The printed side-by-side table: percentages with 95% intervals and the sample count of each
    figure (:meth:`steer_server.stats.Estimate.percent`)."""

    def cell(value: dict[str, Any] | None) -> str:
        return "-" if value is None else Estimate.from_dict(value).percent(digits=1)

    width = 30
    lines = [f"{'(report split, 95% CI)':<38} {'transformers':<{width}} {'vLLM served':<{width}}"]
    for name, (arm, key) in ROWS:
        lines.append(
            f"{name:<38} {cell(offline[arm].get(key)):<{width}} {cell(served[arm].get(key)):<{width}}"
        )
    return "\n".join(lines)


def canary_state(server: VllmServer) -> dict[str, Any]:
    """The server's canary report (the state endpoint's `canaries`)."""
    import urllib.request

    with urllib.request.urlopen(f"{server.base_url}/v1/modality_steer/state", timeout=60) as response:
        report: dict[str, Any] = json.loads(response.read())["canaries"]
    return report


def canary_line(report: dict[str, Any]) -> str:
    """One line on the canary check the server ran before it served."""
    if report["status"] == "passed":
        return (
            f"canaries passed before serving: {report['checks']} checks ({report['match']} match, "
            f"{report['seconds']:.1f} s): steering does what the profile records"
        )
    return f"canaries {report['status']}: {report.get('reason') or report.get('failed')}"


def run_demo(out: Path, *, concurrency: int = 16) -> dict[str, Any]:
    """Write the held-out split, serve the toy model with its profile, measure, print and write `out`."""
    started = time.monotonic()
    model_dir = toy_model_dir()
    profile_path = toy_profile_path()
    profile = load_profile(profile_path)
    with tempfile.TemporaryDirectory() as scratch:
        print(f"[1/3] the profile's report split and profile {profile.profile_id}", flush=True)
        samples = shipped_report_split(profile, Path(scratch))
        print("[2/3] starting modality-steer serve (vLLM, CPU; about a minute)", flush=True)
        server = VllmServer(
            model_dir,
            ["--max-model-len", "256", "--max-num-seqs", "32", "--enforce-eager"],
            profile=profile_path,
            steer_args=["--allow-raw-heads"],
        )
        with server:
            canaries = canary_state(server)
            print(f"      up at {server.base_url}; {canary_line(canaries)}", flush=True)
            print("[3/3] evaluating through the endpoint", flush=True)
            served = measure(server, str(model_dir), samples, profile, concurrency)
    offline = offline_figures(profile)
    results = {
        "model": str(model_dir),
        "profile": str(profile_path),
        "profile_id": profile.profile_id,
        "data": f"the profile's report split (synthetic test split {SHIPPED_PROFILE_DATA}, within distribution)",
        "splits": splits_statement(profile),
        "canaries": canaries,
        "served": served,
        "transformers": offline,
        "seconds": round(time.monotonic() - started, 1),
    }
    out.write_text(json.dumps(results, indent=2) + "\n")
    heatmap = profile_path.parent / f"{profile_path.stem}.heads.png"
    if heatmap.is_file():
        shutil.copyfile(heatmap, out.parent / heatmap.name)
    print()
    print(splits_statement(profile))
    print(table(offline, served))
    print(f"\nwrote {out} ({results['seconds']:.0f} s)")
    return results
