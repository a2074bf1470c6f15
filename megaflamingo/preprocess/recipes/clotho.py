"""Clotho v2.1 (captioning) and Clotho-AQA (question answering), both from Tampere University.

**clotho-v2** -> `Clotho-v2-AudioCaptioning` (Zenodo record 4783391). As published:
`clotho_captions_{development,validation,evaluation}.csv` with the header
`file_name,caption_1,caption_2,caption_3,caption_4,caption_5`; the 7z archives extract to
`development/`, `validation/`, `evaluation/`. File names contain spaces and commas (quoted in
the CSV). Splits as AF1 used them: development -> train, validation -> val, evaluation -> test
(AF1 validates on `Clotho-v2-AudioCaptioning/val` and reports Clotho-v2 test numbers on the
evaluation set). One row per caption, all five, as AF1's captioning manifests do (one entry per
(file, caption)); evaluation deduplicates by (file, prompt) and scores against all five.
The unlabelled `clotho_audio_test.7z` has no captions and is not used.

**clotho-aqa** -> `Clotho-AQA-AQA` (Zenodo record 6473207). As published:
`clotho_aqa_{train,val,test}.csv` with the header `file_name,QuestionText,answer,confidence`
(each question answered by three annotators: three rows) and `audio_files.zip` extracting to
`audio_files/`. Splits: train/val/test as named. Prompt `question: <QuestionText>` (AF1's AQA
augmentations rewrite that lead-in), output the answer. Every annotator's row is kept by
default; `min_confidence` drops answers whose annotator was unsure.
"""
from __future__ import annotations

import re

from megaflamingo.preprocess.tables import read_table

from . import prompts
from .base import Context, Option, Recipe, TaskSpec

CLOTHO_TASK = "Clotho-v2-AudioCaptioning"
CLOTHO_SPLITS = (("development", "train"), ("validation", "val"), ("evaluation", "test"))
_CAPTION_COL = re.compile(r"^caption_(\d+)$")


def build_clotho_v2(ctx: Context, validation_as: str) -> None:
    splits = [(folder, validation_as if folder == "validation" else split) for folder, split in CLOTHO_SPLITS]
    wanted = [((folder, split), (f"clotho_captions_{folder}.csv",), f"clotho_captions_{folder}.csv (split {split})")
              for folder, split in splits]
    for (folder, split), csv_path in ctx.each_metadata(wanted, "clotho_captions_*.csv"):
        table = read_table(csv_path)
        table.require("file_name")
        caps = sorted((c for c in table.columns if _CAPTION_COL.match(c)),
                      key=lambda c: int(_CAPTION_COL.match(c).group(1)))
        if not caps:
            table.require("caption_1")
        audio_dir = ctx.rel(csv_path.parent / folder)
        for row in table.rows:
            name = ctx.audio(CLOTHO_TASK, split, row["file_name"], prefer=(folder,),
                             expected_dir=audio_dir)
            if name is None:
                continue
            for c in caps:
                if row[c].strip():
                    ctx.add(CLOTHO_TASK, split, name, row[c])
                else:
                    ctx.skip(CLOTHO_TASK, split, "empty_caption", f"{row['file_name']} {c}")


AQA_TASK = "Clotho-AQA-AQA"
_CONFIDENCE_RANK = {"no": 0, "maybe": 1, "yes": 2}


def build_clotho_aqa(ctx: Context, min_confidence: str) -> None:
    floor = {"any": -1, "maybe": 1, "yes": 2}[min_confidence]
    wanted = [(split, (f"clotho_aqa_{split}.csv",), f"clotho_aqa_{split}.csv") for split in ("train", "val", "test")]
    for split, csv_path in ctx.each_metadata(wanted, "clotho_aqa_*.csv"):
        table = read_table(csv_path)
        table.require("file_name", "QuestionText", "answer")
        has_conf = "confidence" in table.columns
        audio_dir = ctx.rel(csv_path.parent / "audio_files")
        for row in table.rows:
            if has_conf and floor >= 0:
                rank = _CONFIDENCE_RANK.get(row["confidence"].strip().lower(), 2)
                if rank < floor:
                    ctx.skip(AQA_TASK, split, "low_confidence", row["file_name"])
                    continue
            if not row["QuestionText"].strip():
                ctx.skip(AQA_TASK, split, "empty_question", row["file_name"])
                continue
            name = ctx.audio(AQA_TASK, split, row["file_name"], prefer=("audio_files",),
                             expected_dir=audio_dir)
            if name is not None:
                ctx.add(AQA_TASK, split, name, row["answer"], prompt=prompts.question(row["QuestionText"]))


RECIPES = (
    Recipe(
        "clotho-v2", "Clotho v2.1 audio captioning", "https://zenodo.org/records/4783391",
        "clotho_captions_{development,validation,evaluation}.csv + development/ validation/ "
        "evaluation/ (the extracted 7z archives)",
        (TaskSpec(CLOTHO_TASK, ("train", "val", "test"), prompts.CAPTION),),
        build_clotho_v2,
        (Option("validation_as", "val", "split the validation set goes to (AF1: val; 'train' "
                "trains on development + validation)", str, ("val", "train")),),
    ),
    Recipe(
        "clotho-aqa", "Clotho-AQA audio question answering", "https://zenodo.org/records/6473207",
        "clotho_aqa_{train,val,test}.csv + audio_files/ (the extracted audio_files.zip)",
        (TaskSpec(AQA_TASK, ("train", "val", "test"), prompts.QUESTION),),
        build_clotho_aqa,
        (Option("min_confidence", "any", "drop answers whose annotator confidence is below this "
                "('maybe' drops 'no', 'yes' keeps only confident answers)", str,
                ("any", "maybe", "yes")),),
    ),
)
