"""kNN few-shot neighbours (AF1's `interleaved_knn-<split>`), over the `clip_embedding` column.

AF1's rules, per query row: search k+50 nearest train rows (L2), walk them nearest first, keep
one row per audio file (a random one when several rows share the file), drop the query's own
file and (train split) the query row itself, keep the first k-1, shuffle. FIX vs AF1: both random
choices are seeded per query row (`default_rng([seed, row])`), so the output does not depend on
batching or run; faiss's -1 "no result" slots are dropped (AF1 indexed its file list with -1).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa

from megaflamingo.data import arrow_format as af


class KnnError(ValueError):
    pass


def clip_matrix(tables: list[pa.Table], where: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """-> (embeddings [M, D] float32 of rows that have one, their row indices, all rows' paths)."""
    embs, rows, paths = [], [], []
    offset = 0
    for t in tables:
        col = t.column("clip_embedding")
        paths.extend(t.column("path").to_pylist())
        if not isinstance(col.type, pa.FixedSizeListType):
            raise KnnError(f"{where}: no clip embeddings (embedded with --clip-encoder none); "
                           f"re-run embed with --clip-encoder laion-clap (or mean for tiny data)")
        for chunk in col.chunks:
            valid = ~np.asarray(chunk.is_null().to_numpy(zero_copy_only=False))
            d = chunk.type.list_size
            # null rows still own d value slots, so slice the child array rather than flatten()
            flat = chunk.values.slice(chunk.offset * d, len(chunk) * d).to_numpy(zero_copy_only=False)
            mat = flat.reshape(len(chunk), d)
            embs.append(mat[valid])
            rows.append(np.nonzero(valid)[0] + offset)
            offset += len(chunk)
    if not embs:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), paths
    return (np.ascontiguousarray(np.concatenate(embs), dtype=np.float32),
            np.concatenate(rows).astype(np.int64), paths)


def build_index(emb: np.ndarray, index_type: str = "flat", nlist: int | None = None,
                nprobe: int = 16, seed: int = 0):
    import faiss

    d = emb.shape[1]
    if index_type == "flat":
        index = faiss.IndexFlatL2(d)
    elif index_type == "ivf":
        nlist = nlist or max(1, int(4 * np.sqrt(len(emb))))
        nlist = min(nlist, len(emb))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
        index.cp.seed = seed
        index.train(emb)
        index.nprobe = min(nprobe, nlist)
    else:
        raise KnnError(f"index type must be 'flat' or 'ivf', got {index_type!r}")
    index.add(emb)
    return index


def select_neighbors(cand_rows: np.ndarray, train_paths: list[str], query_path: str,
                     query_row: int | None, k: int, rng: np.random.Generator) -> list[int]:
    """AF1's filtering of one query's candidates (nearest first) -> k-1 train rows, shuffled."""
    groups: dict[str, list[int]] = {}
    for r in cand_rows:
        if r < 0:
            continue
        groups.setdefault(train_paths[r], []).append(int(r))
    picked = []
    for path, rows in groups.items():
        if path == query_path:
            continue
        r = rows[int(rng.integers(len(rows)))] if len(rows) > 1 else rows[0]
        if query_row is not None and r == query_row:
            continue
        picked.append(r)
    picked = picked[: max(k - 1, 0)]
    rng.shuffle(picked)
    return picked


