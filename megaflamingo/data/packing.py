"""Sequence packing: several samples per row up to a token budget, the same plan on every rank.

An epoch is packed **globally**: every rank walks the epoch's whole blended order (the order AF1's
DistributedSampler shuffles before sharding), learns each sample's token length, and runs the same
deterministic packer over it. Each packer step emits one *group*: ``world_size`` micro-batches of at
most ``rows_per_batch`` rows of at most ``max_tokens_per_row`` tokens; rank r takes micro-batch r. So
every rank has exactly the same number of micro-batches per epoch by construction (ZeRO-3 forwards are
collective: a rank with one micro-batch more would hang the job), however unevenly the tokens of the
ranks' shares would have fallen, and no collective is needed to agree on it.

* **Lengths** (:func:`sample_lengths`): the dataset's own ``__getitem__`` (templates, augmentation draws,
  tokenisation: exactly what training builds) in DataLoader workers, keeping only the length; samples
  the dataset drops (``None``) or that have no supervised token are left out on every rank alike. Each
  rank builds the text of every sample of the epoch (cheap: no audio is read) but the audio of its
  own samples only.
* **Packer** (:class:`GroupPacker`): first-fit decreasing over a bounded look-ahead of
  ``lookahead`` groups' worth of tokens (a sample that waited ``max_delay`` groups goes first, so none
  drifts far from its place in the shuffled order). The last group of an epoch is topped up with
  samples from the epoch's start when fewer than ``world_size`` samples remain, as DistributedSampler
  pads its shares, so every rank gets at least one sample in every micro-batch.
* **Build** (:class:`PackedSamples` + :class:`PackedCollator`, in the workers): each sample gets its own
  ``max_num_fewshot * W`` audio slots and the AF1 labels the padded collator would give it
  (:func:`sample_labels`); :func:`collate_packed` lays the rows out and builds the segment layout
  (:mod:`megaflamingo.model.segments`) shared by the LM's block-diagonal self-attention and the fused
  cross-attention.

The plan is a pure function of (seed, epoch, world size, settings), so the loader state stays
"(epoch, micro-batches consumed)" and resuming is exact.
"""
from __future__ import annotations

import logging
import threading
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Hashable, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from megaflamingo.tokens import IGNORE_INDEX, SpecialTokens

from .collate import fill_audio_slots
from .labels import build_labels
from .reader import DataError
from .row_check import BAD_ROW

log = logging.getLogger("megaflamingo.train")

@dataclass(frozen=True)
class PackingConfig:
    """The packer's settings (``data.packing``, ``data.max_tokens_per_row``, ``data.packing_lookahead``)."""

    max_tokens_per_row: int = 512  # row capacity; >= data.max_tokens, so every sample fits a row
    rows_per_batch: int = 1  # rows of one micro-batch (train.micro_batch_size)
    lookahead: int = 2  # the packer chooses from this many groups' worth of tokens of the order
    max_delay: int = 4  # groups a sample may wait before it is placed first
    pad_to_multiple_of: int = 8  # T = longest row rounded up (<= max_tokens_per_row); 0 = always the budget
    query_chunk: int = 64  # cross-attention segments cut to this many queries (pads the pure-torch kernel)

    @classmethod
    def from_config(cls, data_cfg, micro_batch_size: int) -> Optional["PackingConfig"]:
        """None when ``data.packing`` is off."""
        if not data_cfg.packing:
            return None
        cfg = cls(max_tokens_per_row=int(data_cfg.max_tokens_per_row or data_cfg.max_tokens),
                  rows_per_batch=int(micro_batch_size), lookahead=int(data_cfg.packing_lookahead))
        cfg.validate(data_cfg.max_tokens)
        return cfg

    def validate(self, max_tokens: Optional[int] = None) -> None:
        names = {"max_tokens_per_row": "data.max_tokens_per_row", "rows_per_batch": "train.micro_batch_size",
                 "lookahead": "data.packing_lookahead"}
        for name, where in names.items():
            if getattr(self, name) < 1:
                raise DataError(f"{where} must be >= 1, got {getattr(self, name)}")
        for name in ("max_delay", "pad_to_multiple_of", "query_chunk"):
            if getattr(self, name) < 0:
                raise DataError(f"packing {name} must be >= 0, got {getattr(self, name)}")
        if max_tokens is not None and self.max_tokens_per_row < max_tokens:
            raise DataError(f"data.max_tokens_per_row={self.max_tokens_per_row} < data.max_tokens={max_tokens}: "
                            "a sample of max_tokens tokens would fit no row")


