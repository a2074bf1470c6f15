"""Acted speech emotion sets whose labels are in the file names: CREMA-D and RAVDESS.

**crema-d** -> `CREMA-D-EmotionClassification` (github.com/CheyneyComputerScience/CREMA-D). As
published: `AudioWAV/<actor>_<sentence>_<emotion>_<level>.wav`, e.g. `1001_DFA_ANG_XX.wav`, with
the emotion codes ANG, DIS, FEA, HAP, NEU, SAD. Labels: the intended emotion of the file name
(not the crowd votes of `processedResults/`), spelled as AF1's CREMA-D option list: angry,
disgusted, fearful, happy, neutral, sad.

**ravdess** -> `ravdess-EmotionClassification` (Zenodo record 1188976; AF1 spells the dataset in
lower case). As published: `Audio_Speech_Actors_01-24.zip` (and `Audio_Song_Actors_01-24.zip`)
extract to `Actor_01/` .. `Actor_24/` holding `MM-VV-EE-II-SS-RR-AA.wav` (modality 03 = audio
only, vocal channel 01 speech / 02 song, emotion 01-08). Labels, as AF1's option list: neutral,
calm, happy, sad, angry, fearful, disgusted, surprised. `vocal_channel` picks speech (default,
the usual benchmark), song or both.

Neither set is in AF1's training blends (zero-shot benchmarks in the paper): every clip goes to
`split` (default `test`).
"""
from __future__ import annotations

import re

from . import prompts
from .base import Context, Option, Recipe, RecipeError, TaskSpec, split_option

CREMA_TASK = "CREMA-D-EmotionClassification"
CREMA_EMOTIONS = {"ANG": "angry", "DIS": "disgusted", "FEA": "fearful", "HAP": "happy",
                  "NEU": "neutral", "SAD": "sad"}
_CREMA_NAME = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{1,2})$")


def build_crema_d(ctx: Context, split: str) -> None:
    n = 0
    for rel in sorted(ctx.index.all_files()):
        stem = rel.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        m = _CREMA_NAME.match(stem)
        if not m:
            continue
        emo = CREMA_EMOTIONS.get(m.group(3))
        if emo is None:
            ctx.skip(CREMA_TASK, split, "unknown_emotion_code", rel)
            continue
        ctx.add(CREMA_TASK, split, rel, emo)
        n += 1
    if not n:
        raise RecipeError(f"crema-d: no AudioWAV/<actor>_<sentence>_<emotion>_<level>.wav files "
                          f"under {ctx.source}")


RAVDESS_TASK = "ravdess-EmotionClassification"
RAVDESS_EMOTIONS = {"01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry",
                    "06": "fearful", "07": "disgusted", "08": "surprised"}
_RAVDESS_NAME = re.compile(r"^(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)$")


def build_ravdess(ctx: Context, split: str, vocal_channel: str) -> None:
    channels = {"speech": {"01"}, "song": {"02"}, "both": {"01", "02"}}[vocal_channel]
    n = 0
    for rel in sorted(ctx.index.all_files()):
        stem = rel.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        m = _RAVDESS_NAME.match(stem)
        if not m or m.group(1) != "03" or m.group(2) not in channels:
            continue
        emo = RAVDESS_EMOTIONS.get(m.group(3))
        if emo is None:
            ctx.skip(RAVDESS_TASK, split, "unknown_emotion_code", rel)
            continue
        ctx.add(RAVDESS_TASK, split, rel, emo)
        n += 1
    if not n:
        raise RecipeError(f"ravdess: no Actor_NN/03-VV-EE-II-SS-RR-AA.wav files ({vocal_channel}) "
                          f"under {ctx.source}")


RECIPES = (
    Recipe(
        "crema-d", "CREMA-D speech emotion classification",
        "https://github.com/CheyneyComputerScience/CREMA-D", "AudioWAV/<actor>_<sentence>_<emotion>_<level>.wav",
        (TaskSpec(CREMA_TASK, ("test", "train", "val"), prompts.EMOTION),),
        build_crema_d, (split_option(),),
    ),
    Recipe(
        "ravdess", "RAVDESS speech emotion classification", "https://zenodo.org/records/1188976",
        "Actor_01..Actor_24/03-VV-EE-II-SS-RR-AA.wav (the extracted Audio_*_Actors_01-24.zip)",
        (TaskSpec(RAVDESS_TASK, ("test", "train", "val"), prompts.EMOTION),),
        build_ravdess,
        (split_option(), Option("vocal_channel", "speech", "speech, song or both", str,
                                ("speech", "song", "both"))),
    ),
)
