"""AF1's dataset blending into virtual epochs.

Each blend entry has a weight ``w = global_weight * entry.weight``. Virtual epoch ``e`` takes
positions ``[int(e*N*w), int((e+1)*N*w))`` of an endless sequence made of seeded shuffles of the
dataset's N items: pass ``p`` (positions ``[p*N, (p+1)*N)``) uses the shuffle seeded with
``sum(ord(name))`` for p = 0 and ``sum(ord(f"{name}-epoch-{p}"))`` after that, exactly AF1's seeds
(so the same manifest gives the same sample sets as AF1's ``dataset_blending.json``). The epoch's
list is the concatenation of all entries in config order; the sampler then shuffles it.

``af1_exact=True`` reproduces a quirk of AF1's loop: a pass's reshuffle only took effect inside the
virtual epoch that crossed the pass boundary, so later slices of pass p>0 were read from the pass-0
order. The default (False) uses pass p's own shuffle for the whole pass, which is what AF1
intended ("reshuffle when a dataset wraps").
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np


def af1_seed(text: str) -> int:
    """AF1's deterministic seed for a string: the sum of its code points (blend shuffles, and the
    per-sample template choice of validation)."""
    return sum(map(ord, text))


@functools.lru_cache(maxsize=64)
def _shuffle(n: int, seed: int) -> np.ndarray:
    # AF1 shuffled the list of keys "0".."n-1" with default_rng(seed).shuffle; a numpy Generator
    # draws the same permutation for a list and for arange(n).
    perm = np.arange(n, dtype=np.int64)
    np.random.default_rng(seed).shuffle(perm)
    perm.setflags(write=False)
    return perm


def pass_permutation(name: str, n: int, p: int) -> np.ndarray:
    """Order of the N items during pass ``p`` (perm[k] = item at shuffled position k)."""
    seed = af1_seed(name) if p == 0 else af1_seed(f"{name}-epoch-{p}")
    return _shuffle(n, seed)


def epoch_bounds(n: int, weight: float, epoch: int) -> tuple[int, int]:
    # Same float expression order as AF1: (epoch * N) * weight.
    return int(epoch * n * weight), int((epoch + 1) * n * weight)


def virtual_epoch_items(name: str, n: int, weight: float, epoch: int, af1_exact: bool = False) -> np.ndarray:
    """Item indices (0..n-1) this entry contributes to virtual epoch ``epoch``, in AF1 order."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    start, end = epoch_bounds(n, weight, epoch)
    if end <= start:
        return np.zeros(0, dtype=np.int64)
    pos = np.arange(start, end, dtype=np.int64)
    passes = pos // n
    out = np.empty_like(pos)
    if af1_exact:
        # the permutation in force at position idx is that of the last boundary p*N (p>0) inside
        # [start, idx]; before any boundary inside this slice it is the pass-0 order.
        first_boundary_pass = -(-start // n) if start > 0 else 1  # ceil(start/n), boundary at >0
        effective = np.where(passes >= max(first_boundary_pass, 1), passes, 0)
    else:
        effective = passes
    for p in np.unique(effective):
        sel = effective == p
        out[sel] = pass_permutation(name, n, int(p))[pos[sel] % n]
    return out


@dataclass(frozen=True)
class EpochPlan:
    """The blended list of one virtual epoch: ``entry[k]`` indexes the blend entries and
    ``item[k]`` the item within that entry."""

    entry: np.ndarray
    item: np.ndarray

    def __len__(self) -> int:
        return len(self.entry)


def plan_epoch(names: Sequence[str], sizes: Sequence[int], weights: Sequence[float], epoch: int,
               af1_exact: bool = False) -> EpochPlan:
    entries, items = [], []
    for k, (name, n, w) in enumerate(zip(names, sizes, weights)):
        it = virtual_epoch_items(name, n, w, epoch, af1_exact)
        entries.append(np.full(len(it), k, dtype=np.int64))
        items.append(it)
    if not entries:
        return EpochPlan(np.zeros(0, np.int64), np.zeros(0, np.int64))
    return EpochPlan(np.concatenate(entries), np.concatenate(items))
