"""The analysis: head-intervention invariants on tiny models, the metric, the whole pipeline on tiny
random LLaVA and Qwen2-VL, and every bad input refused before anything is written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from dataclasses import replace

import pytest
import torch

from steer_server.analysis.ablation import gain_table, spearman
from steer_server.analysis.attribution import attribution
from steer_server.analysis.config import AnalysisConfig, AnalysisError, TransferRule
from steer_server.analysis.metric import Runner, score_logits
from steer_server.analysis.pipeline import analyze, content_overlap, split_holdout
from steer_server.analysis.sparsity import CURVE_FRACTIONS
from steer_server.architectures import (
    UnsupportedArchitectureError,
    attention_modules,
    geometry_of,
    o_proj_modules,
)
from steer_server.data.schema import DataError, LoadedSample, data_digest, load_samples
from steer_server.data.scoring import is_success
from steer_server.data.synth import SynthSpec, synth_dataset
from steer_server.hf.hooks import capture_head_outputs, knockout_attention, scale_heads
from steer_server.hf.model import ModelLoadError, encode, greedy_decode, load_model
from steer_server.profile import load_profile
from steer_server.toy.model import build_random_qwen2_vl, toy_model_dir

CLI = [sys.executable, "-m", "steer_server.cli"]


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tmp_path_factory):
    return build_random_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"), seed=2)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    return synth_dataset(tmp_path_factory.mktemp("small-data"), 240, seed=9)


@pytest.fixture(params=["llava", "qwen2_vl"])
def tiny_model(request, tiny_llava, tiny_qwen2_vl):
    return {"llava": tiny_llava, "qwen2_vl": tiny_qwen2_vl}[request.param]


def _logits(loaded, batch, gains=None):
    with torch.inference_mode():
        if gains is None:
            return loaded.model(**batch).logits
        with scale_heads(loaded.model, gains):
            return loaded.model(**batch).logits


def test_head_gain_invariants(tiny_model, small_data):
    loaded = load_model(tiny_model)
    geometry = geometry_of(loaded.model.config)
    batch = encode(loaded, load_samples(small_data["test"])[:4])
    plain = _logits(loaded, batch)
    # Gain 1 everywhere is an exact no-op (every layer is hooked).
    assert torch.equal(_logits(loaded, batch, torch.ones(geometry.num_layers, geometry.num_heads)), plain)
    # Gain 0 on a head equals zeroing the o_proj weight columns that read it.
    layer, head = geometry.num_layers - 1, 1
    gains = torch.ones(geometry.num_layers, geometry.num_heads)
    gains[layer, head] = 0.0
    blocked = _logits(loaded, batch, gains)
    o_proj = o_proj_modules(loaded.model)[layer]
    saved = o_proj.weight.detach().clone()
    with torch.no_grad():
        o_proj.weight[:, head * geometry.head_dim : (head + 1) * geometry.head_dim] = 0.0
    try:
        zeroed = _logits(loaded, batch)
    finally:
        with torch.no_grad():
            o_proj.weight.copy_(saved)
    assert not torch.allclose(blocked, plain, atol=1e-4)
    torch.testing.assert_close(blocked, zeroed, atol=1e-5, rtol=0)
    # Per-row gains equal each row run with its own gains.
    per_row = torch.ones(4, geometry.num_layers, geometry.num_heads)
    per_row[1, 0, 0] = 0.0
    per_row[2, layer, head] = 3.0
    mixed = _logits(loaded, batch, per_row)
    for row in range(4):
        alone = _logits(loaded, batch, per_row[row])
        torch.testing.assert_close(mixed[row], alone[row], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_passes_started_at_a_later_layer_equal_whole_passes(family, small_data, tmp_path):
    """`Runner.score_many` starts each setting at its first changed layer from the baseline's residual
    stream there (`start_at_layer`), and a setting that changes only later positions at the first of them
    against the baseline's KV cache (`suffix_last_logits`): every metric and answer equals that setting
    scored alone from the embeddings, for head gains and attention knockouts; the layers below and the
    positions before are really not run. On the toy (8 layers) and a 4-layer Qwen2-VL (multimodal rotary
    positions, which the shortened passes take from the baseline's)."""
    from steer_server.analysis.metric import BASELINE, Setting
    from steer_server.architectures import residual_modules

    model_dir = toy_model_dir() if family == "llava" else build_random_qwen2_vl(tmp_path, layers=4, seed=3)
    loaded = load_model(model_dir)
    geometry = geometry_of(loaded.model.config)
    samples = load_samples(small_data["test"])[:10]
    runner = Runner(loaded, samples, batch_size=4)
    last = geometry.num_layers - 1
    size = max(int(runner.encoded(n)["input_ids"].shape[1]) for n in range(len(runner.batches)))

    def lengths(number: int) -> list[int]:
        return runner.encoded(number)["attention_mask"].sum(dim=1).tolist()

    def cut_last_token(layer: int):
        def active(number: int):
            blocked = torch.zeros(len(lengths(number)), size, size, dtype=torch.bool)
            for row, length in enumerate(lengths(number)):
                blocked[row, length - 1, : length - 1] = True
            return knockout_attention(loaded.model, {layer}, blocked)

        return active

    def last_tokens(number: int) -> int:
        return min(lengths(number)) - 1

    settings = [
        BASELINE,
        Setting.of_gains(gain_table(geometry, [(last, 0), (last, 1)], 0.0)),
        Setting.of_gains(gain_table(geometry, [(2, 0), (last, 2)], 4.0)),
        Setting(intervention=cut_last_token(last), first_layer=last),
        Setting(intervention=cut_last_token(last), first_layer=last, first_position=last_tokens),
        Setting(intervention=cut_last_token(0), first_position=last_tokens),
    ]
    assert [s.first_layer for s in settings] == [0, last, 2, last, last, 0]
    mlps = residual_modules(loaded.model).mlps  # run inside a decoder layer's own forward only
    seen: dict[int, list[int]] = {index: [] for index in mlps}
    handles = [
        mlp.register_forward_pre_hook(lambda m, a, index=index: seen[index].append(a[0].shape[1]))
        for index, mlp in mlps.items()
    ]
    try:
        runner.score_many(settings, answers=False)  # the first answer token only
    finally:
        for handle in handles:
            handle.remove()
    widths = [int(runner.encoded(n)["input_ids"].shape[1]) for n in range(len(runner.batches))]
    shortened = [w - last_tokens(n) for n, w in enumerate(widths)]
    # Per batch: the baseline; the layer-0 cut, from the last tokens on; the gains from layer 2; the rest.
    assert seen[0] == [x for n, w in enumerate(widths) for x in (w, shortened[n])]
    assert seen[1] == seen[0]
    assert seen[2] == [x for n, w in enumerate(widths) for x in (w, w, shortened[n])]
    assert seen[last] == [x for n, w in enumerate(widths) for x in (w, w, w, w, shortened[n], shortened[n])]
    started = runner.score_many(settings)
    for setting, scored in zip(settings, started, strict=True):
        whole = runner.score_many([Setting(setting.gains, setting.intervention)])[0]
        torch.testing.assert_close(scored.metric, whole.metric, atol=1e-5, rtol=0)
        assert scored.follows.tolist() == whole.follows.tolist()
    for changed in (1, 3, 5):
        assert not torch.allclose(started[changed].metric, started[0].metric, atol=1e-3)


def test_head_contributions_sum_to_attention_output(tiny_llava):
    loaded = load_model(tiny_llava)
    geometry = geometry_of(loaded.model.config)
    o_proj = o_proj_modules(loaded.model)[0]
    z = torch.randn(3, 5, geometry.num_heads * geometry.head_dim)
    parts = []
    for head in range(geometry.num_heads):
        only = torch.zeros_like(z)
        span = slice(head * geometry.head_dim, (head + 1) * geometry.head_dim)
        only[..., span] = z[..., span]
        parts.append(o_proj(only))
    torch.testing.assert_close(sum(parts), o_proj(z), atol=1e-5, rtol=1e-5)


def test_attribution_is_the_metrics_derivative_in_each_heads_gain(tiny_llava, small_data):
    """Gradient x activation predicts the metric's drop when a head is zeroed, to first order: it is exactly
    d metric / d gain at gain 1, which a central finite difference checks, sign included."""
    loaded = load_model(tiny_llava)
    geometry = geometry_of(loaded.model.config)
    conflicts = [s for s in load_samples(small_data["test"]) if s.sample.kind == "conflict"][:6]
    runner = Runner(loaded, conflicts, batch_size=3)
    scores = attribution(runner, geometry, progress=False)
    assert scores.shape == (len(conflicts), geometry.num_layers, geometry.num_heads)
    eps = 1e-2
    last_layer, last_head = geometry.num_layers - 1, geometry.num_heads - 1
    for layer, head in [(0, 0), (last_layer, last_head), (last_layer, 1)]:
        up = runner.score(gain_table(geometry, [(layer, head)], 1 + eps)).metric
        down = runner.score(gain_table(geometry, [(layer, head)], 1 - eps)).metric
        derivative = (up - down) / (2 * eps)
        torch.testing.assert_close(scores[:, layer, head], derivative, atol=2e-3, rtol=2e-2)
        clear = derivative.abs() > 2e-2  # well above the tolerance: the sign is tested there
        assert clear.any(), "the check needs heads that matter"
        assert torch.equal(scores[clear, layer, head].sign(), derivative[clear].sign())


def test_metric_pools_surface_forms():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.1, 0.2, 0.6], [0.1, 0.1, 0.2, 0.6]]))
    metric = score_logits(logits, instructed=[[0, 1], [0], [3]], competing=[[2], [3, 2], []])
    assert metric[0].item() == pytest.approx(torch.log(torch.tensor(0.7 / 0.2)).item(), abs=1e-6)
    assert metric[1].item() == pytest.approx(torch.log(torch.tensor(0.1 / 0.8)).item(), abs=1e-6)
    assert metric[2].item() == pytest.approx(torch.log(torch.tensor(0.6)).item(), abs=1e-6)  # a control


