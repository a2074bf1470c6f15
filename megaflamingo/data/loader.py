"""Train / validation loaders: blended virtual epochs, distributed, exactly resumable.

Every random choice of a training sample (augmentation, prefix coin, label shuffle) comes from a
generator seeded with ``(seed, epoch, position in the epoch's blended list)``, and the order of an
epoch comes from ``seed + epoch`` (AF1's DistributedSampler). The loader state is therefore just
``(epoch, batches already yielded)``: a resumed job rebuilds the same batch list and skips the
consumed prefix, whatever the number of DataLoader workers (they prefetch, but only batches that
were handed to the caller count).
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from megaflamingo.config import DataConfig, DatasetEntry, ModelConfig
from megaflamingo.tokens import SpecialTokens

from .blending import EpochPlan, pass_permutation, plan_epoch
from .collate import Collator
from .loader_rng import loader_generator
from .packing import (PackedCollator, PackedSamples, PackingConfig, PlanCache, RankPlan, pack_epoch,
                      settings_signature)
from .reader import DataError
from .row_check import BAD_ROW, RowTally, bad_row
from .sampling import af1_distributed_indices, chunk, length_grouped_batches
from .sources import Source
from .templates import TemplateRegistry
from .text import SpecialText, build_parts
from .tokenize import FastEncoder

STATE_VERSION = 1
# Page-locked batches make the trainer's non_blocking host-to-GPU copies actually asynchronous.
_PIN = torch.cuda.is_available()


# --------------------------------------------------------------------------------------- setup


def _sections(cfg: Any, model_cfg, encoder_cfg, batch_size):
    """Accept the root Config or its ``data`` section."""
    if hasattr(cfg, "data") and hasattr(cfg, "model"):
        model_cfg = model_cfg or cfg.model
        encoder_cfg = encoder_cfg or cfg.encoder
        if batch_size is None:
            batch_size = cfg.train.micro_batch_size
        cfg = cfg.data
    if not isinstance(cfg, DataConfig):
        raise TypeError(f"expected a DataConfig (cfg.data) or the root Config, got {type(cfg).__name__}")
    return cfg, model_cfg, encoder_cfg, batch_size


def _open_sources(data_cfg: DataConfig, names: list[str], what: str) -> list[Source]:
    if not data_cfg.data_root:
        raise DataError("data.data_root is not set (the directory of the preprocessed Arrow datasets)")
    root = Path(data_cfg.data_root)
    if not root.is_dir():
        raise DataError(f"data.data_root {root} does not exist")
    cache: dict = {}
    out = []
    for name in names:
        try:
            out.append(Source(root, name, cache, allow_outside_root=data_cfg.allow_outside_root))
        except DataError as e:
            raise DataError(f"{what} entry {name!r}: {e}") from None
    return out


def _check_consistent(sources: list[Source], model_cfg: Optional[ModelConfig], encoder_cfg) -> tuple[int, int]:
    """All datasets must come from one encoder configuration matching the model; returns (D, W)."""
    first = sources[0].ds
    for s in sources:
        for ds in ([s.ds] + ([s.knn.train] if s.knn is not None else [])):
            if ds.encoder_signature != first.encoder_signature or ds.max_windows != first.max_windows:
                raise DataError(
                    f"datasets made with different encoders in one blend: {first.directory} has "
                    f"{first.encoder_signature} / max_windows={first.max_windows}, {ds.directory} has "
                    f"{ds.encoder_signature} / max_windows={ds.max_windows}")
            if model_cfg is not None:
                ds.check_compatible(embed_dim=model_cfg.audio_embed_dim, max_windows=model_cfg.max_num_window,
                                    where=s.name)
            if encoder_cfg is not None:
                ds.check_compatible(encoder_name=encoder_cfg.name, where=s.name)
    return first.embed_dim, first.max_windows


def _entry_for_task(blend: Mapping[str, DatasetEntry], flamingo_task: str, own: Optional[str]) -> Optional[DatasetEntry]:
    # AF1 looks augmentations up under "<flamingo_task>/train", also for interleaved entries (their
    # own entry's augmentations are never read). Fall back to the entry itself when that key is absent
    # (AF1 raised KeyError there).
    key = f"{flamingo_task}/train"
    if key in blend:
        return blend[key]
    if own is not None and own in blend:
        return blend[own]
    for name, entry in blend.items():
        if name.startswith(flamingo_task + "/"):
            return entry
    return None


class _SampleBuilder:
    """Shared per-sample logic of the train and validation datasets."""

    def __init__(self, sources: list[Source], tokenizer, tokens: SpecialTokens, registry: TemplateRegistry,
                 max_tokens: int):
        self.sources = sources
        self.special = SpecialText.from_tokenizer(tokenizer, SpecialTokens.of(tokens))
        self.encoder = FastEncoder(tokenizer, self.special)
        self.registry = registry
        self.max_tokens = int(max_tokens)

    def build(self, src: Source, j: int, split: str, augmentations, prefix_prob, rng,
              check_audio: bool = True) -> dict:
        """The sample of item ``j``. ``check_audio=False`` (packing's length pass, which only needs the
        token ids) leaves the window embeddings unread; the sample built for training checks them."""
        item = src.item(j)
        bad = bad_row(src, j, item) if check_audio else None
        if bad is not None:
            return {BAD_ROW: bad}  # the collator drops it and reports it
        text = build_parts(item, self.special, self.registry, flamingo_task=src.flamingo_task, split=split,
                          augmentations=augmentations, prefix_prob=prefix_prob, rng=rng)
        ids = self.encoder(text, self.max_tokens)
        return {"input_ids": ids, "windows": [s.windows for s in item.shots], "silence": src.ds.silence_embedding,
                "dataset": src.name}


class BlendedTrainDataset(Dataset):
    """Map-style dataset keyed by ``(epoch, position)`` in that epoch's blended list."""

    def __init__(self, sources: list[Source], weights: list[float], entries: list[DatasetEntry],
                 builder: _SampleBuilder, seed: int, af1_exact_blend: bool = False):
        self.sources = sources
        self.weights = weights
        self.entries = entries
        self.builder = builder
        self.seed = int(seed)
        self.af1_exact_blend = af1_exact_blend
        self._plans: dict[int, EpochPlan] = {}

    def plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            if len(self._plans) > 4:
                self._plans.clear()
            self._plans[epoch] = plan_epoch([s.name for s in self.sources], [len(s) for s in self.sources],
                                            self.weights, epoch, self.af1_exact_blend)
        return self._plans[epoch]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_plans"] = {}
        return state

    def __len__(self) -> int:  # only meaningful per epoch; see plan()
        return len(self.plan(0))

    def __getitem__(self, key) -> dict:
        return self.sample(key)

    def sample(self, key, check_audio: bool = True) -> dict:
        """The sample at ``key = (epoch, position)``; see ``_SampleBuilder.build`` for ``check_audio``."""
        epoch, pos = int(key[0]), int(key[1])
        plan = self.plan(epoch)
        k, j = int(plan.entry[pos]), int(plan.item[pos])
        src, entry = self.sources[k], self.entries[k]
        rng = np.random.default_rng([self.seed, epoch, pos])
        return self.builder.build(src, j, "train", entry.augmentations, entry.prefix_prob, rng, check_audio)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --------------------------------------------------------------------------------------- train


