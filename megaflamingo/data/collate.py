"""Batching: right padding to the longest sample, AF1 labels, and the audio window slots.

Audio: audio k (0-based) of a sample owns window slots ``[k*W, (k+1)*W)``; its windows fill the first
``num_windows`` slots (mask 1). Every other slot holds the dataset's embedding of a silent window
(mask 0), which is what AF1's zero-padded audio produced after the encoder.
"""
from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np
import torch

from megaflamingo.tokens import IGNORE_INDEX, SpecialTokens

from .labels import build_labels
from .reader import DataError
from .row_check import BAD_ROW


class Collator:
    """Samples (dicts from the datasets) -> batch dict.

    Output: ``input_ids`` [B, T] long (pad id on the right), ``attention_mask`` [B, T] long,
    ``labels`` [B, T] (AF1 masking on the padded batch), ``audio_embeds`` [B, L, D] float32,
    ``audio_mask`` [B, L] bool, ``dataset`` list[str], ``num_skipped`` int, ``bad_rows`` (the
    ``row_check.BadRow`` of each sample whose audio failed the check: dropped, reported).

    A sample with no supervised token left (its text was cut before the answer by ``max_tokens``)
    is dropped and counted in ``num_skipped`` instead of contributing a row of -100 (a batch of
    only such rows would give a NaN loss).
    """

    def __init__(self, tokens: SpecialTokens | Mapping[str, int], num_slots: int, max_windows: int, embed_dim: int,
                 skip_unsupervised: bool = True):
        self.tokens = SpecialTokens.of(tokens)
        self.num_slots = int(num_slots)
        self.max_windows = int(max_windows)
        self.embed_dim = int(embed_dim)
        self.skip_unsupervised = skip_unsupervised

    def __call__(self, samples: Sequence[Mapping]) -> dict:
        skipped = sum(1 for s in samples if s is None)
        bad = [s[BAD_ROW] for s in samples if s is not None and BAD_ROW in s]  # rows that failed the check
        samples = [s for s in samples if s is not None and BAD_ROW not in s]
        batch = self._collate(samples)
        if self.skip_unsupervised and len(samples):
            ok = (batch["labels"] != IGNORE_INDEX).any(dim=1)
            if not bool(ok.all()):
                keep = [i for i in range(len(samples)) if bool(ok[i])]
                skipped += len(samples) - len(keep)
                batch = self._collate([samples[i] for i in keep])
        batch["num_skipped"] = skipped
        batch["bad_rows"] = bad
        return batch

    def _collate(self, samples: Sequence[Mapping]) -> dict:
        B = len(samples)
        T = max((len(s["input_ids"]) for s in samples), default=0)
        ids = np.full((B, T), self.tokens.pad, dtype=np.int64)
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
            "labels": build_labels(input_ids, self.tokens),
            "audio_embeds": audio,
            "audio_mask": amask,
            "dataset": [s["dataset"] for s in samples],
        }


def fill_audio_slots(out, mask, windows: Sequence[np.ndarray], silence: np.ndarray, max_windows: int) -> None:
    """Write one sample's audio into ``out`` [L, D] / ``mask`` [L] (preallocated torch tensors or
    numpy arrays). Unused slots get ``silence`` and mask 0."""
    L = out.shape[0]
    if len(windows) * max_windows > L:
        raise DataError(f"sample has {len(windows)} audios but the model has room for "
                        f"{L // max_windows} (model.max_num_fewshot)")
    if isinstance(out, np.ndarray):
        out[:] = silence
        mask[:] = False
        put = lambda lo, w: out.__setitem__(slice(lo, lo + len(w)), w)  # noqa: E731
    else:  # torch copies (with dtype conversion) are vectorised, numpy's float16 casts are not
        out.copy_(torch.from_numpy(np.asarray(silence, dtype=np.float32)).expand_as(out))
        mask.zero_()
        put = lambda lo, w: out[lo:lo + len(w)].copy_(torch.from_numpy(w))  # noqa: E731
    for k, w in enumerate(windows):
        n = w.shape[0]
        if n == 0 or n > max_windows:
            raise DataError(f"audio {k} has {n} windows (allowed 1..{max_windows})")
        put(k * max_windows, w)
        mask[k * max_windows:k * max_windows + n] = True
