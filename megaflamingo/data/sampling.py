"""Which dataset positions go into which batch, on which rank: AF1's DistributedSampler order, plain
chunks, and length-grouped batches (similar lengths together, to cut padding)."""
from __future__ import annotations

import numpy as np
import torch


def length_grouped_batches(indices: np.ndarray, lengths: np.ndarray, batch_size: int,
                           generator: torch.Generator, megabatch_mult: int = 32) -> list[np.ndarray]:
    """Split ``indices`` (already shuffled) into batches of similar length: sort inside
    megabatches of ``batch_size * megabatch_mult`` (longest first), cut into batches, shuffle
    the batch order. Deterministic under ``generator``; every index appears exactly once."""
    mb = batch_size * megabatch_mult
    batches: list[np.ndarray] = []
    for lo in range(0, len(indices), mb):
        chunk = indices[lo:lo + mb]
        order = np.argsort(-lengths[lo:lo + mb], kind="stable")
        chunk = chunk[order]
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    perm = torch.randperm(len(batches), generator=generator).numpy()
    return [batches[i] for i in perm]


def af1_distributed_indices(n: int, rank: int, world_size: int, shuffle: bool, seed: int = 0,
                            epoch: int = 0) -> np.ndarray:
    """The indices torch's DistributedSampler gives ``rank`` (drop_last=False), as AF1 used it."""
    if shuffle:
        g = torch.Generator()
        g.manual_seed(seed + epoch)
        idx = torch.randperm(n, generator=g).numpy()
    else:
        idx = np.arange(n)
    if n == 0:
        return idx.astype(np.int64)
    total = -(-n // world_size) * world_size
    pad = total - n
    if pad:
        reps = -(-pad // n)
        idx = np.concatenate([idx, np.tile(idx, reps)[:pad]])
    return idx[rank:total:world_size].astype(np.int64)


def chunk(indices: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