class TrainLoader:
    """Iterating yields the batches of the current virtual epoch from the current position, then
    moves to the next epoch. ``state_dict()``/``load_state_dict()`` make resumption exact.

    With ``packing`` a batch is ``batch_size`` packed rows (``megaflamingo.data.packing``): the epoch's
    whole order is packed identically on every rank and rank r takes the r-th micro-batch of each group,
    so all ranks have the same number of batches per epoch."""

    def __init__(self, dataset: BlendedTrainDataset, collator: Collator, batch_size: int, rank: int,
                 world_size: int, seed: int, num_workers: int, group_by_length: bool, epoch: int = 0,
                 packing: Optional[PackingConfig] = None):
        self.dataset = dataset
        self.collator = collator
        self.batch_size = int(batch_size)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.num_workers = int(num_workers)
        self.group_by_length = group_by_length
        self.epoch = int(epoch)
        self.batch_in_epoch = 0
        self.skipped = 0
        self.rows = RowTally("train")
        self._batches_cache: tuple[int, list] | None = None
        self.packing = packing
        if packing is not None and group_by_length:
            raise DataError("data.group_by_length has no meaning with data.packing; set one of them")
        # the next epoch's plan is computed in the background when workers do the length pass
        self._plans = PlanCache(self._compute_plan, background=self.num_workers > 0)

    # -- plan
    def packed_plan(self, epoch: Optional[int] = None) -> RankPlan:
        """This rank's packed micro-batches of ``epoch`` (rows of blended positions) and the packing stats.
        Computed once per epoch from the lengths of the epoch's every sample (DataLoader workers)."""
        return self._plans.get(self.epoch if epoch is None else epoch)

    def _compute_plan(self, epoch: int) -> RankPlan:
        order = af1_distributed_indices(len(self.dataset.plan(epoch)), 0, 1, True, self.seed, epoch)
        return pack_epoch(self.dataset, epoch, order, self.collator.tokens, self.packing, self.rank,
                          self.world_size, self.num_workers, _worker_init)

    def epoch_batches(self, epoch: Optional[int] = None) -> list[np.ndarray]:
        """This rank's batches of blended positions for ``epoch``."""
        epoch = self.epoch if epoch is None else epoch
        if self.packing is not None:
            return self.packed_plan(epoch).batches
        if self._batches_cache is not None and self._batches_cache[0] == epoch:
            return self._batches_cache[1]
        plan = self.dataset.plan(epoch)
        idx = af1_distributed_indices(len(plan), self.rank, self.world_size, True, self.seed, epoch)
        if self.group_by_length:
            lengths = np.zeros(len(plan), dtype=np.int64)
            for k, src in enumerate(self.dataset.sources):
                sel = plan.entry == k
                lengths[sel] = src.text_lengths()[plan.item[sel]]
            g = torch.Generator()
            g.manual_seed(self.seed * 1_000_003 + epoch * 7919 + self.rank)
            batches = length_grouped_batches(idx, lengths[idx], self.batch_size, g)
        else:
            batches = chunk(idx, self.batch_size)
        self._batches_cache = (epoch, batches)
        return batches

    def __len__(self) -> int:
        return len(self.epoch_batches())

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batch_in_epoch = int(epoch), 0

    def __iter__(self) -> Iterator[dict]:
        epoch = self.epoch
        if len(self.dataset.plan(epoch)) == 0:
            sizes = {s.name: len(s) for s in self.dataset.sources}
            raise DataError(f"virtual epoch {epoch} of the blend is empty: every int(N * weight * "
                            f"global_weight) is 0 (sizes {sizes}, weights {self.dataset.weights})")
        batches = self.epoch_batches(epoch)
        start = self.batch_in_epoch
        dataset, collate = self.dataset, self.collator
        if self.packing is not None:
            keys = [[(epoch, int(p), r) for r, row in enumerate(mb) for p in row] for mb in batches[start:]]
            c = self.collator
            dataset = PackedSamples(self.dataset, c.tokens, c.num_slots, c.max_windows, c.embed_dim)
            collate = PackedCollator(c.tokens, self.packing, c.max_windows)
            if start == 0:
                self.skipped += self.packed_plan(epoch).left_out
            self._plans.prefetch(epoch + 1)
        else:
            keys = [[(epoch, int(p)) for p in b] for b in batches[start:]]
        if keys:
            # Its own generator: without one, creating the iterator draws from the global RNG that the
            # trainer restored on resume, and every later dropout mask would shift.
            loader = DataLoader(dataset, batch_sampler=keys, collate_fn=collate,
                                num_workers=self.num_workers, worker_init_fn=_worker_init if self.num_workers else None,
                                persistent_workers=False, pin_memory=_PIN,
                                generator=loader_generator(self.seed, epoch, start, self.rank))
            for batch in loader:
                self.batch_in_epoch += 1
                self.rows.take(batch)
                n_skip = int(batch.pop("num_skipped", 0))
                self.skipped += n_skip
                if batch["input_ids"].shape[0] == 0:
                    continue  # every sample was cut before its answer; counted in .skipped
                yield batch
        if self.epoch == epoch and self.batch_in_epoch >= len(batches):
            self.epoch, self.batch_in_epoch = epoch + 1, 0

    # -- resumption
    def _signature(self) -> list:
        return [[s.name, len(s), float(w)] for s, w in zip(self.dataset.sources, self.dataset.weights)]

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "skipped": self.skipped, "seed": self.seed, "world_size": self.world_size, "rank": self.rank,
                "batch_size": self.batch_size, "group_by_length": self.group_by_length,
                "af1_exact_blend": self.dataset.af1_exact_blend, "blend": self._signature(),
                "rows": self.rows.state_dict(), "packing": settings_signature(self.packing)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data loader state version {state.get('version')!r} is not {STATE_VERSION}")
        for key, mine in (("seed", self.seed), ("world_size", self.world_size), ("batch_size", self.batch_size),
                          ("group_by_length", self.group_by_length),
                          ("af1_exact_blend", self.dataset.af1_exact_blend),
                          ("packing", settings_signature(self.packing))):
            if state.get(key) != mine:
                raise DataError(f"cannot resume the data loader exactly: saved {key}={state.get(key)!r}, "
                                f"now {mine!r}")
        if [list(x) for x in state.get("blend", [])] != self._signature():
            raise DataError("cannot resume the data loader exactly: the blend (datasets, sizes or weights) "
                            "differs from the saved one")
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.skipped = int(state.get("skipped", 0))
        self.rows.load_state_dict(state.get("rows"))


