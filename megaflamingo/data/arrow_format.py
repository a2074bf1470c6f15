"""On-disk format of a preprocessed dataset split (written by `megaflamingo-preprocess`, read by
the data pipeline).

One directory per `<dataset>-<task>/<split>/`:

    metadata.json          everything needed to train on the split (see `REQUIRED_METADATA_KEYS`)
    shard-00000.arrow ...  Arrow IPC *file* format, so readers memory-map them (no copies, no
                           whole-file JSON loads at train time). Row order = manifest order.
    interleaved_knn.arrow  optional kNN few-shot manifest (`megaflamingo-preprocess knn`)

Every file is written to a temporary name in the same directory and renamed into place, so a
reader (or a resumed writer) never sees a half-written shard, whatever kills the writer.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from megaflamingo import io

SCHEMA_VERSION = 1
METADATA_FILE = "metadata.json"
SHARD_PATTERN = "shard-{:05d}.arrow"
KNN_FILE = "interleaved_knn.arrow"
KNN_SIDECAR = "interleaved_knn.json"

REQUIRED_METADATA_KEYS = (
    "schema_version", "dataset", "task", "split", "encoder", "windows", "dtype",
    "silence_embedding", "clip_encoder", "clip_embed_dim", "num_rows", "shards", "bad_files",
    "audio_hours", "created_by",
)
ENCODER_KEYS = ("name", "checkpoint", "checkpoint_sha256", "random_init", "embed_dim",
                "sample_rate", "config")
_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


class FormatError(ValueError):
    """A dataset directory or file does not match this format (message names the file/field)."""


def arrow_schema(embed_dim: int, dtype: str = "float16", clip_dim: int | None = None) -> pa.Schema:
    """Schema of one shard. `clip_dim=None` -> no clip encoder: the column is a variable-size
    float32 list that is always null (kept so every split has the same column set)."""
    if dtype not in _DTYPES:
        raise FormatError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if int(embed_dim) <= 0:
        raise FormatError(f"embed_dim must be positive, got {embed_dim}")
    window = pa.list_(pa.field("item", _DTYPES[dtype], nullable=False), int(embed_dim))
    clip = (pa.list_(pa.float32()) if clip_dim is None
            else pa.list_(pa.field("item", pa.float32(), nullable=False), int(clip_dim)))
    turn = pa.struct([("user", pa.string()), ("assistant", pa.string())])
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("index", pa.int64(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("start", pa.float64(), nullable=False),
        pa.field("duration", pa.float64(), nullable=False),
        pa.field("num_windows", pa.int32(), nullable=False),
        pa.field("windows", pa.list_(window), nullable=False),
        pa.field("clip_embedding", clip, nullable=True),
        pa.field("prompt", pa.string(), nullable=True),
        pa.field("output", pa.string(), nullable=True),
        pa.field("dialogue", pa.list_(turn), nullable=True),
        pa.field("task", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
    ]
    return pa.schema(fields, metadata={b"megaflamingo.schema_version": str(SCHEMA_VERSION).encode()})


# --------------------------------------------------------------------------------------------
# atomic file helpers


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON deterministically (sorted keys) via temp file + rename."""
    io.atomic_write_json(path, obj)


def atomic_write_table(path: str | os.PathLike, table: pa.Table,
                       max_chunksize: int | None = None) -> None:
    """Write `table` as an Arrow IPC file via temp file + fsync + rename."""
    with io.atomic_path(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink:
            with pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table, max_chunksize=max_chunksize)


def open_arrow_file(path: str | os.PathLike) -> pa.Table:
    """Memory-map one Arrow IPC file and return it as a zero-copy Table."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"missing Arrow file {path}")
    try:
        with pa.memory_map(str(path), "r") as source:
            return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid as e:
        raise FormatError(f"{path}: not a readable Arrow IPC file ({e})") from e


# --------------------------------------------------------------------------------------------
# metadata


def write_metadata(directory: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    """Validate and atomically write `<directory>/metadata.json`."""
    directory = Path(directory)
    validate_metadata(meta, where=str(directory / METADATA_FILE))
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / METADATA_FILE, dict(meta))


def read_metadata(directory: str | os.PathLike) -> dict:
    """Read and validate `<directory>/metadata.json`."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise FormatError(f"{path} does not exist (not a preprocessed dataset directory?)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: invalid JSON ({e})") from e
    validate_metadata(meta, where=str(path))
    return meta


