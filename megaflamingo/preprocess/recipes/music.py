"""Music sets: GTZAN, NSynth, Medley-solos-DB, MusicCaps, MUSIC-AVQA.

**gtzan** -> `GTZAN-GenreClassification` (marsyas.info). No metadata file: the label is the
folder. As published, `genres/<genre>/<genre>.000NN.au`; the widely used Kaggle repack has
`Data/genres_original/<genre>/<genre>.000NN.wav`. Both are found (any folder named after one of
the ten genres holding `<genre>.<n>.<ext>`). Labels as the folder names, which are AF1's option
list (`hiphop` included). Not in AF1's training blends (a zero-shot benchmark in the paper), so
everything goes to `split` (default `test`). (The Kaggle repack's `jazz.00054.wav` is broken;
`embed` reports it.)

**nsynth** -> `NSynth-MIR`, `NSynth-InstrClassification`, `NSynth-SourceClassification`,
`NSynth-QualityClassification` (magenta.tensorflow.org/datasets/nsynth). As published:
`nsynth-{train,valid,test}/examples.json` (an object keyed by note id with `instrument_family_str`,
`instrument_source_str`, `qualities_str`, `pitch`, `velocity`, ...) and
`nsynth-*/audio/<note id>.wav`. Splits: train / valid -> val / test. Labels keep NSynth's own
spelling (AF1's NSynth option list keeps `synth_lead`). `NSynth-MIR` (the set AF1's stage
configs use) pairs AF1's prompt "this music note is produced by" with
"<source> <family>, pitch <p>, velocity <v>[, <qualities>]"; AF1 did not publish the exact
wording of that output, so this one is ours. Notes without qualities have no
QualityClassification row.

**medley-solos-db** -> `Medley-solos-DB-InstrClassification` (Zenodo record 3464194). As
published: `Medley-solos-DB_metadata.csv` (`subset,instrument,instrument_id,song_id,uuid4`) and
the audio `Medley-solos-DB_<subset>-<instrument_id>_<uuid4>.wav`. Splits: training -> train,
validation -> val, test -> test. Labels: `instrument` as written (AF1's option list).

**musiccaps** -> `MusicCaps-AudioCaptioning` (kaggle.com/datasets/googleai/musiccaps). As
published: `musiccaps-public.csv` (`ytid,start_s,end_s,audioset_positive_labels,aspect_list,
caption,author_id,is_balanced_subset,is_audioset_eval`); the audio is not distributed, so
`audio_pattern` names the downloaded clips (default `{ytid}.*`; `full_videos=true` when they are
whole soundtracks: `audio_start = start_s`). Splits: the customary one,
`is_audioset_eval` True -> test, False -> train (AF1 trains on `MusicCaps-AudioCaptioning/train`).

**music-avqa** -> `Music-AVQA-AQA_All`, `Music-AVQA-AVQA_All` (github.com/GeWu-Lab/MUSIC-AVQA).
As published: `avqa-{train,val,test}.json` (a list of `{video_id, question_id, type,
question_content, templ_values, anser}`; `type` is a JSON list such as `["Audio", "Counting"]`,
the `<...>` placeholders of `question_content` are filled from `templ_values` in order; the
answer field is spelled `anser`). The audio is the soundtrack of the videos, extracted by the
user: `audio_pattern` (default `{video_id}.*`). Tasks: `AQA_All` = every `Audio` question
(AF1's task name reads "audio question answering"), `AVQA_All` = `Audio` + `Audio-Visual`
questions ("audio vision question answering"); `Visual` questions need the video and are left
out unless `avqa_visual=true`. AF1 did not publish which types each name holds; this mapping
follows the names.
"""
from __future__ import annotations

import ast
import json
import re

from megaflamingo.preprocess.tables import TableError, read_json, read_table

from . import prompts
from .audiocaps import pattern_fields
from .base import Context, Option, Recipe, RecipeError, TaskSpec, label_text, split_option

# ----------------------------------------------------------------------------------------- GTZAN
GTZAN_TASK = "GTZAN-GenreClassification"
GTZAN_GENRES = ("blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop",
                "reggae", "rock")


