"""The training DataLoader's own random generator.

``torch.utils.data.DataLoader`` draws one int64 from ``loader.generator`` every time an iterator is
created (``_BaseDataLoaderIter.__init__``: the base seed of its worker processes), also with
``num_workers=0``. Without a generator that draw comes from the *global* torch RNG. The trainer restores
the global RNG from the checkpoint and only then starts iterating, so after a resume that extra draw
shifts every later dropout mask: the run is no longer exact.

Passing :func:`loader_generator` as ``DataLoader(generator=...)`` keeps the global RNG untouched. Its seed
is a function of the loader state ``(seed, epoch, batch_in_epoch)`` and the rank, so the generator needs
no state of its own: a resumed loader builds the same one from its restored position. (Sample
randomness does not use the workers' RNG at all; it comes from per-sample generators keyed by
``(seed, epoch, position)``, so which worker produces a batch never matters.)
"""
from __future__ import annotations

import numpy as np
import torch


def loader_generator(seed: int, epoch: int, start_batch: int, rank: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, epoch, start_batch, rank)`` (independent streams per key)."""
    key = [int(seed) & 0xFFFFFFFF, int(epoch), int(start_batch), int(rank), 0x4D46]  # 0x4D46: "MF", a domain tag
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] & 0x7FFF_FFFF_FFFF_FFFF))
    return g
