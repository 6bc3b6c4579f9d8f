"""head_scale_ benchmark: Triton kernel vs torch eager (index_select + mul_) vs a device-to-device copy of
the same bytes (the bandwidth ceiling), for decode and prefill shapes.

    python benchmarks/kernel_bench.py [--device cuda|cpu] [--json OUT] [--quick]

On CUDA every figure is a median of event-timed repeats (triton.testing.do_bench, which flushes L2
between repeats); decode sizes are also timed as CUDA-graph replays, which is how vLLM runs decode
steps. On CPU only the torch path and the copy run (there is no Triton CPU backend): report ratios there,
not absolute times.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from steer_server.kernels.head_scale import head_scale_torch_, head_scale_triton_

DECODE_TOKENS = (1, 8, 32, 64, 128, 256)
PREFILL_TOKENS = (2048, 4096, 8192, 16384, 32768)
HEAD_SHAPES = {"H32-D128": (32, 128), "Qwen2.5-VL-7B H28-D128": (28, 128)}
SLOTS = 17  # 16 distinct steering configurations in flight, plus row 0


def make_inputs(tokens: int, heads: int, head_dim: int, dtype: torch.dtype, device: str):
    out = torch.randn(tokens, heads * head_dim, device=device).to(dtype)
    # Every token steered (the kernel's worst case: no row is skipped); gains near 1 but never 1, so the
    # data stays random and finite however often the in-place op repeats.
    slot = torch.randint(1, SLOTS, (tokens,), device=device, dtype=torch.int32)
    table = 1.0 + (torch.rand(SLOTS, heads, device=device) - 0.5) * 1e-3
    table[table == 1.0] = 1.0005
    table[0] = 1.0
    return out, slot, table


def time_cuda(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")) * 1e3  # us


def time_cuda_graph(fn: Callable[[], object], calls: int = 100) -> float:
    """Per-call time inside a captured graph of `calls` launches (no Python launch overhead)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return time_cuda(graph.replay) / calls


def time_cpu(fn: Callable[[], object], repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def run(device: str, dtype: torch.dtype, quick: bool) -> dict[str, object]:
    rows = []
    tokens_list = (DECODE_TOKENS[:3] + PREFILL_TOKENS[:2]) if quick else (DECODE_TOKENS + PREFILL_TOKENS)
    for shape_name, (heads, head_dim) in HEAD_SHAPES.items():
        for tokens in tokens_list:
            out, slot, table = make_inputs(tokens, heads, head_dim, dtype, device)
            copy_dst = torch.empty_like(out)
            moved = 2 * out.numel() * out.element_size()  # read + write of the activations
            arms: dict[str, Callable[[], object]] = {
                "torch_eager": lambda out=out, slot=slot, table=table: head_scale_torch_(out, slot, table),
                "copy": lambda out=out, dst=copy_dst: dst.copy_(out),
            }
            if device == "cuda":
                arms["triton"] = lambda out=out, slot=slot, table=table: head_scale_triton_(out, slot, table)
            row: dict[str, object] = {
                "shape": shape_name,
                "tokens": tokens,
                "bytes_moved": moved,
                "phase": "decode" if tokens <= 256 else "prefill",
            }
            for name, fn in arms.items():
                us = time_cuda(fn) if device == "cuda" else time_cpu(fn, repeats=5 if tokens > 4096 else 30)
                row[f"{name}_us"] = us
                row[f"{name}_gbps"] = moved / (us * 1e-6) / 1e9
            if device == "cuda" and tokens <= 256:
                row["triton_graph_us"] = time_cuda_graph(arms["triton"])
            if "triton_us" in row:
                row["triton_vs_copy_bandwidth"] = row["triton_gbps"] / row["copy_gbps"]  # type: ignore[operator]
                row["triton_speedup_vs_torch"] = row["torch_eager_us"] / row["triton_us"]  # type: ignore[operator]
            row["torch_vs_copy_bandwidth"] = row["torch_eager_gbps"] / row["copy_gbps"]  # type: ignore[operator]
            rows.append(row)
            print(_line(row), flush=True)
    device_name = (
        torch.cuda.get_device_name(0)
        if device == "cuda"
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    return {
        "platform": device,
        "device": device_name,
        "dtype": str(dtype),
        "torch": torch.__version__,
        "quick": quick,
        "rows": rows,
    }


def _line(row: dict[str, object]) -> str:
    parts = [f"{row['shape']:<24} T={row['tokens']:<6}"]
    for key in ("triton_us", "triton_graph_us", "torch_eager_us", "copy_us"):
        if key in row:
            parts.append(f"{key}={row[key]:.2f}")
    for key in ("triton_vs_copy_bandwidth", "triton_speedup_vs_torch", "torch_vs_copy_bandwidth"):
        if key in row:
            parts.append(f"{key}={row[key]:.2f}")
    return "  ".join(parts)


def markdown(result: dict[str, object]) -> str:
    rows = result["rows"]
    assert isinstance(rows, list)
    cuda = "triton_us" in rows[0]
    head = (
        "| shape | T | "
        + ("Triton us | Triton in graph us | " if cuda else "")
        + "torch eager us | copy us | "
    )
    head += "Triton GB/s / copy GB/s | Triton speed-up vs torch |" if cuda else "torch GB/s / copy GB/s |"
    lines = [
        f"Device: {result['device']}, {result['dtype']}.",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for row in rows:
        cells = [str(row["shape"]), str(row["tokens"])]
        if cuda:
            cells += [
                f"{row['triton_us']:.2f}",
                f"{row['triton_graph_us']:.2f}" if "triton_graph_us" in row else "-",
            ]
        cells += [f"{row['torch_eager_us']:.2f}", f"{row['copy_us']:.2f}"]
        if cuda:
            cells += [f"{row['triton_vs_copy_bandwidth']:.2f}", f"{row['triton_speedup_vs_torch']:.2f}"]
        else:
            cells += [f"{row['torch_vs_copy_bandwidth']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--json", type=Path, help="write the full results here")
    parser.add_argument("--quick", action="store_true", help="fewer sizes (a smoke run)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    result = run(args.device, dtype, args.quick)
    print()
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
