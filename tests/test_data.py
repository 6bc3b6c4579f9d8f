"""The data schema and loader, the synthetic generator, the importer for the paper's files."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from steer_server.data.importer import import_mf
from steer_server.data.normalize import answer_matches
from steer_server.data.prompts import INSTRUCTIONS, insert_instruction, openai_messages, user_text
from steer_server.data.schema import DataError, LoadedSample, Sample, load_samples
from steer_server.data.scoring import is_success, judge
from steer_server.data.synth import COLOURS, TASKS, synth_dataset

CLI = [sys.executable, "-m", "steer_server.cli"]


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_synth_is_deterministic_per_seed(tmp_path):
    synth_dataset(tmp_path / "a", 240, seed=3)
    synth_dataset(tmp_path / "b", 240, seed=3)
    synth_dataset(tmp_path / "c", 240, seed=4)
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    assert _tree_digest(tmp_path / "a") != _tree_digest(tmp_path / "c")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> dict[str, list[LoadedSample]]:
    out = tmp_path_factory.mktemp("synth")
    paths = synth_dataset(out, 2000, seed=0)
    return {split: load_samples(path) for split, path in paths.items()}


def test_synth_splits_and_balance(synth):
    assert {k: len(v) for k, v in synth.items()} == {"train": 1600, "validation": 200, "test": 200}
    train = [s.sample for s in synth["train"]]
    conflicts = [s for s in train if s.kind == "conflict"]
    assert 0.6 < len(conflicts) / len(train) < 0.8
    by_cell = Counter((s.task, s.follow) for s in conflicts)
    assert set(by_cell) == {(t, f) for t in TASKS for f in ("image", "text")}
    assert max(by_cell.values()) / min(by_cell.values()) < 1.5
    controls = Counter(s.task.split("/")[1] for s in train if s.kind == "control")
    assert set(controls) == {"agree", "image_only", "text_only"}
    ids = [s.sample.id for split in synth.values() for s in split]
    assert len(ids) == len(set(ids))


def test_synth_conflicts_contradict_and_images_show_the_image_answer(synth):
    for loaded in synth["test"]:
        sample = loaded.sample
        if sample.kind == "conflict":
            assert sample.answer_text[0] in sample.context
            assert sample.answer_image[0] not in sample.context.split()
            assert INSTRUCTIONS[sample.follow] in user_text(sample)
        if sample.task == "colour" and sample.kind == "conflict":
            pixels = Counter(
                map(tuple, np.asarray(Image.open(loaded.image_path).convert("RGB")).reshape(-1, 3).tolist())
            )
            background = (245, 245, 245)
            drawn = max((c for c in pixels if c != background), key=pixels.__getitem__)
            assert drawn == COLOURS[sample.answer_image[0]]


def test_controls_have_the_right_modalities(synth):
    for loaded in synth["train"]:
        sample = loaded.sample
        if sample.kind != "control":
            continue
        control = sample.task.split("/")[1]
        if control == "image_only":
            assert sample.context == "" and loaded.image_path is not None and sample.follow == "image"
        elif control == "text_only":
            assert loaded.image_path is None and sample.context and sample.follow == "text"
        else:
            assert sample.answer_image == sample.answer_text


GOOD = {
    "id": "x1",
    "image": "img.png",
    "context": "The object is red.",
    "question": "What colour is the object?",
    "follow": "image",
    "answer_image": ["blue"],
    "answer_text": ["red"],
    "kind": "conflict",
}

BAD_LINES = [
    ({**GOOD, "follow": "audio"}, ":2: field 'follow'"),
    ({k: v for k, v in GOOD.items() if k != "question"}, ":2: field 'question': Field required"),
    ({**GOOD, "answer_image": []}, ":2: field '(sample)'"),
    ({**GOOD, "answer_image": ["Red."]}, "the image and text answers are the same ('red'): no conflict"),
    ({**GOOD, "image": None}, "a conflict sample needs both an image and a context"),
    ({**GOOD, "kind": "other"}, ":2: field 'kind'"),
    ({**GOOD, "extra": 1}, ":2: field 'extra': Extra inputs are not permitted"),
    ({**GOOD, "id": "x0"}, ":2: field 'id': 'x0' repeats line 1"),
]


@pytest.mark.parametrize(("record", "needle"), BAD_LINES, ids=[n for _, n in BAD_LINES])
def test_loader_names_line_and_field(tmp_path, record, needle):
    Image.new("RGB", (4, 4)).save(tmp_path / "img.png")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({**GOOD, "id": "x0"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError) as caught:
        load_samples(path)
    assert needle in str(caught.value)
    assert str(path) in str(caught.value)


LOADER_ERRORS = [
    ("{not json\n", "d.jsonl:1: not valid JSON"),
    ("", "the data set is empty"),
    (
        json.dumps({**GOOD, "image": "missing.png"}) + "\n",
        "1 image(s) missing, first: line 1 (x1): missing.png",
    ),
]


@pytest.mark.parametrize(("content", "needle"), LOADER_ERRORS, ids=[n for _, n in LOADER_ERRORS])
def test_loader_file_errors(tmp_path, content, needle):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=__import__("re").escape(needle)):
        load_samples(path)


JUDGE = [
    ("blue", "follow"),
    ("Blue.", "follow"),
    ("It is blue", "follow"),
    ("red", "other"),
    ("green", "neither"),
    ("red and blue", "both"),
]


@pytest.mark.parametrize(("answer", "outcome"), JUDGE)
def test_judge(answer, outcome):
    assert judge(Sample(**GOOD), answer) == outcome


@pytest.mark.parametrize(
    ("said", "candidates"), [("Walking", ["walk"]), ("dogs", ["dog"]), ("the Apples!", ["apple"])]
)
def test_answer_matching_normalises_inflection(said, candidates):
    assert answer_matches(said, candidates)


def _released_ids(path: Path) -> list[str]:
    return [r["image_id"] for r in json.loads(path.read_text())]


def _stand_in_images(ids: list[str], folder: Path, *, coco_names: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for image_id in set(ids):
        name = f"COCO_val2014_{image_id}.jpg" if coco_names else f"{image_id}.jpg"
        Image.new("RGB", (8, 8), (int(image_id[-2:]) % 255, 0, 0)).save(folder / name)


@pytest.mark.parametrize("coco_names", [True, False])
def test_import_every_released_file(mf_data_dir, tmp_path, coco_names):
    files = sorted(mf_data_dir.glob("*.json"))
    assert len(files) == 4
    for source in files:
        records = json.loads(source.read_text())
        images = tmp_path / "coco"
        _stand_in_images([r["image_id"] for r in records], images, coco_names=coco_names)
        out = tmp_path / "out" / f"{source.stem}.jsonl"
        done = subprocess.run(
            [*CLI, "data", "import-mf", str(source), "--images", str(images), "--out", str(out)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert f"wrote {len(records)} of {len(records)} samples" in done.stdout
        loaded = load_samples(out)
        assert len(loaded) == len(records)
        expected_follow = "text" if "following_text" in source.name else "image"
        for record, item in zip(records, loaded, strict=True):
            sample = item.sample
            assert sample.follow == expected_follow and sample.kind == "conflict"
            assert sample.answer_image[0] == record["answer_img"]
            assert sample.answer_text[0] == record["answer_text"]
            assert set(record["answer_img_candidate_list"]) <= set(sample.answer_image)
            assert sample.question and "\n" not in sample.question and "rely on" not in sample.question
            assert sample.task == record["task"]
            assert item.image_path is not None and item.image_path.is_file()


def test_import_reports_missing_images(mf_data_dir, tmp_path):
    source = mf_data_dir / "v3_following_text_open_ended_qwen_vl_2_5_7b_remaining.json"
    ids = _released_ids(source)
    images = tmp_path / "coco"
    _stand_in_images(ids, images, coco_names=True)
    gone = sorted(set(ids))[:3]
    for image_id in gone:
        (images / f"COCO_val2014_{image_id}.jpg").unlink()
    lost = sum(1 for i in ids if i in gone)
    out = tmp_path / "mf.jsonl"
    refused = subprocess.run(
        [*CLI, "data", "import-mf", str(source), "--images", str(images), "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert refused.returncode != 0
    assert f"{lost} of {len(ids)} images not found" in refused.stderr
    assert gone[0] in refused.stderr
    assert not out.exists()
    partial = subprocess.run(
        [
            *CLI,
            "data",
            "import-mf",
            str(source),
            "--images",
            str(images),
            "--out",
            str(out),
            "--skip-missing",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert partial.returncode == 0, partial.stderr
    assert f"wrote {len(ids) - lost} of {len(ids)} samples" in partial.stdout
    assert f"skipped {lost} samples whose image is missing" in partial.stderr
    assert len(load_samples(out)) == len(ids) - lost


AGREE = {**GOOD, "kind": "control", "answer_image": ["red"], "answer_text": ["red"]}
SUCCESS = [
    (GOOD, "blue", True),
    (GOOD, "red", False),
    (GOOD, "red and blue", False),
    (AGREE, "red", True),
    (AGREE, "Red.", True),
    (AGREE, "green", False),
    ({**GOOD, "kind": "control", "context": "", "answer_text": []}, "blue", True),
]


@pytest.mark.parametrize(("record", "answer", "expected"), SUCCESS)
def test_success_of_conflicts_and_controls(record, answer, expected):
    assert is_success(Sample(**record), answer) is expected


# --------------------------------------------------------------------------------------------------
# The one prompt layout: injection puts the instruction where the data layout does.
# --------------------------------------------------------------------------------------------------


def _all_layouts(synth, mf_data_dir, tmp_path):
    samples = [s.sample for s in synth["test"]]
    for source in sorted(mf_data_dir.glob("*.json")):
        images = tmp_path / "coco"
        _stand_in_images([r["image_id"] for r in json.loads(source.read_text())], images, coco_names=False)
        out = tmp_path / f"{source.stem}.jsonl"
        import_mf(source, images, out)
        samples += [s.sample for s in load_samples(out)]
    return samples


def test_injected_instruction_lands_where_the_data_layout_puts_it(synth, mf_data_dir, tmp_path):
    """Every synthetic sample and every sample of the paper's released files (some contexts span several
    lines): inserting the instruction into the uninstructed text gives the instructed text exactly."""
    samples = _all_layouts(synth, mf_data_dir, tmp_path)
    assert any("\n" in s.context for s in samples)
    for sample in samples:
        bare = user_text(sample, with_instruction=False)
        assert insert_instruction(bare, INSTRUCTIONS[sample.follow]) == user_text(sample), sample.id


def test_server_injection_renders_the_data_layouts_prompt(synth):
    """The server's rewrite of a chat request without an instruction, rendered by the toy's chat
    template, is the prompt the data layout renders with the instruction: text compared, not length."""
    from steer_server.serving.policy import Policy, rewrite
    from steer_server.spec import SteerSpec
    from steer_server.toy.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()

    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    policy = Policy(
        plugin=None,  # type: ignore[arg-type]  # rewrite reads only the injection settings
        default=SteerSpec(mode="off"),
        enforce=None,
        inject_instruction=True,
        instructions=dict(INSTRUCTIONS),
    )
    loaded = synth["test"]
    kinds = {(s.sample.kind, s.sample.image is None, bool(s.sample.context)) for s in loaded}
    assert len(kinds) >= 3  # conflicts, image-only and text-only controls
    for sample in loaded[:40]:
        mode = sample.sample.follow
        body = {"messages": openai_messages(sample, with_instruction=False), "modality_steer": mode}
        rewritten = rewrite(body, SteerSpec(mode=mode), policy)
        assert render(rewritten["messages"]) == render(openai_messages(sample)), sample.sample.id
        if sample.sample.context:  # a completions prompt is found its place by its context line
            prompt = f"USER: {user_text(sample.sample, with_instruction=False)}\nASSISTANT:"
            completion = rewrite({"prompt": prompt}, SteerSpec(mode=mode), policy)
            assert completion["prompt"] == f"USER: {user_text(sample.sample)}\nASSISTANT:"
