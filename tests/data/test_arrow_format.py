"""The on-disk contract: schema, metadata validation, memory-mapped reads, atomic shards."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from megaflamingo.data import arrow_format as af

ENC = dict(name="tiny", checkpoint=None, checkpoint_sha256=None, random_init=True, embed_dim=8,
           sample_rate=44100, config={})


def _rows(n, dim=8, rng=np.random.default_rng(0)):
    return [dict(id=f"x{i}", index=i, path=f"{i}.wav", start=0.5 * i, duration=3.0,
                 windows=rng.standard_normal((1 + i % 3, dim)).astype(np.float32),
                 clip_embedding=None if i == 1 else np.full(4, i, np.float32),
                 prompt=None if i == 2 else "p", output="o",
                 dialogue=[{"user": "u", "assistant": "a"}] if i == 0 else None,
                 task="ds-T", dataset="ds") for i in range(n)]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_roundtrip(tmp_path, dtype):
    rows = _rows(7)
    meta = af.write_dataset(tmp_path, rows, embed_dim=8, dtype=dtype, clip_dim=4, rows_per_shard=3,
                            dataset="ds", task="T", split="train", encoder=ENC,
                            silence_embedding=[0.0] * 8)
    assert meta["num_rows"] == 7 and [s["num_rows"] for s in meta["shards"]] == [3, 3, 1]
    assert af.read_metadata(tmp_path) == meta
    tables = af.open_shards(tmp_path)
    assert tables[0].schema.equals(af.arrow_schema(8, dtype, 4), check_metadata=True)
    got = [r for t in tables for r in t.to_pylist()]
    for r, g in zip(rows, got):
        assert g["num_windows"] == len(r["windows"]) == len(g["windows"])
        np.testing.assert_array_equal(np.array(g["windows"], dtype), r["windows"].astype(dtype))
        assert g["clip_embedding"] == (None if r["clip_embedding"] is None else list(r["clip_embedding"]))
        assert (g["prompt"], g["dialogue"], g["start"]) == (r["prompt"], r["dialogue"], r["start"])
    w = af.row_windows(tables[1], 2)   # row 5
    np.testing.assert_array_equal(w, rows[5]["windows"].astype(dtype))


def test_metadata_validation(tmp_path):
    meta = af.make_metadata(dataset="d", task="t", split="s", encoder=ENC, silence_embedding=[0.0] * 8)
    af.write_metadata(tmp_path, meta)
    for bad, msg in [({"schema_version": 99}, "schema_version"),
                     ({"silence_embedding": [0.0]}, "silence_embedding"),
                     ({"dtype": "int8"}, "dtype"), ({"num_rows": 3}, "num_rows")]:
        with pytest.raises(af.FormatError, match=msg):
            af.write_metadata(tmp_path, {**meta, **bad})
    broken = dict(meta)
    del broken["encoder"]
    with pytest.raises(af.FormatError, match="encoder"):
        af.validate_metadata(broken)


def test_open_shards_checks_row_counts(tmp_path):
    af.write_dataset(tmp_path, _rows(4), embed_dim=8, clip_dim=4, rows_per_shard=2, dataset="d",
                     task="t", split="s", encoder=ENC, silence_embedding=[0.0] * 8)
    other = tmp_path / "o"
    af.write_dataset(other, _rows(3), embed_dim=8, clip_dim=4, rows_per_shard=3, dataset="d",
                     task="t", split="s", encoder=ENC, silence_embedding=[0.0] * 8)
    (other / "shard-00000.arrow").replace(tmp_path / "shard-00001.arrow")
    with pytest.raises(af.FormatError, match="rows"):
        af.open_shards(tmp_path)


def test_failed_shard_write_leaves_nothing(tmp_path):
    w = af.DatasetWriter(tmp_path, af.arrow_schema(8, "float16", 4))
    w.write_shard(0, _rows(2))
    bad = _rows(1)
    bad[0]["windows"] = np.zeros((1, 5))            # wrong embed dim
    with pytest.raises(af.FormatError, match=r"\[n, 8\]"):
        w.write_shard(1, bad)
    assert not w.has_shard(1) and sorted(p.name for p in tmp_path.iterdir()) == [
        "shard-00000.arrow", "shard-00000.json"]
    with pytest.raises(af.FormatError, match="schema mismatch"):
        w.write_shard(2, pa.table({"id": ["x"]}))
