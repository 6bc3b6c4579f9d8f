"""`modality-steer report`: one self-contained page of a profile, opened in a real browser (headless
Chromium from the OS packages, `make browser`): every section drawn, nothing asked of the network, nothing
on the console."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from PIL import Image

from steer_server.analysis.report import SECTIONS, open_in_chromium
from steer_server.eval.demo import toy_profile_path

CLI = [sys.executable, "-m", "steer_server.cli"]


def _report(profile, out, *extra):
    done = subprocess.run(
        [*CLI, "report", str(profile), "--out", str(out), *extra], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def _drawn(png: bytes) -> int:
    """How many distinct colours a screenshot has (a blank or failed section has one or two)."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    return len(image.getcolors(maxcolors=1 << 24) or ())


def test_the_toy_profiles_page_shows_every_section_in_chromium(tmp_path):
    page_path = _report(toy_profile_path(), tmp_path / "toy.html", "--screenshot", str(tmp_path / "toy.png"))
    text = page_path.read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text
    with open_in_chromium(page_path) as (page, problems):
        for key, title in SECTIONS:
            section = page.locator(f"section#{key}")
            assert section.locator("h2").inner_text() == title
            assert "Not in this profile" not in section.inner_text(), key
            box = section.bounding_box()
            assert box is not None and box["height"] > 60, (key, box)
            assert _drawn(section.screenshot()) > 20, key
            # Every plot decoded: an <img> that failed to load has no natural width.
            for image in section.locator("img").all():
                assert image.evaluate("i => i.complete && i.naturalWidth > 400"), key
        assert page.locator("section#heads img").count() == 1
        for key in ("sparsity", "knockout", "logit-lens"):
            assert page.locator(f"section#{key} img").count() == 1, key
        assert problems == []
    assert Image.open(tmp_path / "toy.png").size[1] > 3000


def test_a_profile_with_only_the_required_fields_says_what_it_lacks(llava_profile, tmp_path):
    raw = json.loads(llava_profile.read_text())
    minimal = tmp_path / "minimal.json"
    minimal.write_text(json.dumps({k: raw[k] for k in ("format", "model", "default_gain", "modes")}))
    page_path = _report(minimal, tmp_path / "minimal.html")
    with open_in_chromium(page_path) as (page, problems):
        for key in ("validation", "splits", "sparsity", "transfer", "knockout", "logit-lens", "canaries"):
            assert "Not in this profile" in page.locator(f"section#{key}").inner_text(), key
        assert problems == []


def test_a_bad_profile_is_refused_by_name(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "modality-steer.profile/v1"}')
    done = subprocess.run([*CLI, "report", str(bad)], capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "bad.json" in done.stderr
    assert not (tmp_path / "bad.html").exists()


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ('<img src="https://example.com/x.png">', "outside the page"),
        ('<link rel="stylesheet" href="http://127.0.0.1:9/y.css">', "outside the page"),
        ("<script>console.error('broken')</script>", "console error: broken"),
        ("<script>undefined_function()</script>", "page error"),
    ],
)
def test_the_browser_check_can_fail(tmp_path, body, needle):
    """What the page test relies on sees what it must: a request to the network, a console message, an
    uncaught error."""
    page_path = tmp_path / "faulty.html"
    page_path.write_text(f"<!DOCTYPE html><html><head><title>x</title></head><body>{body}</body></html>")
    with open_in_chromium(page_path) as (page, problems):
        page.wait_for_timeout(200)
    assert any(needle in p for p in problems), problems


def test_a_profile_whose_data_has_no_controls_renders(tmp_path):
    """Data without controls (the paper's released files) leaves collateral unmeasured: the page and the
    README tables say so instead of failing."""
    from steer_server.analysis.report import figures_markdown, render

    raw = json.loads(toy_profile_path().read_text())
    for mode in raw["validation"]["modes"].values():
        mode["collateral"] = None
    for split in raw["transfer"]["splits"].values():
        for mode in split["modes"].values():
            mode["collateral"] = None
    for by_split in raw["transfer"]["side_by_side"]["collateral"].values():
        for name in by_split:
            by_split[name] = None
    path = tmp_path / "no-controls.json"
    path.write_text(json.dumps(raw))
    page = render(path)
    assert "no controls" in page and "not measured" in page
    assert '| controls changed, "image" heads blocked | - |' in figures_markdown(path, "transfer")
