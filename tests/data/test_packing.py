"""The packer: capacity respected, every sample exactly once, deterministic, bounded delay, fill rate; groups of
world_size micro-batches (every rank one, never empty, however uneven the lengths); the packed collate."""
import numpy as np
import pytest
import torch

from megaflamingo.data.packing import (GroupPacker, PackingConfig, PlanCache, RankPlan, collate_packed, pack_lengths,
                                       plan_groups, plan_rank, prepare_sample)
from megaflamingo.data.labels import build_labels
from megaflamingo.data.reader import DataError

TOK = dict(media=90, eoc=91, sep=92, pad=1, bos=2, eos=2)
W, SHOTS, D = 2, 3, 4


def _lengths(n, seed=0):
    rng = np.random.default_rng(seed)
    short = rng.integers(8, 60, n)
    long_ = rng.integers(200, 500, n)
    return np.where(rng.random(n) < 0.15, long_, short).tolist()


def test_pack_lengths_capacity_each_sample_once_deterministic():
    cfg = PackingConfig(max_tokens_per_row=512, rows_per_batch=3, lookahead=2, max_delay=3)
    lengths = _lengths(500)
    plan = pack_lengths(lengths, cfg)
    flat = [i for b in plan for row in b for i in row]
    assert sorted(flat) == list(range(500))
    for b in plan:
        assert 1 <= len(b) <= 3
        for row in b:
            assert sum(lengths[i] for i in row) <= 512
    assert plan == pack_lengths(lengths, cfg)
    p = GroupPacker(cfg)
    assert len(list(plan_groups(enumerate(lengths), cfg, packer=p))) == len(plan)
    # first-fit decreasing over the look-ahead fills rows far better than one sample per row
    assert p.stats.fill_rate > 0.9, p.stats.fill_rate
    rows = sum(len(b) for b in plan)
    assert p.stats.fill_rate == pytest.approx(sum(lengths) / (rows * 512))
    assert p.stats.samples == 500 and p.stats.duplicates == 0


def test_bounded_delay():
    cfg = PackingConfig(max_tokens_per_row=100, rows_per_batch=1, lookahead=3, max_delay=2)
    lengths = [60] + [95] * 30  # the 60 never fits beside a 95: longest-first alone would starve it
    emitted_at = {i: k for k, b in enumerate(pack_lengths(lengths, cfg)) for row in b for i in row}
    no_delay = {i: k for k, b in enumerate(pack_lengths(lengths, PackingConfig(100, 1, 3, max_delay=0)))
                for row in b for i in row}
    assert no_delay[0] > 10  # without the bound it waits until the long ones run out
    assert emitted_at[0] <= cfg.max_delay + 1


@pytest.mark.parametrize("world", [2, 3])
def test_groups_deal_one_nonempty_micro_batch_to_every_rank(world):
    """The global plan is the same on every rank; each group gives each rank one micro-batch. The ranks'
    shares of the stream are uneven in tokens (long samples on even positions), which per-rank packing
    would turn into different numbers of micro-batches."""
    cfg = PackingConfig(max_tokens_per_row=256, rows_per_batch=2, lookahead=2)
    rng = np.random.default_rng(world)
    lengths = [int(rng.integers(150, 250)) if i % world == 0 else int(rng.integers(5, 30)) for i in range(301)]
    per_rank_alone = [len(pack_lengths(lengths[r::world], cfg)) for r in range(world)]
    assert len(set(per_rank_alone)) > 1, "the test wants shares that pack into different counts"
    stream = list(enumerate(lengths))
    plans = [plan_rank(iter(stream), cfg, r, world) for r in range(world)]
    assert len({len(p.batches) for p in plans}) == 1
    groups = list(plan_groups(iter(stream), cfg, world))
    assert [[mb for mb in (g[r] for g in groups)] for r in range(world)] == [p.batches for p in plans]
    for g in groups:
        assert len(g) == world
        for mb in g:
            assert 1 <= len(mb) <= cfg.rows_per_batch and all(row for row in mb)
            assert all(sum(lengths[i] for i in row) <= 256 for row in mb)
    seen = [i for g in groups for mb in g for row in mb for i in row]
    assert set(seen) == set(range(301)) and len(seen) == 301 + plans[0].stats.duplicates


