"""Transfer splits: report figures on tasks or instruction wordings that no choice saw.

Heads that pass necessity checks on one prompt set often fail on another (arXiv 2606.08292). With
``--transfer RULE`` (repeatable) the samples a rule matches are kept out of the selection split, and the
report split's matching samples form a transfer split of their own; the profile reports the figures on
the within-distribution report split (matching no rule) and on each transfer split side by side.

Rules:
    ``task:NAME[,NAME...]``: samples whose task (the part before "/": the synthetic data's colour, shape,
    count, position) is one of the names.
    ``wording:paraphrase``: samples whose instruction is a paraphrase, not the paper's sentence
    (:attr:`~steer_server.data.schema.Sample.instruction`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..data.schema import LoadedSample
from .config import TransferRule

# The figures set side by side, from each split's validation summary.
SIDE_BY_SIDE = (
    "mf_ratio_baseline",
    "mf_ratio_block_top",
    "block_top_relative_drop",
    "block_random_relative_drop",
    "amplify_rescued_share",
    "amplify_broken_share",
)


def split_by_rules(
    samples: Sequence[LoadedSample], rules: Sequence[TransferRule]
) -> tuple[list[LoadedSample], dict[str, list[LoadedSample]]]:
    """(the samples no rule matches, each rule's matching samples by its name); a sample two rules
    match is in both rules' splits."""
    within = [s for s in samples if not any(rule.matches(s) for rule in rules)]
    return within, {rule.name: [s for s in samples if rule.matches(s)] for rule in rules}


def side_by_side(within: dict[str, Any], transferred: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each figure of :data:`SIDE_BY_SIDE` on the within split and on each transfer split (validation
    summaries), and each mode's collateral likewise."""
    splits = {"within": within, **transferred}
    table: dict[str, Any] = {
        figure: {name: split["summary"][figure] for name, split in splits.items()} for figure in SIDE_BY_SIDE
    }
    table["collateral"] = {
        mode: {name: split["modes"][mode]["collateral"] for name, split in splits.items()}
        for mode in within["modes"]
    }
    return table
