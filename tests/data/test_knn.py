"""kNN few-shot selection against a brute-force reading of AF1's rules."""
from __future__ import annotations

import numpy as np
import pytest

from megaflamingo.data import arrow_format as af
from megaflamingo.data.knn import KnnError, build_knn, read_knn

ENC = dict(name="tiny", checkpoint=None, checkpoint_sha256=None, random_init=True, embed_dim=4,
           sample_rate=44100, config={})


def _write(d, clips, paths, split):
    rows = [dict(id=f"r{i}", index=i, path=p, start=0.0, duration=1.0, windows=np.zeros((1, 4)),
                 clip_embedding=c, prompt="p", output="o", task="t-T", dataset="t")
            for i, (c, p) in enumerate(zip(clips, paths))]
    af.write_dataset(d, rows, embed_dim=4, clip_dim=3, rows_per_shard=7, dataset="t", task="T",
                     split=split, encoder=ENC, silence_embedding=[0.0] * 4,
                     clip_encoder=dict(ENC, embed_dim=3))


def _brute_force_paths(q, q_path, q_row, train, rows, paths, k, extra=50):
    """Paths of the k-1 nearest distinct other files among the k+extra nearest rows
    (`rows`: the global row index of each line of `train`)."""
    d = ((train - q) ** 2).sum(1)
    order = np.argsort(d, kind="stable")[: k + extra]
    seen = []
    for r in order:
        if paths[r] == q_path or rows[r] == q_row or paths[r] in seen:
            continue
        seen.append(paths[r])
    return set(seen[: k - 1])


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    train = rng.standard_normal((n, 3)).astype(np.float32)
    paths = [f"f{i // 3}.wav" for i in range(n)]          # 3 captions per file, like AudioCaps
    clips = [None if i == 5 else train[i] for i in range(n)]  # one row without a clip embedding
    _write(tmp_path / "train", clips, paths, "train")
    val = rng.standard_normal((10, 3)).astype(np.float32)
    vpaths = [paths[0]] + [f"v{i}.wav" for i in range(1, 10)]   # row 0 shares a file with train
    _write(tmp_path / "val", list(val), vpaths, "val")
    keep = np.array([c is not None for c in clips])
    return tmp_path, train, paths, keep, val, vpaths


def test_train_split_follows_af1_rules(dataset):
    root, train, paths, keep, _, _ = dataset
    info = build_knn(root / "train", k=5, seed=3)
    table, side = read_knn(root / "train")
    assert side == info and info["rows_without_clip_embedding"] == 1 and info["train_dir"] == "."
    idx = table.column("index").to_pylist()
    assert 5 not in idx and len(idx) == 59
    tr_rows = np.nonzero(keep)[0]
    for q, nb in zip(idx, table.column("neighbors").to_pylist()):
        assert len(nb) == 4 and q not in nb
        nb_paths = [paths[r] for r in nb]
        assert paths[q] not in nb_paths and len(set(nb_paths)) == 4   # one row per file
        assert all(keep[r] for r in nb)
        want = _brute_force_paths(train[q], paths[q], q, train[tr_rows], tr_rows,
                                  [paths[r] for r in tr_rows], 5)
        assert set(nb_paths) == want


def test_other_split_and_seeding(dataset):
    root, train, paths, keep, val, vpaths = dataset
    build_knn(root / "val", root / "train", k=4, seed=0)
    t0, info = read_knn(root / "val")
    assert info["train_dir"] == "../train"
    nbs = t0.column("neighbors").to_pylist()
    assert all(paths[r] != paths[0] for r in nbs[0])  # AF1 drops the same file across splits
    build_knn(root / "val", root / "train", k=4, seed=0)
    assert read_knn(root / "val")[0].equals(t0)
    build_knn(root / "val", root / "train", k=4, seed=1)
    nbs1 = read_knn(root / "val")[0].column("neighbors").to_pylist()
    assert [set(map(paths.__getitem__, a)) for a in nbs] == [set(map(paths.__getitem__, b)) for b in nbs1]
    assert nbs != nbs1   # shuffle / duplicate choice depend on the seed


def test_ivf_exhaustive_equals_flat(dataset):
    root = dataset[0]
    build_knn(root / "train", k=4, seed=0)
    flat = read_knn(root / "train")[0]
    info = build_knn(root / "train", k=4, seed=0, index_type="ivf", nlist=4, nprobe=4)
    assert info["index_type"] == "ivf" and info["nlist"] == 4
    assert read_knn(root / "train")[0].equals(flat)


def test_errors(dataset, tmp_path):
    root = dataset[0]
    with pytest.raises(KnnError, match="k must be"):
        build_knn(root / "train", k=1)
    rows = [dict(id="x", index=0, path="a.wav", start=0.0, duration=1.0, windows=np.zeros((1, 4)),
                 task="t-T", dataset="t")]
    af.write_dataset(tmp_path / "noclip" / "train", rows, embed_dim=4, dataset="t", task="T",
                     split="train", encoder=ENC, silence_embedding=[0.0] * 4)
    with pytest.raises(KnnError, match="no clip embeddings"):
        build_knn(tmp_path / "noclip" / "train")


def test_k_larger_than_the_train_split_warns_with_the_numbers(tmp_path, capsys):
    import json

    from megaflamingo.cli.preprocess import main

    rng = np.random.default_rng(1)
    _write(tmp_path / "train", list(rng.standard_normal((6, 3)).astype(np.float32)), [f"f{i}.wav" for i in range(6)],
           "train")
    _write(tmp_path / "val", list(rng.standard_normal((2, 3)).astype(np.float32)), ["v0.wav", "v1.wav"], "val")
    assert main(["knn", "--split-dir", str(tmp_path / "val"), "-k", "64"]) == 0
    out = capsys.readouterr()
    info = json.loads(out.out)
    assert info["k"] == 64 and info["min_neighbors"] == 6
    assert "[knn] warning: k=64 asks for 63 neighbours per row, but the train split" in out.err
    assert "has 6 rows with a clip embedding: rows get at most 6 neighbours" in out.err
    assert main(["knn", "--split-dir", str(tmp_path / "train"), "-k", "4"]) == 0  # 3 <= 5: no warning
    assert "warning" not in capsys.readouterr().err