def validate_metadata(meta: Mapping[str, Any], where: str = "metadata") -> None:
    missing = [k for k in REQUIRED_METADATA_KEYS if k not in meta]
    if missing:
        raise FormatError(f"{where}: missing keys {missing}")
    if meta["schema_version"] != SCHEMA_VERSION:
        raise FormatError(f"{where}: schema_version {meta['schema_version']!r} is not supported "
                          f"(this code reads version {SCHEMA_VERSION})")
    if meta["dtype"] not in _DTYPES:
        raise FormatError(f"{where}: field 'dtype' must be one of {sorted(_DTYPES)}")
    for key in ("encoder",) + (("clip_encoder",) if meta["clip_encoder"] is not None else ()):
        enc = meta[key]
        if not isinstance(enc, Mapping) or any(k not in enc for k in ENCODER_KEYS):
            raise FormatError(f"{where}: field '{key}' must be a dict with keys {list(ENCODER_KEYS)}")
    d = meta["encoder"]["embed_dim"]
    if len(meta["silence_embedding"]) != d:
        raise FormatError(f"{where}: 'silence_embedding' has {len(meta['silence_embedding'])} "
                          f"values, encoder.embed_dim is {d}")
    for key in ("window_s", "overlap_s", "max_windows"):
        if key not in meta["windows"]:
            raise FormatError(f"{where}: field 'windows' lacks {key!r}")
    if sum(int(s["num_rows"]) for s in meta["shards"]) != meta["num_rows"]:
        raise FormatError(f"{where}: 'num_rows' does not equal the sum of the shards' num_rows")


def make_metadata(*, dataset: str, task: str, split: str, encoder: Mapping[str, Any],
                  window_s: float = 7.0, overlap_s: float = 5.25, max_windows: int = 16,
                  dtype: str = "float16", silence_embedding: Sequence[float],
                  clip_encoder: Mapping[str, Any] | None = None, clip_embed_dim: int | None = None,
                  shards: Sequence[Mapping[str, Any]] = (), bad_files: Sequence[Mapping] = (),
                  audio_hours: float = 0.0, **extra: Any) -> dict:
    """Build a metadata dict with every required key (extra keys are kept)."""
    meta = {
        "schema_version": SCHEMA_VERSION,
        "dataset": dataset, "task": task, "split": split,
        "encoder": dict(encoder),
        "windows": {"window_s": float(window_s), "overlap_s": float(overlap_s),
                    "max_windows": int(max_windows)},
        "dtype": dtype,
        "silence_embedding": [float(x) for x in silence_embedding],
        "clip_encoder": None if clip_encoder is None else dict(clip_encoder),
        "clip_embed_dim": clip_embed_dim,
        "num_rows": int(sum(int(s["num_rows"]) for s in shards)),
        "shards": [dict(s) for s in shards],
        "bad_files": [dict(b) for b in bad_files],
        "audio_hours": float(audio_hours),
        "created_by": created_by(),
    }
    meta.update(extra)
    return meta


def created_by() -> str:
    try:
        from importlib.metadata import version
        return f"megaflamingo {version('megaflamingo')}"
    except Exception:  # not installed (running from a source tree)
        return "megaflamingo (source)"


def open_shards(directory: str | os.PathLike) -> list[pa.Table]:
    """Memory-map every shard listed in metadata.json, in row order. Checks row counts and the
    schema version so a stale or foreign file fails loudly instead of shifting row indices."""
    directory = Path(directory)
    meta = read_metadata(directory)
    tables = []
    for entry in meta["shards"]:
        path = directory / entry["file"]
        t = open_arrow_file(path)
        if t.num_rows != int(entry["num_rows"]):
            raise FormatError(f"{path}: has {t.num_rows} rows, metadata.json says {entry['num_rows']}")
        version = (t.schema.metadata or {}).get(b"megaflamingo.schema_version")
        if version is not None and int(version) != SCHEMA_VERSION:
            raise FormatError(f"{path}: schema version {int(version)}, expected {SCHEMA_VERSION}")
        tables.append(t)
    return tables


