"""AudioCaps -> `audiocaps-AudioCaptioning` (github.com/cdjkim/audiocaps).

As published: `dataset/{train,val,test}.csv` with the header
`audiocap_id,youtube_id,start_time,caption` (train: one caption per clip; val/test: five rows per
clip). The audio is not distributed: each download tool names the 10 s clips its own way, so
`audio_pattern` says how, with the CSV's columns (and `{split}`) as fields:

* `{youtube_id}.*` (default): `<youtube_id>.<any audio extension>` anywhere under the source;
* `{youtube_id}_{start_time}.wav`, `Y{youtube_id}.wav` (AudioSet style), `{audiocap_id}.flac`;
* `audio/{split}/{youtube_id}.wav`: a path relative to the source folder.

A name without a folder is searched for anywhere under the source (preferring a folder named
after the split: train / val, valid, validation / test). `full_videos=true` says the files are
whole YouTube soundtracks: each row then gets `audio_start = start_time` and a 10 s duration.

Splits: train/val/test as named (AF1 read audio/{train,valid,test}; AudioCaps is zero-shot
for AF1, `test` is what the paper reports). One row per caption, captions of one character or
less dropped, as AF1's audiocaps example did.
"""
from __future__ import annotations

import string

from megaflamingo.preprocess.tables import read_table

from . import prompts
from .base import Context, Option, Recipe, RecipeError, TaskSpec

TASK = "audiocaps-AudioCaptioning"
SPLIT_DIRS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


def pattern_fields(pattern: str) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(pattern) if f]
    except ValueError as e:
        raise RecipeError(f"audio pattern {pattern!r} is not a valid format string ({e})") from None


def build(ctx: Context, audio_pattern: str, full_videos: bool, metadata_dir: str | None) -> None:
    fields = pattern_fields(audio_pattern)
    wanted = [(split, (f"{metadata_dir}/{split}.csv",) if metadata_dir else
               (f"dataset/{split}.csv", f"{split}.csv", f"audiocaps/dataset/{split}.csv"), f"{split}.csv")
              for split in ("train", "val", "test")]
    none = ("train.csv / val.csv / test.csv (the CSVs of github.com/cdjkim/audiocaps, dataset/; or pass "
            "metadata_dir=...)")
    for split, csv_path in ctx.each_metadata(wanted, none, max_depth=2):
        table = read_table(csv_path)
        table.require("youtube_id", "caption")
        unknown = [f for f in fields if f != "split" and f not in table.columns]
        if unknown:
            raise RecipeError(f"audiocaps: audio_pattern {audio_pattern!r} uses "
                              f"{', '.join('{' + f + '}' for f in unknown)}, not a column of "
                              f"{csv_path} (columns: {', '.join(table.columns)}, and {{split}})")
        if full_videos:
            table.require("start_time")
        for row in table.rows:
            caption = row["caption"].strip()
            if len(caption) <= 1:
                ctx.skip(TASK, split, "empty_caption", row.get("audiocap_id") or row["youtube_id"])
                continue
            values = {k: v.strip() for k, v in row.items()}
            values["split"] = split
            found = ctx.index.resolve_pattern(audio_pattern, values, prefer=SPLIT_DIRS[split])
            listed = audio_pattern.format_map(values)
            name = ctx.audio(TASK, split, listed, found=found)
            if name is None:
                continue
            start = None
            if full_videos:
                try:
                    start = float(row["start_time"])
                except ValueError:
                    ctx.skip(TASK, split, "bad_start_time", f"{row['youtube_id']} {row['start_time']!r}")
                    continue
            ctx.add(TASK, split, name, caption, audio_start=start,
                    duration=10.0 if full_videos else None)


RECIPES = (
    Recipe(
        "audiocaps", "AudioCaps audio captioning", "https://github.com/cdjkim/audiocaps",
        "dataset/{train,val,test}.csv + the downloaded clips, named per audio_pattern",
        (TaskSpec(TASK, ("train", "val", "test"), prompts.CAPTION),),
        build,
        (Option("audio_pattern", "{youtube_id}.*", "how the downloaded clips are named: CSV "
                "columns and {split} as fields; '.*' = any audio extension", str),
         Option("full_videos", False, "files are whole soundtracks: audio_start = start_time", bool),
         Option("metadata_dir", None, "folder of train/val/test.csv relative to the source "
                "(default: dataset/ or the source itself)", str)),
    ),
)
