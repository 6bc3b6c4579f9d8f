"""The README's figures are their files' figures: every figure block (`<!-- figures: PROFILE -->`) is the
table `steer_server.analysis.report.figures_markdown` renders from that profile today (`make readme-figures`
writes them again)."""

from __future__ import annotations

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
