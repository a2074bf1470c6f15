"""Answer normalisation before scoring: named steps a registry entry lists (``normalize: [...]``).

``af1`` is AF1's evaluation normalisation of free-form answers: strip, lower-case, collapse
whitespace, drop a trailing period (its answers end in '.', its option lists spell labels with one).
"""
from __future__ import annotations

import re
from typing import Callable, Sequence


def _af1(text: str) -> str:
    t = re.sub(r"\s+", " ", (text or "").strip().lower())
    return t.rstrip(".").strip()


def _emotion_names(text: str) -> str:
    # AF1 spells emotions one way when listing options ("anger" -> "angry"): map both sides alike.
    from megaflamingo.data.templates import EMOTION_NAMES

    return EMOTION_NAMES.get(text, text)


def _underscores(text: str) -> str:
    return text.replace("_", " ")


NORMALIZERS: dict[str, Callable[[str], str]] = {
    "af1": _af1,
    "emotion_names": _emotion_names,
    "underscores_to_spaces": _underscores,
}


def normalizer(steps: Sequence[str]) -> Callable[[str], str]:
    fns = [NORMALIZERS[s] for s in steps]

    def run(text: str) -> str:
        for fn in fns:
            text = fn(text)
        return text

    return run


def split_labels(text: str) -> list[str]:
    """A multi-label answer as a label list: AF1 joins labels with ', ' (some sets with ';')."""
    return [x.strip() for x in re.split(r"[,;]", text or "") if x.strip()]
