"""MACS -> `MACS-AudioCaptioning` (Multi-Annotator Captioned Soundscapes, Zenodo record 5114771).

As published: `MACS.yaml` = `{files: [{filename, annotations: [{annotator_id, sentence, tags}]}]}`
(2-5 annotators per clip); the audio is a subset of TAU Urban Acoustic Scenes 2019 development
(Zenodo record 2589280), whose zips extract to
`TAU-urban-acoustic-scenes-2019-development/audio/<filename>`. Files are looked up by name
anywhere under the source (so the MACS subset may also sit in a folder of its own). One row per
sentence. AF1 trains on all of MACS (`MACS-AudioCaptioning/train` only), so every clip goes to
`split` (default `train`).
"""
from __future__ import annotations

from megaflamingo.preprocess.tables import TableError, read_yaml

from . import prompts
from .base import Context, Option, Recipe, TaskSpec

TASK = "MACS-AudioCaptioning"


def build(ctx: Context, split: str) -> None:
    meta = ctx.find("MACS.yaml", what="MACS.yaml")
    data = read_yaml(meta)
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list):
        raise TableError(f"{meta}: expected a mapping with a 'files' list")
    for i, item in enumerate(files):
        if not isinstance(item, dict) or not item.get("filename"):
            ctx.skip(TASK, split, "incomplete_item", f"{meta}: files[{i}]")
            continue
        name = ctx.audio(TASK, split, str(item["filename"]),
                         prefer=("audio", "TAU-urban-acoustic-scenes-2019-development"))
        if name is None:
            continue
        for ann in item.get("annotations") or []:
            sentence = ann.get("sentence") if isinstance(ann, dict) else None
            if sentence and str(sentence).strip():
                ctx.add(TASK, split, name, str(sentence))
            else:
                ctx.skip(TASK, split, "empty_caption", str(item["filename"]))


RECIPES = (
    Recipe(
        "macs", "MACS audio captioning (TAU Urban Acoustic Scenes 2019 clips)",
        "https://zenodo.org/records/5114771",
        "MACS.yaml + TAU-urban-acoustic-scenes-2019-development/audio/ (or just the MACS clips)",
        (TaskSpec(TASK, ("train", "val", "test"), prompts.CAPTION),),
        build,
        (Option("split", "train", "split name for the whole set (AF1 trains on all of MACS)", str,
                ("train", "val", "test")),),
    ),
)