def build_train_loader(data_cfg, tokenizer, token_ids: SpecialTokens, rank: int = 0, world_size: int = 1,
                       seed: int = 42, *, batch_size: Optional[int] = None, model_cfg: Optional[ModelConfig] = None,
                       encoder_cfg=None, num_workers: Optional[int] = None, af1_exact_blend: bool = False,
                       epoch: int = 0) -> TrainLoader:
    """The training loader for ``data_cfg.blend`` (AF1 virtual epochs), this rank's share.

    ``data_cfg`` may be the root Config (then model/encoder/batch size come from it) or
    ``cfg.data`` (then pass ``batch_size=cfg.train.micro_batch_size`` and ``model_cfg=cfg.model``).
    """
    data_cfg, model_cfg, encoder_cfg, batch_size = _sections(data_cfg, model_cfg, encoder_cfg, batch_size)
    if batch_size is None or int(batch_size) <= 0:
        raise TypeError("build_train_loader needs batch_size (cfg.train.micro_batch_size) when given cfg.data")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
    if not data_cfg.blend:
        raise DataError("data.blend is empty: nothing to train on")
    names = list(data_cfg.blend)
    sources = _open_sources(data_cfg, names, "data.blend")
    D, W = _check_consistent(sources, model_cfg, encoder_cfg)
    fewshot = model_cfg.max_num_fewshot if model_cfg is not None else ModelConfig().max_num_fewshot
    weights = [float(data_cfg.global_weight) * float(data_cfg.blend[n].weight) for n in names]
    for n, w, s in zip(names, weights, sources):
        if w <= 0:
            raise DataError(f"data.blend.{n}.weight: must be > 0 to be in the blend (AF1 asserted this)")
        if s.knn is not None and len(s.knn.values) and np.diff(s.knn.offsets).max() + 1 > fewshot:
            raise DataError(f"data.blend.{n}: kNN manifest has {int(np.diff(s.knn.offsets).max())} neighbours "
                            f"+ query > model.max_num_fewshot={fewshot}")
    entries = [_entry_for_task(data_cfg.blend, s.flamingo_task, s.name) for s in sources]
    registry = TemplateRegistry.from_config(data_cfg.templates)
    builder = _SampleBuilder(sources, tokenizer, token_ids, registry, data_cfg.max_tokens)
    ds = BlendedTrainDataset(sources, weights, entries, builder, seed, af1_exact_blend)
    collator = Collator(token_ids, fewshot * W, W, D)
    nw = data_cfg.num_workers if num_workers is None else num_workers
    return TrainLoader(ds, collator, int(batch_size), rank, world_size, seed, nw, data_cfg.group_by_length, epoch,
                       packing=PackingConfig.from_config(data_cfg, int(batch_size)))


