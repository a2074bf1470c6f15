"""Synthetic, learnable training data for tests, benchmarks and the CPU quickstart.

The task: K classes; a sample's audio window embeddings are noise around a class centroid, and the
answer after ``<SEP>`` is the class's word. A model can only learn it through the audio path (audio
transformer + xattn), so a falling loss proves gradients flow through the trainable parts.

* :class:`SyntheticBatches` yields ready batches (the data pipeline's batch format) and is resumable
  (``state_dict``/``load_state_dict``/``set_epoch``), sharded by rank, seeded.
* :func:`write_tiny_dataset` writes the same task as preprocessed Arrow splits
  (``megaflamingo.data.arrow_format``) so the real loader and ``configs/tiny_cpu.yaml`` can read it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from megaflamingo.tokens import IGNORE_INDEX, SpecialTokens

from .lms import tiny_lm_config_dict

CLASS_WORDS = ("dog bark", "rain", "siren", "piano", "bird song", "car engine", "white noise", "drums")
DATASET = "SynthTiny"
TASK = "EventClassification"


def class_centroids(num_classes: int, dim: int, seed: int = 1234) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((num_classes, dim)).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True) * np.sqrt(dim)


class SyntheticBatches:
    """``num_batches`` micro-batches per epoch for this rank; batch i of epoch e is a pure function of
    (seed, epoch, rank, i), so resuming from ``state_dict`` replays exactly."""

    def __init__(self, token_ids: SpecialTokens, vocab_size: int, *, micro_batch: int = 4, seq_len: int = 24,
                 num_fewshot: int = 1, windows_per_audio: int = 4, embed_dim: int = 32, num_classes: int = 4,
                 num_batches: int = 64, rank: int = 0, world_size: int = 1, seed: int = 0,
                 nonfinite_at: Sequence[tuple[int, int]] = (), dataset_names: Sequence[str] = ("synth-a", "synth-b")):
        self.ids = SpecialTokens.of(token_ids)
        self.vocab = vocab_size
        self.B, self.T = micro_batch, seq_len
        self.F, self.W, self.D = num_fewshot, windows_per_audio, embed_dim
        self.K, self.n = num_classes, num_batches
        self.rank, self.world, self.seed = rank, world_size, seed
        self.nonfinite_at = {tuple(x) for x in nonfinite_at}  # (epoch, batch index) -> overflowing audio
        self.names = list(dataset_names)
        self.centroids = torch.from_numpy(class_centroids(num_classes, embed_dim))
        specials = set(self.ids.as_dict().values())
        pool = [i for i in range(8, vocab_size) if i not in specials]
        self.answer_tok = pool[:num_classes]
        self.filler = pool[num_classes:num_classes + 64]
        self.epoch, self.pos = 0, 0

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.pos = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, st: dict) -> None:
        self.epoch, self.pos = int(st["epoch"]), int(st["pos"])

    def __iter__(self):
        while self.pos < self.n:
            i = self.pos
            self.pos += 1
            yield self.make(self.epoch, i)
        self.epoch += 1
        self.pos = 0

    def make(self, epoch: int, i: int) -> dict:
        g = torch.Generator().manual_seed(hash((self.seed, epoch, self.rank, i)) % (2**63))
        B, T, L = self.B, self.T, self.F * self.W
        cls = torch.randint(0, self.K, (B,), generator=g)
        ids = torch.full((B, T), self.ids.pad, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        att = torch.zeros(B, T, dtype=torch.long)
        for b in range(B):  # test data only: per-sample Python is fine here
            nprompt = int(torch.randint(2, max(3, T - 8), (1,), generator=g))
            prompt = torch.tensor(self.filler)[torch.randint(0, len(self.filler), (nprompt,), generator=g)]
            ans = self.answer_tok[int(cls[b])]
            seq = [self.ids.bos, self.ids.bos, self.ids.media, *prompt.tolist(), self.ids.sep, ans,
                   self.ids.eoc, self.ids.eos]
            seq = seq[:T]
            ids[b, : len(seq)] = torch.tensor(seq)
            att[b, : len(seq)] = 1
            start = 3 + nprompt + 1  # first answer position
            labels[b, start: len(seq)] = ids[b, start: len(seq)]
        nwin = torch.randint(1, self.W + 1, (B,), generator=g)
        audio = self.centroids[cls][:, None, :] + 0.5 * torch.randn(B, L, self.D, generator=g)
        amask = torch.zeros(B, L, dtype=torch.bool)
        amask[torch.arange(L)[None, :] < nwin[:, None]] = True
        audio = audio * amask[..., None]
        if (epoch, i) in self.nonfinite_at:
            # Finite input (the model rejects NaN inputs) that overflows inside: an inf/NaN loss.
            audio[0] = 3e38
        return {"input_ids": ids, "attention_mask": att, "labels": labels, "audio_embeds": audio,
                "audio_mask": amask, "dataset": [self.names[j % len(self.names)] for j in range(B)]}


def write_tiny_dataset(root: str | Path, *, embed_dim: int = 32, num_classes: int = 4,
                       rows: dict[str, int] | None = None, max_windows: int = 4, seed: int = 0,
                       dtype: str = "float32", nan_rows: dict[str, list[int]] | None = None) -> list[Path]:
    """Write ``<root>/SynthTiny-EventClassification/{train,val}`` Arrow splits of the synthetic task.

    Returns the split directories. Embeddings are class centroid + noise, so the task is learnable.
    ``nan_rows``: per split, rows whose last window gets a NaN (bad data the loader must skip)."""
    from megaflamingo.data import arrow_format as af

    rows = rows or {"train": 64, "val": 16}
    cents = class_centroids(num_classes, embed_dim)
    encoder = {"name": "tiny", "checkpoint": None, "checkpoint_sha256": None, "random_init": True,
               "embed_dim": embed_dim, "sample_rate": 16000, "config": {"synthetic": True}}
    out = []
    for s_i, (split, n) in enumerate(rows.items()):
        rng = np.random.default_rng(seed * 1000 + s_i)
        data = []
        for i in range(n):
            c = int(rng.integers(num_classes))
            nw = int(rng.integers(1, 4))
            win = cents[c][None, :] + 0.5 * rng.standard_normal((nw, embed_dim)).astype(np.float32)
            if i in (nan_rows or {}).get(split, ()):
                win[-1, 0] = np.nan
            data.append({
                "id": f"{split}-{i:05d}", "index": i, "path": f"audio/{split}/{i:05d}.wav", "start": 0.0,
                "duration": 7.0 + 1.75 * (nw - 1), "num_windows": nw, "windows": win, "clip_embedding": None,
                "prompt": "what is the label of the audio?", "output": CLASS_WORDS[c], "dialogue": None,
                "task": TASK, "dataset": DATASET,
            })
        d = Path(root) / f"{DATASET}-{TASK}" / split
        af.write_dataset(d, data, embed_dim=embed_dim, dtype=dtype, rows_per_shard=max(1, n // 2) or 1,
                         dataset=DATASET, task=TASK, split=split, encoder=encoder,
                         max_windows=max_windows, silence_embedding=[0.0] * embed_dim,
                         audio_hours=n * 7.0 / 3600)
        out.append(d)
    return out


def tiny_raw_config(embed_dim: int = 32, windows: int = 4, fewshot: int = 1, vocab_size: int = 512,
                    hidden: int = 64, layers: int = 2) -> dict:
    """The model/encoder sections of a tiny random-init AudioFlamingo (tests, bench, quickstart)."""

    lm = {k: v for k, v in tiny_lm_config_dict("opt", vocab_size=vocab_size, hidden_size=hidden,
                                                 num_layers=layers).items()
          if k not in ("transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype")}
    return {
        "model": {
            "lm": "tiny", "tokenizer": "tiny", "lm_config": lm, "attn_implementation": "sdpa",
            "audio_embed_dim": embed_dim, "max_num_window": windows, "max_num_fewshot": fewshot,
            "audio_transformer": {"n_head": 2, "n_layers": 1, "d_inner": 2 * embed_dim,
                                  "max_num_media": windows * fewshot, "max_window_per_audio": windows},
            "xattn": {"every_n_layers": 1, "heads": 2, "dim_head": 16, "ff_mult": 2},
        },
        "encoder": {"name": "tiny", "random_init": True, "embed_dim": embed_dim, "sample_rate": 16000,
                    "max_windows": windows},
    }


def make_config(raw: dict, source: str = "<synthetic>"):
    """dict -> validated Config (same checks as load_config)."""
    from megaflamingo.config import Config, from_dict, validate

    cfg = from_dict(Config, raw, "", source)
    cfg.source = source
    validate(cfg)
    return cfg


def main(argv=None) -> int:
    """``python -m megaflamingo.testing.tiny_task OUT_DIR``: write the SynthTiny Arrow splits."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m megaflamingo.testing.tiny_task", description=main.__doc__)
    p.add_argument("out", help="data root (configs/tiny_cpu.yaml's MF_DATA_ROOT)")
    p.add_argument("--train-rows", type=int, default=256)
    p.add_argument("--val-rows", type=int, default=32)
    a = p.parse_args(argv)
    for d in write_tiny_dataset(a.out, rows={"train": a.train_rows, "val": a.val_rows}):
        print(d)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
