"""Random-access reading of preprocessed Arrow datasets and their kNN few-shot manifests.

An :class:`ArrowDataset` memory-maps the shards of one ``<dataset>-<task>/<split>`` directory
(nothing is copied into RAM; many can be open at once). Pickling it (DataLoader workers) sends
only the directory; each process maps the files itself.

Blend names follow AF1: ``Clotho-AQA-AQA/train`` is the split directory itself, and
``Clotho-AQA-AQA/interleaved_knn-train`` is the same split directory read through its
``interleaved_knn.arrow`` manifest (neighbours from the TRAIN split directory).
"""
from __future__ import annotations

import bisect
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from megaflamingo.data import arrow_format as af
from megaflamingo.io import PathEscapeError, path_inside


class DataError(ValueError):
    """Bad or inconsistent input data (message names the dataset/file/row)."""


_INTERLEAVED = re.compile(r"^interleaved_(knn|random)-(.+)$")


@dataclass(frozen=True)
class BlendName:
    """A parsed blend/valid name such as ``Clotho-AQA-AQA/interleaved_knn-train``."""

    name: str
    flamingo_task: str  # "<dataset>-<Task>" (AF1's flamingo_task)
    split: str          # "train" / "val" / "test" (the directory)
    interleaved: Optional[str]  # None, "knn" or "random"

    @property
    def split_dir(self) -> str:
        return f"{self.flamingo_task}/{self.split}"

    @property
    def manifest_file(self) -> str:
        return f"interleaved_{self.interleaved}.arrow"


def inside_root(data_root: str | Path, rel: str | Path, allow_outside: bool, what: str) -> Path:
    """``data_root/rel``, refused when it leaves the root (absolute, ``..``, or a symlink whose target
    lies outside the root), unless the user set ``data.allow_outside_root``. Symlinks that stay inside
    the root are fine."""
    try:
        return path_inside(data_root, rel, allow_outside)
    except PathEscapeError as e:
        raise DataError(f"{what} {os.path.normpath(os.path.join(os.path.abspath(data_root), rel))} is outside "
                        f"data.data_root ({e}; set data.allow_outside_root: true to allow it)") from None


def parse_blend_name(name: str) -> BlendName:
    head, sep, tail = name.strip().rpartition("/")
    if not sep or not head or not tail:
        raise DataError(f"dataset name {name!r}: expected '<dataset>-<task>/<split>' "
                        "or '<dataset>-<task>/interleaved_knn-<split>'")
    m = _INTERLEAVED.match(tail)
    if m:
        return BlendName(name, head, m.group(2), m.group(1))
    return BlendName(name, head, tail, None)


