"""Batching: right padding to the longest sample, AF1 labels, audio slots, optional length grouping."""
from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np
import torch

from megaflamingo.data.assemble import fill_audio_slots
from megaflamingo.data.labels import IGNORE_INDEX, build_labels


class Collator:
    """Samples (dicts from the datasets) -> batch dict.

    Output: ``input_ids`` [B, T] long (pad id on the right), ``attention_mask`` [B, T] long,
    ``labels`` [B, T] (AF1 masking on the padded batch), ``audio_embeds`` [B, L, D] float32,
    ``audio_mask`` [B, L] bool, ``dataset`` list[str], ``num_skipped`` int.

    A sample with no supervised token left (its text was cut before the answer by ``max_tokens``)
    is dropped and counted in ``num_skipped`` instead of contributing a row of -100 (a batch of
    only such rows would give a NaN loss).
    """

    def __init__(self, token_ids: Mapping[str, int], num_slots: int, max_windows: int, embed_dim: int,
                 skip_unsupervised: bool = True):
        self.token_ids = dict(token_ids)
        self.num_slots = int(num_slots)
        self.max_windows = int(max_windows)
        self.embed_dim = int(embed_dim)
        self.skip_unsupervised = skip_unsupervised

    def __call__(self, samples: Sequence[Mapping]) -> dict:
        skipped = sum(1 for s in samples if s is None)
        samples = [s for s in samples if s is not None]
        batch = self._collate(samples)
        if self.skip_unsupervised and len(samples):
            ok = (batch["labels"] != IGNORE_INDEX).any(dim=1)
            if not bool(ok.all()):
                keep = [i for i in range(len(samples)) if bool(ok[i])]
                skipped += len(samples) - len(keep)
                batch = self._collate([samples[i] for i in keep])
        batch["num_skipped"] = skipped
        return batch

    def _collate(self, samples: Sequence[Mapping]) -> dict:
        B = len(samples)
        T = max((len(s["input_ids"]) for s in samples), default=0)
        ids = np.full((B, T), int(self.token_ids["pad"]), dtype=np.int64)
        att = np.zeros((B, T), dtype=np.int64)
        audio = torch.empty((B, self.num_slots, self.embed_dim), dtype=torch.float32)
        amask = torch.zeros((B, self.num_slots), dtype=torch.bool)
        with warnings.catch_warnings():
            # windows are read-only views of memory-mapped shards; they are only read here
            warnings.simplefilter("ignore", UserWarning)
            for b, s in enumerate(samples):
                n = len(s["input_ids"])
                ids[b, :n] = s["input_ids"]
                att[b, :n] = 1
                fill_audio_slots(audio[b], amask[b], s["windows"], s["silence"], self.max_windows)
        input_ids = torch.from_numpy(ids)
        return {
            "input_ids": input_ids,
            "attention_mask": torch.from_numpy(att),
            "labels": build_labels(input_ids, self.token_ids),
            "audio_embeds": audio,
            "audio_mask": amask,
            "dataset": [s["dataset"] for s in samples],
        }


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