def build_knn(split_dir: str | os.PathLike, train_dir: str | os.PathLike | None = None, k: int = 8,
              seed: int = 0, index_type: str = "flat", nlist: int | None = None, nprobe: int = 16,
              extra_candidates: int = 50, batch: int = 4096, log=None) -> dict:
    """Write `<split_dir>/interleaved_knn.arrow` (+ `.json` sidecar). Returns the sidecar dict.
    `log(message)` receives the warnings (default: `warnings.warn`), e.g. a `k` the train split
    cannot fill."""
    log = log or (lambda msg: warnings.warn(msg, stacklevel=3))
    import faiss  # noqa: F401  (fail early with a clear ImportError)

    split_dir = Path(split_dir)
    train_dir = Path(train_dir) if train_dir is not None else split_dir.parent / "train"
    if k < 2:
        raise KnnError(f"k must be >= 2 (k-1 neighbours are kept), got {k}")
    smeta, tmeta = af.read_metadata(split_dir), af.read_metadata(train_dir)
    if smeta["clip_encoder"] != tmeta["clip_encoder"]:
        raise KnnError(f"{split_dir} and {train_dir} were embedded with different clip encoders; "
                       f"their embeddings are not comparable")
    t_emb, t_rows, t_paths = clip_matrix(af.open_shards(train_dir), str(train_dir))
    same = split_dir.resolve() == train_dir.resolve()
    if same:
        q_emb, q_rows, q_paths = t_emb, t_rows, t_paths
    else:
        q_emb, q_rows, q_paths = clip_matrix(af.open_shards(split_dir), str(split_dir))
    if len(t_emb) == 0:
        raise KnnError(f"{train_dir}: no rows with a clip embedding")
    available = len(t_emb) - (1 if same else 0)  # a row is never its own neighbour
    if k - 1 > available:
        log(f"k={k} asks for {k - 1} neighbours per row, but the train split {train_dir} has {len(t_emb)} rows "
            f"with a clip embedding{' (the row itself excluded: ' + str(available) + ')' if same else ''}: "
            f"rows get at most {available} neighbours")
    index = build_index(t_emb, index_type, nlist, nprobe, seed)
    n_search = min(k + extra_candidates, len(t_emb))
    out_idx, out_nb = [], []
    for lo in range(0, len(q_emb), batch):
        _, cand = index.search(q_emb[lo:lo + batch], n_search)
        cand_rows = np.where(cand >= 0, t_rows[np.clip(cand, 0, None)], -1)
        for j in range(len(cand_rows)):
            qrow = int(q_rows[lo + j])
            rng = np.random.default_rng([seed, qrow])
            out_idx.append(qrow)
            out_nb.append(select_neighbors(cand_rows[j], t_paths, q_paths[qrow],
                                           qrow if same else None, k, rng))
    info = {"train_dir": os.path.relpath(train_dir.resolve(), split_dir.resolve()).replace(os.sep, "/"),
            "k": k, "seed": seed, "index_type": index_type, "extra_candidates": extra_candidates,
            "nlist": getattr(index, "nlist", None), "nprobe": getattr(index, "nprobe", None),
            "clip_encoder": tmeta["clip_encoder"], "num_rows": len(out_idx),
            "rows_without_clip_embedding": int(smeta["num_rows"] - len(out_idx)),
            "min_neighbors": min((len(n) for n in out_nb), default=0)}
    schema = pa.schema([pa.field("index", pa.int64(), nullable=False),
                        pa.field("neighbors", pa.list_(pa.int64()), nullable=False)],
                       metadata={b"megaflamingo.knn": af.json.dumps(info, sort_keys=True).encode()})
    table = pa.table({"index": pa.array(out_idx, pa.int64()),
                      "neighbors": pa.array(out_nb, pa.list_(pa.int64()))}, schema=schema)
    af.atomic_write_table(split_dir / af.KNN_FILE, table)
    af.atomic_write_json(split_dir / af.KNN_SIDECAR, info)
    return info


def read_knn(split_dir: str | os.PathLike) -> tuple[pa.Table, dict]:
    split_dir = Path(split_dir)
    side = split_dir / af.KNN_SIDECAR
    if not side.is_file():
        raise KnnError(f"{split_dir}: no {af.KNN_SIDECAR}; run `megaflamingo-preprocess knn`")
    return af.open_arrow_file(split_dir / af.KNN_FILE), af.json.loads(side.read_text("utf-8"))