def build_gtzan(ctx: Context, split: str) -> None:
    counts = {g: 0 for g in GTZAN_GENRES}
    for rel in sorted(ctx.index.all_files()):
        parts = rel.split("/")
        if len(parts) < 2:
            continue
        genre = parts[-2].lower()
        if genre in counts and parts[-1].lower().startswith(genre + "."):
            counts[genre] += 1
            ctx.add(GTZAN_TASK, split, rel, genre)
    if not any(counts.values()):
        raise RecipeError(f"gtzan: no <genre>/<genre>.NNNNN.<ext> files under {ctx.source} "
                          f"(genres: {', '.join(GTZAN_GENRES)})")
    short = {g: n for g, n in counts.items() if n != 100}
    if short:
        ctx.note("GTZAN has 100 clips per genre; found " +
                 ", ".join(f"{g}: {n}" for g, n in short.items()))


# ---------------------------------------------------------------------------------------- NSynth
NSYNTH_TASKS = {
    "MIR": "NSynth-MIR",
    "InstrClassification": "NSynth-InstrClassification",
    "SourceClassification": "NSynth-SourceClassification",
    "QualityClassification": "NSynth-QualityClassification",
}
NSYNTH_SPLITS = (("nsynth-train", "train"), ("nsynth-valid", "val"), ("nsynth-test", "test"))


def _nsynth_tasks(spec: str) -> list[str]:
    wanted = [t.strip() for t in spec.split(",") if t.strip()]
    bad = [t for t in wanted if t not in NSYNTH_TASKS]
    if bad or not wanted:
        raise RecipeError(f"nsynth: tasks must be a comma list of {', '.join(NSYNTH_TASKS)}; "
                          f"got {spec!r}")
    return wanted


def nsynth_mir_output(note: dict) -> str:
    out = f"{note['instrument_source_str']} {note['instrument_family_str']}, pitch {int(note['pitch'])}, " \
          f"velocity {int(note['velocity'])}"
    q = [str(x) for x in note.get("qualities_str") or []]
    return out + (", " + ", ".join(q) if q else "")


def build_nsynth(ctx: Context, tasks: str) -> None:
    wanted = _nsynth_tasks(tasks)
    files = [((folder, split), (f"{folder}/examples.json",), f"{folder}/examples.json (split {split})")
             for folder, split in NSYNTH_SPLITS]
    for (folder, split), meta in ctx.each_metadata(files, "nsynth-{train,valid,test}/examples.json"):
        notes = read_json(meta)
        if not isinstance(notes, dict):
            raise TableError(f"{meta}: expected an object keyed by note id")
        audio_dir = ctx.rel(meta.parent / "audio")
        need = ("instrument_family_str", "instrument_source_str", "pitch", "velocity")
        for key, note in notes.items():
            if not isinstance(note, dict) or any(k not in note for k in need):
                for t in wanted:
                    ctx.skip(NSYNTH_TASKS[t], split, "incomplete_metadata", key)
                continue
            found = ctx.index.resolve(f"{key}.wav", (folder,), audio_dir)
            for t in wanted:
                task = NSYNTH_TASKS[t]
                name = ctx.audio(task, split, f"{key}.wav", found=found)
                if name is None:
                    continue
                if t == "MIR":
                    ctx.add(task, split, name, nsynth_mir_output(note))
                elif t == "InstrClassification":
                    ctx.add(task, split, name, label_text(note["instrument_family_str"], underscores=False))
                elif t == "SourceClassification":
                    ctx.add(task, split, name, label_text(note["instrument_source_str"], underscores=False))
                else:
                    q = [str(x) for x in note.get("qualities_str") or []]
                    if q:
                        ctx.add(task, split, name, ", ".join(q))
                    else:
                        ctx.skip(task, split, "no_qualities", key)


# ------------------------------------------------------------------------------- Medley-solos-DB
MEDLEY_TASK = "Medley-solos-DB-InstrClassification"
MEDLEY_SPLITS = {"training": "train", "validation": "val", "test": "test"}


