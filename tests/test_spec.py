"""The `modality_steer` value: accepted forms and their gains, and every refusal with its message."""

from __future__ import annotations

import math

import pytest
from helpers import MINIMAL_PROFILE

from steer_server.geometry import ModelGeometry
from steer_server.profile import Profile
from steer_server.spec import (
    OFF,
    SpecError,
    SteerSpec,
    effective_gains,
    gains_digest,
    gains_matrix,
    parse_spec,
)

GEOMETRY = ModelGeometry(architecture="LlavaForConditionalGeneration", num_layers=8, num_heads=8, head_dim=32)
PROFILE = Profile.model_validate(
    {
        **MINIMAL_PROFILE,
        "modes": {
            "image": {
                "heads": [{"layer": 5, "head": 3, "score": 0.41}, {"layer": 1, "head": 0, "score": 0.2}]
            },
            "text": {"heads": [{"layer": 6, "head": 1, "score": 0.37}]},
        },
    }
)

ACCEPTED = [
    ("off", OFF, {}),
    ("image", SteerSpec("image"), {(5, 3): 2.0, (1, 0): 2.0}),
    ("text", SteerSpec("text"), {(6, 1): 2.0}),
    ({"follow": "text", "gain": 0}, SteerSpec("text", 0.0), {(6, 1): 0.0}),
    ({"follow": "image", "gain": 8}, SteerSpec("image", 8.0), {(5, 3): 8.0, (1, 0): 8.0}),
    ({"follow": "image", "gain": 1}, SteerSpec("image", 1.0), {}),
    ('{"follow": "text", "gain": 3.5}', SteerSpec("text", 3.5), {(6, 1): 3.5}),
    ({"heads": [[0, 0, 0.0], [7, 7, 2.5], [3, 3, 1.0]]}, None, {(0, 0): 0.0, (7, 7): 2.5}),
]


@pytest.mark.parametrize(("value", "spec", "gains"), ACCEPTED, ids=[str(v) for v, _, _ in ACCEPTED])
def test_accepted_forms(value, spec, gains):
    parsed = parse_spec(value, geometry=GEOMETRY, allow_raw_heads=True)
    if spec is not None:
        assert parsed == spec
    assert effective_gains(parsed, PROFILE) == gains