# ---------------------------------------------------------------------------------------------- samples


def prepare_sample(sample: Optional[Mapping], num_slots: int, max_windows: int, embed_dim: int,
                   key: Hashable = None) -> Optional[dict]:
    """A dataset sample -> what a packed row holds: its ids and its own audio slots (labels are made per
    micro-batch, :func:`sample_labels`). None stays None."""
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
    return {"key": key, "input_ids": ids, "audio": audio, "audio_mask": amask, "dataset": sample.get("dataset", ""),
            "length": int(ids.numel())}


def sample_labels(ids: Sequence[torch.Tensor], tokens: SpecialTokens | Mapping[str, int]) -> list[torch.Tensor]:
    """AF1 labels of each sample, computed as the padded collator computes them (one right-padded batch):
    a sample's labels never depend on the others (AF1's truncation rule looks at the batch's last
    column, which only a sample cut at ``max_tokens``, hence a longest one, reaches), and one vectorised
    call costs what one sample's does."""
    tokens = SpecialTokens.of(tokens)
    if not ids:
        return []
    T = max(int(x.numel()) for x in ids)
    batch = torch.full((len(ids), T), tokens.pad, dtype=torch.long)
    for i, x in enumerate(ids):
        batch[i, :x.numel()] = x
    labels = build_labels(batch, tokens)
    return [labels[i, :x.numel()] for i, x in enumerate(ids)]


def is_supervised(labels: torch.Tensor) -> bool:
    return bool((labels[1:] != IGNORE_INDEX).any())


class LengthView(Dataset):
    """``dataset[key]`` reduced to its token ids (None for a sample the dataset drops). The audio is not
    read: a dataset with ``sample(key, check_audio=False)`` skips its window check here (every rank runs
    this pass over the whole epoch); the sample built for training is checked."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        sample = getattr(self.dataset, "sample", None)
        s = sample(key, check_audio=False) if sample is not None else self.dataset[key]
        if s is None or BAD_ROW in s:  # a dataset without the switch may still report a bad row: leave it out
            return None
        return torch.as_tensor(np.asarray(s["input_ids"]), dtype=torch.long)


class _Lengths:
    """Collate of the length pass: each sample's length, or None when it has no supervised token."""

    def __init__(self, tokens: SpecialTokens):
        self.tokens = SpecialTokens.of(tokens)

    def __call__(self, items: Sequence[Optional[torch.Tensor]]) -> list[Optional[int]]:
        real = [x for x in items if x is not None and x.numel()]
        sup = iter([is_supervised(lab) for lab in sample_labels(real, self.tokens)])
        return [int(x.numel()) if x is not None and x.numel() and next(sup) else None for x in items]


def sample_lengths(dataset, keys: Sequence, tokens: SpecialTokens, num_workers: int = 0, chunk: int = 256,
                   worker_init_fn: Optional[Callable] = None) -> Iterator[tuple[Any, Optional[int]]]:
    """``(key, length)`` for ``keys`` in order; length None for a sample to leave out (dropped by the
    dataset, or without any supervised token). Built in ``num_workers`` DataLoader workers."""
    if not len(keys):
        return
    chunks = [list(keys[i:i + chunk]) for i in range(0, len(keys), chunk)]
    # A generator of its own: DataLoader otherwise draws its workers' base seed from the global torch RNG,
    # and this pass runs at times that differ between a run and its resumption (the next epoch's plan is
    # prefetched in the background; a resumed run computes its epoch's plan at start), which would shift
    # every later dropout mask. Nothing here is random (samples draw from generators keyed by position).
    loader = DataLoader(LengthView(dataset), batch_sampler=chunks, collate_fn=_Lengths(tokens),
                        num_workers=num_workers, worker_init_fn=worker_init_fn if num_workers else None,
                        generator=torch.Generator().manual_seed(0))
    for ks, got in zip(chunks, loader):
        yield from zip(ks, got)


# ---------------------------------------------------------------------------------------------- packer