class ArrowDataset:
    """One preprocessed split directory, memory-mapped, with random access by row."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise DataError(f"dataset directory {self.directory} does not exist")
        try:
            self.meta: dict = af.read_metadata(self.directory)
        except af.FormatError as e:
            raise DataError(str(e)) from e
        self.num_rows = int(self.meta["num_rows"])
        self.embed_dim = int(self.meta["encoder"]["embed_dim"])
        self.max_windows = int(self.meta["windows"]["max_windows"])
        self.silence_embedding = np.asarray(self.meta["silence_embedding"], dtype=np.float32)
        self._batches: Optional[list] = None

    # -- pickling: send the path only; every process maps the files itself
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_batches"] = None
        return state

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        return f"ArrowDataset({str(self.directory)!r}, rows={self.num_rows}, D={self.embed_dim})"

    @property
    def encoder_name(self) -> str:
        return str(self.meta["encoder"]["name"])

    @property
    def encoder_signature(self) -> tuple:
        enc = self.meta["encoder"]
        return (enc["name"], enc.get("checkpoint_sha256"), int(enc["embed_dim"]), bool(enc.get("random_init")))

    # -- lazy mapping
    def _open(self) -> list:
        if self._batches is None:
            try:
                tables = af.open_shards(self.directory)
            except af.FormatError as e:
                raise DataError(str(e)) from e
            batches, starts, n = [], [], 0
            for t in tables:
                for rb in t.to_batches():
                    if rb.num_rows == 0:
                        continue
                    batches.append(_Batch(rb, self.embed_dim))
                    starts.append(n)
                    n += rb.num_rows
            if n != self.num_rows:
                raise DataError(f"{self.directory}: shards hold {n} rows, metadata.json says {self.num_rows}")
            self._starts = starts
            self._batches = batches
        return self._batches

    def _locate(self, i: int) -> tuple["_Batch", int]:
        if not 0 <= i < self.num_rows:
            raise IndexError(f"row {i} out of range for {self.directory} ({self.num_rows} rows)")
        batches = self._open()
        b = bisect.bisect_right(self._starts, i) - 1
        return batches[b], i - self._starts[b]

    def windows(self, i: int) -> np.ndarray:
        """[num_windows, D] window embeddings of row ``i`` (a zero-copy view, float16/32)."""
        b, r = self._locate(int(i))
        return b.windows(r)

    def text(self, i: int, column: str) -> Any:
        b, r = self._locate(int(i))
        return b.rb.column(column)[r].as_py()

    def shot(self, i: int) -> tuple[str, Optional[str], Optional[str], np.ndarray, bool]:
        """(path, prompt, output, windows, has_dialogue) of row ``i``: the hot-path accessor."""
        b, r = self._locate(int(i))
        return b.string("path", r), b.string("prompt", r), b.string("output", r), b.windows(r), b.has_dialogue(r)

    def row(self, i: int) -> dict:
        b, r = self._locate(int(i))
        out = {name: b.rb.column(name)[r].as_py()
               for name in ("id", "path", "prompt", "output", "dialogue", "task", "dataset")}
        out["windows"] = b.windows(r)
        return out

    def column_lengths(self, column: str) -> np.ndarray:
        """UTF-8 length of a string column for every row (nulls count 0); vectorised."""
        import pyarrow.compute as pc

        parts = [pc.fill_null(pc.utf8_length(b.rb.column(column)), 0).to_numpy(zero_copy_only=False)
                 for b in self._open()]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    # -- validation
    def check_compatible(self, *, embed_dim: Optional[int] = None, max_windows: Optional[int] = None,
                         encoder_name: Optional[str] = None, where: str = "") -> None:
        """Raise DataError if this dataset was made for another model/encoder configuration."""
        src = f" ({where})" if where else ""
        if embed_dim is not None and self.embed_dim != int(embed_dim):
            raise DataError(f"{self.directory}: embeddings are {self.embed_dim}-d (encoder "
                            f"{self.encoder_name!r}) but model.audio_embed_dim is {embed_dim}{src}")
        if max_windows is not None and self.max_windows != int(max_windows):
            raise DataError(f"{self.directory}: made with windows.max_windows={self.max_windows} but "
                            f"model.max_num_window is {max_windows}{src}")
        if encoder_name is not None and self.encoder_name != encoder_name:
            raise DataError(f"{self.directory}: made with encoder {self.encoder_name!r} but the config "
                            f"uses encoder.name {encoder_name!r}{src}")


class _Batch:
    """numpy views of one record batch's window column (so a row lookup is two slices)."""

    def __init__(self, rb: pa.RecordBatch, dim: int):
        self.rb = rb
        col = rb.column("windows")
        fsl = col.values
        if fsl.type.list_size != dim:
            raise DataError(f"windows column has dimension {fsl.type.list_size}, metadata says {dim}")
        self.offsets = col.offsets.to_numpy()
        flat = fsl.values.slice(fsl.offset * dim, len(fsl) * dim).to_numpy(zero_copy_only=True)
        self.values = flat.reshape(-1, dim)
        self.num_windows = rb.column("num_windows").to_numpy()

        self._strings: dict[str, tuple] = {}
        self._dialogue_null: Optional[np.ndarray] = None

    def windows(self, r: int) -> np.ndarray:
        return self.values[self.offsets[r]:self.offsets[r + 1]]

    def string(self, column: str, r: int) -> Optional[str]:
        # Decode straight from the mapped Arrow buffers (offsets + bytes): no per-row Arrow scalars.
        col = self._strings.get(column)
        if col is None:
            arr = self.rb.column(column)
            off_type = np.int64 if pa.types.is_large_string(arr.type) else np.int32
            bufs = arr.buffers()
            offsets = np.frombuffer(bufs[1], dtype=off_type)[arr.offset:arr.offset + len(arr) + 1]
            data = memoryview(bufs[2]) if bufs[2] is not None else memoryview(b"")
            valid = arr.is_valid().to_numpy(zero_copy_only=False) if arr.null_count else None
            col = self._strings[column] = (offsets, data, valid)
        offsets, data, valid = col
        if valid is not None and not valid[r]:
            return None
        return str(data[offsets[r]:offsets[r + 1]], "utf-8")

    def has_dialogue(self, r: int) -> bool:
        if self._dialogue_null is None:
            self._dialogue_null = self.rb.column("dialogue").is_null().to_numpy(zero_copy_only=False)
        return not bool(self._dialogue_null[r])


