"""Write benchmarks/RESULTS.md from the JSON files the benchmarks wrote (every figure comes from a run).

    python benchmarks/report.py [--dir benchmarks] [--out benchmarks/RESULTS.md]

Reads, where present (a missing file leaves its section saying so):

- ``plugin_cost.json``   `throughput.py --part cost` (in-process shares, configurations sweep);
- ``engine_ab.json``     `throughput.py --part ab` (engines side by side, A/A arm);
- ``bench_serve.json``   `bench_serve.py` (`vllm bench serve` against the toy server);
- ``analysis_scaling.json`` `analysis_scaling.py`;
- ``analysis_speedup.json``, ``analysis_speedup_defaults.json`` `analysis_speedup.py` (the analysis before and
  after a change, at the reduced settings and at the defaults);
- ``kernel_bench.json``  `kernel_bench.py` on a CUDA GPU (its GPU section), ``kernel_bench_cpu.json`` on CPU;
- ``load.json``          the load test of `make bench`.

The summary block at the top is for scripts: one line per figure, ``name: value [low, high]`` (see
:data:`SUMMARY_FORMAT`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SUMMARY_FORMAT = (
    "Each line of the block below is `name: value [low, high]`: a ratio of throughputs (1 = the plugin "
    "costs nothing), five decimals, with its 95% interval (seeded, paired BCa bootstrap over interleaved "
    "repeats, `steer_server.stats.bootstrap`); `n/a [n/a, n/a]` where it was not measured. A script reads "
    r"it with the regular expression `^(\w+): (\S+) \[(\S+), (\S+)\]$`."
)
# Targets of issue #19 (CPU): throughput ratios, lower bounds.
TARGETS = {"plugin_idle": 0.995, "all_steered": 0.98, "mixed": 0.98, "configs_16": 0.95}
FULL_GRAPH_NOTE = (
    "What runs in a step besides the model (by construction, not measured here): in eager and piecewise-graph "
    "steps the kernel runs only when a token of the step is steered, and an unsteered step after a steered one "
    "clears the slot map once. A FULL CUDA graph (vLLM's decode graphs on GPU) replays the head_scale kernel on "
    "every steered layer for the padded batch, steered or not; it reads the slot-map buffer the plugin fills "
    "before the step and the gain table, and tokens whose gain is 1 (slot 0: unsteered requests and padding) "
    "are neither read nor written."
)


def load(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def fmt(value: float | None, digits: int = 5) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def summary_line(name: str, estimate: dict[str, Any] | None) -> str:
    if not estimate:
        return f"{name}: n/a [n/a, n/a]"
    low, high = estimate["ci95"]
    return f"{name}: {fmt(estimate['value'])} [{fmt(low)}, {fmt(high)}]"


def interval(estimate: dict[str, Any] | None, digits: int = 4) -> str:
    """``0.9995 [0.9993, 0.9997]``."""
    if not estimate or estimate["value"] is None:
        return "n/a"
    low, high = estimate["ci95"]
    return f"{fmt(estimate['value'], digits)} [{fmt(low, digits)}, {fmt(high, digits)}]"


def verdict(name: str, estimate: dict[str, Any] | None) -> str:
    """Whether the target holds: on the point estimate, and whether the whole interval clears it."""
    target = TARGETS.get(name)
    if target is None or not estimate or estimate["value"] is None:
        return ""
    low = estimate["ci95"][0]
    if low is not None and low >= target:
        return f">= {target}: met (whole interval)"
    return f">= {target}: {'met (point estimate)' if estimate['value'] >= target else 'missed'}"


def provenance(data: dict[str, Any], command: str) -> str:
    """The run's command line (as recorded, else `command`) and a warning for quick runs."""
    quick = " **Quick (smoke) run: settings too small for conclusions.**" if data.get("quick") else ""
    return f"Run: `{data.get('command') or command}`.{quick}"


def machine_line(data: dict[str, Any]) -> str:
    m = data.get("machine") or {}
    return f"Machine: {m.get('cpus', '?')} CPUs ({m.get('processor', '?')}), torch {m.get('torch', '?')}, vLLM {m.get('vllm', '?')}."


# ---- sections ----------------------------------------------------------------------------------------