@dataclass
class PackStats:
    samples: int = 0  # placed, duplicates included
    duplicates: int = 0  # tail top-ups from the epoch's start
    tokens: int = 0
    capacity: int = 0  # rows x max_tokens_per_row of the emitted micro-batches
    groups: int = 0

    @property
    def fill_rate(self) -> float:
        return self.tokens / self.capacity if self.capacity else float("nan")


class GroupPacker:
    """Bounded look-ahead first-fit-decreasing packing of a sample stream into groups of
    ``world_size`` micro-batches (see the module docstring). Deterministic given the input order."""

    def __init__(self, cfg: PackingConfig, world_size: int = 1):
        cfg.validate()
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.cfg, self.world = cfg, int(world_size)
        self.rows = self.world * cfg.rows_per_batch
        self.buffer: list[list] = []  # [key, length, arrival, age]
        self.buffered_tokens = 0
        self.arrivals = 0
        self.head: list[tuple[Any, int]] = []  # the first world_size samples: the tail's top-ups
        self.stats = PackStats()

    def push(self, key, length: int) -> None:
        length = int(length)
        if length > self.cfg.max_tokens_per_row:
            raise DataError(f"sample {key!r} has {length} tokens > data.max_tokens_per_row="
                            f"{self.cfg.max_tokens_per_row}")
        if length < 1:
            raise DataError(f"sample {key!r} has no tokens")
        self.buffer.append([key, length, self.arrivals, 0])
        self.arrivals += 1
        self.buffered_tokens += length
        if len(self.head) < self.world:
            self.head.append((key, length))

    def ready(self) -> bool:
        return self.buffered_tokens >= self.cfg.lookahead * self.rows * self.cfg.max_tokens_per_row

    def _place(self, order: list[list], spread: bool) -> list[list[list]]:
        """First fit (or, ``spread``, the emptiest row that fits) into the group's rows."""
        room = np.full(self.rows, self.cfg.max_tokens_per_row, dtype=np.int64)
        rows: list[list[list]] = [[] for _ in range(self.rows)]
        for it in order:
            n = it[1]
            if spread:
                j = int(room.argmax())
                if room[j] < n:
                    continue
            else:
                fits = room >= n
                j = int(fits.argmax())
                if not fits[j]:
                    continue
            rows[j].append(it)
            room[j] -= n
        return rows

    def emit(self) -> list[list[list]]:
        """One group: ``world_size`` micro-batches, each a list of rows, each a list of keys."""
        if not self.buffer:
            return []
        delay = self.cfg.max_delay
        # overdue samples first, oldest first; then longest first, ties by arrival
        order = sorted(self.buffer, key=lambda it: (0, it[2], 0) if delay and it[3] >= delay else (1, -it[1], it[2]))
        rows = self._place(order, spread=False)
        if sum(1 for r in rows if r) < self.world:  # the epoch's tail: spread so that every rank gets one
            rows = self._place(order, spread=True)
        used = [r for r in rows if r]
        taken = {it[2] for r in used for it in r}
        self.buffer = [it for it in self.buffer if it[2] not in taken]
        self.buffered_tokens = sum(it[1] for it in self.buffer)
        for it in self.buffer:
            it[3] += 1
        st = self.stats
        st.groups += 1
        st.samples += len(taken)
        st.tokens += sum(it[1] for r in used for it in r)
        st.capacity += len(used) * self.cfg.max_tokens_per_row
        # deal the used rows round-robin: row i to rank i % world (a rank gets <= rows_per_batch rows)
        return [[[it[0] for it in r] for r in used[k::self.world]] for k in range(self.world)]

    def flush(self) -> Iterator[list[list[list]]]:
        while self.buffer:
            missing = self.world - len(self.buffer)
            for i in range(max(0, missing)):  # top up with the epoch's first samples
                key, n = self.head[i % len(self.head)]
                self.buffer.append([key, n, self.arrivals, 0])
                self.arrivals += 1
                self.buffered_tokens += n
                self.stats.duplicates += 1
            yield self.emit()


def plan_groups(samples: Iterable[tuple[Any, int]], cfg: PackingConfig, world_size: int = 1,
                packer: Optional[GroupPacker] = None) -> Iterator[list[list[list]]]:
    """Groups of ``world_size`` micro-batches for a stream of ``(key, length)``."""
    p = packer or GroupPacker(cfg, world_size)
    for key, n in samples:
        p.push(key, n)
        if p.ready():
            yield p.emit()
    yield from p.flush()