# --------------------------------------------------------------------------------------- valid


class ValidDataset(Dataset):
    def __init__(self, source: Source, order: np.ndarray, builder: _SampleBuilder, augmentations, prefix_prob):
        self.source, self.order, self.builder = source, order, builder
        self.augmentations, self.prefix_prob = dict(augmentations), float(prefix_prob)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict:
        return self.builder.build(self.source, int(self.order[i]), "val", self.augmentations, self.prefix_prob, None)


class ValidLoader:
    """Fixed-order batches of one validation set (the same every time it is iterated)."""

    def __init__(self, name: str, dataset: ValidDataset, indices: np.ndarray, collator: Collator,
                 batch_size: int, num_workers: int):
        self.name, self.dataset, self.indices = name, dataset, indices
        self.collator, self.batch_size, self.num_workers = collator, batch_size, num_workers
        self.skipped = 0
        self.rows = RowTally(f"validation {name}")

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        keys = [b.tolist() for b in chunk(self.indices, self.batch_size)]
        if not keys:
            return
        loader = DataLoader(self.dataset, batch_sampler=keys, collate_fn=self.collator, num_workers=self.num_workers,
                            worker_init_fn=_worker_init if self.num_workers else None, pin_memory=_PIN)
        for batch in loader:
            self.rows.take(batch)
            self.skipped += int(batch.pop("num_skipped", 0))
            if batch["input_ids"].shape[0]:
                yield batch


