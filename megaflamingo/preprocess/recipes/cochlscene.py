"""CochlScene -> `CochlScene-SceneClassification` (github.com/cochlearai/cochlscene, Zenodo
record 7080122).

As published: `CochlScene/Train/<Class>/*.wav`, `CochlScene/Val/<Class>/*.wav`,
`CochlScene/Test/<Class>/*.wav` with 13 classes (Bus, Cafe, Car, CrowdedIndoor, Elevator,
Kitchen, Park, ResidentialArea, Restaurant, Restroom, Street, Subway, SubwayStation). No
metadata file: the label is the folder, lower-cased with nothing else changed (AF1's option list
reads `crowdedindoor`, `residentialarea`, `subwaystation`). Splits: Train -> train, Val -> val,
Test -> test. Prompt: AF1's scene prompt "this acoustic scene is" (its `default` /
`provide_all_labels` augmentations, the ones the stage configs use, replace it with
"classify this sound.").
"""
from __future__ import annotations

from . import prompts
from .base import Context, Recipe, RecipeError, TaskSpec

TASK = "CochlScene-SceneClassification"
CLASSES = ("bus", "cafe", "car", "crowdedindoor", "elevator", "kitchen", "park", "residentialarea",
           "restaurant", "restroom", "street", "subway", "subwaystation")
SPLITS = {"train": "train", "val": "val", "test": "test"}


def build(ctx: Context) -> None:
    counts: dict[str, int] = {}
    for rel in sorted(ctx.index.all_files()):
        parts = rel.split("/")
        if len(parts) < 3:
            continue
        split = SPLITS.get(parts[-3].lower())
        label = parts[-2].lower()
        if split is None or label not in CLASSES:
            continue
        ctx.add(TASK, split, rel, label)
        counts[split] = counts.get(split, 0) + 1
    if not counts:
        raise RecipeError(f"cochlscene: no {{Train,Val,Test}}/<Class>/*.wav under {ctx.source} "
                          f"(classes: {', '.join(CLASSES)}, any capitalisation)")
    for split in SPLITS.values():
        if split not in counts:
            ctx.note(f"no {split} clips found")


RECIPES = (
    Recipe(
        "cochlscene", "CochlScene acoustic scene classification", "https://github.com/cochlearai/cochlscene",
        "CochlScene/{Train,Val,Test}/<Class>/*.wav",
        (TaskSpec(TASK, ("train", "val", "test"), prompts.ACOUSTIC_SCENE),),
        build,
    ),
)
