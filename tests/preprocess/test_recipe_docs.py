"""The dataset pages stay true: every recipe and task is documented, and every
`megaflamingo-preprocess` flag the pages use exists."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from megaflamingo.preprocess.recipes import list_recipes

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_recipe_and_task_is_in_docs_datasets():
    text = (DOCS / "datasets.md").read_text(encoding="utf-8")
    for r in list_recipes():
        assert f"`{r.name}`" in text, r.name
        for t in r.tasks:
            short = t.name if t.name in text else t.name.split("-")[-1]
            assert short in text, t.name


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from megaflamingo.cli.preprocess import build_parser as _parser
    action = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _commands(text: str):
    """(subcommand, flags) of every `megaflamingo-preprocess SUB ...` command, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    for m in re.finditer(r"megaflamingo-preprocess (\w+)([^\n`]*)", joined):
        yield m.group(1), re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", m.group(2))


@pytest.mark.parametrize("page", ["getting-started.md", "datasets.md"])
def test_documented_preprocess_flags_exist(page):
    subs = _subparsers()
    seen = 0
    for sub, flags in _commands((DOCS / page).read_text(encoding="utf-8")):
        assert sub in subs, (page, sub)
        known = {o for a in subs[sub]._actions for o in a.option_strings}
        unknown = [f for f in flags if f not in known]
        assert not unknown, (page, sub, unknown)
        seen += 1
    assert seen >= 3