# --------------------------------------------------------------------------------------------
# building columns from numpy


def windows_array(windows: Sequence[np.ndarray], dtype: str = "float16",
                  embed_dim: int | None = None) -> pa.ListArray:
    """[n_i, D] arrays (one per row) -> list<fixed_size_list<dtype, D>> without Python loops over
    windows."""
    np_dtype = np.dtype(dtype)
    if embed_dim is None:
        if not windows:
            raise FormatError("embed_dim is needed to build an empty windows column")
        embed_dim = int(windows[0].shape[-1])
    counts = np.array([w.shape[0] for w in windows], dtype=np.int32)
    for i, w in enumerate(windows):
        if w.ndim != 2 or w.shape[1] != embed_dim:
            raise FormatError(f"row {i}: windows must be [n, {embed_dim}], got {tuple(w.shape)}")
    flat = (np.concatenate([w.astype(np_dtype, copy=False) for w in windows]).reshape(-1)
            if windows else np.zeros(0, np_dtype))
    values = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=_DTYPES[dtype]), embed_dim)
    offsets = np.zeros(len(windows) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def clip_array(clips: Sequence[np.ndarray | None], clip_dim: int | None) -> pa.Array:
    if clip_dim is None:
        return pa.nulls(len(clips), type=pa.list_(pa.float32()))
    typ = pa.list_(pa.field("item", pa.float32(), nullable=False), int(clip_dim))
    mask = np.array([c is None for c in clips], dtype=bool)
    flat = np.zeros((len(clips), clip_dim), np.float32)
    for i, c in enumerate(clips):
        if c is not None:
            if np.shape(c) != (clip_dim,):
                raise FormatError(f"row {i}: clip embedding must have shape ({clip_dim},), "
                                  f"got {np.shape(c)}")
            flat[i] = c
    values = pa.array(flat.reshape(-1), type=pa.float32())
    arr = pa.FixedSizeListArray.from_arrays(values, type=typ)
    if mask.any():
        arr = pa.FixedSizeListArray.from_arrays(values, type=typ, mask=pa.array(mask))
    return arr


def rows_to_table(rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows as dicts (with `windows` a [n, D] numpy array and `clip_embedding` a vector or None)
    -> Table with `schema`. Fills `num_windows` from the windows when absent."""
    window_type = schema.field("windows").type.value_type
    dim = window_type.list_size
    dtype = "float16" if window_type.value_type == pa.float16() else "float32"
    clip_type = schema.field("clip_embedding").type
    clip_dim = clip_type.list_size if isinstance(clip_type, pa.FixedSizeListType) else None
    wins = [np.asarray(r["windows"]) for r in rows]
    cols: dict[str, pa.Array] = {}
    for f in schema:
        name = f.name
        if name == "windows":
            cols[name] = windows_array(wins, dtype, dim)
        elif name == "clip_embedding":
            cols[name] = clip_array([r.get("clip_embedding") for r in rows], clip_dim)
        elif name == "num_windows":
            cols[name] = pa.array([int(r.get("num_windows", w.shape[0])) for r, w in zip(rows, wins)],
                                  pa.int32())
        else:
            cols[name] = pa.array([r.get(name) for r in rows], type=f.type)
    for r, w in zip(rows, wins):
        if int(r.get("num_windows", w.shape[0])) != w.shape[0]:
            raise FormatError(f"row {r.get('id')!r}: num_windows={r['num_windows']} but "
                              f"{w.shape[0]} window embeddings")
    return pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)


def row_windows(table: pa.Table, row: int) -> np.ndarray:
    """[num_windows, D] numpy view of one row's window embeddings (zero-copy on mmapped data)."""
    col = table.column("windows")
    for chunk in col.chunks:
        if row < len(chunk):
            start, end = chunk.offsets[row].as_py(), chunk.offsets[row + 1].as_py()
            fsl = chunk.values
            dim = fsl.type.list_size
            flat = fsl.values.slice((fsl.offset + start) * dim, (end - start) * dim)
            return flat.to_numpy(zero_copy_only=True).reshape(end - start, dim)
        row -= len(chunk)
    raise IndexError(f"row {row} out of range")


# --------------------------------------------------------------------------------------------
# writer


class DatasetWriter:
    """Writes a dataset directory shard by shard; each shard is complete or absent.

    `write_shard(i, rows_or_table, extra)` writes `shard-0000i.arrow` atomically plus a small
    sidecar `shard-0000i.json` (row count, the shard file's size and CRC-32, bad files, audio hours,
    whatever `extra` holds) that is renamed into place only after the shard itself, so "sidecar
    exists" means "shard written" (whether its work counts as finished is the embed step's call).
    `finalize(**meta)` collects the sidecars into metadata.json.
    """

    def __init__(self, directory: str | os.PathLike, schema: pa.Schema):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.schema = schema

    def shard_path(self, i: int) -> Path:
        return self.directory / SHARD_PATTERN.format(i)

    def sidecar_path(self, i: int) -> Path:
        return self.shard_path(i).with_suffix(".json")

    def has_shard(self, i: int) -> bool:
        return self.sidecar_path(i).is_file() and self.shard_path(i).is_file()

    def read_sidecar(self, i: int) -> dict:
        return json.loads(self.sidecar_path(i).read_text(encoding="utf-8"))

    def write_shard(self, i: int, data: pa.Table | Sequence[Mapping[str, Any]],
                    extra: Mapping[str, Any] | None = None) -> int:
        table = data if isinstance(data, pa.Table) else rows_to_table(data, self.schema)
        if not table.schema.equals(self.schema, check_metadata=False):
            raise FormatError(f"shard {i}: schema mismatch\n{table.schema}\nvs\n{self.schema}")
        table = table.replace_schema_metadata(self.schema.metadata)
        self.sidecar_path(i).unlink(missing_ok=True)  # a rewrite invalidates the old marker first
        atomic_write_table(self.shard_path(i), table)
        # Size and CRC-32 of the file as written: a rerun skips it only if it is still exactly this.
        size, crc = io.crc32_file(self.shard_path(i))
        side = {"file": self.shard_path(i).name, "num_rows": table.num_rows, "file_size": size, "file_crc32": crc}
        side.update(extra or {})
        atomic_write_json(self.sidecar_path(i), side)
        return table.num_rows

    def completed_shards(self) -> list[int]:
        out = []
        for p in sorted(self.directory.glob("shard-*.json")):
            try:
                i = int(p.stem.split("-")[1])
            except (IndexError, ValueError):
                continue
            if self.shard_path(i).is_file():
                out.append(i)
        return out

    def finalize(self, shard_ids: Iterable[int] | None = None, **meta_fields: Any) -> dict:
        """Write metadata.json listing `shard_ids` (default: all finished ones) in order.
        `bad_files` and `audio_hours` are summed from the sidecars unless given."""
        ids = sorted(self.completed_shards() if shard_ids is None else shard_ids)
        shards, bad, hours = [], [], 0.0
        for i in ids:
            if not self.has_shard(i):
                raise FormatError(f"{self.shard_path(i)} is not finished")
            side = self.read_sidecar(i)
            shards.append({"file": side["file"], "num_rows": int(side["num_rows"])})
            bad.extend(side.get("bad_files", []))
            hours += float(side.get("audio_hours", 0.0))
        meta_fields.setdefault("bad_files", bad)
        meta_fields.setdefault("audio_hours", hours)
        meta = make_metadata(shards=shards, **meta_fields)
        write_metadata(self.directory, meta)
        return meta


def write_dataset(directory: str | os.PathLike, rows: Sequence[Mapping[str, Any]], *,
                  embed_dim: int, dtype: str = "float16", clip_dim: int | None = None,
                  rows_per_shard: int = 1000, **meta_fields: Any) -> dict:
    """Convenience for tests and small tools: write `rows` as a complete split directory.
    `meta_fields` go to `make_metadata` (dataset, task, split, encoder, silence_embedding, ...)."""
    schema = arrow_schema(embed_dim, dtype, clip_dim)
    writer = DatasetWriter(directory, schema)
    ids = []
    for s, lo in enumerate(range(0, max(len(rows), 1), rows_per_shard)):
        writer.write_shard(s, rows[lo:lo + rows_per_shard])
        ids.append(s)
    meta_fields.setdefault("dtype", dtype)
    meta_fields.setdefault("clip_embed_dim", clip_dim)
    return writer.finalize(ids, **meta_fields)
