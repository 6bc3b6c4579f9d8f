"""Profile schema: the minimal profile is valid; every malformed one is refused naming the problem."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from helpers import MINIMAL_PROFILE

from steer_server.profile import Profile, ProfileError, load_profile, model_fingerprint, save_profile

MINIMAL = MINIMAL_PROFILE


def _edit(path: str, value):
    profile = copy.deepcopy(MINIMAL)
    *parents, leaf = path.split(".")
    node = profile
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    if value is _DELETE:
        del node[leaf]
    elif leaf.isdigit():
        node[int(leaf)] = value
    else:
        node[leaf] = value
    return profile


_DELETE = object()

MALFORMED = [
    (_edit("format", "modality-steer.profile/v2"), "format: Input should be 'modality-steer.profile/v1'"),
    (_edit("model", _DELETE), "model: Field required"),
    (_edit("model.num_heads", _DELETE), "model.num_heads: Field required"),
    (_edit("default_gain", -1), "default_gain: Input should be greater than or equal to 0"),
    (_edit("modes.text", _DELETE), "modes must include both 'image' and 'text' (missing: text)"),
    (
        _edit("modes.image.heads.0.layer", 8),
        "modes.image.heads: layer 8 head 3 is outside the model (8 layers x 8 heads x head_dim 32)",
    ),
    (_edit("modes.image.heads.0.head", 9), "layer 5 head 9 is outside the model"),
    (
        _edit("modes.text.heads", [{"layer": 1, "head": 1, "score": 1}, {"layer": 1, "head": 1, "score": 2}]),
        "layer 1 head 1 is listed twice",
    ),
    (_edit("modes.image.heads.0.score", "high"), "modes.image.heads.0.score: Input should be a valid number"),
    (_edit("modes.audio", {"heads": []}), "modes.audio.[key]"),
    (
        _edit("model.attention_layers", [3, 7]),
        "layer 5 head 3 is outside the model (8 layers (attention on [3, 7]) x 8 heads x head_dim 32)",
    ),
    (_edit("model.attention_layers", [7, 3]), "attention_layers must be increasing layer indices in [0, 8)"),
    (_edit("model.attention_layers", [8]), "attention_layers must be increasing layer indices in [0, 8)"),
]


@pytest.mark.parametrize(("profile", "needle"), MALFORMED, ids=[n for _, n in MALFORMED])
def test_malformed_profiles_are_refused(tmp_path, profile, needle):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile))
    with pytest.raises(ProfileError) as caught:
        load_profile(path)
    assert needle in str(caught.value) and str(path) in str(caught.value)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused(tmp_path, constant):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(MINIMAL).replace("0.41", constant))
    with pytest.raises(ProfileError, match=f"{constant} is not allowed"):
        load_profile(path)


def test_minimal_profile_round_trips_and_keeps_extra_fields(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({**MINIMAL, "validation": {"anything": 1}}))
    profile = load_profile(path)
    assert profile.heads("image") == [(5, 3)] and profile.default_gain == 2.0
    save_profile(profile, tmp_path / "again.json")
    again = load_profile(tmp_path / "again.json")
    assert again.model_dump() == profile.model_dump() and again.profile_id == profile.profile_id


def test_fingerprint_changes_with_the_model(tiny_llava, tmp_path):
    first = model_fingerprint(tiny_llava)
    assert first == model_fingerprint(tiny_llava) and first.startswith("sha256:")
    config = json.loads((tiny_llava / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 3
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(config))
    (other / "model.safetensors").write_bytes((tiny_llava / "model.safetensors").read_bytes())
    assert model_fingerprint(other) != first


def test_profiles_without_attention_layers_keep_their_id():
    """`attention_layers` (hybrid models) is left out of the id when unset: a profile written before the
    field existed (the toy profile shipped then, kept as test data) keeps the id it had then."""
    before = Path(__file__).parent / "data" / "toy-profile-before-attention-layers.json"
    assert load_profile(before).profile_id == "3cd7ac40d51e"
    hybrid = copy.deepcopy(MINIMAL)
    hybrid["model"]["attention_layers"] = [1, 5, 6]
    assert Profile.model_validate(hybrid).profile_id != Profile.model_validate(MINIMAL).profile_id
