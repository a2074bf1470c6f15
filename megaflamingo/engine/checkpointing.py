"""DeepSpeed checkpoints with our client state, an atomic ``latest`` and keep-last-K.

Layout under ``<run_dir>/checkpoints/``::

    step-00000100/                DeepSpeed tag dir (model/optimizer shards of every rank) plus
        megaflamingo_rank<R>.pt   per-rank state: RNG of torch/numpy/python(/cuda), data-loader state
        megaflamingo.json         step, world size, ZeRO stage, config hash; written LAST = complete
    step-00000100-universal/      made on demand when resuming on another world size
    latest                        name of the newest COMPLETE tag (temp file + rename)

Every rank fsyncs the files it wrote before the barrier that precedes the marker, so after a power
loss the marker (and ``latest``) can only name a tag whose shards are on disk.

DeepSpeed's own ``latest`` is disabled (``save_latest=False``): it would be written before the other
ranks finished their shards. Ours is written by rank 0 after a barrier and the marker, so a crash at
any moment leaves ``latest`` on the previous complete checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megaflamingo.io import atomic_write_text, fsync_path

from .distributed import barrier, on_rank0_others_wait

MARKER = "megaflamingo.json"
LATEST = "latest"
_TAG = re.compile(r"^step-(\d{8})$")


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


# Which rank wrote a file of a tag dir: DeepSpeed names shards ``..._pp_rank_<R>_...`` (data-parallel
# rank == global rank here, there is no model parallelism), ours ``megaflamingo_rank<R>.pt``;
# anything else (``mp_rank_00_model_states.pt`` below ZeRO-3) is rank 0's.
_OWNER = re.compile(r"(?:pp_rank_|megaflamingo_rank)(\d+)")


def fsync_own_files(tag_dir: Path, rank: int) -> list[Path]:
    """Flush the files this rank wrote into ``tag_dir`` (the writer's cache is the one that counts on
    network filesystems), so the completion marker can never reach the disk before a shard does.
    Rank 0 also flushes the directory entries. Returns the files flushed."""
    mine = []
    for f in sorted(tag_dir.rglob("*")):
        m = _OWNER.search(f.name)
        if f.is_file() and (int(m.group(1)) if m else 0) == rank:
            fsync_path(f)
            mine.append(f)
    if rank == 0:
        for d in [tag_dir, *sorted(p for p in tag_dir.rglob("*") if p.is_dir())]:
            fsync_path(d)
    return mine


# ------------------------------------------------------------------------------------------ RNG


def rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    st = {
        "torch": torch.get_rng_state(),
        # numpy/python states as tensors and ints so weights_only=True loads them.
        "numpy": {"key": np_state[0], "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached": float(np_state[4]), "state": torch.from_numpy(np_state[1].astype(np.int64))},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n["key"], n["state"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = st["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


# ------------------------------------------------------------------------------------------ discovery


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags of ``ckpt_dir`` whose completion marker exists, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if _TAG.match(p.name) and (p / MARKER).is_file())


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    """The tag ``latest`` names when it is complete; else the newest complete tag (``latest`` lost)."""
    f = ckpt_dir / LATEST
    if f.is_file():
        tag = f.read_text().strip()
        if _TAG.match(tag) and (ckpt_dir / tag / MARKER).is_file():
            return tag
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


# ------------------------------------------------------------------------------------------ manager


class CheckpointManager:
    def __init__(self, run_dir: str | Path, rank: int, world_size: int, keep_last: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)

    # -- discovery
    def complete_tags(self) -> list[str]:
        return complete_tags(self.dir)

    def latest_tag(self) -> Optional[str]:
        return latest_tag(self.dir)

    # -- save
    def save(self, engine, step: int, meta: dict, rank_state: dict) -> Path:
        tag = tag_for(step)
        tag_dir = self.dir / tag
        if self.rank == 0 and tag_dir.exists():  # leftovers of a crashed save of the same step
            shutil.rmtree(tag_dir)
        barrier()
        engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False)
        tag_dir.mkdir(parents=True, exist_ok=True)
        state = dict(rank_state, rng=rng_state())
        torch.save(state, tag_dir / f"megaflamingo_rank{self.rank}.pt")
        fsync_own_files(tag_dir, self.rank)
        barrier()  # every rank's shards and state are on disk
        if self.rank == 0:
            atomic_write_text(tag_dir / MARKER, json.dumps(dict(meta, step=step, world_size=self.world_size), indent=2))
            atomic_write_text(self.dir / LATEST, tag)
            fsync_path(self.dir)  # the renames of the marker and `latest`
            self._prune(keep=tag)
        barrier()
        return tag_dir

    def _prune(self, keep: str) -> None:
        tags = self.complete_tags()
        for old in tags[: max(0, len(tags) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(self.dir / old, ignore_errors=True)
                shutil.rmtree(self.dir / f"{old}-universal", ignore_errors=True)
        # Incomplete tag dirs older than the newest complete one are crash leftovers.
        for p in self.dir.iterdir():
            m = _TAG.match(p.name)
            if m and not (p / MARKER).is_file() and p.name < keep:
                shutil.rmtree(p, ignore_errors=True)

    # -- load
    def read_meta(self, tag: str, src: Optional[Path] = None) -> dict:
        return json.loads(((src or self.dir) / tag / MARKER).read_text())

    def universal_tag(self, tag: str, src: Optional[Path] = None, timeout_s: int = 21600) -> str:
        """Convert ``src/tag`` to DeepSpeed's universal format in THIS run's checkpoint dir. Rank 0
        converts; the others wait up to ``timeout_s`` (``train.convert_timeout_s``, not the collective
        timeout) and raise rank 0's error if it fails. Returns the new tag."""
        src = Path(src or self.dir)
        out = f"{tag}-universal"

        def convert():
            if (self.dir / out / MARKER).is_file():
                return  # converted by an earlier attempt (the marker is written last)
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.dir / out, ignore_errors=True)
            workers = str(max(1, min(4, (os.cpu_count() or 2) // 2)))
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                   str(src / tag), "--output_folder", str(self.dir / out), "--num_extract_workers", workers,
                   "--num_merge_workers", workers]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"universal checkpoint conversion of {src / tag} failed:\n"
                                   f"{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
            (self.dir / "latest_universal").unlink(missing_ok=True)  # the converter's own pointer
            for f in (src / tag).glob("megaflamingo_rank*.pt"):
                shutil.copy2(f, self.dir / out / f.name)
            shutil.copy2(src / tag / MARKER, self.dir / out / MARKER)

        on_rank0_others_wait(convert, self.rank, timeout_s, what=f"converting {src / tag} to a universal checkpoint")
        return out

    def load(self, engine, tag: str, universal: bool, src: Optional[Path] = None) -> tuple[dict, Optional[dict]]:
        """Load the engine state from ``src/tag`` (default: this run's dir); returns (meta, this rank's
        state or None when the world changed)."""
        src = Path(src or self.dir)
        meta = self.read_meta(tag, src)
        path, _ = engine.load_checkpoint(str(src), tag=tag, load_module_strict=True,
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {src / tag}")
        rank_state = None
        f = src / tag / f"megaflamingo_rank{self.rank}.pt"
        if not universal and meta.get("world_size") == self.world_size and f.is_file():
            rank_state = torch.load(f, map_location="cpu", weights_only=True)
        return meta, rank_state


@dataclass(frozen=True)
class ResumePoint:
    """A complete checkpoint to resume from: ``dir/tag`` (``dir`` is some run's ``checkpoints/``)."""

    dir: Path
    tag: str

    @property
    def path(self) -> Path:
        return self.dir / self.tag

    def meta(self) -> dict:
        return json.loads((self.path / MARKER).read_text())


_NO_RESUME = ("none", "never", "false", "")


def resolve_resume(spec: str, run_dir: str | Path) -> Optional[ResumePoint]:
    """What ``train.resume`` / ``--resume`` means, in one place (the trainer resumes from it and the run
    skips ``train.init_from`` exactly when it is not None):

    * ``none`` (never, false, empty): start fresh;
    * ``auto``: the newest complete checkpoint of this run (its ``latest``, else the newest tag with a
      marker), or None when there is none;
    * a path: a tag dir (``.../step-N`` with a marker), a ``checkpoints/`` dir or a run dir. A path
      that holds no complete checkpoint is an error, never a silent fresh start.

    Only ``step-<8 digits>`` tags count: a ``step-N-universal`` conversion is a by-product of a resume
    on another world size, not a checkpoint of its own."""
    spec = str(spec)
    if spec.lower() in _NO_RESUME:
        return None
    if spec == "auto":
        d = Path(run_dir) / "checkpoints"
        tag = latest_tag(d)
        return ResumePoint(d, tag) if tag is not None else None
    p = Path(spec)
    if _TAG.match(p.name) and (p / MARKER).is_file():
        return ResumePoint(p.parent, p.name)
    for d in (p, p / "checkpoints"):
        tag = latest_tag(d)
        if tag is not None:
            return ResumePoint(d, tag)
    if not p.exists():
        raise FileNotFoundError(f"train.resume={spec!r}: no such directory")
    raise FileNotFoundError(f"train.resume={spec!r}: no complete checkpoint there (expected a step-N tag dir "
                            f"with {MARKER}, a checkpoints/ dir or a run dir)")


def config_hash(cfg_dict: dict) -> str:
    import hashlib

    # Run bookkeeping fields may change between a run and its resume; the recipe may not.
    d = json.loads(json.dumps(cfg_dict, default=str))
    for k in ("run_dir", "run_name", "resume", "max_steps", "logging_steps", "eval_steps", "save_steps",
              "keep_last", "progress_bar", "init_from", "dist_timeout_s", "convert_timeout_s"):
        d.get("train", {}).pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