def build_medley(ctx: Context) -> None:
    table = read_table(ctx.find("Medley-solos-DB_metadata.csv", what="Medley-solos-DB_metadata.csv"))
    table.require("subset", "instrument", "instrument_id", "uuid4")
    for i, row in enumerate(table.rows):
        split = MEDLEY_SPLITS.get(row["subset"].strip())
        if split is None:
            ctx.skip(MEDLEY_TASK, "train", "unknown_subset", f"{table.where(i)}: {row['subset']!r}")
            continue
        fname = f"Medley-solos-DB_{row['subset'].strip()}-{row['instrument_id'].strip()}_{row['uuid4'].strip()}.wav"
        name = ctx.audio(MEDLEY_TASK, split, fname, prefer=("Medley-solos-DB", "audio"))
        if name is not None:
            ctx.add(MEDLEY_TASK, split, name, label_text(row["instrument"], underscores=False))


# ------------------------------------------------------------------------------------- MusicCaps
MUSICCAPS_TASK = "MusicCaps-AudioCaptioning"


def _truthy(v: str) -> bool:
    return str(v).strip().lower() in ("true", "1", "yes")


def build_musiccaps(ctx: Context, audio_pattern: str, full_videos: bool, all_train: bool) -> None:
    meta = ctx.find("musiccaps-public.csv", what="musiccaps-public.csv")
    table = read_table(meta)
    table.require("ytid", "caption")
    if not all_train:
        table.require("is_audioset_eval")
    if full_videos:
        table.require("start_s", "end_s")
    unknown = [f for f in pattern_fields(audio_pattern) if f not in table.columns and f != "split"]
    if unknown:
        raise RecipeError(f"musiccaps: audio_pattern uses {', '.join(unknown)}, not a column of "
                          f"{meta} (columns: {', '.join(table.columns)})")
    for row in table.rows:
        split = "train" if all_train or not _truthy(row["is_audioset_eval"]) else "test"
        values = {k: v.strip() for k, v in row.items()}
        values["split"] = split
        found = ctx.index.resolve_pattern(audio_pattern, values, prefer=(split,))
        name = ctx.audio(MUSICCAPS_TASK, split, audio_pattern.format_map(values), found=found)
        if name is None:
            continue
        start = dur = None
        if full_videos:
            try:
                start, dur = float(row["start_s"]), float(row["end_s"]) - float(row["start_s"])
            except ValueError:
                ctx.skip(MUSICCAPS_TASK, split, "bad_start", row["ytid"])
                continue
        ctx.add(MUSICCAPS_TASK, split, name, row["caption"], audio_start=start, duration=dur)


# ------------------------------------------------------------------------------------ MUSIC-AVQA
AVQA_AQA = "Music-AVQA-AQA_All"
AVQA_AVQA = "Music-AVQA-AVQA_All"
_PLACEHOLDER = re.compile(r"<[^<>]+>")


def _literal_list(v) -> list | None:
    if isinstance(v, list):
        return v
    if not isinstance(v, str):
        return None
    for parse in (json.loads, ast.literal_eval):  # published as a Python-literal string
        try:
            out = parse(v)
        except (ValueError, SyntaxError):
            continue
        return out if isinstance(out, list) else None
    return None


def avqa_question(item: dict) -> str | None:
    """`question_content` with its `<...>` placeholders filled from `templ_values` in order;
    None when they do not match up."""
    q = str(item.get("question_content", ""))
    values = _literal_list(item.get("templ_values", "[]"))
    holes = _PLACEHOLDER.findall(q)
    if values is None or len(values) < len(holes):
        return None
    it = iter(values)
    return _PLACEHOLDER.sub(lambda m: str(next(it)), q)


