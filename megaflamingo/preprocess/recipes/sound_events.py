"""Single-label sound event sets with folds: ESC-50 and UrbanSound8K.

**esc50** -> `ESC50-EventClassification` (github.com/karolpiczak/ESC-50). As published:
`meta/esc50.csv` with the header `filename,fold,target,category,esc10,src_file,take` and the
clips in `audio/`. Labels: `category` with underscores as spaces (`crying_baby` ->
`crying baby`). `esc10=true` keeps the ESC-10 subset only.

**urbansound8k** -> `UrbanSound8K-EventClassification` (urbansounddataset.weebly.com). As
published: `metadata/UrbanSound8K.csv` with the header
`slice_file_name,fsID,start,end,salience,fold,classID,class` and the clips in
`audio/fold1` .. `audio/fold10`. Labels: `class` with underscores as spaces, which is exactly
AF1's UrbanSound8K option list ('air conditioner', 'children playing', ...). `start`/`end` are
positions in the original Freesound recording, not in the slice, so the slices are read from 0
(`duration = end - start` is recorded).

Splits: neither set is in AF1's training blends (both are zero-shot benchmarks in the paper), so
by default every clip goes to one split (`split`, default `test`). `holdout_fold=N` gives the
usual cross-validation split instead: fold N -> test, `val_fold` -> val, the other folds ->
train. Use the official folds for any training, never a random split (ESC-50 clips cut from one
recording share a fold).
"""
from __future__ import annotations

from megaflamingo.preprocess.tables import read_table

from . import prompts
from .base import Context, Option, Recipe, RecipeError, TaskSpec, fold_split, label_text, split_option

ESC_TASK = "ESC50-EventClassification"
US8K_TASK = "UrbanSound8K-EventClassification"


def _fold(ctx, task, report_split, table, i, row, n_folds, column="fold") -> int | None:
    try:
        fold = int(row[column])
    except ValueError:
        fold = -1
    if not 1 <= fold <= n_folds:
        ctx.skip(task, report_split, "bad_fold", f"{table.where(i)}: {row[column]!r}")
        return None
    return fold


def _check_folds(recipe: str, holdout, val_fold, n_folds: int) -> None:
    for name, v in (("holdout_fold", holdout), ("val_fold", val_fold)):
        if v is not None and not 1 <= v <= n_folds:
            raise RecipeError(f"{recipe}: {name} must be in 1..{n_folds}, got {v}")
    if val_fold is not None and holdout is None:
        raise RecipeError(f"{recipe}: val_fold needs holdout_fold")
    if val_fold is not None and val_fold == holdout:
        raise RecipeError(f"{recipe}: val_fold and holdout_fold must differ")


def build_esc50(ctx: Context, split: str, holdout_fold: int | None, val_fold: int | None,
                esc10: bool) -> None:
    _check_folds("esc50", holdout_fold, val_fold, 5)
    meta = ctx.find("meta/esc50.csv", "esc50.csv", what="meta/esc50.csv")
    table = read_table(meta)
    table.require("filename", "fold", "category")
    base = meta.parent.parent if meta.parent.name == "meta" else meta.parent
    audio_dir = ctx.rel(base / "audio")
    if esc10:
        table.require("esc10")
    for i, row in enumerate(table.rows):
        if esc10 and row["esc10"].strip().lower() not in ("true", "1"):
            continue
        fold = _fold(ctx, ESC_TASK, split if holdout_fold is None else "train", table, i, row, 5)
        if fold is None:
            continue
        sp = fold_split(fold, holdout_fold, val_fold, split)
        name = ctx.audio(ESC_TASK, sp, row["filename"], prefer=("audio",), expected_dir=audio_dir)
        if name is not None:
            ctx.add(ESC_TASK, sp, name, label_text(row["category"]))


def build_urbansound8k(ctx: Context, split: str, holdout_fold: int | None, val_fold: int | None) -> None:
    _check_folds("urbansound8k", holdout_fold, val_fold, 10)
    meta = ctx.find("metadata/UrbanSound8K.csv", "UrbanSound8K.csv", what="metadata/UrbanSound8K.csv")
    table = read_table(meta)
    table.require("slice_file_name", "fold", "class")
    base = meta.parent.parent if meta.parent.name == "metadata" else meta.parent
    for i, row in enumerate(table.rows):
        fold = _fold(ctx, US8K_TASK, split if holdout_fold is None else "train", table, i, row, 10)
        if fold is None:
            continue
        sp = fold_split(fold, holdout_fold, val_fold, split)
        name = ctx.audio(US8K_TASK, sp, row["slice_file_name"], prefer=(f"fold{fold}",),
                         expected_dir=ctx.rel(base / "audio" / f"fold{fold}"))
        if name is None:
            continue
        duration = None
        try:
            duration = max(float(row["end"]) - float(row["start"]), 0.0)
        except (KeyError, ValueError):
            pass
        ctx.add(US8K_TASK, sp, name, label_text(row["class"]), duration=duration)


_FOLD_OPTIONS = (
    Option("holdout_fold", None, "fold that becomes the test split (others: train); default: "
           "the whole set goes to the split option", int),
    Option("val_fold", None, "with holdout_fold: fold that becomes the val split", int),
)

RECIPES = (
    Recipe(
        "esc50", "ESC-50 environmental sound classification", "https://github.com/karolpiczak/ESC-50",
        "meta/esc50.csv + audio/",
        (TaskSpec(ESC_TASK, ("test", "train", "val"), prompts.CLASSIFY_SOUND),),
        build_esc50,
        (split_option(), *_FOLD_OPTIONS,
         Option("esc10", False, "only the ESC-10 subset (esc10 column true)", bool)),
    ),
    Recipe(
        "urbansound8k", "UrbanSound8K urban sound classification",
        "https://urbansounddataset.weebly.com/urbansound8k.html",
        "metadata/UrbanSound8K.csv + audio/fold1..fold10/",
        (TaskSpec(US8K_TASK, ("test", "train", "val"), prompts.CLASSIFY_SOUND),),
        build_urbansound8k,
        (split_option(), *_FOLD_OPTIONS),
    ),
)