REFUSED = [
    ("loud", {}, "unknown mode 'loud'"),
    ("", {}, "unknown mode ''"),
    (3, {}, "must be 'off', 'image', 'text' or an object, got int"),
    (None, {}, "got NoneType"),
    (["image"], {}, "got list"),
    ({"follow": "audio", "gain": 2}, {}, "follow must be 'image' or 'text'"),
    ({"follow": "text", "gain": math.nan}, {}, "gain must be finite"),
    ({"follow": "text", "gain": math.inf}, {}, "gain must be finite"),
    ('{"follow": "text", "gain": NaN}', {}, "gain must be finite"),
    ({"follow": "text", "gain": -0.5}, {}, "gain must lie in [0, 8]"),
    ({"follow": "text", "gain": 8.01}, {}, "gain must lie in [0, 8]"),
    ({"follow": "text", "gain": 3}, {"max_gain": 2.0}, "gain must lie in [0, 2]"),
    ({"follow": "text", "gain": "2"}, {}, "gain must be a number, got str"),
    ({"follow": "text", "gain": True}, {}, "gain must be a number, got bool"),
    ({"follow": "text", "gain": {"x": 1}}, {}, "gain must be a number, got dict"),
    ({"follow": "text", "extra": 1}, {}, "unknown keys ['extra', 'follow']"),
    ({}, {}, "unknown keys []"),
    ('{"follow": "text",', {}, "not valid JSON"),
    ({"follow": "text", "gain": 10**400}, {}, "gain must be finite, got an integer of 401 digits"),
    (
        '{"follow": "text", "gain": 1' + "0" * 400 + "}",
        {},
        "gain must be finite, got an integer of 401 digits",
    ),
    ('{"follow": ' + "[" * 100000 + "]" * 100000 + "}", {}, "nested too deeply"),
    ({"heads": [[0, 0, 2.0]]}, {"allow_raw_heads": False}, "raw heads are not allowed on this server"),
    ({"heads": []}, {}, "heads must be a non-empty list"),
    ({"heads": [[8, 0, 1.0]]}, {}, "heads[0]: layer 8 is out of range [0, 8)"),
    ({"heads": [[0, -1, 1.0]]}, {}, "heads[0]: head -1 is out of range [0, 8)"),
    ({"heads": [[0, 1.5, 1.0]]}, {}, "heads[0]: head must be an integer"),
    ({"heads": [[0, 1, 2.0], [0, 1, 3.0]]}, {}, "heads[1]: layer 0 head 1 is listed twice"),
    ({"heads": [[0, 1]]}, {}, "heads[0] must be [layer, head, gain]"),
    ({"heads": [[0, 1, math.nan]]}, {}, "heads[0]: gain must be finite"),
    (
        {"heads": [[i // 8, i % 8, 2.0] for i in range(65)]},
        {},
        "heads lists 65 entries; the model has only 64 heads",
    ),
]


@pytest.mark.parametrize(("value", "options", "needle"), REFUSED, ids=[n for _, _, n in REFUSED])
def test_refusals_say_what_is_wrong(value, options, needle):
    kwargs = {"geometry": GEOMETRY, "allow_raw_heads": True, **options}
    with pytest.raises(SpecError) as caught:
        parse_spec(value, **kwargs)
    assert needle in str(caught.value)


def test_mode_needs_a_profile():
    with pytest.raises(SpecError, match="needs a profile"):
        effective_gains(SteerSpec("image"), None)


def test_digest_is_canonical_and_distinguishes_configurations():
    a = gains_digest({(5, 3): 2.0, (1, 0): 2.0})
    assert a == gains_digest({(1, 0): 2.0, (5, 3): 2.0})
    assert a != gains_digest({(5, 3): 2.0, (1, 0): 3.0})
    assert a != gains_digest({})


def test_gains_matrix():
    table = gains_matrix({(5, 3): 0.0, (1, 0): 2.0}, GEOMETRY)
    assert table.shape == (8, 8) and table[5, 3] == 0.0 and table[1, 0] == 2.0
    assert int((table == 1.0).sum()) == 62


HYBRID = ModelGeometry(
    architecture="Qwen3_5ForConditionalGeneration",
    num_layers=8,
    num_heads=4,
    head_dim=32,
    attention_layers=(3, 7),
)
HYBRID_REFUSED = [
    ({"heads": [[2, 0, 2.0]]}, "heads[0]: layer 2 has no attention heads (attention on [3, 7])"),
    ({"heads": [[8, 0, 2.0]]}, "heads[0]: layer 8 is out of range [0, 8)"),
    (
        {"heads": [[i % 2 * 4 + 3, i // 2, 2.0] for i in range(9)]},
        "heads lists 9 entries; the model has only 8 heads",
    ),
]


@pytest.mark.parametrize(("value", "needle"), HYBRID_REFUSED, ids=[n for _, n in HYBRID_REFUSED])
def test_raw_heads_of_a_hybrid_model_must_sit_on_attention_layers(value, needle):
    with pytest.raises(SpecError) as caught:
        parse_spec(value, geometry=HYBRID, allow_raw_heads=True)
    assert needle in str(caught.value)
    spec = parse_spec({"heads": [[3, 0, 0.0], [7, 3, 2.0]]}, geometry=HYBRID, allow_raw_heads=True)
    assert spec.heads == ((3, 0, 0.0), (7, 3, 2.0))


def test_hybrid_geometry_counts_only_attention_heads():
    assert HYBRID.layers == (3, 7) and HYBRID.total_heads == 8 and HYBRID.heads()[:2] == [(3, 0), (3, 1)]
    assert HYBRID.has_heads(3) and not HYBRID.has_heads(2) and not HYBRID.has_heads(8)
    assert GEOMETRY.layers == tuple(range(8)) and GEOMETRY.total_heads == 64
    for bad in ((), (7, 3), (3, 3), (8,), (-1,)):
        with pytest.raises(ValueError, match="attention_layers"):
            ModelGeometry(architecture="x", num_layers=8, num_heads=4, head_dim=32, attention_layers=bad)
