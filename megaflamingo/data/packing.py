"""Sequence packing: several samples per row up to a token budget, deterministic and exactly resumable.

Pipeline (each step a function of its inputs, so a resumed job redoes exactly the same):

1. :func:`prepare_sample` (in the data-loader workers): a sample dict from the datasets (``input_ids``,
   ``windows``, ``silence``, ``dataset``) gets its AF1 labels (computed on the sample alone: the same
   labels the padded collator gives it, since AF1's truncation rule only fires on a row cut at
   ``max_tokens``, which is always the longest row) and its own ``L = max_num_fewshot * W`` audio slots.
2. :class:`StreamPacker` (main process): samples arrive in the epoch's order; a bounded look-ahead
   buffer of ``buffer_size`` samples is packed into micro-batches of ``rows_per_batch`` rows of at most
   ``max_tokens_per_row`` tokens by first-fit decreasing (longest first, ties by arrival; a sample that
   has waited ``max_delay`` micro-batches goes first, so none starves). Deterministic given the input
   order; its state is the stream position plus the buffer's keys (:meth:`StreamPacker.state_dict`).
3. :func:`collate_packed`: rows -> the packed batch (``input_ids``/``labels``/``attention_mask`` [R, T],
   ``audio_embeds`` [S, L, D], ``audio_mask`` [S, L], and the segment ``layout`` shared by the LM
   self-attention and the fused cross-attention, see ``megaflamingo.segments``).
4. :class:`PackedBatchStream`: ties them to a list of sample keys (an epoch's positions) and a fetch
   function (e.g. a DataLoader over the keys), and is resumable: its state is ``(cursor, buffer keys)``;
   the buffer's samples are rebuilt from their keys, which is exact because every random choice of a
   sample comes from ``(seed, epoch, position)``.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Hashable, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch

from megaflamingo.data.assemble import fill_audio_slots
from megaflamingo.data.labels import IGNORE_INDEX, build_labels
from megaflamingo.data.reader import DataError

STATE_VERSION = 1


def _pad_id(token_ids) -> int:
    """The one place that reads the token-id mapping (dict today, SpecialTokens attributes later)."""
    return int(token_ids["pad"])


def _media_id(token_ids) -> int:
    return int(token_ids["media"])


@dataclass(frozen=True)
class PackingConfig:
    """``data.packing`` settings."""

    max_tokens_per_row: int = 512  # row capacity; must be >= data.max_tokens (every sample fits a row)
    rows_per_batch: int = 1  # rows of a micro-batch
    lookahead_tokens: int = 0  # pack once the buffer holds this many tokens; 0 = 2 x rows x max_tokens_per_row
    buffer_size: int = 256  # ... or this many samples (the bound on the look-ahead, hence on memory)
    max_delay: int = 4  # micro-batches a sample may wait before it is placed first
    max_samples_per_row: int = 0  # 0 = no cap
    max_samples_per_batch: int = 0  # 0 = no cap (audio memory grows with the samples of a micro-batch)
    pad_to_multiple_of: int = 8  # T = longest row rounded up (<= max_tokens_per_row); 0 = always the budget
    query_chunk: int = 64  # cross-attention segments cut to this many queries (pure-torch kernel padding)

    def validate(self, max_tokens: Optional[int] = None) -> None:
        for name in ("max_tokens_per_row", "rows_per_batch", "buffer_size"):
            if getattr(self, name) < 1:
                raise DataError(f"data.packing.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lookahead_tokens", "max_delay", "max_samples_per_row", "max_samples_per_batch", "pad_to_multiple_of", "query_chunk"):
            if getattr(self, name) < 0:
                raise DataError(f"data.packing.{name} must be >= 0, got {getattr(self, name)}")
        if max_tokens is not None and self.max_tokens_per_row < max_tokens:
            raise DataError(f"data.packing.max_tokens_per_row={self.max_tokens_per_row} < data.max_tokens="
                            f"{max_tokens}: a sample of max_tokens tokens would fit no row")


# ---------------------------------------------------------------------------------------------- samples


def prepare_sample(sample: Optional[Mapping], token_ids, num_slots: int, max_windows: int, embed_dim: int,
                   key: Hashable = None) -> Optional[dict]:
    """A dataset sample -> what the packer holds: ids, AF1 labels, its own audio slots. None stays None."""
    if sample is None:
        return None
    ids = torch.as_tensor(np.asarray(sample["input_ids"]), dtype=torch.long)
    if ids.ndim != 1 or ids.numel() == 0:
        raise DataError(f"sample {key!r}: input_ids must be a non-empty 1-D sequence, got shape {tuple(ids.shape)}")
    audio = torch.empty(num_slots, embed_dim, dtype=torch.float32)
    amask = torch.zeros(num_slots, dtype=torch.bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only memory-mapped windows, only read
        fill_audio_slots(audio, amask, sample["windows"], sample["silence"], max_windows)
    return {"key": key, "input_ids": ids, "labels": build_labels(ids, token_ids), "audio": audio,
            "audio_mask": amask, "dataset": sample.get("dataset", ""), "length": int(ids.numel())}


def supervised(prepared: Mapping) -> bool:
    return bool((prepared["labels"][1:] != IGNORE_INDEX).any())


# ---------------------------------------------------------------------------------------------- packer


@dataclass
class _Item:
    key: Any
    length: int
    arrival: int
    age: int = 0
    payload: Any = field(default=None, repr=False)


class StreamPacker:
    """Bounded look-ahead first-fit-decreasing packing of a sample stream into micro-batches of rows."""

    def __init__(self, cfg: PackingConfig):
        cfg.validate()
        self.cfg = cfg
        self.buffer: list[_Item] = []
        self.buffered_tokens = 0
        self.arrivals = 0
        self.emitted = 0
        self.tokens = 0  # packed tokens so far (fill-rate statistics)
        self.capacity = 0  # row capacity of the emitted micro-batches

    def push(self, key, length: int, payload=None) -> None:
        if length > self.cfg.max_tokens_per_row:
            raise DataError(f"sample {key!r} has {length} tokens > data.packing.max_tokens_per_row="
                            f"{self.cfg.max_tokens_per_row}")
        if length < 1:
            raise DataError(f"sample {key!r} has no tokens")
        self.buffer.append(_Item(key, int(length), self.arrivals, 0, payload))
        self.arrivals += 1
        self.buffered_tokens += int(length)

    @property
    def lookahead_tokens(self) -> int:
        c = self.cfg
        return c.lookahead_tokens or 2 * c.rows_per_batch * c.max_tokens_per_row

    def ready(self) -> bool:
        return len(self.buffer) >= self.cfg.buffer_size or self.buffered_tokens >= self.lookahead_tokens

    def emit(self) -> list[list[_Item]]:
        """One micro-batch: a list of rows (each a list of items in placement order)."""
        c = self.cfg
        if not self.buffer:
            return []
        order = sorted(self.buffer, key=lambda it: (it.age < c.max_delay if c.max_delay else True,
                                                    -it.length, it.arrival))
        rows: list[list[_Item]] = [[] for _ in range(c.rows_per_batch)]
        room = [c.max_tokens_per_row] * c.rows_per_batch
        placed = 0
        taken = set()
        for it in order:
            if c.max_samples_per_batch and placed >= c.max_samples_per_batch:
                break
            for r in range(c.rows_per_batch):
                if room[r] >= it.length and not (c.max_samples_per_row and len(rows[r]) >= c.max_samples_per_row):
                    rows[r].append(it)
                    room[r] -= it.length
                    placed += 1
                    taken.add(it.arrival)
                    break
        self.buffer = [it for it in self.buffer if it.arrival not in taken]
        self.buffered_tokens = sum(it.length for it in self.buffer)
        for it in self.buffer:
            it.age += 1
        rows = [r for r in rows if r]
        self.emitted += 1
        self.tokens += sum(it.length for r in rows for it in r)
        self.capacity += c.rows_per_batch * c.max_tokens_per_row
        return rows

    def flush(self) -> Iterator[list[list[_Item]]]:
        while self.buffer:
            yield self.emit()

    @property
    def fill_rate(self) -> float:
        return self.tokens / self.capacity if self.capacity else float("nan")

    def state_dict(self) -> dict:
        return {"buffer": [[it.key, it.length, it.arrival, it.age] for it in self.buffer],
                "arrivals": self.arrivals, "emitted": self.emitted, "tokens": self.tokens,
                "capacity": self.capacity}

    def load_state_dict(self, state: Mapping) -> None:
        self.buffer = [_Item(k, int(n), int(a), int(g)) for k, n, a, g in state["buffer"]]
        self.buffered_tokens = sum(it.length for it in self.buffer)
        self.arrivals, self.emitted = int(state["arrivals"]), int(state["emitted"])
        self.tokens, self.capacity = int(state.get("tokens", 0)), int(state.get("capacity", 0))


def pack_lengths(lengths: Sequence[int], cfg: PackingConfig) -> list[list[list[int]]]:
    """Plan of a whole length sequence (indices into ``lengths``): micro-batches of rows. For benchmarks
    and tests; the loader streams the same algorithm through :class:`StreamPacker`."""
    p = StreamPacker(cfg)
    out = []
    for i, n in enumerate(lengths):
        p.push(i, int(n))
        if p.ready():
            out.append([[it.key for it in r] for r in p.emit()])
    out.extend([[it.key for it in r] for r in rows] for rows in p.flush())
    return out


# ---------------------------------------------------------------------------------------------- collate


def collate_packed(rows: Sequence[Sequence[Mapping]], token_ids, cfg: PackingConfig, windows_per_audio: int,
                   build_layout: bool = True) -> dict:
    """Rows of prepared samples -> the packed batch.

    ``input_ids``, ``labels``, ``attention_mask``, ``sample_index`` [R, T] (pad / -100 / 0 / -1 outside
    samples), ``audio_embeds`` [S, L, D], ``audio_mask`` [S, L] (samples in row-major order),
    ``layout`` (``megaflamingo.segments.PackedLayout``, built here on the host unless
    ``build_layout=False``), ``dataset`` (per sample), ``num_samples``, ``num_tokens``."""
    R = len(rows)
    samples = [s for row in rows for s in row]
    if not samples:
        raise DataError("collate_packed: no samples")
    longest = max(sum(int(s["length"]) for s in row) for row in rows)
    if longest > cfg.max_tokens_per_row:
        raise DataError(f"a packed row holds {longest} tokens > max_tokens_per_row={cfg.max_tokens_per_row}")
    m = cfg.pad_to_multiple_of
    T = cfg.max_tokens_per_row if m == 0 else min(cfg.max_tokens_per_row, -(-longest // m) * m)
    ids = torch.full((R, T), _pad_id(token_ids), dtype=torch.long)
    labels = torch.full((R, T), IGNORE_INDEX, dtype=torch.long)
    sidx = torch.full((R, T), -1, dtype=torch.long)
    s = 0
    for r, row in enumerate(rows):
        t = 0
        for smp in row:
            n = int(smp["length"])
            ids[r, t:t + n] = smp["input_ids"]
            lab = smp["labels"].clone()
            lab[0] = IGNORE_INDEX  # never predicted from the previous sample (AF1 masks it anyway)
            labels[r, t:t + n] = lab
            sidx[r, t:t + n] = s
            s += 1
            t += n
    audio = torch.stack([smp["audio"] for smp in samples])
    amask = torch.stack([smp["audio_mask"] for smp in samples])
    batch = {"input_ids": ids, "labels": labels, "attention_mask": (sidx >= 0).long(), "sample_index": sidx,
             "audio_embeds": audio, "audio_mask": amask, "dataset": [smp["dataset"] for smp in samples],
             "keys": [smp.get("key") for smp in samples], "num_samples": len(samples),
             "num_tokens": int((sidx >= 0).sum())}
    if build_layout:
        from megaflamingo.segments import build_layout as _build

        batch["layout"] = _build(ids, sidx, amask, _media_id(token_ids), windows_per_audio,
                                 query_chunk=cfg.query_chunk or None)
    return batch


# ---------------------------------------------------------------------------------------------- stream


class PackedBatchStream:
    """Packed micro-batches from an ordered list of sample keys, resumable exactly.

    ``fetch(keys)`` yields the prepared samples (:func:`prepare_sample`; None for a sample to drop) of
    ``keys`` in order, e.g. from a DataLoader whose workers build and prepare them. Samples without any
    supervised token are dropped (counted in ``skipped``), as the padded collator does."""

    def __init__(self, keys: Sequence, fetch: Callable[[Sequence], Iterable[Optional[dict]]], cfg: PackingConfig,
                 collate: Callable[[list[list[dict]]], dict], skip_unsupervised: bool = True):
        self.keys = list(keys)
        self.fetch = fetch
        self.cfg = cfg
        self.collate = collate
        self.skip_unsupervised = skip_unsupervised
        self.packer = StreamPacker(cfg)
        self.cursor = 0  # keys consumed into the packer (or dropped)
        self.skipped = 0
        self._restored_buffer = False

    def _take(self, key, smp) -> None:
        if smp is None or (self.skip_unsupervised and not supervised(smp)):
            self.skipped += 1
            return
        self.packer.push(key, smp["length"], smp)

    def _batch(self, rows) -> dict:
        return self.collate([[it.payload for it in row] for row in rows])

    def __iter__(self) -> Iterator[dict]:
        if self._restored_buffer:
            # rebuild the buffer's samples from their keys (same keys -> same samples)
            pending = [it for it in self.packer.buffer if it.payload is None]
            for it, smp in zip(pending, self.fetch([it.key for it in pending])):
                if smp is None or smp["length"] != it.length:
                    raise DataError(f"cannot resume packing exactly: sample {it.key!r} rebuilt with "
                                    f"{None if smp is None else smp['length']} tokens, saved {it.length}")
                it.payload = smp
            self._restored_buffer = False
        for key, smp in zip(self.keys[self.cursor:], self.fetch(self.keys[self.cursor:])):
            self.cursor += 1
            self._take(key, smp)
            if self.packer.ready():
                yield self._batch(self.packer.emit())
        for rows in self.packer.flush():
            yield self._batch(rows)

    @property
    def fill_rate(self) -> float:
        return self.packer.fill_rate

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "cursor": self.cursor, "skipped": self.skipped, "num_keys": len(self.keys),
                "packer": self.packer.state_dict(), "config": asdict(self.cfg)}

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"packing state version {state.get('version')!r} is not {STATE_VERSION}")
        if state.get("config") != asdict(self.cfg):
            raise DataError(f"cannot resume packing exactly: data.packing changed (saved {state.get('config')}, "
                            f"now {asdict(self.cfg)})")
        if int(state["num_keys"]) != len(self.keys):
            raise DataError(f"cannot resume packing exactly: the epoch has {len(self.keys)} samples, saved "
                            f"{state['num_keys']}")
        self.cursor, self.skipped = int(state["cursor"]), int(state.get("skipped", 0))
        self.packer.load_state_dict(state["packer"])
        self._restored_buffer = bool(self.packer.buffer)


def unpack_samples(batch: Mapping) -> list[dict]:
    """The packed batch's samples back as separate dicts (ids, labels, audio, audio_mask): for tests and
    for comparing with the padded path."""
    sidx = batch["sample_index"]
    out = []
    for s in range(batch["num_samples"]):
        pos = (sidx == s).nonzero()
        r, a, n = int(pos[0, 0]), int(pos[0, 1]), int(pos.shape[0])
        out.append({"row": r, "start": a, "length": n, "input_ids": batch["input_ids"][r, a:a + n],
                    "labels": batch["labels"][r, a:a + n], "audio": batch["audio_embeds"][s],
                    "audio_mask": batch["audio_mask"][s]})
    return out
