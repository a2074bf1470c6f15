"""WavCaps -> `WavCaps-<Source>-AudioCaptioning` for its four sources (huggingface.co/datasets/
cvssp/WavCaps): AudioSet_SL, BBC_Sound_Effects, FreeSound, SoundBible, AF1's task names.

As published: `json_files/AudioSet_SL/as_final.json`, `json_files/BBC_Sound_Effects/bbc_final.json`,
`json_files/FreeSound/fsd_final.json`, `json_files/SoundBible/sb_final.json`, each
`{"num_captions_per_audio": 1, "data": [{"id", "caption", "duration", ...}]}`; the audio comes as
split zips under `Zip_files/<Source>/` holding `<id>.flac` (AudioSet_SL ids end in `.wav`: the
file is the id with `.flac`). Where the zips extract to is not fixed, so a clip is looked up by
its id as a file stem anywhere under the source, preferring a folder whose name starts with the
source name (the sources' numeric ids overlap: FreeSound and SoundBible both have `2229`).

All four are training data in AF1's pretraining blend: every clip goes to `train`. WavCaps'
AudioSet_SL overlaps AudioCaps' val/test and FreeSound overlaps Clotho's; drop those ids yourself
(`exclude_ids`: a text file of ids, one a line) before evaluating on those sets.
"""
from __future__ import annotations

from pathlib import Path

from megaflamingo.preprocess.tables import TableError, decode_text, read_json

from . import prompts
from .base import Context, Option, Recipe, RecipeError, TaskSpec

SOURCES = {
    "AudioSet_SL": "as_final.json",
    "BBC_Sound_Effects": "bbc_final.json",
    "FreeSound": "fsd_final.json",
    "SoundBible": "sb_final.json",
}


def task_name(source: str) -> str:
    return f"WavCaps-{source}-AudioCaptioning"


def build(ctx: Context, sources: str, exclude_ids: str | None) -> None:
    wanted = [s.strip() for s in sources.split(",") if s.strip()]
    bad = [s for s in wanted if s not in SOURCES]
    if bad or not wanted:
        raise RecipeError(f"wavcaps: sources must be a comma list of {', '.join(SOURCES)}; got {sources!r}")
    excluded: set[str] = set()
    if exclude_ids:
        path = Path(exclude_ids)
        if not path.is_absolute() and not path.is_file():
            path = ctx.source / exclude_ids
        text, _ = decode_text(path)
        excluded = {ln.strip() for ln in text.splitlines() if ln.strip()}
    files = [(source, (f"json_files/{source}/{SOURCES[source]}", f"{source}/{SOURCES[source]}", SOURCES[source]),
              f"{SOURCES[source]} ({task_name(source)})") for source in wanted]
    for source, meta in ctx.each_metadata(files, f"one of {', '.join(SOURCES[s] for s in wanted)}"):
        task = task_name(source)
        obj = read_json(meta)
        rows = obj.get("data") if isinstance(obj, dict) else obj
        if not isinstance(rows, list):
            raise TableError(f"{meta}: expected {{'data': [...]}}")
        for i, r in enumerate(rows):
            if not isinstance(r, dict) or not r.get("id") or not r.get("caption"):
                ctx.skip(task, "train", "incomplete_item", f"{meta}: data[{i}]")
                continue
            rid = str(r["id"]).strip()
            if rid in excluded:
                ctx.skip(task, "train", "excluded_id", rid)
                continue
            stem = rid[:-4] if rid.lower().endswith(".wav") else rid
            found = ctx.index.resolve_stem(stem, prefer=(source,))
            name = ctx.audio(task, "train", f"{stem}.flac", found=found)
            if name is None:
                continue
            dur = r.get("duration")
            ctx.add(task, "train", name, str(r["caption"]),
                    duration=float(dur) if isinstance(dur, (int, float)) else None)


RECIPES = (
    Recipe(
        "wavcaps", "WavCaps weakly-labelled audio captioning (4 sources)",
        "https://huggingface.co/datasets/cvssp/WavCaps",
        "json_files/<Source>/<x>_final.json + the extracted Zip_files/<Source>/ (<id>.flac)",
        tuple(TaskSpec(task_name(s), ("train",), prompts.CAPTION) for s in SOURCES),
        build,
        (Option("sources", ",".join(SOURCES), "comma list of the sources to write", str),
         Option("exclude_ids", None, "text file of ids to leave out (one a line)", str)),
    ),
)