def section_cost(cost: dict[str, Any] | None) -> list[str]:
    out = ["## 1. The plugin's own cost, measured in one process (`throughput.py --part cost`)", ""]
    if cost is None:
        return [*out, "Not measured (no `plugin_cost.json`).", ""]
    arms = cost["summary"]["arms"]
    model = cost["model"]
    out += [
        provenance(cost, f"python benchmarks/throughput.py --part cost --repeats {cost['repeats']}")
        + " "
        + machine_line(cost),
        "",
        f"Bench model: random-weight LLaVA, language model {model['lm_parameters'] / 1e6:.0f} M parameters "
        f"({model['layers']} layers x {model['heads']} heads), float32, {'compiled' if cost['compiled'] else 'eager'}; "
        f"{cost['requests']} chat requests with images x {cost['max_tokens']} output tokens per arm, max_num_seqs "
        f"{cost['max_num_seqs']}; {cost['repeats']} interleaved repeats per arm (rotated order, after a warm-up "
        f"pass). The plugin steers {cost['install']['steered_layers']} of {model['layers']} layers. The offline "
        "engine runs with `VLLM_ENABLE_V1_MULTIPROCESSING=0`, so the model runner lives in the measuring "
        "process; the plugin's hooks are timed from the outside (`benchmarks/accounting.py`): the slot fill "
        "(`WorkerSteering.begin_step`) and the release inside the plugin's `_prepare_inputs` / "
        "`_update_states` wrappers, and the attention wrapper minus the backend forward it calls (the "
        "head-scaling kernel included), against the runner's step time (`execute_model` + `sample_tokens`). "
        f"The timers' own overhead (about {cost['timer_overhead_us']:.2f} us per timed call) is counted as the "
        "plugin's: the shares are upper bounds.",
        "",
        "| arm | plugin us / step | step ms | plugin share of step time | throughput ratio (1 - share) [95% CI] | target |",
        "|---|---|---|---|---|---|",
    ]
    names = {"idle": "plugin_idle", "all_steered": "all_steered", "mixed": "mixed"}
    labels = {
        "idle": "idle (plugin loaded, nothing steered)",
        "all_steered": "all steered (image / text heads)",
        "mixed": "mixed (half steered, 4 configurations)",
    }
    for arm, label in labels.items():
        row = arms[arm]
        share = row["plugin_share"]["value"]
        out.append(
            f"| {label} | {fmt(row['plugin_us_per_step'], 1)} | {fmt(row['step_ms'], 1)} | "
            f"{fmt(100 * share, 3)}% | {interval(row['throughput_ratio'], 5)} | {verdict(names[arm], row['throughput_ratio'])} |"
        )
    out += [
        "",
        "Where the plugin's time goes (us per step; the wrappers' figures include what they call):",
        "",
        "| arm | `_prepare_inputs` hook | of it: slot fill | `_update_states` hook | of it: release | attention wrappers | of it: kernel | attention wrapper us / call | null wrapper us / call |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        b = arms[arm]["breakdown_us_per_step"]
        out.append(
            f"| {arm} | {fmt(b['hook.prepare_inputs'], 1)} | {fmt(b['steer.begin_step'], 1)} | "
            f"{fmt(b['hook.update_states'], 1)} | {fmt(b['steer.release'], 1)} | {fmt(b['hook.attention'], 1)} | "
            f"{fmt(b['attention.kernel'], 1)} | {fmt(arms[arm].get('attention_us_per_call'), 2)} | "
            f"{fmt(arms[arm].get('null_wrapper_us_per_call'), 2)} |"
        )
    out += [
        "",
        f"Each step calls the attention wrapper once per steered layer "
        f"({fmt(next(iter(arms.values()))['attention_calls_per_step'], 0)} calls). The null wrapper is the "
        "method's floor: a wrapper that only calls the backend, on the layers the plugin leaves alone, timed "
        "the same way; the plugin's per-call figure above it is the plugin's own work.",
    ]
    return [*out, ""]


def section_sweep(cost: dict[str, Any] | None) -> list[str]:
    out = ["## 2. Distinct steering configurations in one batch (same process, same engine)", ""]
    if cost is None:
        return [*out, "Not measured (no `plugin_cost.json`).", ""]
    sweep = cost["summary"]["sweep"]
    arms = cost["summary"]["arms"]
    counts = cost["sweep_counts"]
    out += [
        f"Every request steered, its configuration one of N distinct gains (N = 0: nothing steered); "
        f"{cost['requests']} requests, max_num_seqs {cost['max_num_seqs']}, so the whole batch is scheduled "
        "together and the last row holds as many configurations as the engine schedules sequences. Wall-clock "
        "throughput ratio to one configuration (paired per repeat), and the same ratio implied by the "
        "plugin's measured share of step time (less noisy).",
        "",
        "| configurations | median tok/s | wall throughput / 1 configuration [95% CI] | plugin share | from plugin shares [95% CI] |",
        "|---|---|---|---|---|",
    ]
    for n in counts:
        arm = "idle" if n == 0 else f"configs_{n}"
        out.append(
            f"| {n} | {fmt(arms[arm]['median_tokens_per_s'], 1)} | {interval(sweep['wall_ratio_to_1'][str(n)])} | "
            f"{fmt(100 * arms[arm]['plugin_share']['value'], 3)}% | {interval(sweep['share_ratio_to_1'][str(n)], 5)} |"
        )
    top = counts[-1]
    wall = sweep["wall_ratio_to_1"][str(top)]
    shares = sweep["share_ratio_to_1"][str(top)]
    sixteen = sweep["wall_ratio_to_1"].get("16")
    out += [
        "",
        f"Where this design stands: with {top} distinct configurations in one batch, throughput is "
        f"{fmt(wall['value'], 3)} of one configuration's by the wall clock ({fmt(shares['value'], 4)} by the "
        "plugin's own time); the tool issue #19 measures against loses 80% of its throughput at 256 "
        "configurations (measuring 256 here takes max_num_seqs 256: `throughput.py --part cost --requests 256`). "
        "The gain tables keep one row per distinct configuration scheduled in the step "
        "(`WorkerSteering`), so a configuration costs one row write when it first appears, not work per token. "
        + (f"Target at 16 configurations: {verdict('configs_16', sixteen)}." if sixteen else ""),
        "",
    ]
    return out


def section_ab(ab: dict[str, Any] | None) -> list[str]:
    out = ["## 3. Engines side by side (`throughput.py --part ab`)", ""]
    if ab is None:
        return [*out, "Not measured (no `engine_ab.json`).", ""]
    ratios = ab["ratios_to_plain_a"]
    med = ab["median_tokens_per_second"]
    out += [
        provenance(ab, f"python benchmarks/throughput.py --part ab --repeats {ab['repeats']}")
        + " "
        + machine_line(ab),
        "",
        f"Same bench model and requests ({ab['requests']} x {ab['max_tokens']} tokens, max_num_seqs "
        f"{ab['max_num_seqs']}); one engine alive at a time, each in its own process; per repeat the three "
        "engines start in rotated order, warm up and measure their arms. `plain_b` is the same plain engine as "
        "`plain_a`, started again: the A/A arm, whose interval is the resolution of this comparison on this "
        "machine. Ratios of mean throughput to `plain_a`, paired per repeat. These engines run vLLM's usual "
        "process layout (the engine core in its own process), so their tokens per second differ from "
        "section 1's single process.",
        "",
        "| arm | median tok/s | ratio to plain_a [95% CI] |",
        "|---|---|---|",
        f"| plain_a | {fmt(med['plain_a'], 1)} | 1 |",
    ]
    for arm, label in (
        ("plain_b", "plain_b (A/A: the same engine)"),
        ("idle", "plugin, idle"),
        ("all_steered", "plugin, all steered"),
        ("mixed", "plugin, mixed"),
    ):
        out.append(f"| {label} | {fmt(med[arm], 1)} | {interval(ratios[arm])} |")
    starts = ab.get("engine_start_s") or {}
    if starts:
        out += ["", "Engine start (median s): " + ", ".join(f"{k} {v:.0f}" for k, v in starts.items()) + "."]
    return [*out, ""]


def section_serve(serve: dict[str, Any] | None) -> list[str]:
    out = ["## 4. `vllm bench serve` against the toy server (`bench_serve.py`)", ""]
    if serve is None:
        return [*out, "Not measured (no `bench_serve.json`).", ""]
    steer = json.dumps({"modality_steer": serve["steer"]})
    med = serve["medians"]
    out += [
        provenance(serve, f"python benchmarks/bench_serve.py --rounds {serve['rounds']}"),
        "",
        f"`modality-steer serve steer_server/toy/checkpoint --profile profiles/toy-llava.json "
        f"{' '.join(serve['server_args'])}` (float32, 256 MiB KV cache); vLLM's client, "
        f"{serve['num_prompts']} random prompts of {serve['input_len']} tokens x {serve['output_len']} output tokens, "
        f"{serve['concurrency']} in flight, steered runs with `--extra-body '{steer}'`; "
        f"{serve['rounds']} ABBA round(s) (medians):",
        "",
        "| run | output tok/s | requests/s | median TTFT ms | median TPOT ms | completed | failed | steered (server count, all runs) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in ("unsteered", "steered"):
        m = med[arm]
        steered = sum(r.get("steered_requests", 0) for r in serve["runs"][arm])
        out.append(
            f"| {arm} | {m['output_throughput']:.1f} | {m['request_throughput']:.2f} | {m['median_ttft_ms']:.0f} | "
            f"{m['median_tpot_ms']:.1f} | {m['completed']:.0f} | {m['failed']:.0f} | {steered:.0f} |"
        )
    out += [
        "",
        f"Steered / unsteered output throughput: {serve['steered_to_unsteered_output_throughput']:.3f} (a 5.8 M "
        "model on CPU, where HTTP and scheduling dominate; section 1 is the plugin's cost).",
        "",
    ]
    return out


def section_analysis(scaling: dict[str, Any] | None) -> list[str]:
    out = ["## 5. The analysis' cost at three model sizes (`analysis_scaling.py`)", ""]
    if scaling is None:
        return [*out, "Not measured (no `analysis_scaling.json`).", ""]
    sizes = scaling["sizes"]
    first = sizes[0]["settings"]
    out += [
        provenance(scaling, "python benchmarks/analysis_scaling.py"),
        "",
        f"`modality-steer analyze` on CPU, each size in its own process: heads selected on {scaling['limit']} "
        f"samples of the synthetic validation split, validated on {scaling['limit']} of the test split "
        f"(`--limit {scaling['limit']} --top-frac {first['top_frac']} --random-draws {first['random_draws']} "
        f"--knockout-samples {first['knockout_samples']} --batch-size {first['batch_size']}`). Peak memory: the "
        "analysis process's maximum resident set. F and B: forwards and backwards of one sample's prompt, "
        "counted by `analysis_scaling.forward_equivalents` from the settings, the data and the layers of the "
        "heads the run intervened on (attribution 1 F + 1 B per conflict; a scored pass forwards only the "
        "samples it scores; a setting's first answer token costs the share of the decoder layers from its "
        "first changed layer on, and for the knockout's cuts also only the positions from the cut group's "
        "first on; each further greedy answer token 1 F; exact ablation scores the first token only). Their "
        "unit times are measured with the analysis' own code (`Runner.score`, `attribution`) on a batch of the same "
        "samples; F x ms/F + B x ms/B is the compute-only prediction, shown against the measured time. The last "
        "column divides the measured time by the forward-equivalents (a backward counted as its measured "
        "time in forwards): everything the analysis spends (loading, encoding, Python) per forward-equivalent.",
        "",
        "| model | LM parameters | layers x heads | conflict samples | analysis s | conflict samples / s | peak RSS MiB | F / conflict | B / conflict | ms / F | ms / B | compute-only prediction s (/ measured) | measured per forward-equivalent |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in sizes:
        c = s["cost_model"]
        out.append(
            f"| {s['size']} | {s['lm_parameters'] / 1e6:.1f} M | {s['layers']} x {s['heads']} | {s['conflict_samples']} | "
            f"{s['analysis_s']:.0f} | {s['samples_per_second']:.3f} | {s['peak_rss_mib']:.0f} | "
            f"{c['run_per_conflict']['F']:.0f} | {c['run_per_conflict']['B']:.1f} | {1e3 * s['forward_s']:.1f} | "
            f"{1e3 * s['backward_s']:.1f} | {c['predicted_s']:.0f} ({c['predicted_over_measured']:.2f}) | "
            f"{1e3 * c['measured_per_forward_equivalent_s']:.1f} ms |"
        )
    out += [
        "",
        "At the analysis' default settings (`--top-frac 0.05`, 5 random draws, 128 knockout samples, batch 32; "
        "same data), the cost model and the measured time per forward-equivalent give:",
        "",
        "| model | F / conflict | B / conflict | predicted conflict samples / s |",
        "|---|---|---|---|",
    ]
    for s in sizes:
        c = s["cost_model"]
        out.append(
            f"| {s['size']} | {c['defaults_per_conflict']['F']:.0f} | {c['defaults_per_conflict']['B']:.1f} | "
            f"{c['defaults_predicted_samples_per_second']:.3f} |"
        )
    out += [
        "",
        "Stages at the measured settings (F, all sizes):",
        "",
        "| model | " + " | ".join(k for k in sizes[0]["cost_model"]["run"] if k != "total") + " |",
        "|---|" + "---|" * (len(sizes[0]["cost_model"]["run"]) - 1),
    ]
    for s in sizes:
        run = s["cost_model"]["run"]
        out.append(
            f"| {s['size']} | "
            + " | ".join(
                f"{v['F']:.0f} F" + (f" + {v['B']:.0f} B" if v["B"] else "")
                for k, v in run.items()
                if k != "total"
            )
            + " |"
        )
    return [*out, ""]


def section_speedup(speedup: dict[str, Any] | None, which: str = "at the reduced settings") -> list[str]:
    out = [f"### Before and after, side by side, {which} (`analysis_speedup.py`)", ""]
    if speedup is None:
        return [*out, "Not measured (no `analysis_speedup.json`).", ""]
    out += [
        provenance(speedup, "python benchmarks/analysis_speedup.py"),
        "",
        f"The analysis at revision `{speedup['baseline']}` (baseline) and at this revision (current), "
        f"alternately in fresh processes, {speedup['repeats']} runs each per size, same models, data and "
        f"settings (`{' '.join(speedup['settings'])}`). Time: the analysis' own (`provenance.seconds`); the "
        "ratio is the geometric mean of the paired ratios with a 95% t interval. F / conflict: each "
        "revision's own cost model, at these settings and at the defaults. Profile: the same heads and default "
        "gain, and the largest difference of any figure (timings aside).",
        "",
        "| model | LM parameters | baseline s | current s | time ratio (95% CI) | F / conflict (baseline → current) | at the defaults | same heads and gain | largest figure difference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in speedup["sizes"]:
        ratio, cost = s["time_ratio_baseline_over_current"], s["forward_equivalents_per_conflict"]
        spread = f" ({ratio['low']:.2f}-{ratio['high']:.2f})" if ratio["low"] is not None else ""
        out.append(
            f"| {s['size']} | {s['lm_parameters'] / 1e6:.1f} M | "
            + " / ".join(f"{x:.0f}" for x in s["seconds"]["baseline"])
            + " | "
            + " / ".join(f"{x:.0f}" for x in s["seconds"]["current"])
            + f" | {ratio['value']:.2f}x{spread} | {cost['baseline']['run']['F']:.1f} → {cost['current']['run']['F']:.1f} "
            f"({cost['baseline']['run']['F'] / cost['current']['run']['F']:.1f}x) | "
            f"{cost['baseline']['defaults']['F']:.1f} → {cost['current']['defaults']['F']:.1f} "
            f"({cost['baseline']['defaults']['F'] / cost['current']['defaults']['F']:.1f}x) | "
            f"{'yes' if s['same_heads_and_gain'] else 'no: ' + ', '.join(s['differences'][:3])} | "
            f"{s['max_figure_difference']:.1g} |"
        )
    return [*out, ""]


def gpu_kernel_runs(folder: Path) -> dict[str, Any] | None:
    """`kernel_bench.json` and any `kernel_bench_gpu_run*.json` beside it (repeated runs on the same GPU),
    combined: each row's figures are the median over the runs (each run's figures are medians of its
    repeats); `runs` says how many. None without a CUDA run."""
    runs = [load(folder, "kernel_bench.json")] + [
        load(folder, path.name) for path in sorted(folder.glob("kernel_bench_gpu_run*.json"))
    ]
    runs = [r for r in runs if r is not None and r.get("platform") == "cuda"]
    if not runs:
        return None
    combined = dict(runs[0])
    rows = []
    for index, row in enumerate(runs[0]["rows"]):
        same = [run["rows"][index] for run in runs if run["device"] == runs[0]["device"]]
        merged = dict(row)
        for key, value in row.items():
            if isinstance(value, float):
                merged[key] = statistics.median(r[key] for r in same)
        rows.append(merged)
    combined["rows"], combined["runs"] = rows, len(runs)
    return combined


def section_kernel(gpu: dict[str, Any] | None, cpu: dict[str, Any] | None, folder: Path) -> list[str]:
    out = ["## 6. The head_scale_ kernel (`kernel_bench.py`)", ""]
    on_gpu = gpu is not None and (
        gpu.get("platform") == "cuda" or "triton_us" in (gpu.get("rows") or [{}])[0]
    )
    if on_gpu and gpu is not None:
        out += [
            f"GPU: **{gpu['device']}**, {gpu['dtype']}, torch {gpu.get('torch', '?')} "
            "(`python benchmarks/kernel_bench.py --device cuda --json benchmarks/kernel_bench.json`). Medians of "
            f"event-timed repeats, then the median over {gpu.get('runs', 1)} run(s) of the benchmark; decode sizes "
            "also as CUDA-graph replays. Targets: at least 85% of copy "
            "bandwidth and 2x torch eager at prefill sizes, at most 5 us per call at decode sizes.",
            "",
            "| shape | T | Triton us | Triton in graph us | torch eager us | copy us | Triton GB/s / copy GB/s | Triton speed-up vs torch |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in gpu["rows"]:
            graph = f"{r['triton_graph_us']:.2f}" if "triton_graph_us" in r else "-"
            out.append(
                f"| {r['shape']} | {r['tokens']} | {r['triton_us']:.2f} | {graph} | {r['torch_eager_us']:.2f} | "
                f"{r['copy_us']:.2f} | {r['triton_vs_copy_bandwidth']:.2f} | {r['triton_speedup_vs_torch']:.2f} |"
            )
        prefill = [r for r in gpu["rows"] if r["phase"] == "prefill"]
        decode = [r for r in gpu["rows"] if "triton_graph_us" in r]
        if prefill and decode:
            bandwidth = sorted(r["triton_vs_copy_bandwidth"] for r in prefill)
            speedup = sorted(r["triton_speedup_vs_torch"] for r in prefill)
            graph = max(r["triton_graph_us"] for r in decode)
            eager = sorted(r["triton_us"] for r in decode)
            out += [
                "",
                f"Against the targets: at prefill sizes ({len(prefill)} rows, T >= 2048) the kernel moves "
                f"{bandwidth[len(bandwidth) // 2]:.2f} of copy bandwidth (median; lowest {bandwidth[0]:.2f}, "
                f"{sum(b >= 0.85 for b in bandwidth)} of {len(bandwidth)} rows at >= 0.85) and is "
                f"{speedup[len(speedup) // 2]:.1f}x torch eager (median; lowest {speedup[0]:.1f}x). At decode sizes "
                f"a call replayed in a CUDA graph (how vLLM runs decode steps) takes at most {graph:.2f} us "
                f"(target 5 us); launched eagerly from Python it takes {eager[0]:.1f}-{eager[-1]:.1f} us, the "
                "launch itself (event timing includes the host's launch gap for such small kernels).",
            ]
        tests = folder / "cuda_tests.log"
        if tests.is_file():
            lines = tests.read_text().splitlines()
            summary = next((line for line in reversed(lines) if " passed" in line), "no summary line")
            out += [
                "",
                f"CUDA tests on the same GPU (`cuda_tests.log`: {lines[0] if lines else ''}): "
                f"`python -m pytest --noconftest tests/test_kernel.py tests/test_gpu_path.py -k 'not worker'`: "
                f"{summary.strip('= ')}. The skipped cases run Triton on CPU tensors (interpreter only).",
            ]
    else:
        out += [
            "GPU figures: not yet measured (no `benchmarks/kernel_bench.json` from a CUDA GPU). On a GPU machine: "
            "`python benchmarks/kernel_bench.py --device cuda --json benchmarks/kernel_bench.json`, then "
            "`python benchmarks/report.py`."
        ]
    out += ["", FULL_GRAPH_NOTE, ""]
    if cpu is not None:
        out += [
            f"CPU (the torch path, where serving runs here; {cpu['device']}, {cpu['dtype']}): time ratios only.",
            "",
            "| shape | T | torch path us | copy us | torch path / copy, time |",
            "|---|---|---|---|---|",
        ]
        for r in cpu["rows"]:
            out.append(
                f"| {r['shape']} | {r['tokens']} | {r['torch_eager_us']:.1f} | {r['copy_us']:.1f} | "
                f"{r['torch_eager_us'] / r['copy_us']:.1f}x |"
            )
        out.append("")
    return out


def section_load(load_: dict[str, Any] | None) -> list[str]:
    out = ["## 7. Load (`tests/test_hardening.py -k concurrent_mixed_load`)", ""]
    if load_ is None:
        return [*out, "Not measured (no `load.json`).", ""]
    rss = load_["rss_mib"]
    return [
        *out,
        f"{load_['requests_per_wave']} concurrent requests of mixed steering per wave, {load_['waves']} waves, "
        "against one server (the tests' tiny 2-layer LLaVA, eager); every request completed and equalled the "
        "same request sent alone; no slot left held.",
        "",
        "| p50 latency | p99 latency | server RSS before / after wave 1 / after wave 2 |",
        "|---|---|---|",
        f"| {load_['latency_p50_s']:.3f} s | {load_['latency_p99_s']:.3f} s | {' / '.join(str(r) for r in rss)} MiB |",
        "",
    ]


def render(folder: Path) -> str:
    cost = load(folder, "plugin_cost.json")
    ab = load(folder, "engine_ab.json")
    arms = cost["summary"]["arms"] if cost else {}
    sweep = cost["summary"]["sweep"]["wall_ratio_to_1"] if cost else {}
    ab_ratios = ab["ratios_to_plain_a"] if ab else {}
    lines = [
        summary_line("plugin_idle", arms.get("idle", {}).get("throughput_ratio")),
        summary_line("all_steered", arms.get("all_steered", {}).get("throughput_ratio")),
        summary_line("mixed", arms.get("mixed", {}).get("throughput_ratio")),
        *(summary_line(f"configs_{n}", sweep[n]) for n in sweep if n != "1"),
        summary_line("ab_aa", ab_ratios.get("plain_b")),
        summary_line("ab_plugin_idle", ab_ratios.get("idle")),
        summary_line("ab_all_steered", ab_ratios.get("all_steered")),
        summary_line("ab_mixed", ab_ratios.get("mixed")),
    ]
    head = [
        "# Benchmark results",
        "",
        f"Written by `benchmarks/report.py` ({time.strftime('%Y-%m-%d')}) from the JSON files of the runs "
        "(`make bench`); every figure below comes from them. Do not edit by hand: rerun the benchmark, then "
        "`python benchmarks/report.py`.",
        "",
        "## Summary",
        "",
        SUMMARY_FORMAT,
        "",
        "`plugin_idle`, `all_steered`, `mixed`: 1 - the plugin's share of the model runner's step time, measured "
        "in one process (section 1). `configs_N`: wall-clock throughput with N distinct configurations in the "
        "batch over one configuration (section 2; N = 0: nothing steered). `ab_*`: throughput of a separately "
        "started engine over the plain engine `plain_a` (section 3); `ab_aa` is a second plain engine.",
        "",
        "```text",
        *lines,
        "```",
        "",
    ]
    body = [
        *section_cost(cost),
        *section_sweep(cost),
        *section_ab(ab),
        *section_serve(load(folder, "bench_serve.json")),
        *section_analysis(load(folder, "analysis_scaling.json")),
        *section_speedup(load(folder, "analysis_speedup.json")),
        *section_speedup(load(folder, "analysis_speedup_defaults.json"), "at the analysis' defaults"),
        *section_kernel(gpu_kernel_runs(folder), load(folder, "kernel_bench_cpu.json"), folder),
        *section_load(load(folder, "load.json")),
    ]
    return "\n".join(head + body).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dir", type=Path, default=HERE, help="folder of the JSON files (default: benchmarks/)"
    )
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md", help="Markdown file to write")
    args = parser.parse_args()
    args.out.write_text(render(args.dir))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
