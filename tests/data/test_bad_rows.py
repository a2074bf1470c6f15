"""Rows with NaN/inf embeddings are skipped, counted and named; too many of them stop the run."""
import numpy as np
import pytest

from megaflamingo.config import DataConfig, DatasetEntry, ModelConfig
from megaflamingo.data import arrow_format as af
from megaflamingo.data import build_train_loader
from megaflamingo.data.row_check import FractionBudget, bad_windows
from tests.data.data_fixtures import D, W, encoder_meta

MODEL = ModelConfig(audio_embed_dim=D, max_num_window=W, max_num_fewshot=1)


def write_split(root, name, n, nan_rows=()):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        w = rng.standard_normal((2, D)).astype(np.float32)
        if i in nan_rows:
            w[1, 3] = np.nan
        rows.append({"id": f"row-{i}", "index": i, "path": f"a/{i}.wav", "start": 0.0, "duration": 8.75,
                     "num_windows": 2, "windows": w, "clip_embedding": None, "prompt": "what is it?",
                     "output": f"thing {i}", "dialogue": None, "task": "AQA", "dataset": "Clotho-AQA"})
    ds, split = name.split("/")
    af.write_dataset(root / name, rows, embed_dim=D, dtype="float32", rows_per_shard=4, dataset="Clotho-AQA",
                     task="AQA", split=split, encoder=encoder_meta(), max_windows=W,
                     silence_embedding=[0.0] * D)


def test_bad_windows():
    ok = [np.zeros((3, D), np.float32)]
    assert bad_windows(ok) is None
    bad = np.zeros((3, D), np.float32)
    bad[2, 0] = np.inf
    bad[0, 1] = np.nan
    assert bad_windows(ok + [bad]) == "shot 1: 2 window embedding(s) contain NaN/inf"
    assert bad_windows([np.zeros((0, D))]) == "shot 0 has no windows"


def test_fraction_budget():
    b = FractionBudget("rows", "train.max_bad_row_fraction", 0.05, min_count=20)
    b.add(1, 5)
    assert not b.exceeded()  # 1 bad of 5 is 20%, but within 0.05 * 20 = 1 at the start of a run
    b.add(1, 5)
    assert b.exceeded()
    assert b.message().startswith("2 of 10 rows (20.0%) were bad, more than train.max_bad_row_fraction=0.05")
    big = FractionBudget("micro-batches", "train.max_nonfinite_fraction", 0.05, min_count=20)
    big.add(4, 100)
    assert not big.exceeded()
    big.add(2, 10)  # 6 of 110 > 5.5
    assert big.exceeded()
    off = FractionBudget("rows", "k", 1.0)
    off.add(10, 10)
    assert not off.exceeded()
    resumed = FractionBudget("rows", "k", 0.5)
    resumed.load_state_dict(big.state_dict())
    assert (resumed.bad, resumed.seen) == (6, 110)
    with pytest.raises(ValueError, match="k: must be in"):
        FractionBudget("rows", "k", 1.5)


def test_loader_skips_counts_and_names_a_nan_row(tmp_path, tiny_tok, tiny_token_ids, caplog):
    write_split(tmp_path, "Clotho-AQA-AQA/train", 10, nan_rows={6})
    cfg = DataConfig(data_root=str(tmp_path), num_workers=0, blend={"Clotho-AQA-AQA/train": DatasetEntry(weight=1.0)})
    loader = build_train_loader(cfg, tiny_tok, tiny_token_ids, 0, 1, 7, batch_size=3, model_cfg=MODEL)
    rows = 0
    with caplog.at_level("WARNING", logger="megaflamingo.data"):
        for batch in loader:
            assert bool(np.isfinite(batch["audio_embeds"].numpy()).all()) and "bad_rows" not in batch
            rows += batch["input_ids"].shape[0]
    assert rows == 9
    assert (loader.rows.bad, loader.rows.seen) == (1, 10)
    assert [r.getMessage() for r in caplog.records] == [
        "train data: skipped a bad row: Clotho-AQA-AQA/train row 6 (id row-6): shot 0: 1 window embedding(s) "
        "contain NaN/inf"]
    # The counts are part of the loader state: a resumed loader keeps counting.
    again = build_train_loader(cfg, tiny_tok, tiny_token_ids, 0, 1, 7, batch_size=3, model_cfg=MODEL)
    again.load_state_dict(loader.state_dict())
    assert (again.rows.bad, again.rows.seen) == (1, 10)


def test_packed_loader_skips_counts_and_names_a_nan_row_without_reading_audio_to_plan(
        tmp_path, tiny_tok, tiny_token_ids, caplog, monkeypatch):
    """Packing plans the epoch from token lengths alone (every rank runs that pass over the whole epoch,
    so it must not read the embeddings); the bad row is found when its micro-batch is built, dropped,
    counted and named, as without packing."""
    from megaflamingo.data import loader as loader_mod

    write_split(tmp_path, "Clotho-AQA-AQA/train", 10, nan_rows={6})
    cfg = DataConfig(data_root=str(tmp_path), num_workers=0, packing=True, max_tokens_per_row=512,
                     blend={"Clotho-AQA-AQA/train": DatasetEntry(weight=1.0)})
    checked = []
    real = loader_mod.bad_row
    monkeypatch.setattr(loader_mod, "bad_row", lambda src, j, item: checked.append(j) or real(src, j, item))
    loader = build_train_loader(cfg, tiny_tok, tiny_token_ids, 0, 1, 7, batch_size=2, model_cfg=MODEL)
    samples = 0
    with caplog.at_level("WARNING", logger="megaflamingo.data"):
        for batch in loader:
            assert bool(np.isfinite(batch["audio_embeds"].numpy()).all()) and "bad_rows" not in batch
            samples += batch["num_samples"]
    assert samples == 9 and sorted(checked) == list(range(10))  # each row's audio checked once: when built
    assert (loader.rows.bad, loader.rows.seen) == (1, 10)
    assert [r.getMessage() for r in caplog.records] == [
        "train data: skipped a bad row: Clotho-AQA-AQA/train row 6 (id row-6): shot 0: 1 window embedding(s) "
        "contain NaN/inf"]
