"""Retrieval-augmented few-shot inference (AF1's ICL-based RAG).

The query clip's retrieval key is searched among the rows of a preprocessed *train* split; the
nearest rows (their window embeddings + prompt + answer) become the in-context examples of a
``Here are similar examples. ...`` prompt, the query comes last.

Retrieval key: the split's LAION-CLAP ``clip_embedding`` when preprocessing stored one (then the
query is embedded with the same LAION-CLAP encoder, rebuilt from the split's ``clip_encoder``
record), otherwise the L2-normalised mean of the row's window embeddings (the same key
`megaflamingo-preprocess knn` falls back to without a clip encoder). Rules as AF1's kNN: search
k + 50, drop rows of the same audio file, keep k - 1. Examples are shown farthest first, so the
nearest neighbour sits right before the query (AF1 shuffled them; order is not meaningful to it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .prompts import Example


@dataclass
class Neighbour:
    row: int
    distance: float
    id: str
    path: str
    prompt: str
    output: str
    windows: np.ndarray


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def mean_window_keys(table) -> np.ndarray:
    """[rows, D] mean of each row's window embeddings, vectorised over the flat Arrow buffers."""
    import pyarrow as pa

    col = table.column("windows")
    col = pa.concat_arrays(col.chunks) if col.num_chunks != 1 else col.chunk(0)
    counts = col.value_lengths().to_numpy(zero_copy_only=False)
    if (counts <= 0).any():
        bad = int(np.nonzero(counts <= 0)[0][0])
        raise ValueError(f"row {bad} has no window embeddings")
    dim = col.type.value_type.list_size
    # flatten() honours slicing (unlike .values): windows of exactly these rows, in order.
    flat = col.flatten().flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    sums = np.add.reduceat(flat, starts, axis=0)
    return sums / counts[:, None]


class RetrievalIndex:
    """kNN over a preprocessed train split."""

    def __init__(self, train_dir: str | os.PathLike, use_clip: Optional[bool] = None):
        import pyarrow as pa

        from megaflamingo.data.arrow_format import open_shards, read_metadata

        self.dir = Path(train_dir)
        self.meta = read_metadata(self.dir)
        tables = open_shards(self.dir)
        if not tables:
            raise ValueError(f"{self.dir}: empty dataset")
        self.table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        if self.table.num_rows == 0:
            raise ValueError(f"{self.dir}: the train split has no rows to retrieve from")
        clip_enc = self.meta.get("clip_encoder") or {}
        # A "clip encoder" that is just the mean of the window embeddings (tiny / quickstart) is
        # recomputed from the windows, so query and index keys come from the same arithmetic.
        has_clip = bool(clip_enc) and bool(self.meta.get("clip_embed_dim")) and (
            (clip_enc.get("config") or {}).get("pooling") != "mean_of_windows")
        self.use_clip = bool(has_clip) if use_clip is None else use_clip
        if self.use_clip:
            if not has_clip:
                raise ValueError(f"{self.dir}: no clip embeddings stored (preprocess with a LAION-CLAP encoder)")
            keys = np.asarray(self.table.column("clip_embedding").to_pylist(), dtype=np.float32)
        else:
            keys = mean_window_keys(self.table)
        self.keys = _normalize(keys)
        self.paths = self.table.column("path").to_pylist()
        self.ids = self.table.column("id").to_pylist()
        self._faiss = None
        try:
            import faiss

            index = faiss.IndexFlatL2(self.keys.shape[1])
            index.add(np.ascontiguousarray(self.keys))
            self._faiss = index
        except ImportError:  # pragma: no cover - faiss-cpu is a dependency; numpy fallback
            pass

    @property
    def encoder_record(self) -> dict:
        return {"encoder": self.meta["encoder"], "windows": self.meta["windows"],
                "silence_embedding": self.meta["silence_embedding"]}

    def key_for_windows(self, windows: np.ndarray) -> np.ndarray:
        if self.use_clip:
            raise ValueError("this index uses clip embeddings; compute the query's with the clip encoder")
        return _normalize(np.asarray(windows, dtype=np.float32).mean(0))

    def search(self, key: np.ndarray, k: int, exclude_paths: Sequence[str] = (),
               exclude_rows: Sequence[int] = ()) -> list[tuple[int, float]]:
        """Up to ``k`` (row, squared L2 distance) pairs, nearest first, AF1's exclusions applied."""
        if k < 1:
            return []
        q = _normalize(np.asarray(key, dtype=np.float32).reshape(1, -1))
        if q.shape[1] != self.keys.shape[1]:
            raise ValueError(f"query key has {q.shape[1]} dims, the index {self.keys.shape[1]}")
        want = min(k + 50, len(self.keys))
        if self._faiss is not None:
            dist, idx = self._faiss.search(q, want)
            pairs = [(int(i), float(d)) for i, d in zip(idx[0], dist[0]) if i >= 0]
        else:
            d = ((self.keys - q) ** 2).sum(1)
            order = np.argsort(d, kind="stable")[:want]
            pairs = [(int(i), float(d[i])) for i in order]
        ex_p, ex_r = set(exclude_paths), set(int(r) for r in exclude_rows)
        return [(i, d) for i, d in pairs if self.paths[i] not in ex_p and i not in ex_r][:k]

    def neighbours(self, key: np.ndarray, k: int, exclude_paths: Sequence[str] = (),
                   exclude_rows: Sequence[int] = ()) -> list[Neighbour]:
        from megaflamingo.data.arrow_format import row_windows

        out = []
        for row, dist in self.search(key, k, exclude_paths, exclude_rows):
            rec = self.table.slice(row, 1).select(["id", "path", "prompt", "output"]).to_pylist()[0]
            if rec["output"] is None:
                raise ValueError(f"{self.dir}: row {row} ({rec['id']}) has no output to show as an example")
            out.append(Neighbour(row, dist, rec["id"], rec["path"], rec["prompt"] or "", rec["output"],
                                 np.array(row_windows(self.table, row), dtype=np.float32)))
        return out


def build_examples(neigh: Sequence[Neighbour], render=None) -> tuple[list[Example], list[np.ndarray]]:
    """Farthest first, so the nearest example is right before the query. ``render(neighbour) ->
    Example`` puts an example's text in its trained form (default: as stored)."""
    ordered = list(reversed(neigh))
    render = render or (lambda n: Example(n.prompt, n.output))
    return [render(n) for n in ordered], [n.windows for n in ordered]
