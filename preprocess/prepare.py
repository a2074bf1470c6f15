"""`megaflamingo-preprocess prepare`: a public dataset as its publisher ships it -> AF1 manifests.

    megaflamingo-preprocess prepare --list
    megaflamingo-preprocess prepare clotho-v2 --source DATA/clotho --out DATA/manifests
    megaflamingo-preprocess prepare audiocaps --source DATA/audiocaps --out DATA/manifests \
        --audio-pattern '{youtube_id}_{start_time}.wav'
    megaflamingo-preprocess prepare esc50 --source DATA/ESC-50 --out DATA/manifests -o holdout_fold=5

stdout: one JSON document (the report); stderr: one line per manifest and what was missing.
Exit codes: 0 ok; 1 nothing written (no metadata row had its audio); 2 usage / metadata errors.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "prepare", help="a public dataset as downloaded -> AF1 manifests <Dataset>-<Task>/<split>.jsonl",
        description="Read a public dataset in its publisher's layout and write AF1-style JSONL "
                    "manifests OUT/<Dataset>-<Task>/<split>.jsonl (audio paths relative to SOURCE, "
                    "so `embed --data-root SOURCE` finds them). See --list.")
    p.add_argument("recipe", nargs="?", help="dataset recipe, e.g. clotho-v2 (see --list)")
    p.add_argument("--source", help="the dataset folder, as downloaded and extracted")
    p.add_argument("--out", help="manifest root; writes OUT/<Dataset>-<Task>/<split>.jsonl")
    p.add_argument("--audio-pattern",
                   help="how downloaded clips are named, for datasets that do not ship audio "
                        "(audiocaps, musiccaps, music-avqa): metadata columns as fields, e.g. "
                        "'{youtube_id}.wav' or 'audio/{split}/{youtube_id}_{start_time}.flac'; "
                        "'.*' matches any audio extension")
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe option (repeatable; each recipe's options are in --list)")
    p.add_argument("--list", action="store_true",
                   help="list the recipes with their tasks, splits and options, then exit")
    p.add_argument("--json", action="store_true", help="with --list: print JSON")
    return p


def _print_list(as_json: bool) -> None:
    from megaflamingo.preprocess.recipes import list_recipes

    recipes = list_recipes()
    if as_json:
        print(json.dumps([r.describe() for r in recipes], indent=2))
        return
    for r in recipes:
        print(f"{r.name}: {r.title}  <{r.homepage}>")
        print(f"    source: {r.layout}")
        for t in r.tasks:
            print(f"    -> {t.name}/{{{','.join(t.splits)}}}")
        for o in r.options:
            choices = f" [{'|'.join(map(str, o.choices))}]" if o.choices else ""
            print(f"    -o {o.name}=...{choices} (default {o.default!r}): {o.help}")


def _options(pairs: list[str], audio_pattern: str | None) -> dict:
    from megaflamingo.preprocess.recipes import RecipeError

    opts: dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise RecipeError(f"--option takes KEY=VALUE, got {pair!r}")
        opts[key.strip()] = value
    if audio_pattern is not None:
        opts["audio_pattern"] = audio_pattern
    return opts


def run(args) -> int:
    """Returns the exit code; recipe and metadata errors propagate as ManifestError (the
    caller prints them as one line and exits 2)."""
    from megaflamingo.preprocess.recipes import RecipeError, get_recipe, prepare

    if args.list:
        _print_list(args.json)
        return 0
    if not args.recipe or not args.source or not args.out:
        raise RecipeError("prepare needs RECIPE --source DIR --out DIR (or --list)")
    recipe = get_recipe(args.recipe)
    opts = _options(args.option, args.audio_pattern)
    if "audio_pattern" in opts and "audio_pattern" not in {o.name for o in recipe.options}:
        raise RecipeError(f"{recipe.name} ships its own audio: --audio-pattern does not apply")
    report = prepare(recipe.name, args.source, args.out, **opts)
    path = os.path.join(args.out, f"{recipe.name}.report.json")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
    for m in report["manifests"]:
        where = m["manifest"] or "(not written: no rows)"
        print(f"[prepare] {m['task']}/{m['split']}: {m['rows']} rows, {m['files']} files -> {where}",
              file=sys.stderr)
        miss = m["missing_audio"]
        if miss["files"]:
            more = f" (+{miss['files'] - len(miss['first'])} more)" if miss["files"] > len(miss["first"]) else ""
            print(f"[prepare]   {miss['files']} files listed in the metadata are not under "
                  f"{args.source} ({miss['rows']} rows dropped): "
                  f"{', '.join(repr(n) for n in miss['first'])}{more}", file=sys.stderr)
        for reason, s in m["skipped"].items():
            print(f"[prepare]   {s['count']} metadata rows skipped ({reason})", file=sys.stderr)
    for note in report["notes"]:
        print(f"[prepare] note: {note}", file=sys.stderr)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0 if report["total_rows"] else 1
