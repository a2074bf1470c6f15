"""Dataset recipes: a public dataset, in the layout its publisher ships, -> AF1 manifests.

    from megaflamingo.preprocess.recipes import prepare, list_recipes
    report = prepare("clotho-v2", "/data/clotho", "/data/manifests")
    # -> /data/manifests/Clotho-v2-AudioCaptioning/{train,val,test}.jsonl

Each manifest line is `{"name", "prompt", "output"[, "audio_start", "duration"], "dataset",
"task", "split"}` with `name` relative to the source folder, so
`megaflamingo-preprocess embed --manifest OUT/<Dataset>-<Task>/<split>.jsonl --data-root SOURCE
--out ARROW/<Dataset>-<Task>/<split>` picks up the dataset, task and split by itself, and the
`<Dataset>-<Task>` names are those of AF1's stage configs. Each recipe module's docstring says
which files it reads and how it maps the publisher's splits and labels onto AF1's.
"""
from __future__ import annotations

import difflib
from pathlib import Path

from megaflamingo.io import atomic_write_json

from . import audiocaps, clotho, cochlscene, emotion, fsd50k, macs, music, sound_events, wavcaps
from .base import Context, Option, Recipe, RecipeError, TaskSpec

__all__ = ["Context", "Option", "Recipe", "RecipeError", "TaskSpec", "RECIPES", "get_recipe",
           "list_recipes", "prepare", "tasks_by_name"]

_MODULES = (clotho, audiocaps, sound_events, fsd50k, cochlscene, macs, wavcaps, music, emotion)
RECIPES: dict[str, Recipe] = {}
for _m in _MODULES:
    for _r in _m.RECIPES:
        if _r.name in RECIPES:
            raise RuntimeError(f"two recipes named {_r.name}")
        RECIPES[_r.name] = _r


def list_recipes() -> list[Recipe]:
    return [RECIPES[k] for k in sorted(RECIPES)]


def get_recipe(name: str) -> Recipe:
    key = str(name).strip().lower()
    if key in RECIPES:
        return RECIPES[key]
    close = difflib.get_close_matches(key, list(RECIPES), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise RecipeError(f"unknown recipe {name!r}{hint} (recipes: {', '.join(sorted(RECIPES))})")


def tasks_by_name() -> dict[str, str]:
    """`<Dataset>-<Task>` -> the recipe that writes it."""
    return {t.name: r.name for r in RECIPES.values() for t in r.tasks}


def parse_option_pairs(pairs: list[str], audio_pattern: str | None = None) -> dict[str, str]:
    """CLI `-o KEY=VALUE` pairs (and `--audio-pattern`) -> the options dict `prepare` takes."""
    opts: dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise RecipeError(f"--option takes KEY=VALUE, got {pair!r}")
        opts[key.strip()] = value
    if audio_pattern is not None:
        opts["audio_pattern"] = audio_pattern
    return opts


def describe_recipes() -> str:
    """`prepare --list` as text: each recipe, its source layout, the manifests it writes and its
    options."""
    lines = []
    for r in list_recipes():
        lines.append(f"{r.name}: {r.title}  <{r.homepage}>")
        lines.append(f"    source: {r.layout}")
        lines.extend(f"    -> {t.name}/{{{','.join(t.splits)}}}" for t in r.tasks)
        for o in r.options:
            choices = f" [{'|'.join(map(str, o.choices))}]" if o.choices else ""
            lines.append(f"    -o {o.name}=...{choices} (default {o.default!r}): {o.help}")
    return "\n".join(lines)


def report_lines(report: dict) -> list[str]:
    """The human summary of a `prepare` report: one line per manifest, then what was missing or
    skipped, then the recipe's notes."""
    lines = []
    for m in report["manifests"]:
        where = m["manifest"] or "(not written: no rows)"
        lines.append(f"{m['task']}/{m['split']}: {m['rows']} rows, {m['files']} files -> {where}")
        miss = m["missing_audio"]
        if miss["files"]:
            extra = miss["files"] - len(miss["first"])
            more = f" (+{extra} more)" if extra > 0 else ""
            lines.append(f"  {miss['files']} files listed in the metadata are not under {report['source']} "
                         f"({miss['rows']} rows dropped): {', '.join(repr(n) for n in miss['first'])}{more}")
        lines.extend(f"  {s['count']} metadata rows skipped ({reason})" for reason, s in m["skipped"].items())
    lines.extend(f"note: {note}" for note in report["notes"])
    return lines


def prepare(name: str, source_dir: str | Path, out_dir: str | Path, **options) -> dict:
    """Run recipe `name` on `source_dir`, writing `out_dir/<Dataset>-<Task>/<split>.jsonl`.

    Options are the recipe's own (`get_recipe(name).options`; strings are converted, so CLI
    `key=value` pairs pass through). Returns the report: per manifest the rows and files written,
    the files listed in the metadata but absent on disk (count and first names) and the skipped
    metadata rows by reason; it is also written to `out_dir/<recipe>.report.json`. Raises
    `RecipeError` (a `ManifestError`) for an unknown recipe or option, or a source folder without
    the dataset's metadata; a malformed metadata file raises `TableError` naming the file and line.
    Nothing is written unless the recipe completes."""
    recipe = get_recipe(name)
    source = Path(source_dir)
    if not source.is_dir():
        raise RecipeError(f"{recipe.name}: source folder {source} does not exist")
    if "audio_pattern" in options and "audio_pattern" not in {o.name for o in recipe.options}:
        raise RecipeError(f"{recipe.name} ships its own audio: --audio-pattern does not apply")
    opts = recipe.parse_options(options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(recipe, source.resolve(), out, opts)
    try:
        recipe.build(ctx, **opts)
    except BaseException:
        ctx.abort()
        raise
    report = ctx.finish()
    atomic_write_json(out / f"{recipe.name}.report.json", report, sort_keys=False)
    return report
