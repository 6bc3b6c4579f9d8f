"""The benchmarks' shared material: random-weight LLaVA bench models, a profile for them, and prompts.

Imported by the scripts beside it (``python benchmarks/<script>.py`` puts this folder on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The language model of each named size (the vision tower is the toy's). `bench` is the throughput
# benchmark's model (154 M parameters in the language model), `quick` a small stand-in for smoke runs,
# `large` the ~500 M model of the analysis scaling.
SIZES: dict[str, dict[str, int]] = {
    "quick": {"text_hidden": 256, "text_layers": 4, "text_heads": 4, "head_dim": 64, "text_mlp": 512},
    "bench": {"text_hidden": 1024, "text_layers": 12, "text_heads": 16, "head_dim": 64, "text_mlp": 2816},
    "large": {"text_hidden": 1536, "text_layers": 18, "text_heads": 24, "head_dim": 64, "text_mlp": 4096},
}
DEFAULT_GAIN = 2.0


@dataclass(frozen=True)
class BenchModel:
    """A built bench model: checkpoint folder, profile, and its language model's size."""

    model_dir: Path
    profile: Path
    layers: int
    heads: int
    head_dim: int
    lm_parameters: int


def lm_parameters(size: dict[str, int]) -> int:
    """Parameters of the language model's decoder layers (attention and MLP weights; the toy vocabulary's
    embeddings are negligible)."""
    hidden, mlp = size["text_hidden"], size["text_mlp"]
    attention = 2 * hidden * size["text_heads"] * size["head_dim"] * 2  # q, o and k, v (no GQA)
    return size["text_layers"] * (attention + 3 * hidden * mlp)


def write_profile(path: Path, layers: int, heads: int, head_dim: int, top_frac: float = 0.05) -> Path:
    """A profile for a random model: `top_frac` of the heads per mode, spread over the layers (image heads
    every 7th cell from the first, text heads every 7th from the fourth), default gain 2."""
    k = max(1, round(top_frac * layers * heads))
    cells = [(layer, head) for layer in range(layers) for head in range(heads)]
    profile = {
        "format": "modality-steer.profile/v1",
        "model": {
            "architecture": "LlavaForConditionalGeneration",
            "num_layers": layers,
            "num_heads": heads,
            "head_dim": head_dim,
        },
        "default_gain": DEFAULT_GAIN,
        "modes": {
            "image": {"heads": [{"layer": la, "head": h, "score": 1.0} for la, h in cells[::7][:k]]},
            "text": {"heads": [{"layer": la, "head": h, "score": 1.0} for la, h in cells[3::7][:k]]},
        },
    }
    path.write_text(json.dumps(profile))
    return path


def build_model(folder: Path, size_name: str, *, seed: int = 0) -> BenchModel:
    """Build (or reuse, when `folder` already holds it) the random LLaVA of `size_name` and its profile."""
    from steer_server.toy.model import ToyArchitecture, build_random

    size = SIZES[size_name]
    model_dir = folder / "model"
    marker = folder / "model.complete"  # written last: a build cut short is never reused
    folder.mkdir(parents=True, exist_ok=True)
    if not marker.is_file() or json.loads(marker.read_text()) != size:
        shutil.rmtree(model_dir, ignore_errors=True)
        started = time.perf_counter()
        build_random(model_dir, ToyArchitecture(**size), seed=seed)
        marker.write_text(json.dumps(size) + "\n")
        progress(
            f"built the {size_name} model ({lm_parameters(size) / 1e6:.0f} M) in {time.perf_counter() - started:.0f} s"
        )
    profile = write_profile(
        folder / "profile.json", size["text_layers"], size["text_heads"], size["head_dim"]
    )
    return BenchModel(
        model_dir, profile, size["text_layers"], size["text_heads"], size["head_dim"], lm_parameters(size)
    )


def image_messages(folder: Path, count: int, *, seed: int = 1) -> list[Any]:
    """`count` OpenAI chat conversations with an image each (synthetic conflict samples)."""
    from steer_server.data.prompts import openai_messages
    from steer_server.data.schema import load_samples
    from steer_server.data.synth import synth_dataset

    paths = synth_dataset(folder / "data", max(240, count * 10), seed=seed)
    samples = [s for s in load_samples(paths["train"]) if s.image_path is not None][:count]
    if len(samples) < count:
        raise RuntimeError(f"the synthetic data gave {len(samples)} prompts with images, {count} wanted")
    return [openai_messages(s) for s in samples]


def engine_environment() -> dict[str, str]:
    """This process's environment for an engine: no Triton interpreter switch (a developer's shell may
    carry it) and no steering settings of the caller."""
    return {
        k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("MODALITY_STEER_")
    }


def command_line() -> str:
    """This run's command line, as it would be typed in the repository root (for the report)."""
    import shlex
    import sys

    script = Path(sys.argv[0])
    shown = f"benchmarks/{script.name}" if script.parent.name == "benchmarks" else str(script)
    return " ".join(["python", shown, *(shlex.quote(a) for a in sys.argv[1:])])


def progress(message: str) -> None:
    """One line of progress on stdout, flushed, with the wall-clock time."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def save_report(path: Path | None, report: dict[str, Any]) -> None:
    """Write a benchmark's results as indented JSON to `path` (None: nowhere) and say so."""
    if path is not None:
        path.write_text(json.dumps(report, indent=2) + "\n")
        progress(f"wrote {path}")