def valid_settings(blend: Mapping[str, DatasetEntry], flamingo_task: str, name: str) -> tuple[dict, float]:
    """AF1 validation settings: the training entry's augmentations (only ``provide_all_labels`` if
    it is among them) with prefix probability 1."""
    entry = _entry_for_task(blend, flamingo_task, None)
    if entry is None:
        warnings.warn(f"data.valid {name!r}: no '{flamingo_task}/train' entry in data.blend to borrow "
                      "augmentations from; using do_nothing", stacklevel=3)
        return {"do_nothing": 1.0}, 1.0
    return _eval_augmentations(entry), 1.0


def _eval_augmentations(entry: DatasetEntry) -> dict:
    augs = dict(entry.augmentations)
    return {"provide_all_labels": 1.0} if "provide_all_labels" in augs else augs


def inference_settings(blend: Mapping[str, DatasetEntry], flamingo_task: str) -> tuple[dict, float]:
    """Augmentations and prefix probability for prompting a trained model on ``flamingo_task``:
    validation's augmentations, and the prefix when training mostly showed it (prefix_prob >= 0.5;
    AF1's validation always added it, which a model trained with prefix_prob 0 never saw). A task
    absent from the blend (zero-shot) is prompted as given, with its prefix."""
    entry = _entry_for_task(blend, flamingo_task, None)
    if entry is None:
        return {"do_nothing": 1.0}, 1.0
    return _eval_augmentations(entry), (1.0 if entry.prefix_prob >= 0.5 else 0.0)


def build_valid_loaders(data_cfg, tokenizer, token_ids: SpecialTokens, rank: int = 0, world_size: int = 1,
                        *, batch_size: Optional[int] = None, model_cfg: Optional[ModelConfig] = None,
                        encoder_cfg=None, num_workers: Optional[int] = None, max_samples: Optional[int] = 64,
                        max_tokens: Optional[int] = None) -> dict[str, ValidLoader]:
    """One fixed-order loader per ``data.valid`` entry, in config order.

    As AF1: items in the order of the seeded shuffle ``sum(ord(name))``, the first ``max_samples``
    (AF1 used 64; None = all), split over ranks like DistributedSampler(shuffle=False), text
    truncated at ``5 * data.max_tokens`` unless ``max_tokens`` is given.
    """
    data_cfg, model_cfg, encoder_cfg, batch_size = _sections(data_cfg, model_cfg, encoder_cfg, batch_size)
    if batch_size is None or int(batch_size) <= 0:
        raise TypeError("build_valid_loaders needs batch_size (cfg.train.micro_batch_size) when given cfg.data")
    names = list(data_cfg.valid)
    if not names:
        return {}
    sources = _open_sources(data_cfg, names, "data.valid")
    D, W = _check_consistent(sources, model_cfg, encoder_cfg)
    fewshot = model_cfg.max_num_fewshot if model_cfg is not None else ModelConfig().max_num_fewshot
    registry = TemplateRegistry.from_config(data_cfg.templates)
    builder = _SampleBuilder(sources, tokenizer, token_ids, registry,
                             max_tokens if max_tokens is not None else 5 * data_cfg.max_tokens)
    collator = Collator(token_ids, fewshot * W, W, D)
    nw = data_cfg.num_workers if num_workers is None else num_workers
    out: dict[str, ValidLoader] = {}
    for name, src in zip(names, sources):
        order = pass_permutation(name, len(src), 0)
        if max_samples is not None:
            order = order[:max_samples]
        augs, pp = valid_settings(data_cfg.blend, src.flamingo_task, name)
        vds = ValidDataset(src, np.asarray(order), builder, augs, pp)
        idx = af1_distributed_indices(len(vds), rank, world_size, shuffle=False)
        out[name] = ValidLoader(name, vds, idx, collator, int(batch_size), nw)
    return out