def build_music_avqa(ctx: Context, audio_pattern: str, avqa_visual: bool) -> None:
    files = [(split, (f"avqa-{split}.json", f"data/json/avqa-{split}.json", f"data/json_update/avqa-{split}.json"),
              f"avqa-{split}.json") for split in ("train", "val", "test")]
    for split, meta in ctx.each_metadata(files, "avqa-{train,val,test}.json"):
        items = read_json(meta)
        if not isinstance(items, list):
            raise TableError(f"{meta}: expected a list of question objects")
        for i, item in enumerate(items):
            if not isinstance(item, dict) or "video_id" not in item or "anser" not in item:
                ctx.skip(AVQA_AQA, split, "incomplete_item", f"{meta}[{i}]")
                continue
            kinds = _literal_list(item.get("type")) or []
            kind = str(kinds[0]) if kinds else ""
            tasks = []
            if kind == "Audio":
                tasks = [AVQA_AQA, AVQA_AVQA]
            elif kind == "Audio-Visual" or (kind == "Visual" and avqa_visual):
                tasks = [AVQA_AVQA]
            if not tasks:
                continue
            question = avqa_question(item)
            if question is None:
                for t in tasks:
                    ctx.skip(t, split, "bad_template", f"{meta}[{i}]")
                continue
            values = {k: str(v) for k, v in item.items()}
            values["split"] = split
            found = ctx.index.resolve_pattern(audio_pattern, values)
            for t in tasks:
                name = ctx.audio(t, split, audio_pattern.format_map(values), found=found)
                if name is not None:
                    ctx.add(t, split, name, str(item["anser"]), prompt=prompts.question(question))


RECIPES = (
    Recipe(
        "gtzan", "GTZAN music genre classification", "http://marsyas.info/index.html",
        "genres/<genre>/<genre>.000NN.au (or the Kaggle repack's genres_original/...wav)",
        (TaskSpec(GTZAN_TASK, ("test", "train", "val"), prompts.GENRE),),
        build_gtzan, (split_option(),),
    ),
    Recipe(
        "nsynth", "NSynth musical notes (MIR, instrument, source, qualities)",
        "https://magenta.tensorflow.org/datasets/nsynth",
        "nsynth-{train,valid,test}/examples.json + nsynth-*/audio/ (the extracted .jsonwav archives)",
        (TaskSpec(NSYNTH_TASKS["MIR"], ("train", "val", "test"), prompts.NOTE_PRODUCED_BY),
         TaskSpec(NSYNTH_TASKS["InstrClassification"], ("train", "val", "test"), prompts.INSTRUMENT),
         TaskSpec(NSYNTH_TASKS["SourceClassification"], ("train", "val", "test"), prompts.SOURCE),
         TaskSpec(NSYNTH_TASKS["QualityClassification"], ("train", "val", "test"), prompts.QUALITIES)),
        build_nsynth,
        (Option("tasks", ",".join(NSYNTH_TASKS), "comma list of the tasks to write", str),),
    ),
    Recipe(
        "medley-solos-db", "Medley-solos-DB instrument classification",
        "https://zenodo.org/records/3464194",
        "Medley-solos-DB_metadata.csv + the extracted Medley-solos-DB.tar.gz",
        (TaskSpec(MEDLEY_TASK, ("train", "val", "test"), prompts.INSTRUMENT),),
        build_medley,
    ),
    Recipe(
        "musiccaps", "MusicCaps music captioning", "https://www.kaggle.com/datasets/googleai/musiccaps",
        "musiccaps-public.csv + the downloaded clips, named per audio_pattern",
        (TaskSpec(MUSICCAPS_TASK, ("train", "test"), prompts.MUSIC_CAPTION_PARAGRAPH),),
        build_musiccaps,
        (Option("audio_pattern", "{ytid}.*", "how the downloaded clips are named (CSV columns as "
                "fields; '.*' = any audio extension)", str),
         Option("full_videos", False, "files are whole soundtracks: audio_start = start_s", bool),
         Option("all_train", False, "put every clip in train (ignore is_audioset_eval)", bool)),
    ),
    Recipe(
        "music-avqa", "MUSIC-AVQA music question answering (audio questions)",
        "https://github.com/GeWu-Lab/MUSIC-AVQA",
        "avqa-{train,val,test}.json + the soundtracks extracted from the videos, per audio_pattern",
        (TaskSpec(AVQA_AQA, ("train", "val", "test"), prompts.QUESTION),
         TaskSpec(AVQA_AVQA, ("train", "val", "test"), prompts.QUESTION)),
        build_music_avqa,
        (Option("audio_pattern", "{video_id}.*", "how the extracted soundtracks are named "
                "(item fields such as {video_id}; '.*' = any audio extension)", str),
         Option("avqa_visual", False, "also put Visual-only questions in AVQA_All", bool)),
    ),
)
