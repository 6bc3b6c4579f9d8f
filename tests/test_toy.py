"""The committed embedded default: loadable, small, and measured in the target ranges on the held-out split."""

from __future__ import annotations

import json

import pytest

from steer_server.data.synth import SynthSpec, synth_records
from steer_server.toy.card import MF_RANGE, MIN_CONTROL_ACCURACY, _target_verdict, evaluate, target_misses
from steer_server.toy.model import ToyArchitecture, toy_model_dir
from steer_server.toy.training import Recipe, _training_gains, example_for


@pytest.fixture(scope="module")
def toy_report(toy_test_split):
    return evaluate(toy_model_dir(), data=toy_test_split)


def test_checkpoint_is_complete_and_small():
    from transformers import LlavaForConditionalGeneration

    folder = toy_model_dir()
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


def test_toy_meets_its_targets_measured_here(toy_report):
    """Measured now (transformers, the held-out split), checked against the targets in code."""
    for mode in ("image", "text"):
        assert MF_RANGE[0] <= toy_report["mf_ratio_by_follow"][mode] <= MF_RANGE[1], toy_report
    assert toy_report["control_accuracy"] >= MIN_CONTROL_ACCURACY, toy_report
    assert toy_report["conflicts"] >= 400 and toy_report["controls"] >= 100
    assert target_misses(toy_report) == []
    interval = toy_report["intervals"]["mf_ratio"]
    assert interval["ci95"][0] <= toy_report["mf_ratio"] <= interval["ci95"][1]


def test_target_check_names_each_miss():
    report = {"mf_ratio_by_follow": {"image": 0.5, "text": 0.9}, "control_accuracy": 0.9}
    misses = target_misses(report)
    assert len(misses) == 2 and '"rely on the image" 0.500 outside' in misses[0] and "control" in misses[1]


def test_model_card_states_what_we_measure(toy_report):
    card = json.loads((toy_model_dir() / "evaluation.json").read_text())
    for key in ("mf_ratio", "control_accuracy", "preference_image_share_without_instruction"):
        assert card[key] == pytest.approx(toy_report[key], abs=1e-9), key
    assert card["mf_ratio_by_follow"] == pytest.approx(toy_report["mf_ratio_by_follow"], abs=1e-9)
    readme = (toy_model_dir() / "README.md").read_text()
    assert _target_verdict(toy_report) in readme
    for mode in ("image", "text"):
        assert f'"rely on the {mode}" | {toy_report["mf_ratio_by_follow"][mode]:.3f}' in readme


def _first(records, predicate):
    return next(r for r in records if predicate(r))


def test_training_labels_follow_the_designed_arbitration():
    """An instructed conflict is labelled with the instructed answer when its instruction's heads' gain beats
    the competing modality's pull (high only against a salient competitor), else with the competing answer;
    controls and uninstructed conflicts do not depend on the gains."""
    import random

    recipe = Recipe()
    records = synth_records(400, 3, prefix="t", spec=SynthSpec(salient_share=0.5))
    rng = random.Random(0)

    def salient(record, mode):
        return record.scene.big if mode == "image" else record.emphatic

    def other(mode):
        return "text" if mode == "image" else "image"

    for mode in ("image", "text"):
        hard = _first(
            records,
            lambda r, m=mode: (
                r.sample.kind == "conflict"
                and r.sample.follow == m
                and salient(r, other(m))
                and not salient(r, m)
            ),
        )
        easy = _first(
            records,
            lambda r, m=mode: (
                r.sample.kind == "conflict" and r.sample.follow == m and not salient(r, other(m))
            ),
        )
        instructed = {"image": "answer_image", "text": "answer_text"}
        for record, pull in ((hard, recipe.high_pull), (easy, recipe.low_pull)):
            example = example_for(record, with_instruction=True, recipe=recipe, rng=rng)
            assert example.pull == pull
            win = getattr(record.sample, instructed[mode])[0]
            lose = getattr(record.sample, instructed[other(mode)])[0]
            for gain, expected in ((0.0, lose), (1.0, win if pull < 1 else lose), (2.0, win)):
                # The other instruction's heads never matter.
                for other_gain in (0.0, 1.0, 3.0):
                    assert example.target_at({mode: gain, other(mode): other_gain}) == expected
    control = _first(records, lambda r: r.sample.kind == "control")
    uninstructed = _first(records, lambda r: r.sample.kind == "conflict")
    for record, flag in ((control, True), (uninstructed, False)):
        example = example_for(record, with_instruction=flag, recipe=recipe, rng=rng)
        assert {example.target_at({"image": g, "text": g}) for g in (0.0, 1.0, 2.0)} == {example.target}


