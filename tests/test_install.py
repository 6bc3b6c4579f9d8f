"""The installed stack: the console script, `doctor`, the plugin entry point, and the wheel's contents."""

from __future__ import annotations

import json
import os
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
    assert facts["vllm supported"] == "yes (>=0.32,<0.35)"
    if torch.cuda.is_available():
        assert facts["platform"] == "cuda" and facts["triton kernel"] == "compiled (CUDA)"
    else:
        assert facts["platform"] == "cpu"
        assert facts["triton kernel"].startswith("interpreted only")


def test_vllm_loads_the_plugin_entry_point():
    from vllm.plugins import load_plugins_by_group

    plugins = load_plugins_by_group("vllm.general_plugins")
    assert "modality_steer" in plugins


def test_kernels_folder_does_not_pass_for_hugging_faces_kernels_package():
    """From the repository root (on sys.path), the top-level `kernels/` folder must not make transformers
    believe the Hugging Face `kernels` package is installed; the op imports under `steer_server`."""
    probe = (
        "from transformers.utils.import_utils import is_kernels_available;"
        "import steer_server.kernels.head_scale as k;"
        "print(is_kernels_available(), k.__name__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=300
    )
    assert done.stdout.split() == ["False", "steer_server.kernels.head_scale"]


def test_plugin_does_nothing_without_a_profile_and_refuses_a_broken_one(monkeypatch, tmp_path):
    from steer_server.serving import plugin
    from steer_server.serving.policy import policy
    from steer_server.serving.settings import SteeringConfigError, settings

    def reread() -> None:  # both are read once per process; this test changes the environment
        settings.cache_clear()
        policy.cache_clear()

    monkeypatch.delenv("MODALITY_STEER_PROFILE", raising=False)
    reread()
    plugin.register()  # nothing configured: nothing happens
    assert settings() is None and policy() is None
    missing = tmp_path / "nope.json"
    monkeypatch.setenv("MODALITY_STEER_PROFILE", str(missing))
    reread()
    try:
        plugin.register()
    except SteeringConfigError as exc:
        assert f"{missing}: no such profile" in str(exc)
    else:
        raise AssertionError("a configured profile that cannot be read must stop the process")
    finally:
        reread()


def test_the_built_wheel_imports_the_kernel_and_ships_the_profile_and_toy(tmp_path):
    """`kernels/` and `profiles/` live at the top of the repository and are installed as
    `steer_server.kernels` and `steer_server.profiles` by the build configuration: a wheel built from the
    checkout and installed on its own (first on the path, run from an empty folder) has them."""
    wheels, target, scratch = tmp_path / "wheels", tmp_path / "site", tmp_path / "cwd"
    scratch.mkdir()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(REPO_ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = wheels.glob("modality_steer-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    probe = (
        "import json, importlib.resources as r, torch;"
        "import steer_server.kernels.head_scale as k;"
        "from steer_server.eval.demo import toy_profile_path;"
        "from steer_server.toy.model import toy_model_dir;"
        "out = torch.ones(3, 2, 4); k.head_scale_(out, torch.tensor([0, 1, 1], dtype=torch.int32), "
        "torch.tensor([[1.0, 1.0], [0.0, 2.0]]));"
        "print(json.dumps({'kernel': k.__file__, 'profile': str(toy_profile_path()), "
        "'toy': str(toy_model_dir() / 'model.safetensors'), 'sum': float(out.sum())}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=scratch,
        env={**env, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("kernel", "profile", "toy"):
        assert Path(found[key]).is_relative_to(target), (key, found)
        assert Path(found[key]).is_file(), (key, found)
    assert found["sum"] == 2 * 4 + 2 * (0 + 2) * 4  # token 0 unsteered; tokens 1, 2: head 0 x0, head 1 x2
