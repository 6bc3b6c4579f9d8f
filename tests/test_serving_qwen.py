"""Qwen2-VL through `modality-steer serve` against the transformers reference of the same gains."""

from __future__ import annotations

import pytest
from helpers import (
    SPEC_IDS,
    SPECS,
    assert_same_steps,
    chat,
    reference_steps,
    serve,
    served_steps,
    write_profile,
)

from steer_server.hf.model import load_model
from steer_server.profile import load_profile
from steer_server.toy.model import build_random_qwen2_vl

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    return build_random_qwen2_vl(tmp_path_factory.mktemp("serve-qwen"), seed=3)


@pytest.mark.parametrize("steer", SPECS, ids=SPEC_IDS)
def test_qwen2_vl_matches_transformers_reference(qwen_server, tiny_qwen, qwen_profile, serve_samples, steer):
    reference = load_model(tiny_qwen)
    profile = load_profile(qwen_profile)
    for sample in serve_samples[:3]:
        got = served_steps(
            chat(qwen_server.client(), str(tiny_qwen), sample, None if steer == "off" else steer)
        )
        assert_same_steps(got, reference_steps(reference, profile, sample, steer), 1e-3)


@pytest.fixture(scope="module")
def qwen_profile(tiny_qwen, tmp_path_factory):
    return write_profile(tiny_qwen, tmp_path_factory.mktemp("profiles") / "qwen.json")


@pytest.fixture(scope="module")
def qwen_server(tiny_qwen, qwen_profile):
    with serve(tiny_qwen, qwen_profile, "--enforce-eager") as server:
        yield server
