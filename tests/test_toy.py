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


def test_failures_are_arbitration_failures(toy_report):
    """A failed conflict sample answers from the competing modality; answers naming neither are rare."""
    outcomes = toy_report["outcomes"]
    assert outcomes.get("other", 0) > 0
    assert outcomes.get("neither", 0) <= 0.03 * toy_report["conflicts"], toy_report
    assert outcomes.get("other", 0) > 3 * outcomes.get("neither", 0), toy_report


def test_model_card_states_what_we_measure(toy_report):
    card = json.loads((toy.toy_model_dir() / "evaluation.json").read_text())
    for key in ("mf_ratio", "control_accuracy", "preference_image_share_without_instruction"):
        assert card[key] == pytest.approx(toy_report[key], abs=1e-9), key
    assert card["mf_ratio_by_follow"] == pytest.approx(toy_report["mf_ratio_by_follow"], abs=1e-9)
    readme = (toy.toy_model_dir() / "README.md").read_text()
    assert toy._target_verdict(toy_report) in readme
    for mode in ("image", "text"):
        assert f'"rely on the {mode}" | {toy_report["mf_ratio_by_follow"][mode]:.3f}' in readme