def pack_lengths(lengths: Sequence[int], cfg: PackingConfig) -> list[list[list[int]]]:
    """One process's micro-batches (lists of rows of indices into ``lengths``): benchmarks and tests."""
    return [g[0] for g in plan_groups(enumerate(int(n) for n in lengths), cfg, 1)]


@dataclass
class RankPlan:
    """This rank's packed micro-batches of one epoch and what packing the epoch did."""

    batches: list[list[list]] = field(default_factory=list)  # micro-batch -> rows -> keys
    stats: PackStats = field(default_factory=PackStats)
    left_out: int = 0  # this rank's share of the samples left out (dropped, or nothing supervised)


def plan_rank(lengths: Iterable[tuple[Any, Optional[int]]], cfg: PackingConfig, rank: int,
              world_size: int) -> RankPlan:
    """Pack the global stream ``(key, length or None)`` and keep rank ``rank``'s micro-batches. Left-out
    samples are counted on the rank whose turn they were (i-th sample on rank i % world_size), so the
    counts add up over ranks."""
    plan = RankPlan()
    packer = GroupPacker(cfg, world_size)

    def kept():
        for i, (key, n) in enumerate(lengths):
            if n is None:
                plan.left_out += int(i % world_size == rank)
            else:
                yield key, n

    for group in plan_groups(kept(), cfg, world_size, packer):
        plan.batches.append(group[rank])
    plan.stats = packer.stats
    return plan


def pack_epoch(dataset, epoch: int, order: Sequence[int], tokens: SpecialTokens, cfg: PackingConfig, rank: int,
               world_size: int, num_workers: int = 0, worker_init_fn: Optional[Callable] = None) -> RankPlan:
    """Rank ``rank``'s packed micro-batches (rows of positions) of ``epoch``, whose global order is
    ``order`` (positions of the epoch's blended list); ``dataset[(epoch, position)]`` builds a sample."""
    lengths = sample_lengths(dataset, [(epoch, int(p)) for p in order], tokens, num_workers,
                             worker_init_fn=worker_init_fn)
    rp = plan_rank(lengths, cfg, rank, world_size)
    rp.batches = [[[pos for _, pos in row] for row in mb] for mb in rp.batches]
    st = rp.stats
    log.info("packing epoch %d: %d samples (%d repeated to fill the last group) into %d micro-batches per rank of "
             "<= %d rows x %d tokens, fill %.1f%%", epoch, st.samples, st.duplicates, len(rp.batches),
             cfg.rows_per_batch, cfg.max_tokens_per_row, 100 * st.fill_rate)
    return rp


class PlanCache:
    """A rank's packed plans by epoch (``compute(epoch) -> RankPlan``). With ``background`` the next
    epoch's plan is computed in a daemon thread while this one trains (its length pass runs in DataLoader
    workers, so the thread mostly waits), so an epoch boundary does not stall on it. Keeps two epochs."""

    def __init__(self, compute: Callable[[int], RankPlan], background: bool):
        self.compute, self.background = compute, background
        self._done: dict[int, RankPlan] = {}
        self._running: dict[int, tuple[threading.Thread, dict]] = {}

    def get(self, epoch: int) -> RankPlan:
        if epoch in self._running:
            thread, box = self._running.pop(epoch)
            thread.join()
            if "error" in box:
                raise box["error"]
            self._keep(epoch, box["plan"])
        if epoch not in self._done:
            self._keep(epoch, self.compute(epoch))
        return self._done[epoch]

    def prefetch(self, epoch: int) -> None:
        if not self.background or epoch in self._done or epoch in self._running:
            return
        box: dict = {}

        def run():
            try:
                box["plan"] = self.compute(epoch)
            except BaseException as e:  # noqa: BLE001 - re-raised by get() in the training thread
                box["error"] = e

        thread = threading.Thread(target=run, name=f"packing-plan-{epoch}", daemon=True)
        thread.start()
        self._running[epoch] = (thread, box)

    def _keep(self, epoch: int, plan: RankPlan) -> None:
        self._done[epoch] = plan
        for old in [e for e in self._done if e < epoch - 1]:
            del self._done[old]


# ---------------------------------------------------------------------------------------------- collate


