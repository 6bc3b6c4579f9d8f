"""vLLM's own serving benchmark (`vllm bench serve`) against a steered deployment, steered and unsteered.

    python benchmarks/bench_serve.py [--quick] [--rounds 2] [--num-prompts 64] [--input-len 64]
                                     [--output-len 16] [--concurrency 16] [--steer text] [--json OUT]

Starts ``modality-steer serve`` on the embedded toy model with its shipped profile
(`profiles/toy-llava.json`, eager, float32), then runs vLLM's benchmark client through vLLM's CLI
module (the `vllm` console script of the CPU wheel crashes)::

    python -m steer_server.serving.vllm_adapter.cli bench serve --backend openai --base-url URL --model MODEL \
        --tokenizer MODEL --dataset-name random --random-input-len 64 --random-output-len 16 \
        --num-prompts 64 --max-concurrency 16 --ignore-eos --seed 0 \
        [--extra-body '{"modality_steer": "text"}']

``--extra-body`` adds the steering field to every request body; the plugin reads a top-level
``modality_steer``. Runs alternate unsteered / steered in ABBA order for ``--rounds`` rounds against the
same server, on random token prompts from the toy tokenizer (works offline); vLLM's JSON result of each
run is kept. The server's ``modality_steer_requests_total`` counters (``/metrics``) confirm that every
request of a steered run was steered and none of an unsteered one. These are throughput figures of a
5.8 M-parameter model on CPU: they show how to benchmark a steered deployment, not what a GPU serves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_model import command_line, engine_environment, progress, save_report

REPO = Path(__file__).resolve().parent.parent
PROFILE = REPO / "profiles" / "toy-llava.json"
KEYS = (
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
    "median_ttft_ms",
    "median_tpot_ms",
    "median_itl_ms",
    "completed",
    "failed",
)


def bench_command(
    base_url: str, model: str, args: argparse.Namespace, extra_body: dict[str, Any] | None, out: Path
) -> list[str]:
    """The `vllm bench serve` command line of one run."""
    command = [
        sys.executable,
        "-m",
        "steer_server.serving.vllm_adapter.cli",
        "bench",
        "serve",
        "--backend",
        "openai",
        "--base-url",
        base_url,
        "--model",
        model,
        "--tokenizer",
        model,
        "--dataset-name",
        "random",
        "--random-input-len",
        str(args.input_len),
        "--random-output-len",
        str(args.output_len),
        "--num-prompts",
        str(args.num_prompts),
        "--max-concurrency",
        str(args.concurrency),
        "--ignore-eos",
        "--seed",
        "0",
        "--save-result",
        "--result-dir",
        str(out.parent),
        "--result-filename",
        out.name,
    ]
    if extra_body is not None:
        command += ["--extra-body", json.dumps(extra_body)]
    return command


def steered_counts(base_url: str) -> dict[str, float]:
    """The server's ``modality_steer_requests_total`` counters by mode (from ``/metrics``)."""
    import re
    import urllib.request

    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    pattern = re.compile(r'^modality_steer_requests_total\{mode="(\w+)"\} ([0-9.e+]+)$', re.MULTILINE)
    return {mode: float(value) for mode, value in pattern.findall(text)}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one round of 16 prompts (smoke run)")
    parser.add_argument("--rounds", type=int, help="ABBA rounds (default 2; quick 1)")
    parser.add_argument("--num-prompts", type=int, help="prompts per run (default 64; quick 16)")
    parser.add_argument("--input-len", type=int, default=64, help="random prompt tokens")
    parser.add_argument("--output-len", type=int, default=16, help="output tokens (ignore_eos)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (--max-concurrency)")
    parser.add_argument(
        "--steer", default="text", help="the modality_steer value of the steered runs (JSON or a string)"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.num_prompts = args.num_prompts or (16 if args.quick else 64)
    try:
        steer: Any = json.loads(args.steer)
    except json.JSONDecodeError:
        steer = args.steer
    from steer_server.serving.launcher import VllmServer
    from steer_server.toy.model import toy_model_dir

    model = str(toy_model_dir())
    server_args = ["--enforce-eager", "--max-model-len", "512", "--max-num-seqs", str(args.concurrency)]
    arms = {"unsteered": None, "steered": {"modality_steer": steer}}
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    commands: dict[str, list[str]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        progress("starting modality-steer serve on the toy model")
        with VllmServer(model, server_args, profile=PROFILE, env=engine_environment()) as server:
            progress(f"server up at {server.base_url}")
            order = [
                arm for _ in range(args.rounds) for arm in ("unsteered", "steered", "steered", "unsteered")
            ]
            for index, arm in enumerate(order):
                out = Path(scratch) / f"{index}-{arm}.json"
                command = bench_command(server.base_url, model, args, arms[arm], out)
                commands.setdefault(arm, command)
                before = steered_counts(server.base_url)
                done = subprocess.run(
                    command, capture_output=True, text=True, check=False, env=engine_environment()
                )
                if done.returncode != 0 or not out.is_file():
                    raise RuntimeError(
                        f"bench serve failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
                    )
                result = json.loads(out.read_text())
                after = steered_counts(server.base_url)
                steered = sum(after[m] - before.get(m, 0.0) for m in after if m != "off")
                # vLLM's client sends one test request first; every request of a steered run is steered.
                if (arm == "steered") != (steered >= args.num_prompts) or (arm == "unsteered" and steered):
                    raise RuntimeError(
                        f"run {index} ({arm}): the server counted {steered:.0f} steered requests"
                    )
                row = {key: result.get(key) for key in KEYS} | {"steered_requests": steered}
                runs[arm].append(row)
                progress(
                    f"run {index} {arm:<9} {row['output_throughput']:.1f} output tok/s, "
                    f"{row['request_throughput']:.2f} req/s, median TTFT {row['median_ttft_ms']:.0f} ms"
                )
    medians = {
        arm: {key: statistics.median(float(r[key]) for r in rows) for key in KEYS}
        for arm, rows in runs.items()
    }
    report = {
        "quick": args.quick,
        "command": command_line(),
        "model": "steer_server/toy/checkpoint",
        "profile": "profiles/toy-llava.json",
        "server_args": server_args,
        "steer": steer,
        "rounds": args.rounds,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "concurrency": args.concurrency,
        "commands": {
            arm: [Path(c).name if c == sys.executable else c for c in cmd] for arm, cmd in commands.items()
        },
        "runs": runs,
        "medians": medians,
        "steered_to_unsteered_output_throughput": medians["steered"]["output_throughput"]
        / medians["unsteered"]["output_throughput"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(medians, indent=2))
    save_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
