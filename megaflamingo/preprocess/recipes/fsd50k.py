"""FSD50K -> `FSD50k-EventClassification` (Zenodo record 4060432; AF1 spells it `FSD50k`).

As published: `FSD50K.ground_truth/dev.csv` (`fname,labels,mids,split`, split = train | val)
and `FSD50K.ground_truth/eval.csv` (`fname,labels,mids`); the clips are
`FSD50K.dev_audio/<fname>.wav` and `FSD50K.eval_audio/<fname>.wav`. `labels` is one quoted,
comma-separated field listing the clip's AudioSet-ontology labels, leaf labels first and their
ancestors after, which is the order AF1's prompt asks for ("describe this sound in the order
from specific to general."). Output: those labels, underscores as spaces, joined by ", " (AF1's
multi-label text form).

Splits: dev/train -> train, dev/val -> val, eval -> test (AF1 trains on
`FSD50k-EventClassification/train`).
"""
from __future__ import annotations

from megaflamingo.preprocess.tables import read_table

from . import prompts
from .base import Context, Recipe, TaskSpec, label_text

TASK = "FSD50k-EventClassification"


def build(ctx: Context) -> None:
    wanted = [((csv, audio), (f"FSD50K.ground_truth/{csv}",), f"FSD50K.ground_truth/{csv}")
              for csv, audio in (("dev.csv", "FSD50K.dev_audio"), ("eval.csv", "FSD50K.eval_audio"))]
    for (csv_name, audio_folder), meta in ctx.each_metadata(wanted, "FSD50K.ground_truth/dev.csv or eval.csv",
                                                             max_depth=2):
        table = read_table(meta)
        table.require("fname", "labels")
        if csv_name == "dev.csv":
            table.require("split")
        audio_dir = ctx.rel(meta.parent.parent / audio_folder)
        for i, row in enumerate(table.rows):
            split = "test" if csv_name == "eval.csv" else row["split"].strip()
            if split not in ("train", "val", "test"):
                ctx.skip(TASK, "train", "unknown_split", f"{table.where(i)}: {row['split']!r}")
                continue
            labels = [label_text(x) for x in row["labels"].split(",") if x.strip()]
            if not labels:
                ctx.skip(TASK, split, "no_labels", row["fname"])
                continue
            fname = row["fname"].strip()
            name = ctx.audio(TASK, split, fname if "." in fname else f"{fname}.wav",
                             prefer=(audio_folder,), expected_dir=audio_dir)
            if name is not None:
                ctx.add(TASK, split, name, ", ".join(labels))


RECIPES = (
    Recipe(
        "fsd50k", "FSD50K sound event tagging (specific to general)", "https://zenodo.org/records/4060432",
        "FSD50K.ground_truth/{dev,eval}.csv + FSD50K.dev_audio/ FSD50K.eval_audio/",
        (TaskSpec(TASK, ("train", "val", "test"), prompts.SPECIFIC_TO_GENERAL),),
        build,
    ),
)
