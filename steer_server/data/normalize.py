"""Answer normalisation: when a model's answer names a candidate surface form."""

from __future__ import annotations

import re
from collections.abc import Iterable

_PUNCT = re.compile(r"[^\w\s]", flags=re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation and articles, and reduce simple inflections (plural, -ing, -ed)."""
    words = _PUNCT.sub(" ", text.lower()).split()
    words = [w for w in words if w not in {"a", "an", "the"}]
    return " ".join(_stem(w) for w in words)


def _stem(word: str) -> str:
    """Undo simple English inflection: plural -s/-es/-ies, -ing, -ed (both sides are stemmed alike)."""
    if len(word) <= 3 or word.endswith("ss"):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    for plural in ("sses", "shes", "ches", "xes", "zes"):
        if word.endswith(plural):
            return word[:-2]
    for suffix in ("ing", "ed", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def answer_matches(answer: str, candidates: Iterable[str]) -> bool:
    """Whether a model's answer names one of the candidate surface forms (after normalisation)."""
    said = f" {normalize_answer(answer)} "
    for candidate in candidates:
        norm = normalize_answer(candidate)
        if norm and f" {norm} " in said:
            return True
    return False