def test_runner_judges_the_greedy_answer_text_like_every_other_figure(tiny_llava, small_data):
    """Success in the analysis is `is_success` on the greedy answer's text, decoded as far as the longest
    candidate reaches: here two-word answers, so two greedy steps, equal to transformers' `generate`."""
    loaded = load_model(tiny_llava)
    samples = [s for s in load_samples(small_data["test"]) if s.sample.kind == "conflict"][:6]
    two_words = [
        LoadedSample(
            sample=s.sample.model_copy(
                update={
                    "answer_image": [f"{s.sample.answer_image[0]} circle"],
                    "answer_text": [f"{s.sample.answer_text[0]} square"],
                }
            ),
            image_path=s.image_path,
            line=s.line,
        )
        for s in samples
    ]
    runner = Runner(loaded, two_words, batch_size=4)
    assert runner.budget == 2
    tokenizer = loaded.processor.tokenizer
    texts = {}
    for number, members in enumerate(runner.batches):
        batch = runner.encoded(number)
        with torch.inference_mode():
            _, decoded = greedy_decode(loaded, batch, runner.budget)
        texts |= dict(zip(members, decoded, strict=True))
        for row, text in enumerate(decoded):
            length = int(batch["attention_mask"][row].sum())
            single = {k: v[row : row + 1] for k, v in batch.items() if k != "pixel_values"}
            single = {k: v[:, :length] for k, v in single.items()}
            if "pixel_values" in batch:
                single["pixel_values"] = batch["pixel_values"][row : row + 1]
            with torch.inference_mode():
                out = loaded.model.generate(
                    **single, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
            generated = out[0, length:].tolist()
            if tokenizer.eos_token_id in generated:
                generated = generated[: generated.index(tokenizer.eos_token_id)]
            assert text == tokenizer.decode(generated, skip_special_tokens=True).strip()
    follows = runner.score().follows.tolist()
    assert follows == [is_success(s.sample, texts[i]) for i, s in enumerate(two_words)]


def test_hooks_are_removed_and_state_restored_even_on_error(tiny_llava, small_data):
    loaded = load_model(tiny_llava)
    model = loaded.model
    geometry = geometry_of(model.config)
    modules = [*o_proj_modules(model).values(), *attention_modules(model).values()]

    def hooks() -> int:
        return sum(len(m._forward_pre_hooks) for m in modules)

    blocked = torch.zeros(1, 4, 4, dtype=torch.bool)
    for manager in (
        scale_heads(model, torch.ones(geometry.num_layers, geometry.num_heads)),
        capture_head_outputs(model),
        knockout_attention(model, {0}, blocked),
    ):
        with pytest.raises(RuntimeError, match="inside"), manager:
            assert hooks() > 0
            raise RuntimeError("inside")
        assert hooks() == 0
    flags = [p.requires_grad for p in model.parameters()]
    conflicts = [s for s in load_samples(small_data["test"]) if s.sample.kind == "conflict"][:2]
    attribution(Runner(loaded, conflicts, batch_size=2), geometry, progress=False)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert hooks() == 0


def test_knockout_cuts_exactly_the_blocked_edges(tiny_llava, small_data):
    """An empty cut leaves the logits exactly as they are (the layer's own mask is kept); cutting every
    earlier key of the last position in every layer leaves it attending to itself only, which a model
    whose prompt is just that token reproduces."""
    loaded = load_model(tiny_llava)
    model = loaded.model
    geometry = geometry_of(model.config)
    batch = encode(loaded, load_samples(small_data["test"])[:3])
    size = batch["input_ids"].shape[1]
    layers = set(range(geometry.num_layers))
    with torch.inference_mode():
        plain = model(**batch).logits
        with knockout_attention(model, layers, torch.zeros(3, size, size, dtype=torch.bool)):
            same = model(**batch).logits
        torch.testing.assert_close(same, plain, atol=1e-5, rtol=0)
        lengths = batch["attention_mask"].sum(dim=1)
        blocked = torch.zeros(3, size, size, dtype=torch.bool)
        for row, length in enumerate(lengths.tolist()):
            blocked[row, length - 1, : length - 1] = True
        with knockout_attention(model, layers, blocked):
            cut = model(**batch).logits
    for row, length in enumerate(lengths.tolist()):
        last_id = batch["input_ids"][row, length - 1 : length][None]
        with torch.inference_mode():
            alone = model(input_ids=last_id, position_ids=torch.tensor([[length - 1]])).logits
        torch.testing.assert_close(cut[row, length - 1], alone[0, 0], atol=1e-4, rtol=1e-4)
        assert not torch.allclose(cut[row, length - 1], plain[row, length - 1], atol=1e-3)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None


@pytest.mark.slow
def test_analysis_end_to_end(tiny_model, small_data, tmp_path):
    out = tmp_path / "profile.json"
    plots = tmp_path / "plots"
    done = subprocess.run(
        [
            *CLI,
            "analyze",
            str(tiny_model),
            "--data",
            str(small_data["train"]),
            "--eval-data",
            str(small_data["test"]),
            "--out",
            str(out),
            "--plots",
            str(plots),
            "--limit",
            "48",
            "--knockout-samples",
            "8",
            "--top-frac",
            "0.25",
            "--random-draws",
            "2",
            "--batch-size",
            "16",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    profile = load_profile(out)
    raw = json.loads(out.read_text())
    geometry = (profile.model.num_layers, profile.model.num_heads)
    k = round(0.25 * geometry[0] * geometry[1])
    for mode in ("image", "text"):
        assert len(profile.heads(mode)) == k
        assert (
            raw["modes"][mode]["candidates_ablated"] >= 3 * k
            or raw["modes"][mode]["candidates_ablated"] == geometry[0] * geometry[1]
        )
        assert len(raw["scores"]["attribution"][mode]) == geometry[0]
        validation = raw["validation"]["modes"][mode]
        for key in ("mf_ratio_baseline", "mf_ratio_block_top", "mf_ratio_block_random"):
            low, high = validation[key]["ci95"]
            assert 0.0 <= low <= validation[key]["value"] <= high <= 1.0, validation[key]
            assert validation[key]["n"] == validation["conflicts"]
        assert len(validation["mf_ratio_block_random_draws"]) == 2
        assert set(validation["gain_sweep"]) == {"1.5", "2.0", "3.0", "4.0", "6.0"}
    assert profile.default_gain in (1.5, 2.0, 3.0, 4.0, 6.0)
    assert raw["provenance"]["data_sha256"] == data_digest(small_data["train"])
    assert_choices_never_saw_the_reported_split(raw, small_data["train"], small_data["test"], limit=48)
    lens = json.loads((tmp_path / "profile.logit_lens.json").read_text())
    assert lens["num_layers"] == geometry[0] and lens["max_additivity_error"] < 1e-4
    assert lens["conflicts"] == raw["provenance"]["splits"]["report"]["conflicts"]
    assert raw["model"]["fingerprint"].startswith("sha256:")
    flow = json.loads((tmp_path / "profile.knockout.json").read_text())
    assert set(flow["edges"]) >= {"image->instruction", "context->instruction", "instruction->last"}
    # Cutting any edge into the instruction in the last layer cannot reach the last position.
    for edge in ("image->instruction", "context->instruction"):
        assert flow["edges"][edge]["delta_metric"][-1] == pytest.approx(0.0, abs=1e-6)
    for png in (
        "profile.heads.png",
        "profile.knockout.png",
        "profile.logit_lens.png",
        "profile.sparsity.png",
    ):
        assert (plots / png).stat().st_size > 10_000
    # The sparsity curve: one point per fraction; its top heads are the analysis' ranking (the selected heads
    # first), its random heads are drawn outside them; every figure on the report split's conflicts.
    curve = raw["sparsity"]
    assert [p["fraction"] for p in curve["points"]] == list(CURVE_FRACTIONS)
    total = geometry[0] * geometry[1]
    for point in curve["points"]:
        assert point["heads"] == max(1, round(point["fraction"] * total))
        for mode in ("image", "text"):
            at = point["modes"][mode]
            top = [tuple(lh) for lh in at["top_heads"]]
            assert top[: min(k, len(top))] == profile.heads(mode)[: len(top)]
            assert len(at["random_heads"]) == 2
            both_tops = {tuple(lh) for m in ("image", "text") for lh in point["modes"][m]["top_heads"]}
            for drawn in at["random_heads"]:
                assert len(drawn) == point["heads"] and not {tuple(lh) for lh in drawn} & set(top)
                if total - len(both_tops) >= point["heads"]:
                    assert not {tuple(lh) for lh in drawn} & both_tops
            assert at["relative_drop_top"]["n"] == raw["validation"]["modes"][mode]["conflicts"]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def bad_inputs(tmp_path, small_data):
    good = [json.loads(line) for line in small_data["test"].read_text().splitlines()]
    for record in good:
        if record["image"]:
            record["image"] = str(small_data["test"].parent / record["image"])
    no_question = {k: v for k, v in good[0].items() if k != "question"}
    missing_image = {**good[0], "image": str(tmp_path / "nope.png")}
    return {
        "missing field": (
            _jsonl(tmp_path / "a.jsonl", [good[1], no_question]),
            {},
            "a.jsonl:2: field 'question': Field required",
        ),
        "missing image": (_jsonl(tmp_path / "b.jsonl", [missing_image]), {}, "1 image(s) missing"),
        "empty": (_jsonl(tmp_path / "c.jsonl", []), {}, "the data set is empty"),
        "no conflicts": (
            _jsonl(tmp_path / "d.jsonl", [r for r in good if r["kind"] == "control"]),
            {},
            "no conflict samples",
        ),
        "top-frac 0": (small_data["test"], {"top_frac": 0.0}, "--top-frac must lie in (0, 1], got 0.0"),
        "top-frac 1.5": (small_data["test"], {"top_frac": 1.5}, "--top-frac must lie in (0, 1], got 1.5"),
        "device map unknown": (
            small_data["test"],
            {"device_map": "everywhere"},
            "--device-map must be one of auto, balanced, balanced_low_0, sequential or a JSON file",
        ),
        "device map not a mapping": (
            small_data["test"],
            {"device_map": str(_jsonl(tmp_path / "map.json", [["layers", 0]]))},
            "expected a JSON object of module name -> GPU index",
        ),
        "device map bad device": (
            small_data["test"],
            {"device_map": str(_write(tmp_path / "map2.json", {"model": "tpu"}))},
            "expected a JSON object of module name -> GPU index",
        ),
    }


def _write(path, payload):
    path.write_text(json.dumps(payload))
    return path


@pytest.mark.parametrize(
    "case",
    [
        "missing field",
        "missing image",
        "empty",
        "no conflicts",
        "top-frac 0",
        "top-frac 1.5",
        "device map unknown",
        "device map not a mapping",
        "device map bad device",
    ],
)
def test_bad_input_is_refused(bad_inputs, tiny_llava, case):
    path, options, needle = bad_inputs[case]
    with pytest.raises((AnalysisError, DataError)) as caught:
        analyze(tiny_llava, path, AnalysisConfig(progress=False, **options))
    assert needle in str(caught.value)


def test_head_count_mismatch_is_refused(tiny_llava, small_data, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llava, broken)
    config = json.loads((broken / "config.json").read_text())
    config["text_config"]["num_attention_heads"] = 2
    config["text_config"]["num_key_value_heads"] = 2
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelLoadError, match=r"does not match its config .*self_attn.o_proj.weight \(shape differs"
    ):
        analyze(
            broken,
            small_data["test"],
            AnalysisConfig(progress=False, limit=8),
            eval_data=small_data["validation"],
        )


UNSUPPORTED = [
    (
        "MllamaForConditionalGeneration",
        "supported: Gemma3ForConditionalGeneration, Glm4vForConditionalGeneration",
    ),
    ("DeepseekVLV2ForCausalLM", "DeepSeek-VL2 has no transformers 5 class"),
    ("InternVLChatModel", "analyse the transformers-native conversion (the '-hf' checkpoints"),
]


@pytest.mark.parametrize(("architecture", "needle"), UNSUPPORTED, ids=[a for a, _ in UNSUPPORTED])
def test_unsupported_architectures_say_why(architecture, needle):
    config = types.SimpleNamespace(architectures=[architecture])
    with pytest.raises(UnsupportedArchitectureError) as caught:
        geometry_of(config)
    assert needle in str(caught.value)


def test_cli_exit_code_and_nothing_written(small_data, tiny_llava, tmp_path):
    out = tmp_path / "p.json"
    done = subprocess.run(
        [
            *CLI,
            "analyze",
            str(tiny_llava),
            "--data",
            str(small_data["test"]),
            "--out",
            str(out),
            "--top-frac",
            "2",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and "--top-frac must lie in (0, 1]" in done.stderr
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def assert_choices_never_saw_the_reported_split(raw, selection_path, report_path, limit=None):
    """The profile's provenance names the split of every choice and every reported figure; they differ,
    the files are the ones recorded (digests), and no sample id of the report split is in the selection
    split. The default gain is the one the selection split's sweep picks."""
    from steer_server.analysis.validation import MAX_BROKEN_SHARE

    splits = raw["provenance"]["splits"]
    assert splits["selection"]["sha256"] == data_digest(selection_path)
    assert splits["report"]["sha256"] == data_digest(report_path)
    assert any("default_gain" in use for use in splits["selection"]["used_for"])
    assert any("heads" in use for use in splits["selection"]["used_for"])
    assert set(splits["report"]["used_for"]) == {"validation", "knockout", "logit_lens", "sparsity"}
    assert raw["validation"]["split"] == "report" and raw["selection"]["split"] == "selection"
    assert raw["sparsity"]["split"] == "report"
    selection_ids = {s.sample.id for s in load_samples(selection_path)}
    report_ids = {s.sample.id for s in load_samples(report_path)}
    assert not selection_ids & report_ids and splits["disjoint_sample_ids"] is True
    # Transfer splits: every sample a rule matches was kept out of the selection split (counted there),
    # and each transfer split holds exactly the report samples its rule matches.
    rules = [TransferRule.parse(name) for name in splits["transfer_rules"]]
    selection_file, report_file = load_samples(selection_path)[:limit], load_samples(report_path)[:limit]
    for rule in rules:
        assert splits["kept_out_of_selection"][rule.name] == sum(rule.matches(s) for s in selection_file)
        record = splits["transfer"][rule.name]
        assert record["samples"] == sum(rule.matches(s) for s in report_file) > 0
        assert record["sha256"] == data_digest(report_path) and record["used_for"] == ["transfer"]
    within = [s for s in selection_file if not any(rule.matches(s) for rule in rules)]
    within_report = [s for s in report_file if not any(rule.matches(s) for rule in rules)]
    assert splits["selection"]["samples"] == len(within)
    assert splits["report"]["samples"] == len(within_report)
    assert splits["report_samples_identical_to_selection_samples"] == content_overlap(within, within_report)
    assert sorted(raw.get("transfer", {}).get("splits", {})) == sorted(rule.name for rule in rules)
    # The default gain follows from the selection split's sweep (rescued most, broke at most 5%) ...
    sweep = raw["selection"]["gain_sweep"]

    def share(gain, key):
        return sweep[gain][key]["value"] or 0.0  # None: no sample to share (as `choose_gain` reads it)

    allowed = [g for g in sweep if share(g, "broken_share") <= MAX_BROKEN_SHARE] or list(sweep)
    best = max(share(g, "rescued_share") for g in allowed)
    assert raw["default_gain"] == min(float(g) for g in allowed if share(g, "rescued_share") == best)
    # ... whose counts are the selection split's, not the report split's.
    assert raw["selection"]["failed_at_baseline"] + raw["selection"]["correct_at_baseline"] == sum(
        s.sample.kind == "conflict" for s in within
    )


@pytest.mark.slow
def test_analysis_recovers_the_toys_planted_circuit(tmp_path, monkeypatch):
    """The toy model's arbitration was trained into known heads per instruction (its recipe); the analysis,
    rerun here on a CI-sized subset of the synthetic splits and not told which heads, must name exactly
    those for each mode, with validation figures (on the other split) that meet the analysis targets."""
    recipe = json.loads((toy_model_dir() / "training.json").read_text())["recipe"]
    data = synth_dataset(tmp_path, 2000, seed=0)
    subsets = {}
    for name in ("validation", "test"):  # beside the full files, so image paths resolve
        subsets[name] = tmp_path / f"{name}-120.jsonl"
        subsets[name].write_text("".join(line + "\n" for line in data[name].read_text().splitlines()[:120]))
    config = AnalysisConfig(gains=(2.0, 4.0), random_draws=2, knockout_samples=8, progress=False)
    result = analyze(toy_model_dir(), subsets["validation"], config, eval_data=subsets["test"])
    with pytest.raises(AnalysisError, match="--dtype"):
        replace(config, dtype="float64").check()
    profile = result.profile
    for mode in ("image", "text"):
        planted = {tuple(cell) for cell in recipe[f"{mode}_heads"]}
        # The cheap ranking puts the planted heads first (on ~40 conflicts per mode, at most one of them
        # behind a head upstream of them) ...
        attribution = result.scores[mode]
        top = attribution.flatten().argsort(descending=True)[: len(planted)].tolist()
        assert len({divmod(i, attribution.shape[1]) for i in top} & planted) >= len(planted) - 1, mode
        # ... and exact ablation confirms them: all ablated, the strongest selected, at most one swapped
        # for a head upstream of them whose single ablation costs as much.
        exact = profile.model_extra["scores"]["exact_ablation"][mode]
        assert planted <= {(layer, head) for layer, head, _ in exact}, mode
        selected = set(profile.heads(mode))
        assert len(selected & planted) >= len(planted) - 1, (mode, selected)
        assert profile.heads(mode)[0] in planted, mode
    summary = profile.model_extra["validation"]["summary"]
    assert summary["block_top_relative_drop"]["ci95"][0] >= 0.5, summary
    # --dtype bfloat16 (the forwards in bfloat16, the metric and the attribution's sums in float32) chooses
    # the same heads and default gain, and reports figures within the float32 run's intervals.
    import steer_server.analysis.pipeline as pipeline

    dtypes = []

    def load_model_spy(*args, **kwargs):
        loaded = load_model(*args, **kwargs)
        dtypes.append(loaded.model.dtype)
        return loaded

    monkeypatch.setattr(pipeline, "load_model", load_model_spy)
    half = analyze(
        toy_model_dir(),
        subsets["validation"],
        replace(config, dtype="bfloat16", canaries=0),
        eval_data=subsets["test"],
    ).profile
    assert dtypes == [torch.bfloat16]
    assert half.model_extra["provenance"]["dtype"] == "bfloat16"
    assert {m: half.heads(m) for m in ("image", "text")} == {m: profile.heads(m) for m in ("image", "text")}
    assert half.default_gain == profile.default_gain
    for name, figure in half.model_extra["validation"]["summary"].items():
        if isinstance(figure, dict) and "ci95" in figure and "ci95" in summary.get(name, {}):
            low, high = summary[name]["ci95"]
            assert low <= figure["value"] <= high, name
    assert summary["block_random_relative_drop"]["value"] <= 0.1, summary
    assert summary["amplify_broken_share"]["value"] <= 0.05, summary
    raw = json.loads(profile.model_dump_json())
    assert_choices_never_saw_the_reported_split(raw, subsets["validation"], subsets["test"])
    assert result.logit_lens["max_additivity_error"] < 1e-4
    # Canaries: three per instruction, from the report split, each moved by its own block by at least
    # four tolerances.
    assert profile.canaries is not None
    reported = {s.sample.id for s in load_samples(subsets["test"])}
    assert [c.follow for c in profile.canaries.samples] == ["image"] * 3 + ["text"] * 3
    for canary in profile.canaries.samples:
        assert canary.id in reported
        own = canary.recorded[f"{canary.follow}_block"] - canary.recorded["off"]
        assert abs(own) >= 4 * profile.canaries.tolerance, canary.id


@pytest.fixture(scope="module")
def shipped_profile_data(tmp_path_factory):
    from steer_server.eval.demo import SHIPPED_PROFILE_DATA

    spec = SynthSpec(paraphrase_share=SHIPPED_PROFILE_DATA["paraphrase_share"])
    return synth_dataset(
        tmp_path_factory.mktemp("profile-data"),
        int(SHIPPED_PROFILE_DATA["n"]),
        int(SHIPPED_PROFILE_DATA["seed"]),
        spec,
    )


@pytest.mark.parametrize("which", ["toy", "learned"])
def test_shipped_profiles_chose_nothing_on_their_reported_splits(shipped_profile_data, which):
    """Both shipped profiles' provenance: heads and default gain from the synthetic validation split without
    the transfer rules' samples, every figure from the test split (regenerated here, byte for byte the files
    recorded), disjoint; the transfer splits are the rules' report samples; every reported figure carries its
    95% interval and sample count; the sparsity curve and the transfer table are there."""
    from steer_server.eval.demo import SHIPPED_TRANSFER_RULES, learned_profile_path, toy_profile_path

    raw = json.loads((toy_profile_path() if which == "toy" else learned_profile_path()).read_text())
    data = shipped_profile_data
    assert raw["provenance"]["splits"]["transfer_rules"] == list(SHIPPED_TRANSFER_RULES)
    assert_choices_never_saw_the_reported_split(raw, data["validation"], data["test"])
    summary = raw["validation"]["summary"]
    for key in (
        "mf_ratio_baseline",
        "mf_ratio_block_top",
        "mf_ratio_block_random",
        "block_top_relative_drop",
        "block_random_relative_drop",
        "amplify_rescued_share",
        "amplify_broken_share",
    ):
        low, high = summary[key]["ci95"]
        assert low <= summary[key]["value"] <= high and summary[key]["n"] > 0, key
    assert [p["fraction"] for p in raw["sparsity"]["points"]] == list(CURVE_FRACTIONS)
    assert set(raw["transfer"]["side_by_side"]["mf_ratio_baseline"]) == {"within", *SHIPPED_TRANSFER_RULES}
    if which == "learned":
        return  # what the analysis finds on it is reported, not required (README)
    # The planted circuit (the toy's recipe): each mode's strongest head is a planted one; the image heads
    # are exactly the planted three (the README says what the text heads are).
    recipe = json.loads((toy_model_dir() / "training.json").read_text())["recipe"]
    for mode in ("image", "text"):
        heads = [(h["layer"], h["head"]) for h in raw["modes"][mode]["heads"]]
        assert heads[0] in {tuple(cell) for cell in recipe[f"{mode}_heads"]}, (mode, heads)
    assert {(h["layer"], h["head"]) for h in raw["modes"]["image"]["heads"]} == {
        tuple(cell) for cell in recipe["image_heads"]
    }
    # The analysis issue's targets, on the toy's report split.
    assert summary["block_top_relative_drop"]["ci95"][0] >= 0.5, summary
    assert summary["block_random_relative_drop"]["value"] <= 0.1, summary
    assert summary["amplify_rescued_share"]["value"] >= 0.4, summary
    assert summary["amplify_broken_share"]["value"] <= 0.05, summary
    for mode in raw["validation"]["modes"].values():
        before, after = (
            mode["control_accuracy_baseline"]["value"],
            mode["control_accuracy_block_top"]["value"],
        )
        assert before - after <= 0.05, mode


CHOICES = ("attribution", "rank_mode", "choose_default_gain")
FIGURES = ("validate", "knockout", "semantic_inertia")


@pytest.mark.parametrize("report", ["eval-data", "holdout"])
def test_every_choice_sees_only_the_selection_split(tiny_llava, small_data, monkeypatch, report):
    """Spies on what each stage of the pipeline is given: the stages that choose (ranking, exact
    ablation, the default gain's sweep) only selection samples, the stages that report only report
    samples; with --eval-data and with the default held-out split."""
    import steer_server.analysis.pipeline as pipeline

    seen: dict[str, set[str]] = {}

    def spy(name, function):
        def wrapped(runner, *args, **kwargs):
            seen.setdefault(name, set()).update(s.sample.id for s in runner.samples)
            return function(runner, *args, **kwargs)

        return wrapped

    for name in CHOICES + FIGURES:
        monkeypatch.setattr(pipeline, name, spy(name, getattr(pipeline, name)))
    config = AnalysisConfig(progress=False, limit=40, random_draws=1, knockout_samples=4, batch_size=20)
    data = small_data["train"]
    if report == "eval-data":
        result = analyze(tiny_llava, data, config, eval_data=small_data["test"])
        selection = {s.sample.id for s in load_samples(data)[:40]}
        reported = {s.sample.id for s in load_samples(small_data["test"])[:40]}
    else:
        result = analyze(tiny_llava, data, config)
        chosen, held = split_holdout(load_samples(data)[:40], config.holdout, config.seed)
        selection, reported = {s.sample.id for s in chosen}, {s.sample.id for s in held}
        assert result.profile.model_extra["provenance"]["splits"]["report"]["samples"] == len(held)
    assert not selection & reported
    # Canaries come from the report split; where the gains move no report conflict enough (this random
    # model), the profile says why it carries none.
    canaries = result.profile.canaries
    if canaries is None:
        assert result.profile.model_extra["provenance"]["canaries"].startswith("none: no report conflict")
    else:
        assert {c.id for c in canaries.samples} <= reported
    for name in CHOICES:
        assert seen[name] and seen[name] <= selection, name
    for name in FIGURES:
        assert seen[name] and seen[name] <= reported, name


def test_transfer_splits_are_kept_out_of_every_choice(tiny_llava, tmp_path_factory, monkeypatch):
    """With --transfer rules (a held-out task and the held-out instruction wordings), no stage that chooses
    sees a sample a rule matches, the within-distribution figures see none either, and each transfer
    split's validation sees exactly its rule's report samples; the profile sets them side by side."""
    import steer_server.analysis.pipeline as pipeline

    data = synth_dataset(
        tmp_path_factory.mktemp("paraphrased"), 240, seed=9, spec=SynthSpec(paraphrase_share=0.4)
    )
    seen: dict[str, list[set[str]]] = {}

    def spy(name, function):
        def wrapped(runner, *args, **kwargs):
            seen.setdefault(name, []).append({s.sample.id for s in runner.samples})
            return function(runner, *args, **kwargs)

        return wrapped

    for name in (*CHOICES, *FIGURES, "sparsity_curve"):
        monkeypatch.setattr(pipeline, name, spy(name, getattr(pipeline, name)))
    rules = ("task:position", "wording:paraphrase")
    config = AnalysisConfig(
        progress=False, random_draws=1, knockout_samples=4, canaries=0, transfer=rules, gains=(2.0,)
    )
    raw = json.loads(analyze(tiny_llava, data["train"], config).profile.model_dump_json())
    samples = load_samples(data["train"])
    chosen, held = split_holdout(samples, config.holdout, config.seed)
    parsed = [TransferRule.parse(rule) for rule in rules]
    matched = {s.sample.id for s in samples if any(rule.matches(s) for rule in parsed)}
    assert any(s.sample.instruction for s in samples) and matched
    for name in CHOICES:
        assert seen[name] and not set().union(*seen[name]) & matched, name
    for name in ("knockout", "semantic_inertia", "sparsity_curve"):
        assert not set().union(*seen[name]) & matched, name
    within, *transferred = seen["validate"]
    assert within == {s.sample.id for s in held if s.sample.id not in matched}
    assert transferred == [{s.sample.id for s in held if rule.matches(s)} for rule in parsed]
    splits = raw["provenance"]["splits"]
    assert splits["transfer_rules"] == list(rules)
    for rule in parsed:
        assert splits["kept_out_of_selection"][rule.name] == sum(rule.matches(s) for s in chosen)
        assert splits["transfer"][rule.name]["samples"] == sum(rule.matches(s) for s in held)
        assert raw["transfer"]["splits"][rule.name]["split"] == f"transfer {rule.name}"
    table = raw["transfer"]["side_by_side"]
    for figure in ("mf_ratio_baseline", "block_top_relative_drop", "amplify_rescued_share"):
        assert set(table[figure]) == {"within", *rules}
    for mode in ("image", "text"):
        assert set(table["collateral"][mode]) == {"within", *rules}
        assert "block_changed_share" in table["collateral"][mode]["within"]


@pytest.mark.parametrize(
    ("rule", "needle"),
    [
        ("colour", "--transfer must be task:NAME"),
        ("task:", "--transfer must be task:NAME"),
        ("speaker:alice", "--transfer must be task:NAME"),
        ("wording:formal", "knows paraphrase only"),
    ],
)
def test_bad_transfer_rules_are_refused(rule, needle):
    with pytest.raises(AnalysisError, match=needle):
        AnalysisConfig(transfer=(rule,)).check()


def test_a_transfer_rule_that_matches_nothing_is_refused_by_name(tiny_llava, small_data):
    config = AnalysisConfig(progress=False, transfer=("task:colr",))
    with pytest.raises(AnalysisError, match="--transfer task:colr matches no sample"):
        analyze(tiny_llava, small_data["train"], config, eval_data=small_data["test"])


def test_holdout_split_is_disjoint_stratified_and_seeded(small_data):
    samples = load_samples(small_data["test"])
    selection, report = split_holdout(samples, 0.5, seed=3)
    ids = ({s.sample.id for s in selection}, {s.sample.id for s in report})
    assert not ids[0] & ids[1] and len(ids[0]) + len(ids[1]) == len(samples)
    for kind in ("conflict", "control"):
        for follow in ("image", "text"):
            group = [s for s in samples if (s.sample.kind, s.sample.follow) == (kind, follow)]
            held = [s for s in report if (s.sample.kind, s.sample.follow) == (kind, follow)]
            assert len(held) == round(0.5 * len(group)), (kind, follow)
    again = split_holdout(samples, 0.5, seed=3)[1]
    assert [s.sample.id for s in again] == [s.sample.id for s in report]
    assert [s.sample.id for s in split_holdout(samples, 0.5, seed=4)[1]] != [s.sample.id for s in report]


def test_report_data_that_overlaps_the_selection_data_is_refused(tiny_llava, small_data):
    with pytest.raises(AnalysisError, match=r"--eval-data shares \d+ sample id\(s\) with --data"):
        analyze(tiny_llava, small_data["test"], AnalysisConfig(progress=False), eval_data=small_data["test"])


def test_logit_lens_adds_up_and_matches_a_hand_computed_decomposition(tiny_model, small_data):
    """Direct logit attribution at the last prompt position, fp32: the embedding and every layer's
    attention and MLP contributions add up to the model's own logit difference (1e-4); and each one
    equals the sublayer's output (captured at its own module) projected by hand through RMSNorm's
    formula at the final residual's scale and the unembedding rows of the two answers."""
    from steer_server.analysis.logit_lens import decompose
    from steer_server.architectures import residual_modules

    loaded = load_model(tiny_model)
    conflicts = [s for s in load_samples(small_data["test"]) if s.sample.kind == "conflict"][:6]
    runner = Runner(loaded, conflicts, 6)
    members, batch = runner.batches[0], runner.encoded(0)
    instructed = [runner.tokens.instructed[i] for i in members]
    competing = [runner.tokens.competing[i] for i in members]
    found = decompose(loaded, batch, instructed, competing)
    assert torch.allclose(found.total(), found.logit_diff, atol=1e-4), (found.total(), found.logit_diff)
    assert found.logit_diff.abs().max() > 1e-3  # the test is not trivially about zeros

    modules = residual_modules(loaded.model)
    outputs: dict[tuple[str, int], torch.Tensor] = {}

    def keeper(key):
        def keep(module, args, output):
            outputs[key] = (output[0] if isinstance(output, tuple) else output).detach()

        return keep

    handles = [
        getattr(layer, name).register_forward_hook(keeper((name, index)))
        for index, layer in modules.layers.items()
        for name in ("self_attn", "mlp")
    ]
    handles.append(
        modules.final_norm.register_forward_pre_hook(lambda m, args: outputs.update({("final", 0): args[0]}))
    )
    try:
        with torch.inference_mode():
            logits = loaded.model(**batch).logits
    finally:
        for handle in handles:
            handle.remove()
    last = batch["attention_mask"].sum(1) - 1
    norm, weight = modules.final_norm, modules.unembedding.weight.detach()
    gamma = norm.weight.detach()
    for row in range(len(members)):
        inst, comp = instructed[row], competing[row]
        direction = weight[inst].mean(0) - weight[comp].mean(0)
        x_final = outputs[("final", 0)][row, last[row]]
        scale = gamma / torch.sqrt(x_final.pow(2).mean() + norm.variance_epsilon)  # RMSNorm
        d_model = logits[row, last[row], inst].mean() - logits[row, last[row], comp].mean()
        assert float((direction * scale * x_final).sum()) == pytest.approx(float(d_model), abs=1e-4)
        sublayers = torch.zeros_like(x_final)
        for index in modules.layers:
            attn = outputs[("self_attn", index)][row, last[row]]
            mlp = outputs[("mlp", index)][row, last[row]]
            sublayers += attn + mlp
            assert float(found.attention[row, index]) == pytest.approx(
                float((direction * scale * attn).sum()), abs=1e-4
            )
            assert float(found.mlp[row, index]) == pytest.approx(
                float((direction * scale * mlp).sum()), abs=1e-4
            )
        embedding = x_final - sublayers
        assert float(found.embed[row]) == pytest.approx(
            float((direction * scale * embedding).sum()), abs=1e-4
        )


def _without_timing(profile) -> dict:
    raw = json.loads(profile.model_dump_json())
    for key in ("seconds", "samples_per_second"):
        raw["provenance"].pop(key)
    return raw


def test_a_run_killed_after_a_stage_resumes_to_the_same_profile(
    tiny_llava, small_data, tmp_path, monkeypatch
):
    """Killed while validating: the stages before it are on disk; the rerun computes none of them again
    and ends with the profile an uninterrupted run writes. A rerun with other settings starts afresh."""
    import steer_server.analysis.pipeline as pipeline

    config = AnalysisConfig(progress=False, limit=40, random_draws=1, knockout_samples=4, batch_size=20)
    data, report = small_data["train"], small_data["test"]
    whole = analyze(tiny_llava, data, config, eval_data=report)
    folder = tmp_path / "profile.checkpoint"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "validate", killed)
        with pytest.raises(KeyboardInterrupt):
            analyze(tiny_llava, data, config, eval_data=report, checkpoint=folder)
    assert sorted(p.stem for p in folder.glob("*.pt")) == [
        "attribution",
        "default_gain",
        "heads.image",
        "heads.text",
    ]
    assert not list(folder.glob("*.partial"))

    def never(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    with monkeypatch.context() as patch:
        for name in ("attribution", "rank_mode", "choose_default_gain"):
            patch.setattr(pipeline, name, never)
        resumed = analyze(tiny_llava, data, config, eval_data=report, checkpoint=folder)
    assert _without_timing(resumed.profile) == _without_timing(whole.profile)
    assert resumed.knockout == whole.knockout and resumed.logit_lens == whole.logit_lens
    for mode in ("image", "text"):
        assert torch.equal(resumed.scores[mode], whole.scores[mode])
    with pytest.warns(UserWarning, match="left by another run"):
        other = analyze(tiny_llava, data, replace(config, seed=1), eval_data=report, checkpoint=folder)
    assert other.profile.model_extra["provenance"]["seconds"] > 0


def _split_map(model) -> dict[str, str]:
    """accelerate's device map of a LLaVA: every top-level module on the CPU but the second half of the
    decoder layers, offloaded to disk (their weights are brought in by accelerate's hooks per forward,
    the code path of a model split across GPUs)."""
    from steer_server.architectures import residual_modules

    layers = residual_modules(model).layers
    names = {module: name for name, module in model.named_modules()}
    placement = {}
    for name, child in model.model.named_children():
        if name != "language_model":
            placement[f"model.{name}"] = "cpu"
            continue
        for inner in dict(child.named_children()):
            if inner != "layers":
                placement[f"model.language_model.{inner}"] = "cpu"
    for index, layer in layers.items():
        placement[names[layer]] = "disk" if index >= len(layers) // 2 else "cpu"
    placement["lm_head"] = "cpu"
    return placement


def test_a_model_split_across_devices_gives_the_same_analysis(small_data, tmp_path):
    """`--device-map`: the toy split by accelerate (half its decoder layers offloaded to disk, moved in by
    accelerate's hooks per forward) gives the same profile, knockout and logit lens as the model on one
    device, the analysis' shortened passes and bfloat16 canaries included."""
    model_dir = toy_model_dir()
    placement = _write(tmp_path / "device_map.json", _split_map(load_model(model_dir).model))
    config = AnalysisConfig(progress=False, limit=60, knockout_samples=6, random_draws=1, batch_size=16)
    data, held_out = small_data["validation"], small_data["test"]
    whole = analyze(model_dir, data, config, eval_data=held_out)
    split = analyze(model_dir, data, replace(config, device_map=str(placement)), eval_data=held_out)
    provenance = split.profile.model_extra["provenance"]
    assert sorted(set(provenance["device_map"].values())) == ["cpu", "disk"]
    assert whole.profile.model_extra["provenance"]["device_map"] is None
    got, want = _without_timing(split.profile), _without_timing(whole.profile)
    got_canaries, want_canaries = got.pop("canaries"), want.pop("canaries")
    assert got == want | {"provenance": {**want["provenance"], "device_map": provenance["device_map"]}}
    assert split.knockout == whole.knockout and split.logit_lens == whole.logit_lens
    # Offloaded weights cannot be converted in place: the bfloat16 canary figures come from the checkpoint
    # loaded again in bfloat16 (whose rotary frequencies stay float32), within the canaries' tolerance.
    tolerance = min(got_canaries["tolerance"], want_canaries["tolerance"])
    for mine, theirs in zip(got_canaries["samples"], want_canaries["samples"], strict=True):
        assert mine["id"] == theirs["id"] and mine["recorded"] == theirs["recorded"]
        for name, value in mine["recorded_bf16"].items():
            assert value == pytest.approx(theirs["recorded_bf16"][name], abs=tolerance)


def test_the_batch_size_is_halved_until_the_attribution_fits(tiny_llava, small_data, monkeypatch):
    """On a GPU the analysis runs the largest batch, up to --batch-size, whose attribution pass fits: here
    an accelerator that runs out of memory above 4 samples."""
    import steer_server.analysis.attribution as attribution_module

    loaded = load_model(tiny_llava)
    samples = load_samples(small_data["train"])
    assert len(samples) >= 32
    real = attribution_module.last_position_logits
    tried = []

    def limited(loaded, batch):
        tried.append(len(batch["input_ids"]))
        if len(batch["input_ids"]) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(loaded, batch)

    monkeypatch.setattr(attribution_module, "last_position_logits", limited)
    assert attribution_module.fit_batch_size(loaded, samples, 32) == 4
    assert tried == [32, 16, 8, 4]
    monkeypatch.setattr(
        attribution_module, "last_position_logits", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError())
    )
    with pytest.raises(AnalysisError, match="a single sample does not fit"):
        attribution_module.fit_batch_size(loaded, samples, 3)


def test_start_at_layer_puts_back_accelerates_forwards(tiny_llava, small_data):
    """accelerate keeps its device-map hooks in a module's own `forward` (`add_hook_to_module`): the layers
    a shortened pass skips get that forward back, and it still runs."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    from steer_server.analysis.metric import BASELINE, Setting
    from steer_server.architectures import residual_modules

    class Counting(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Counting.calls += 1
            return args, kwargs

    loaded = load_model(tiny_llava)
    geometry = geometry_of(loaded.model.config)
    layers = residual_modules(loaded.model).layers
    for layer in layers.values():
        add_hook_to_module(layer, Counting())
    hooked = {index: vars(layer)["forward"] for index, layer in layers.items()}
    runner = Runner(loaded, load_samples(small_data["test"])[:4], batch_size=4)
    last = geometry.num_layers - 1
    runner.score_many([BASELINE, Setting.of_gains(gain_table(geometry, [(last, 0)], 0.0))], answers=False)
    assert {index: vars(layer).get("forward") for index, layer in layers.items()} == hooked
    before = Counting.calls
    runner.score_many([BASELINE], answers=False)
    assert Counting.calls - before == len(layers) * len(runner.batches)


def test_collateral_counts_changed_answers_per_control_type(small_data):
    """Collateral is the share of controls whose (normalised) greedy answer differs from the unsteered
    one, per arm and per control type; a control answered wrongly both times but differently counts."""
    from steer_server.analysis.metric import Scored
    from steer_server.analysis.validation import collateral, control_type

    controls = [s for s in load_samples(small_data["test"]) if s.sample.kind == "control"][:6]
    types = [control_type(s) for s in controls]
    assert set(types) <= {"agree", "image_only", "text_only"}

    def scored(answers):
        return Scored(
            metric=torch.zeros(len(answers)),
            follows=torch.zeros(len(answers), dtype=torch.bool),
            answers=answers,
        )

    base = ["Red", "blue", "one", "two", "left", "square"]
    block = ["red.", "green", "one", "three", "left", "square"]  # "red." normalises to "red": unchanged
    amplify = list(base)
    report = collateral(controls, [scored(base), scored(block), scored(amplify)])
    assert report["block_changed_share"]["value"] == pytest.approx(2 / 6)
    assert report["block_changed_share"]["n"] == 6
    assert report["amplify_changed_share"]["value"] == 0.0
    changed = [False, True, False, True, False, False]
    for kind in set(types):
        expected = sum(c for c, t in zip(changed, types, strict=True) if t == kind) / types.count(kind)
        assert report["block_changed_by_type"][kind]["value"] == pytest.approx(expected)
