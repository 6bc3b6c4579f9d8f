"""Shared fixtures. vLLM engines are module-scoped (one per configuration and test module, ~30-60 s to start
on CPU) so that no more of them than a module needs share the machine's memory."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Triton has no CPU backend: where torch sees no GPU, the Triton kernel runs in Triton's interpreter so
# that the kernel itself (not only the torch path) is tested. It must be set before triton is imported.
if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before TRITON_INTERPRET could be set")
    os.environ["TRITON_INTERPRET"] = "1"

# Tests serve hand-made profiles (no canaries) beside the shipped toy profile (with canaries): the
# deployment checks canaries wherever the profile has them; the canary tests set `on` explicitly.
os.environ.setdefault("MODALITY_STEER_CANARIES", "auto")

from helpers import write_profile

from steer_server.data.schema import LoadedSample, load_samples
from steer_server.data.synth import synth_dataset
from steer_server.serving.launcher import VllmServer
from steer_server.toy.card import held_out_test_split
from steer_server.toy.model import ToyArchitecture, build_random, toy_model_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
# The paper's released files live in the workspace's shared folder beside the checkout (CI keeps it
# there too); MODALITY_STEER_MF_DATA points elsewhere.
MF_DATA = Path(
    os.environ.get("MODALITY_STEER_MF_DATA", REPO_ROOT.parent / "shared" / "data" / "modality-following")
)

TINY_ARCH = ToyArchitecture(text_hidden=128, text_layers=2, text_heads=4, head_dim=32, text_mlp=256)


@pytest.fixture(scope="session")
def mf_data_dir() -> Path:
    files = sorted(MF_DATA.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"the released modality-following files are not in {MF_DATA}")
    return MF_DATA


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight LLaVA (2 layers x 4 heads, head_dim 32) with the toy tokenizer, built here."""
    return build_random(tmp_path_factory.mktemp("tiny-llava"), TINY_ARCH, seed=1)


@pytest.fixture(scope="session")
def toy_test_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The held-out synthetic test split the toy model card refers to."""
    return held_out_test_split(tmp_path_factory.mktemp("toy-data"))


@pytest.fixture(scope="session")
def toy_test_samples(toy_test_split: Path) -> list[LoadedSample]:
    return load_samples(toy_test_split)


@pytest.fixture(scope="session")
def llava_profile(tiny_llava: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hand-made profile for the tiny LLaVA (two image heads, one text head, default gain 3)."""
    return write_profile(tiny_llava, tmp_path_factory.mktemp("profiles") / "llava.json")


@pytest.fixture(scope="session")
def serve_samples(tmp_path_factory: pytest.TempPathFactory) -> list[LoadedSample]:
    """Sixteen synthetic samples (conflicts and controls, with images) for the serving tests."""
    paths = synth_dataset(tmp_path_factory.mktemp("serve-data"), 240, seed=11)
    return load_samples(paths["test"])[:16]


def _server(model: Path, *args: str) -> Iterator[VllmServer]:
    server = VllmServer(model, ["--max-model-len", "256", "--max-num-seqs", "16", "--enforce-eager", *args])
    with server:
        yield server


@pytest.fixture(scope="module")
def tiny_llava_server(tiny_llava: Path) -> Iterator[VllmServer]:
    yield from _server(tiny_llava)


@pytest.fixture(scope="module")
def toy_server() -> Iterator[VllmServer]:
    yield from _server(toy_model_dir())
