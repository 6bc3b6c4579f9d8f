"""`make demo`'s measurement through a real server (a CI-sized subset of its split), its table, and the
statement of which split chose what."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from steer_server.eval.demo import ROWS, measure, offline_figures, splits_statement, table, toy_profile_path
from steer_server.profile import load_profile
from steer_server.serving.launcher import VllmServer
from steer_server.toy.model import toy_model_dir

FIGURES = [(arm, key) for _, (arm, key) in ROWS]


@pytest.fixture(scope="module")
def demo_server():
    """The server `make demo` starts: the toy model with its shipped profile."""
    server = VllmServer(
        toy_model_dir(),
        ["--max-model-len", "256", "--max-num-seqs", "32", "--enforce-eager"],
        profile=toy_profile_path(),
        steer_args=["--allow-raw-heads"],
    )
    with server:
        yield server


@pytest.mark.vllm
def test_demo_measures_every_figure_with_its_interval_and_count(demo_server, toy_test_samples):
    profile = load_profile(toy_profile_path())
    samples = toy_test_samples[:64]
    served = measure(demo_server, str(toy_model_dir()), samples, profile, concurrency=16)
    conflicts = sum(s.sample.kind == "conflict" for s in samples)
    controls = len(samples) - conflicts
    for arm, key in FIGURES:
        figure = served[arm][key]
        low, high = figure["ci95"]
        assert low <= figure["value"] <= high, (arm, key, figure)
    for arm in ("baseline", "block_top", "block_random"):
        assert served[arm]["mf_ratio"]["n"] == conflicts
    assert served["control"]["baseline_accuracy"]["n"] == controls
    failed = served["amplify"]["recovered_share"]["n"]
    assert failed + served["amplify"]["broken_share"]["n"] == conflicts
    assert served["block_top"]["mf_ratio"]["value"] < served["baseline"]["mf_ratio"]["value"]
    assert served["block_top"]["relative_drop"]["ci95"][0] > 0.3

    printed = table(offline_figures(profile), served)
    for name, _ in ROWS:
        assert name in printed
    assert f"(n={conflicts})" in printed and f"(n={controls})" in printed
    assert printed.count("[") >= 2 * len(ROWS)  # an interval in both columns of every row
    statement = splits_statement(profile)
    assert "selection split" in statement and "report split" in statement and "default_gain" in statement


@pytest.mark.vllm
def test_eval_command_reports_intervals_and_counts(demo_server, toy_test_split, tmp_path):
    subset = toy_test_split.parent / "eval-subset.jsonl"  # beside the split, so image paths resolve
    subset.write_text("".join(line + "\n" for line in toy_test_split.read_text().splitlines()[:40]))
    out = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "steer_server.cli",
            "eval",
            "--base-url",
            demo_server.base_url,
            "--model",
            str(toy_model_dir()),
            "--data",
            str(subset),
            "--steer",
            "instructed",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    intervals = report["intervals"]
    assert intervals["mf_ratio"]["n"] == report["conflicts"] and report["conflicts"] > 0
    low, high = intervals["mf_ratio"]["ci95"]
    assert low <= report["mf_ratio"] <= high
    for follow, estimate in intervals["mf_ratio_by_follow"].items():
        assert estimate["value"] == pytest.approx(report["mf_ratio_by_follow"][follow], abs=1e-6)
    assert intervals["control_accuracy"]["n"] == report["controls"]
    assert "MF ratio" in done.stderr and f"(n={report['conflicts']})" in done.stderr


@pytest.mark.vllm
def test_the_demo_prints_the_canary_check(demo_server):
    """`make demo` says that the server checked its steering against the profile's canaries."""
    from steer_server.eval.demo import canary_line, canary_state

    profile = load_profile(toy_profile_path())
    assert profile.canaries is not None
    line = canary_line(canary_state(demo_server))
    assert line.startswith(f"canaries passed before serving: {len(profile.canaries.samples) * 5} checks"), (
        line
    )