def test_training_gains_scale_each_instructions_heads_together():
    """Each instruction's heads share one drawn gain per sample; the draw has the recipe's shares of 0, 1, 2."""
    import torch

    recipe = Recipe()
    torch.manual_seed(0)
    gains, arbitration = _training_gains(4000, ToyArchitecture(), recipe)
    for mode in ("image", "text"):
        drawn = torch.tensor([row[mode] for row in arbitration])
        for layer, head in recipe.heads_of(mode):
            assert torch.equal(gains[:, layer, head], drawn)
        assert float((drawn == 0).float().mean()) == pytest.approx(recipe.gain_zero, abs=0.03)
        assert float((drawn == 1).float().mean()) == pytest.approx(recipe.gain_one, abs=0.03)
        assert float((drawn == 2).float().mean()) == pytest.approx(recipe.gain_two, abs=0.03)
        assert float(drawn.max()) <= recipe.gain_max


def _train_a_few_steps(arbitration, tmp_path, monkeypatch):
    """Run the real training loop (`train`) for a few steps at a tiny size; return the calls of
    `scale_heads` and, per forward of any module during the language-model steps, whether a hook was on it."""
    import dataclasses

    import torch

    import steer_server.toy.training as training

    calls = []
    real_scale_heads = training.scale_heads

    def spy(model, gains):
        calls.append(gains.clone())
        return real_scale_heads(model, gains)

    monkeypatch.setattr(training, "scale_heads", spy)
    hooked = []

    def watch(module, args):
        if module.training and isinstance(module, torch.nn.Linear):
            hooked.append(bool(module._forward_pre_hooks or module._forward_hooks))

    recipe = dataclasses.replace(
        Recipe.of(arbitration),
        steps=3,
        perception_steps=1,
        vision_steps=1,
        vision_pool_size=40,
        pool_size=120,
        batch_size=4,
        vision_batch_size=4,
    )
    handle = torch.nn.modules.module.register_module_forward_pre_hook(watch)
    try:
        training.train(tmp_path / arbitration, recipe, ToyArchitecture(**_TINY), progress=False)
    finally:
        handle.remove()
    return calls, hooked


# Small, but with the planted recipe's heads (layers 2-4, heads up to 6).
_TINY = {"text_hidden": 64, "text_layers": 5, "text_heads": 8, "head_dim": 8, "text_mlp": 64}


def test_the_learned_models_training_touches_no_head(tmp_path, monkeypatch):
    """The second embedded model learns to arbitrate from its labels alone: its training loop (the code
    that made it) never scales or masks a head, and no module carries a hook while it trains. The
    planted recipe, through the same loop, does both (so the spies see an intervention when there is one)."""
    calls, hooked = _train_a_few_steps("learned", tmp_path, monkeypatch)
    assert calls == [] and hooked and not any(hooked)
    calls, hooked = _train_a_few_steps("planted", tmp_path, monkeypatch)
    assert len(calls) == 3 and any(hooked)
    training = json.loads((tmp_path / "learned" / "training.json").read_text())
    assert training["recipe"]["arbitration"] == "learned"


def test_learned_labels_are_fixed_by_the_data_alone():
    """A learned-recipe example has one label whatever any gain (no competing answer to fall back on);
    against a salient competitor, the competitor's answer is the label about `competitor_wins` of the
    time, else the instructed one, and never otherwise."""
    import random

    recipe = Recipe.of("learned")
    records = synth_records(3000, 5, prefix="t", spec=SynthSpec(conflict_share=1.0, salient_share=0.5))
    rng = random.Random(0)
    wins, against = 0, 0
    for record in records:
        example = example_for(record, with_instruction=True, recipe=recipe, rng=rng)
        sample = record.sample
        assert example.competing is None
        assert example.target_at({"image": 0.0, "text": 0.0}) == example.target_at(
            {"image": 9.0, "text": 9.0}
        )
        instructed = (sample.answer_image if sample.follow == "image" else sample.answer_text)[0]
        competitor_salient = record.scene.big if sample.follow == "text" else record.emphatic
        instructed_salient = record.emphatic if sample.follow == "text" else record.scene.big
        if competitor_salient and not instructed_salient:
            against += 1
            wins += example.target != instructed
        else:
            assert example.target == instructed
    assert abs(wins / against - recipe.competitor_wins) < 0.05, (wins, against)


def test_the_learned_models_card_states_how_it_was_made_and_what_it_measured():
    """The second embedded model's card: made by the learned recipe (its training.json), says so, and
    states the figures of its evaluation.json (measured when it was trained; `modality-steer toy eval
    --model` measures it again), which meet the embedded models' targets."""
    from steer_server.toy.model import learned_model_dir

    folder = learned_model_dir()
    training = json.loads((folder / "training.json").read_text())
    report = json.loads((folder / "evaluation.json").read_text())
    readme = (folder / "README.md").read_text()
    assert training["recipe"]["arbitration"] == "learned"
    assert readme.startswith("# modality-steer-toy-llava-learned")
    assert "nothing is done to any head" in readme and "--arbitration learned" in readme
    for mode in ("image", "text"):
        assert f'"rely on the {mode}" | {report["mf_ratio_by_follow"][mode]:.3f}' in readme
    assert target_misses(report) == [] and _target_verdict(report) in readme
