"""The README's figures are their files' figures: every figure block (`<!-- figures: PROFILE -->`) is the
table `steer_server.analysis.report.figures_markdown` renders from that profile today (`make readme-figures`
writes them again)."""

from __future__ import annotations

import re
from pathlib import Path

from steer_server.analysis.report import FIGURE_BLOCK, update_figure_blocks

ROOT = Path(__file__).resolve().parents[1]


def test_readme_figure_blocks_match_their_profiles():
    text = (ROOT / "README.md").read_text()
    blocks = [m.group("path") for m in FIGURE_BLOCK.finditer(text)]
    assert {"profiles/toy-llava.json", "profiles/toy-llava-learned.json"} <= set(blocks), blocks
    assert len(blocks) >= 5, blocks
    assert update_figure_blocks(text, ROOT) == text, (
        "README figures differ from their profiles: make readme-figures"
    )


def test_readme_demo_output_is_the_shipped_profiles():
    """The README's `make demo` output: its split statement and transformers column are what the shipped
    profile says today, and its served column equals them (as `make demo` measured: transformers and vLLM
    agree on every figure)."""
    from steer_server.eval.demo import offline_figures, splits_statement, table, toy_profile_path
    from steer_server.profile import load_profile

    text = (ROOT / "README.md").read_text()
    profile = load_profile(toy_profile_path())
    figures = offline_figures(profile)
    expected = "\n".join(
        line.rstrip() for line in [splits_statement(profile), *table(figures, figures).split("\n")]
    )
    assert f"```\n{expected}\n```" in text


LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


def test_every_relative_link_of_the_readme_and_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target, _ in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            assert (page.parent / target).exists(), (page.name, target)