def collate_packed(rows: Sequence[Sequence[Mapping]], tokens: SpecialTokens | Mapping[str, int], cfg: PackingConfig,
                   windows_per_audio: int, build_layout: bool = True) -> dict:
    """Rows of prepared samples -> the packed batch.

    ``input_ids``, ``labels``, ``attention_mask``, ``sample_index`` [R, T] (pad / -100 / 0 / -1 outside
    samples), ``audio_embeds`` [S, L, D], ``audio_mask`` [S, L] (samples in row-major order),
    ``layout`` (:class:`~megaflamingo.model.segments.PackedLayout`, built here on the host unless
    ``build_layout=False``), ``dataset`` (per sample), ``num_samples``, ``num_tokens``."""
    tokens = SpecialTokens.of(tokens)
    R = len(rows)
    samples = [s for row in rows for s in row]
    if not samples:
        raise DataError("collate_packed: no samples")
    longest = max(sum(int(s["length"]) for s in row) for row in rows)
    if longest > cfg.max_tokens_per_row:
        raise DataError(f"a packed row holds {longest} tokens > max_tokens_per_row={cfg.max_tokens_per_row}")
    m = cfg.pad_to_multiple_of
    T = cfg.max_tokens_per_row if m == 0 else min(cfg.max_tokens_per_row, -(-longest // m) * m)
    ids = torch.full((R, T), tokens.pad, dtype=torch.long)
    labels = torch.full((R, T), IGNORE_INDEX, dtype=torch.long)
    sidx = torch.full((R, T), -1, dtype=torch.long)
    labs = iter(sample_labels([smp["input_ids"] for smp in samples], tokens))
    s = 0
    for r, row in enumerate(rows):
        t = 0
        for smp in row:
            n = int(smp["length"])
            ids[r, t:t + n] = smp["input_ids"]
            lab = next(labs)
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
        from megaflamingo.model.segments import build_layout as _build

        batch["layout"] = _build(ids, sidx, amask, tokens.media, windows_per_audio,
                                 query_chunk=cfg.query_chunk or None)
    return batch


class PackedSamples(Dataset):
    """Keys ``(epoch, position, row)`` -> the prepared sample of ``dataset[(epoch, position)]``, tagged
    with its row (what :class:`PackedCollator` lays out)."""

    def __init__(self, dataset, tokens: SpecialTokens, num_slots: int, max_windows: int, embed_dim: int):
        self.dataset, self.tokens = dataset, SpecialTokens.of(tokens)
        self.num_slots, self.max_windows, self.embed_dim = int(num_slots), int(max_windows), int(embed_dim)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, pos, row = key
        raw = self.dataset[(epoch, pos)]
        if raw is not None and BAD_ROW in raw:
            return raw  # its audio failed the check: the collator drops it and reports it
        smp = prepare_sample(raw, self.num_slots, self.max_windows, self.embed_dim, key=(int(epoch), int(pos)))
        if smp is not None:
            smp["row"] = int(row)
        return smp


class PackedCollator:
    """Prepared, row-tagged samples of one micro-batch -> the packed batch (``num_skipped`` counts samples
    that came back None although the plan had them; a batch of none has zero rows)."""

    def __init__(self, tokens: SpecialTokens, cfg: PackingConfig, windows_per_audio: int):
        self.tokens, self.cfg, self.windows_per_audio = SpecialTokens.of(tokens), cfg, int(windows_per_audio)

    def __call__(self, samples: Sequence[Optional[Mapping]]) -> dict:
        bad = [s[BAD_ROW] for s in samples if s is not None and BAD_ROW in s]  # reported by the loader
        kept = [s for s in samples if s is not None and BAD_ROW not in s]
        skipped = len(samples) - len(kept) - len(bad)
        if not kept:
            return {"input_ids": torch.zeros(0, 0, dtype=torch.long), "num_skipped": skipped, "bad_rows": bad}
        rows: dict[int, list] = {}
        for s in kept:
            rows.setdefault(s["row"], []).append(s)
        batch = collate_packed([rows[r] for r in sorted(rows)], self.tokens, self.cfg, self.windows_per_audio)
        batch["num_skipped"] = skipped
        batch["bad_rows"] = bad
        return batch


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


def settings_signature(cfg: Optional[PackingConfig]) -> Optional[dict]:
    """What a loader state records of the packing settings (resuming with other settings is refused)."""
    return None if cfg is None else asdict(cfg)
