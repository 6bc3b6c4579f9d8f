"""Throughput of steered serving against plain vLLM, side by side in one run.

    python benchmarks/throughput.py [--quick] [--repeats 3] [--requests 48] [--max-tokens 32] [--json OUT]

Builds a random-weight LLaVA-architecture bench model (language model of about 150 M parameters), a
profile for it (5% of heads per mode), and prompts with images; then measures output tokens per second
for five arms, with the offline engine and through the HTTP server. Only one engine is alive at a time
(on a few cores two resident engines disturb each other): each repeat starts the two plain engines
and the plugin engine in turn (rotating which goes first), warms each up, and measures its arms:

- plain: vLLM without the plugin (vLLM picks its model runner);
- plain_v1: vLLM without the plugin, on the V1 model runner the plugin selects
  (`VLLM_USE_V2_MODEL_RUNNER=0`): separates the cost of that choice from the cost of the plugin. Where
  vLLM would pick V1 anyway (vLLM's CPU build, whose V2 runner needs Triton with a CPU backend), the two
  plain arms are the same engine started twice, and their ratio shows the engine-to-engine noise;
- idle: plugin loaded, no request steered;
- all: every request steered (image and text heads, default gain);
- mixed: half the requests steered, with four distinct configurations.

Reports medians and the ratios idle/plain, all/plain and mixed/plain, and the same against plain_v1
(JSON and a Markdown table).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ARMS = ("plain", "plain_v1", "idle", "all", "mixed")
MIXED_SPECS = [
    {"follow": "image", "gain": 2.0},
    {"follow": "text", "gain": 0.0},
    {"follow": "image", "gain": 3.0},
    {"follow": "text", "gain": 1.5},
]


def bench_architecture(quick: bool) -> Any:
    from steer_server.toy.model import ToyArchitecture

    if quick:
        return ToyArchitecture(text_hidden=256, text_layers=4, text_heads=4, head_dim=64, text_mlp=512)
    return ToyArchitecture(text_hidden=1024, text_layers=12, text_heads=16, head_dim=64, text_mlp=2816)


def build(folder: Path, quick: bool, requests: int) -> tuple[Path, Path, list[Any], int]:
    from steer_server.data.schema import load_samples
    from steer_server.data.synth import synth_dataset
    from steer_server.toy.model import build_random

    arch = bench_architecture(quick)
    model_dir = build_random(folder / "model", arch, seed=0)
    layers, heads = arch.text_layers, arch.text_heads
    k = max(1, round(0.05 * layers * heads))
    cells = [(layer, head) for layer in range(layers) for head in range(heads)]
    profile = {
        "format": "modality-steer.profile/v1",
        "model": {
            "architecture": "LlavaForConditionalGeneration",
            "num_layers": layers,
            "num_heads": heads,
            "head_dim": arch.head_dim,
        },
        "default_gain": 2.0,
        "modes": {
            "image": {"heads": [{"layer": l_, "head": h, "score": 1.0} for l_, h in cells[::7][:k]]},
            "text": {"heads": [{"layer": l_, "head": h, "score": 1.0} for l_, h in cells[3::7][:k]]},
        },
    }
    profile_path = folder / "profile.json"
    profile_path.write_text(json.dumps(profile))
    paths = synth_dataset(folder / "data", max(240, requests * 10), seed=1)
    samples = [s for s in load_samples(paths["train"]) if s.image_path is not None][:requests]
    lm_params = layers * (4 * arch.text_hidden * arch.text_hidden + 3 * arch.text_hidden * arch.text_mlp)
    return model_dir, profile_path, samples, lm_params


def specs_for(arm: str, count: int) -> list[Any]:
    if arm in ("plain", "plain_v1", "idle"):
        return [None] * count
    if arm == "all":
        return ["image" if i % 2 == 0 else "text" for i in range(count)]
    return [MIXED_SPECS[(i // 2) % len(MIXED_SPECS)] if i % 2 == 0 else None for i in range(count)]


# ---- offline engine: one child process per plugin setting, driven over a pipe ----------------------


def _offline_worker(
    connection: Any,
    model_dir: str,
    profile: str | None,
    env: dict[str, str],
    messages: list[Any],
    max_tokens: int,
    eager: bool,
) -> None:
    os.environ.pop(RUNNER_ENV, None)
    os.environ.update(env)
    if profile:
        os.environ["MODALITY_STEER_PROFILE"] = profile
    else:
        os.environ.pop("MODALITY_STEER_PROFILE", None)
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model_dir,
        dtype="float32",
        max_model_len=256,
        max_num_seqs=16,
        kv_cache_memory_bytes=512 * 2**20,
        enforce_eager=eager,
    )
    connection.send("ready")
    while True:
        command = connection.recv()
        if command is None:
            return
        params = [
            SamplingParams(
                max_tokens=max_tokens,
                temperature=0,
                ignore_eos=True,
                extra_args=None
                if spec is None
                else {"modality_steer": spec if isinstance(spec, str) else json.dumps(spec)},
            )
            for spec in command
        ]
        started = time.perf_counter()
        outputs = llm.chat(messages, params, use_tqdm=False)
        seconds = time.perf_counter() - started
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        connection.send((tokens, seconds))


ENGINE_ARMS = {"plain": ("plain",), "plain_v1": ("plain_v1",), "plugin": ("idle", "all", "mixed")}
RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"
# Only plain_v1 names a runner; the others never inherit the caller's choice.
ENGINE_ENV: dict[str, dict[str, str]] = {"plain": {}, "plain_v1": {RUNNER_ENV: "0"}, "plugin": {}}


def _rotated(items: Sequence[str], repeat: int) -> list[str]:
    # Rotate which engine (and which of an engine's arms) goes first, so that neither a slow drift of the
    # machine nor the position in an engine's life favours one arm.
    shift = repeat % len(items)
    return [*items[shift:], *items[:shift]]


def _engine_order(repeat: int) -> list[str]:
    return _rotated(list(ENGINE_ARMS), repeat)


def _profile_for(engine: str, profile: Path) -> Path | None:
    return profile if engine == "plugin" else None


def offline(
    model_dir: Path, profile: Path, messages: list[Any], repeats: int, max_tokens: int, eager: bool
) -> dict[str, list[float]]:
    """One engine alive at a time (two resident engines disturb each other on a few cores): per repeat,
    start each engine, warm it up, measure its arms, stop it."""
    context = mp.get_context("spawn")
    rates: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for repeat in range(repeats):
        for engine in _engine_order(repeat):
            parent, child = context.Pipe()
            engine_profile = _profile_for(engine, profile)
            process = context.Process(
                target=_offline_worker,
                args=(
                    child,
                    str(model_dir),
                    str(engine_profile) if engine_profile else None,
                    ENGINE_ENV[engine],
                    messages,
                    max_tokens,
                    eager,
                ),
            )
            process.start()
            try:
                if parent.recv() != "ready":
                    raise RuntimeError(f"offline engine {engine} did not start")
                parent.send(specs_for(ENGINE_ARMS[engine][-1], len(messages)))  # warm-up, discarded
                parent.recv()
                for arm in _rotated(ENGINE_ARMS[engine], repeat):
                    parent.send(specs_for(arm, len(messages)))
                    tokens, seconds = parent.recv()
                    rates[arm].append(tokens / seconds)
                    print(f"offline {arm:<8} repeat {repeat}: {tokens / seconds:8.1f} tok/s", flush=True)
            finally:
                parent.send(None)
                process.join(timeout=120)
    return rates


# ---- HTTP: plain vLLM server and `modality-steer serve`, concurrent clients ------------------------


def http(
    model_dir: Path,
    profile: Path,
    messages: list[Any],
    repeats: int,
    max_tokens: int,
    eager: bool,
    concurrency: int,
) -> dict[str, list[float]]:
    from steer_server.serving.launcher import VllmServer

    args = ["--max-model-len", "256", "--max-num-seqs", "16", "--kv-cache-memory-bytes", str(512 * 2**20)]
    args += ["--enforce-eager"] if eager else []
    rates: dict[str, list[float]] = {arm: [] for arm in ARMS}

    def run_arm(server: Any, arm: str) -> float:
        client = server.client()

        def one(item: tuple[Any, Any]) -> int:
            message, spec = item
            extra: dict[str, Any] = {"ignore_eos": True}
            if spec is not None:
                extra["modality_steer"] = spec
            reply = client.chat.completions.create(
                model=str(model_dir), messages=message, max_tokens=max_tokens, temperature=0, extra_body=extra
            )
            return int(reply.usage.completion_tokens)

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            tokens = sum(pool.map(one, zip(messages, specs_for(arm, len(messages)), strict=True)))
        return tokens / (time.perf_counter() - started)

    for repeat in range(repeats):
        for engine in _engine_order(repeat):
            # The later --kv-cache-memory-bytes overrides the launcher's CPU default.
            server = VllmServer(
                model_dir,
                args,
                env={**{k: v for k, v in os.environ.items() if k != RUNNER_ENV}, **ENGINE_ENV[engine]},
                profile=_profile_for(engine, profile),
            )
            with server:
                run_arm(server, ENGINE_ARMS[engine][-1])  # warm-up, discarded
                for arm in _rotated(ENGINE_ARMS[engine], repeat):
                    rate = run_arm(server, arm)
                    rates[arm].append(rate)
                    print(f"http    {arm:<8} repeat {repeat}: {rate:8.1f} tok/s", flush=True)
    return rates


def summarise(rates: dict[str, list[float]]) -> dict[str, Any]:
    medians = {arm: statistics.median(values) for arm, values in rates.items()}
    return {
        "tokens_per_second": rates,
        "median_tokens_per_second": medians,
        "ratios": {
            arm if arm != "all" else "all_steered": medians[arm] / medians["plain"]
            for arm in ("plain_v1", "idle", "all", "mixed")
        },
        "ratios_to_plain_v1": {
            arm if arm != "all" else "all_steered": medians[arm] / medians["plain_v1"]
            for arm in ("idle", "all", "mixed")
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a small model and few requests (smoke run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--eager", action="store_true", help="--enforce-eager for every engine")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from steer_server.data.prompts import openai_messages

    with tempfile.TemporaryDirectory() as scratch:
        model_dir, profile, samples, lm_params = build(Path(scratch), args.quick, args.requests)
        messages = [openai_messages(s) for s in samples]
        print(
            f"bench model: language model {lm_params / 1e6:.0f} M parameters; {len(messages)} prompts with images",
            flush=True,
        )
        result = {
            "language_model_parameters": lm_params,
            "requests": len(messages),
            "max_tokens": args.max_tokens,
            "repeats": args.repeats,
            "eager": args.eager,
            "offline": summarise(
                offline(model_dir, profile, messages, args.repeats, args.max_tokens, args.eager)
            ),
            "http": summarise(
                http(
                    model_dir, profile, messages, args.repeats, args.max_tokens, args.eager, args.concurrency
                )
            ),
        }
    print()
    print(
        "| path | baseline | baseline tok/s | idle / baseline | all steered / baseline | mixed / baseline |"
    )
    print("|---|---|---|---|---|---|")
    for path in ("offline", "http"):
        part = result[path]
        for baseline, key in (("plain", "ratios"), ("plain_v1", "ratios_to_plain_v1")):
            ratios = part[key]
            print(
                f"| {path} | {baseline} | {part['median_tokens_per_second'][baseline]:.1f} | "
                f"{ratios['idle']:.3f} | {ratios['all_steered']:.3f} | {ratios['mixed']:.3f} |"
            )
        print(f"| {path} | plain_v1 / plain | | {part['ratios']['plain_v1']:.3f} | | |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
