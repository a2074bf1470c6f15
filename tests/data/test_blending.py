"""Virtual epochs vs a re-statement of AF1's blend loop; the AF1 distributed sampler."""
from copy import deepcopy

import numpy as np
import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from megaflamingo.data.blending import plan_epoch, virtual_epoch_items
from megaflamingo.data.sampling import af1_distributed_indices, length_grouped_batches


def _af1_shuffle_dict(dic, seed):
    rng = np.random.default_rng(seed)
    keys = list(dic.keys())
    shuffled = deepcopy(keys)
    rng.shuffle(shuffled)
    return {k: dic[s] for k, s in zip(keys, shuffled)}


def af1_blend(datasets, global_weight, epoch):
    """AF1's blend loop restated (oracle): datasets = [(name, n, weight)] -> [(name, item)]."""
    out = []
    for name, n, w in datasets:
        data = {str(i): i for i in range(n)}
        base = _af1_shuffle_dict(data, sum(map(ord, name)))
        cur = base
        weight = float(global_weight) * float(w)
        start, end = int(epoch * n * weight), int((epoch + 1) * n * weight)
        for idx in range(start, end):
            if idx > 0 and idx % n == 0:
                cur = _af1_shuffle_dict(data, sum(map(ord, f"{name}-epoch-{idx // n}")))
            out.append((name, cur[str(idx % n)]))
    return out


DATASETS = [("Clotho-AQA-AQA/train", 13, 3.5), ("Clotho-AQA-AQA/interleaved_knn-train", 7, 0.5),
            ("MusicCaps-AudioCaptioning/train", 5, 6.0), ("tiny-AQA/train", 1, 0.3)]


@pytest.mark.parametrize("gw", [0.01, 0.13, 1.0])
def test_af1_exact_mode_matches_af1_loop(gw):
    names, sizes, ws = zip(*DATASETS)
    weights = [gw * w for w in ws]
    for epoch in range(0, 40, 3):
        plan = plan_epoch(names, sizes, weights, epoch, af1_exact=True)
        got = [(names[e], int(i)) for e, i in zip(plan.entry, plan.item)]
        assert got == af1_blend(DATASETS, gw, epoch), epoch


def test_default_mode_each_pass_is_a_permutation_with_its_own_shuffle():
    n, w = 11, 0.3
    seq = np.concatenate([virtual_epoch_items("X/train", n, w, e) for e in range(40)])
    full = len(seq) // n
    for p in range(full):
        assert sorted(seq[p * n:(p + 1) * n].tolist()) == list(range(n))
    assert not np.array_equal(seq[:n], seq[n:2 * n])  # reshuffled when the dataset wraps
    # slices are contiguous: epoch e starts where e-1 ended
    assert len(seq) == int(40 * n * w)


def test_weights_scale_epoch_size():
    plan = plan_epoch(["A/train", "B/train"], [100, 50], [0.1, 0.5], 0)
    assert (plan.entry == 0).sum() == 10 and (plan.entry == 1).sum() == 25


@pytest.mark.parametrize("n,ws", [(10, 3), (7, 2), (1, 4), (12, 1)])
def test_distributed_indices_match_torch_sampler(n, ws):
    ds = list(range(n))
    for epoch in (0, 3):
        for rank in range(ws):
            s = DistributedSampler(ds, num_replicas=ws, rank=rank, shuffle=True, seed=5)
            s.set_epoch(epoch)
            assert af1_distributed_indices(n, rank, ws, True, 5, epoch).tolist() == list(iter(s))
            s2 = DistributedSampler(ds, num_replicas=ws, rank=rank, shuffle=False)
            assert af1_distributed_indices(n, rank, ws, False).tolist() == list(iter(s2))


def test_length_grouping_is_a_partition_and_groups_lengths():
    rng = np.random.default_rng(0)
    idx = rng.permutation(1000)
    lengths = rng.integers(10, 500, size=1000)
    g = torch.Generator().manual_seed(0)
    batches = length_grouped_batches(idx, lengths, 8, g, megabatch_mult=16)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == sorted(idx.tolist())
    pos = {int(k): i for i, k in enumerate(idx)}
    spread = np.mean([np.ptp([lengths[pos[int(k)]] for k in b]) for b in batches])
    assert spread < 0.2 * np.ptp(lengths)