def test_tail_topped_up_from_the_epoch_start():
    cfg = PackingConfig(max_tokens_per_row=64, rows_per_batch=2, lookahead=1)
    groups = list(plan_groups(enumerate([10, 20, 30]), cfg, world_size=5))
    assert len(groups) == 1 and all(len(mb) == 1 for mb in groups[0])
    got = sorted(i for mb in groups[0] for row in mb for i in row)
    assert got == [0, 0, 1, 1, 2]  # three samples, two repeated (the first ones) so that all 5 ranks get one
    # left-out samples (None) are counted once over the ranks, on the rank whose turn they were
    stream = [(i, None if i % 4 == 1 else 10) for i in range(20)]
    plans = [plan_rank(iter(stream), cfg, r, 3) for r in range(3)]
    assert sum(p.left_out for p in plans) == 5
    assert all(1 not in [i for mb in p.batches for row in mb for i in row] for p in plans)


def test_config_errors():
    with pytest.raises(DataError, match="data.max_tokens_per_row=256 < data.max_tokens=512"):
        PackingConfig(max_tokens_per_row=256).validate(max_tokens=512)
    with pytest.raises(DataError, match="train.micro_batch_size must be >= 1"):
        GroupPacker(PackingConfig(rows_per_batch=0))
    with pytest.raises(DataError, match="data.packing_lookahead must be >= 1"):
        GroupPacker(PackingConfig(lookahead=0))
    with pytest.raises(DataError, match="has 600 tokens > data.max_tokens_per_row=512"):
        GroupPacker(PackingConfig(max_tokens_per_row=512)).push("x", 600)


def _sample(p, rng):
    n_shots = 1 if rng.random() < 0.7 else 3
    ids = [TOK["bos"], TOK["bos"]]
    for _ in range(n_shots):
        ids += [TOK["media"]] + list(rng.integers(3, 80, int(rng.integers(1, 20)))) + [TOK["sep"]]
        ids += list(rng.integers(3, 80, int(rng.integers(1, 8)))) + [TOK["eoc"]]
    ids.append(TOK["eos"])
    wins = [rng.standard_normal((int(rng.integers(1, W + 1)), D)).astype(np.float32) for _ in range(n_shots)]
    return prepare_sample({"input_ids": np.asarray(ids), "windows": wins, "silence": np.zeros(D, np.float32),
                           "dataset": "d"}, W * SHOTS, W, D, key=p)


def test_collate_layout_and_fields():
    cfg = PackingConfig(max_tokens_per_row=128, rows_per_batch=2, pad_to_multiple_of=8, query_chunk=0)
    rng = np.random.default_rng(0)
    prepared = [_sample(i, rng) for i in range(3)]
    rows = [prepared[:2], prepared[2:3]]
    b = collate_packed(rows, TOK, cfg, W)
    R, T = b["input_ids"].shape
    assert R == 2 and T % 8 == 0 and T >= max(sum(p["length"] for p in r) for r in rows)
    lay = b["layout"]
    assert lay.num_samples == 3 and lay.sample_row.tolist() == [0, 0, 1]
    assert lay.sample_start.tolist() == [0, prepared[0]["length"], 0]
    # positions restart per sample; padding positions are their own segment
    n0 = prepared[0]["length"]
    assert lay.position_ids[0, n0] == 0 and lay.position_ids[0, n0 - 1] == n0 - 1
    assert (b["input_ids"][b["sample_index"] < 0] == TOK["pad"]).all()
    assert (b["labels"][b["sample_index"] < 0] == -100).all()
    for smp, s in zip(prepared, range(3)):  # labels made batch-wise = each sample's own AF1 labels
        r, a, n = int(lay.sample_row[s]), int(lay.sample_start[s]), smp["length"]
        own = build_labels(smp["input_ids"], TOK)
        assert (own != -100).sum() > 0 and torch.equal(b["labels"][r, a:a + n], own)
        assert torch.equal(b["audio_embeds"][s], smp["audio"])
    assert b["audio_embeds"].shape == (3, W * SHOTS, D) and b["num_tokens"] == sum(p["length"] for r in rows for p in r)
    with pytest.raises(DataError, match="no samples"):
        collate_packed([], TOK, cfg, W)


def test_plan_cache_prefetches_the_next_epoch_and_reraises_its_error():
    calls = []

    def compute(epoch):
        calls.append(epoch)
        if epoch == 3:
            raise DataError("epoch 3 is broken")
        return RankPlan(batches=[[[epoch]]])

    cache = PlanCache(compute, background=True)
    assert cache.get(0).batches == [[[0]]]
    cache.prefetch(1)
    cache.prefetch(1)  # once
    assert cache.get(1).batches == [[[1]]] and calls == [0, 1]
    assert cache.get(0) is cache.get(0) and calls == [0, 1]  # kept, not recomputed
    cache.prefetch(3)
    with pytest.raises(DataError, match="epoch 3 is broken"):
        cache.get(3)
    inline = PlanCache(compute, background=False)
    inline.prefetch(5)
    assert 5 not in calls and inline.get(5).batches == [[[5]]]
