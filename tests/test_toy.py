"""The committed embedded default: loadable, small, and measured in the target ranges on the held-out split."""

from __future__ import annotations

import json

import pytest

from steer_server import toy


@pytest.fixture(scope="module")
def toy_report(toy_test_split):
    return toy.evaluate(toy.toy_model_dir(), data=toy_test_split)


def test_checkpoint_is_complete_and_small():
    from transformers import LlavaForConditionalGeneration

    folder = toy.toy_model_dir()
    weights = folder / "model.safetensors"
    assert weights.stat().st_size <= 30 * 2**20
    model, info = LlavaForConditionalGeneration.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    text = model.config.text_config
    assert text.num_hidden_layers >= 8 and text.num_attention_heads >= 8 and text.head_dim >= 32


def test_modality_following_and_controls_in_target_range(toy_report):
    low, high = toy.MF_RANGE
    for follow in ("image", "text"):
        assert low <= toy_report["mf_ratio_by_follow"][follow] <= high, toy_report
    assert toy_report["control_accuracy"] >= toy.MIN_CONTROL_ACCURACY, toy_report
    # Failures are arbitration failures: the competing modality's answer, not a perception error.
    assert toy_report["outcomes"].get("neither", 0) <= 0.02 * toy_report["conflicts"], toy_report


def test_model_card_states_what_we_measure(toy_report):
    card = json.loads((toy.toy_model_dir() / "evaluation.json").read_text())
    for key in ("mf_ratio", "control_accuracy", "preference_image_share_without_instruction"):
        assert card[key] == pytest.approx(toy_report[key], abs=1e-9), key
    assert card["mf_ratio_by_follow"] == pytest.approx(toy_report["mf_ratio_by_follow"], abs=1e-9)
