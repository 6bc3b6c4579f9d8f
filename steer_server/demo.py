"""`modality-steer demo`: the embedded toy model measured offline (transformers) and served (vLLM), side
by side, on the held-out synthetic test split."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from . import data as D
from . import toy
from .engine import VllmServer
from .eval import served_answers, served_report


def _fmt(value: float | None) -> str:
    return "  -  " if value is None else f"{value:.3f}"


def table(offline: dict[str, Any], served: dict[str, Any]) -> str:
    rows = [
        (
            "MF ratio, rely on the image",
            offline["mf_ratio_by_follow"].get("image"),
            served["mf_ratio_by_follow"].get("image"),
        ),
        (
            "MF ratio, rely on the text",
            offline["mf_ratio_by_follow"].get("text"),
            served["mf_ratio_by_follow"].get("text"),
        ),
        ("MF ratio, both", offline["mf_ratio"], served["mf_ratio"]),
        ("control accuracy", offline["control_accuracy"], served["control_accuracy"]),
    ]
    lines = [f"{'':<30} {'transformers':>12} {'vLLM served':>12}"]
    lines += [f"{name:<30} {_fmt(a):>12} {_fmt(b):>12}" for name, a, b in rows]
    return "\n".join(lines)


def run_demo(out: Path, *, concurrency: int = 8) -> dict[str, Any]:
    model_dir = toy.toy_model_dir()
    with tempfile.TemporaryDirectory() as scratch:
        print(f"[1/3] writing the held-out test split (n={toy.EVAL_N}, seed={toy.EVAL_SEED})", flush=True)
        test_path = toy.held_out_test_split(Path(scratch))
        samples = D.load_samples(test_path)
        print(f"[2/3] transformers: {len(samples)} samples", flush=True)
        offline = toy.evaluate(model_dir, data=test_path, progress=True)
        print("[3/3] vLLM: starting the OpenAI-compatible server (about a minute on CPU)", flush=True)
        started = time.monotonic()
        with VllmServer(
            model_dir, ["--max-model-len", "256", "--max-num-seqs", "16", "--enforce-eager"]
        ) as server:
            print(f"      server up in {time.monotonic() - started:.0f} s at {server.base_url}", flush=True)
            run = served_answers(
                server.client(), str(model_dir), samples, concurrency=concurrency, progress=True
            )
        served = served_report(samples, run)
    if served["errors"]:
        raise RuntimeError(f"{served['errors']} requests failed, first: {served['error_samples']}")
    results = {"model": str(model_dir), "data": offline["data"], "transformers": offline, "served": served}
    out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(table(offline, served))
    print(f"\nwrote {out}")
    return results
