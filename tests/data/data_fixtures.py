"""Helpers writing small Arrow datasets with the preprocessing helper's format module."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from megaflamingo.data import arrow_format as af

D, W = 8, 4  # tiny embedding dim and windows per audio


def encoder_meta(name="tiny", sha="abc", dim=D):
    return {"name": name, "checkpoint": None, "checkpoint_sha256": sha, "random_init": True,
            "embed_dim": dim, "sample_rate": 16000, "config": {}}


def make_split(root: Path, name: str, rows: list[dict] | int, *, dim=D, max_windows=W, encoder=None,
               seed=0, rows_per_shard=3, dtype="float16") -> Path:
    """Write ``root/<name>`` (e.g. 'Clotho-AQA-AQA/train'). ``rows`` may be a count (AQA-like rows)."""
    rng = np.random.default_rng(seed)
    if isinstance(rows, int):
        rows = [{"prompt": f"question: is there a dog number {i}?", "output": "yes" if i % 2 else "no"}
                for i in range(rows)]
    full = []
    for i, r in enumerate(rows):
        n = int(r.get("num_windows", rng.integers(1, max_windows + 1)))
        full.append({
            "id": f"{name}#{i}", "index": i, "path": f"{name}/audio_{i}.wav", "start": 0.0,
            "duration": 7.0 + 1.75 * (n - 1), "num_windows": n,
            "windows": (rng.standard_normal((n, dim)) + i).astype(np.float32),
            "clip_embedding": None, "prompt": r.get("prompt"), "output": r.get("output"),
            "dialogue": r.get("dialogue"), "task": name.split("/")[0].split("-")[-1],
            "dataset": name.split("/")[0],
        })
    directory = root / name
    ds, split = name.split("/")
    af.write_dataset(directory, full, embed_dim=dim, dtype=dtype, rows_per_shard=rows_per_shard,
                     dataset=ds.rsplit("-", 1)[0], task=ds.rsplit("-", 1)[-1], split=split,
                     encoder=encoder or encoder_meta(dim=dim), max_windows=max_windows,
                     silence_embedding=np.full(dim, -7.0).tolist())
    return directory


def make_knn(split_dir: Path, index: list[int], neighbors: list[list[int]], train_dir="../train",
             file_name="interleaved_knn.arrow") -> Path:
    table = pa.table({"index": pa.array(index, pa.int64()),
                      "neighbors": pa.array(neighbors, pa.list_(pa.int64()))})
    af.atomic_write_table(split_dir / file_name, table)
    af.atomic_write_json((split_dir / file_name).with_suffix(".json"),
                         {"train_dir": train_dir, "k": len(neighbors[0]) + 1 if neighbors else 0,
                          "seed": 0, "index_type": "flat"})
    return split_dir / file_name


