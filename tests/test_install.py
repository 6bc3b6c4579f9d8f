"""The installed stack: the console script, `doctor`, and the `kernels` name left to its owner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = Path(sys.executable).parent / "modality-steer"


def test_doctor_reports_the_stack():
    done = subprocess.run(
        [str(CONSOLE_SCRIPT), "doctor"], capture_output=True, text=True, check=True, timeout=120
    )
    facts = dict(
        (key.strip(), value.strip())
        for key, _, value in (line.partition("  ") for line in done.stdout.splitlines())
    )
    assert facts["vllm version"] == "0.32.0"
    for package in ("torch", "torchvision", "transformers", "triton"):
        assert facts[f"{package} version"][0].isdigit(), facts
    assert facts["vllm plugin entry point"] == "registered (vllm.general_plugins: modality_steer)"
    if torch.cuda.is_available():
        assert facts["platform"] == "cuda" and facts["triton kernel"] == "compiled (CUDA)"
    else:
        assert facts["platform"] == "cpu"
        assert facts["triton kernel"].startswith("interpreted only")


def test_vllm_loads_the_plugin_entry_point():
    from vllm.plugins import load_plugins_by_group

    plugins = load_plugins_by_group("vllm.general_plugins")
    assert "modality_steer" in plugins


def test_kernels_folder_is_not_a_top_level_package_even_from_the_checkout():
    """Run from the repository root (cwd on sys.path): transformers must not mistake our folder for the
    Hugging Face `kernels` package, and our op must import once, under steer_server."""
    probe = (
        "import importlib.util, sys;"
        "from transformers.utils.import_utils import is_kernels_available;"
        "import steer_server.kernels.head_scale as k;"
        "spec = importlib.util.find_spec('kernels');"
        "print(is_kernels_available(), spec is None or spec.origin is None, k.__name__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["False", "True", "steer_server.kernels.head_scale"]


def test_plugin_does_nothing_without_a_profile_and_refuses_a_broken_one(monkeypatch, tmp_path):
    from steer_server import vllm_plugin

    monkeypatch.delenv("MODALITY_STEER_PROFILE", raising=False)
    vllm_plugin.settings.cache_clear()
    vllm_plugin.register()  # nothing configured: nothing happens
    assert vllm_plugin.settings() is None
    missing = tmp_path / "nope.json"
    monkeypatch.setenv("MODALITY_STEER_PROFILE", str(missing))
    vllm_plugin.settings.cache_clear()
    try:
        vllm_plugin.register()
    except vllm_plugin.SteeringConfigError as exc:
        assert f"{missing}: no such profile" in str(exc)
    else:
        raise AssertionError("a configured profile that cannot be read must stop the process")
    finally:
        vllm_plugin.settings.cache_clear()