class KnnManifest:
    """``interleaved_knn.arrow`` of a split: per manifest row, the query row index in this split and
    the train-split rows to present before it. Checked against both datasets when opened."""

    def __init__(self, split: ArrowDataset, file_name: str = af.KNN_FILE, datasets: Optional[dict] = None,
                 data_root: Optional[str | Path] = None):
        """``data_root``: when given, the train split the manifest names must lie inside it."""
        self.path = split.directory / file_name
        if not self.path.is_file():
            raise DataError(f"kNN manifest {self.path} does not exist (run `megaflamingo-preprocess knn`"
                            " for this split, or drop the interleaved entry from the blend)")
        sidecar = self.path.with_suffix(".json")
        info: dict = {}
        if sidecar.is_file():
            info = json.loads(sidecar.read_text(encoding="utf-8"))
        try:
            table = af.open_arrow_file(self.path)
        except af.FormatError as e:
            raise DataError(str(e)) from e
        if not info:
            raw = (table.schema.metadata or {}).get(b"megaflamingo.knn")
            info = json.loads(raw.decode()) if raw else {}
        train_rel = info.get("train_dir") or "../train"
        for col in ("index", "neighbors"):
            if col not in table.column_names:
                raise DataError(f"{self.path}: missing column {col!r}")
        self.index = table.column("index").to_numpy().astype(np.int64)
        nb = table.column("neighbors").combine_chunks()
        self.offsets = nb.offsets.to_numpy().astype(np.int64)
        self.values = nb.values.to_numpy(zero_copy_only=False).astype(np.int64)
        self.split = split
        if data_root is not None:
            rel = os.path.relpath(os.path.abspath(split.directory / train_rel), os.path.abspath(data_root))
            inside_root(data_root, rel, False, what=f"{self.path}: its train split")
        self.train_dir = (split.directory / train_rel).resolve()
        cache = datasets if datasets is not None else {}
        cache.setdefault(str(split.directory.resolve()), split)
        if str(self.train_dir) not in cache:
            if not self.train_dir.is_dir():
                raise DataError(f"{self.path}: its train split {self.train_dir} does not exist")
            cache[str(self.train_dir)] = ArrowDataset(self.train_dir)
        self.train = cache[str(self.train_dir)]
        self._validate()

    def _validate(self) -> None:
        n_split, n_train = self.split.num_rows, self.train.num_rows
        bad = np.flatnonzero((self.index < 0) | (self.index >= n_split))
        if bad.size:
            j = int(bad[0])
            raise DataError(f"{self.path}: row {j} points at query row {int(self.index[j])}, but "
                            f"{self.split.directory} has {n_split} rows ({bad.size} bad rows)")
        badv = np.flatnonzero((self.values < 0) | (self.values >= n_train))
        if badv.size:
            j = int(np.searchsorted(self.offsets, badv[0], side="right") - 1)
            raise DataError(f"{self.path}: row {j} lists neighbour {int(self.values[badv[0]])}, but the "
                            f"train split {self.train_dir} has {n_train} rows ({badv.size} bad entries)")
        if self.train.encoder_signature != self.split.encoder_signature:
            raise DataError(f"{self.path}: train split {self.train_dir} was made with encoder "
                            f"{self.train.encoder_signature}, this split with {self.split.encoder_signature}")

    def __len__(self) -> int:
        return len(self.index)

    def neighbors(self, j: int) -> np.ndarray:
        return self.values[self.offsets[j]:self.offsets[j + 1]]
