"""Named subsets of a benchmark's items (``subset:`` in the registry).

An item is a group ``(prompt, references)`` (several references when ``group_references``).
* ``unanimous_yes_no``: every reference is the same yes/no answer (Clotho-AQA "unanimous").
* ``non_binary``: not a yes/no question (some reference is neither yes nor no).
* ``numerical``: every reference is a number (digits or a number word).
* ``prompt_contains:WORD``: the item's raw prompt contains WORD (e.g. NSynth-MIR's question kinds).
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

_NUMBER_WORDS = {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                 "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                 "nineteen", "twenty"}


def _clean(x: str) -> str:
    return (x or "").strip().lower().rstrip(".").strip()


def _is_number(x: str) -> bool:
    x = _clean(x)
    return bool(re.fullmatch(r"\d+(\.\d+)?", x)) or x in _NUMBER_WORDS


def _unanimous(prompt: str, refs: Sequence[str]) -> bool:
    r = {_clean(x) for x in refs}
    return len(r) == 1 and r <= {"yes", "no"}


def _non_binary(prompt: str, refs: Sequence[str]) -> bool:
    return any(_clean(x) not in ("yes", "no") for x in refs)


def _numerical(prompt: str, refs: Sequence[str]) -> bool:
    return bool(refs) and all(_is_number(x) for x in refs)


_FIXED = {"unanimous_yes_no": _unanimous, "non_binary": _non_binary, "numerical": _numerical}


def check_subset(spec: str) -> None:
    subset_filter(spec)


def subset_filter(spec: str) -> Callable[[str, Sequence[str]], bool]:
    if spec in _FIXED:
        return _FIXED[spec]
    if spec.startswith("prompt_contains:") and spec.split(":", 1)[1]:
        word = spec.split(":", 1)[1].lower()
        return lambda prompt, refs: word in (prompt or "").lower()
    raise ValueError(f"subset {spec!r} unknown (known: {', '.join(_FIXED)}, prompt_contains:WORD)")
