"""A config's blend / valid entry as a source of items: a split read directly, or through its kNN
manifest (few-shot: the neighbours' shots first, the query last). Items are what templating and
tokenisation start from."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .reader import ArrowDataset, BlendName, DataError, KnnManifest, inside_root, parse_blend_name


@dataclass
class Shot:
    path: str
    prompt: str
    output: str
    windows: np.ndarray  # [n, D]


@dataclass
class Item:
    """What one blend position resolves to before templating."""

    shots: list[Shot] = field(default_factory=list)       # few-shot context first, query last
    dialogue: Optional[list[dict]] = None
    interleaved: Optional[str] = None                       # "similar" / "random" / None


class Source:
    """One blend/valid entry: a split directory, read directly or through its kNN manifest."""

    def __init__(self, data_root: str | Path, name: str, datasets: Optional[dict] = None,
                 allow_outside_root: bool = False):
        self.bn: BlendName = parse_blend_name(name)
        self.name = name
        cache = datasets if datasets is not None else {}
        directory = inside_root(data_root, self.bn.split_dir, allow_outside_root, what=f"{name}: dataset directory")
        if not directory.is_dir():
            raise DataError(f"{name}: dataset directory {directory} does not exist")
        key = str(directory.resolve())
        if key not in cache:
            cache[key] = ArrowDataset(directory)
        self.ds: ArrowDataset = cache[key]
        self.knn: Optional[KnnManifest] = None
        if self.bn.interleaved:
            self.knn = KnnManifest(self.ds, self.bn.manifest_file, cache,
                                   data_root=None if allow_outside_root else data_root)
        if len(self) == 0:
            raise DataError(f"{name}: {'kNN manifest' if self.knn else 'dataset'} "
                            f"{self.knn.path if self.knn else directory} has no rows")

    def __len__(self) -> int:
        return len(self.knn) if self.knn is not None else self.ds.num_rows

    @property
    def flamingo_task(self) -> str:
        return self.bn.flamingo_task

    def _shot(self, ds: ArrowDataset, row: int, allow_dialogue: bool = False) -> Shot | Item:
        path, prompt, output, windows, has_dialogue = ds.shot(row)
        if has_dialogue and allow_dialogue:
            return Item([Shot(path, "", "", windows)], dialogue=ds.text(row, "dialogue"))
        if prompt is None or output is None:
            raise DataError(f"{self.name}: row {row} of {ds.directory} has no prompt/output "
                            f"(id {ds.text(row, 'id')!r}); a chat dataset needs 'dialogue'")
        return Shot(path, prompt, output, windows)

    def item(self, j: int) -> Item:
        if self.knn is None:
            got = self._shot(self.ds, j, allow_dialogue=True)
            return got if isinstance(got, Item) else Item([got])
        shots = [self._shot(self.knn.train, int(n)) for n in self.knn.neighbors(j)]
        shots.append(self._shot(self.ds, int(self.knn.index[j])))
        return Item(shots, interleaved="similar" if self.bn.interleaved == "knn" else "random")

    def text_lengths(self) -> np.ndarray:
        """Rough text length per item (characters), for length-grouped batching."""
        if not hasattr(self, "_lengths"):
            ds = self.ds
            own = ds.column_lengths("prompt") + ds.column_lengths("output") + 16
            if self.knn is None:
                self._lengths = own
            else:
                tr = self.knn.train
                t_own = own if tr is ds else tr.column_lengths("prompt") + tr.column_lengths("output") + 16
                per_val = t_own[self.knn.values]
                csum = np.concatenate([[0], np.cumsum(per_val)])
                nb_sum = csum[self.knn.offsets[1:]] - csum[self.knn.offsets[:-1]]
                self._lengths = own[self.knn.index] + nb_sum
        return self._lengths

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_lengths", None)
        return state
