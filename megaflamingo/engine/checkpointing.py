"""DeepSpeed checkpoints with our client state, an atomic ``latest`` and keep-last-K.

Layout under ``<run_dir>/checkpoints/``::

    step-00000100/                DeepSpeed tag dir (model/optimizer shards of every rank) plus
        megaflamingo_rank<R>.pt   per-rank state: RNG of torch/numpy/python(/cuda), data-loader state
        megaflamingo.json         step, world size, ZeRO stage, config hash, and the integrity record
                                  (every file of the tag with its size and CRC-32); written LAST = complete
    step-00000100-universal/      made on demand when resuming on another world size
    latest                        name of the newest COMPLETE tag (temp file + rename)

Every rank fsyncs the files it wrote before the barrier that precedes the marker, so after a power
loss the marker (and ``latest``) can only name a tag whose shards are on disk. Every rank then
checksums its own files; rank 0 writes the gathered records into the marker.

Loading is restricted (``checkpoint.safe_load``: DeepSpeed's checkpoint engine replaced for the
load, every ``torch.load`` guarded) and comes after verification: :func:`resolve_resume` only hands
out a tag whose files match its record, each rank checksumming and scanning its own share.

DeepSpeed's own ``latest`` is disabled (``save_latest=False``): it would be written before the other
ranks finished their shards. Ours is written by rank 0 after a barrier and the marker, so a crash at
any moment leaves ``latest`` on the previous complete checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from megaflamingo.checkpoint import safe_load
from megaflamingo.checkpoint.integrity import CheckpointError
from megaflamingo.checkpoint.tag_manifest import (MARKER, TagVerificationError, file_owner, manifest, owned_by,
                                                  read_marker, record_files, verify_marker_record)
from megaflamingo.io import atomic_write_text, fsync_path

from .distributed import all_gather_objects, barrier, on_rank0_others_wait

log = logging.getLogger("megaflamingo.train")

LATEST = "latest"
_TAG = re.compile(r"^step-(\d{8})$")


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def fsync_own_files(tag_dir: Path, rank: int) -> list[Path]:
    """Flush the files this rank wrote into ``tag_dir`` (the writer's cache is the one that counts on
    network filesystems), so the completion marker can never reach the disk before a shard does.
    Rank 0 also flushes the directory entries. Returns the files flushed."""
    mine = []
    for f in sorted(tag_dir.rglob("*")):
        if f.is_file() and file_owner(f.name) == rank:
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


def _candidates(ckpt_dir: Path) -> list[str]:
    """Tags to try, best first: the one ``latest`` names and the older ones, newest first (tags newer
    than ``latest`` were rolled back by the user, or are a save that crashed before ``latest`` moved);
    without a valid ``latest``, every tag newest first. Tags without a marker are included: passing over
    one is reported."""
    if not ckpt_dir.is_dir():
        return []
    tags = sorted((p.name for p in ckpt_dir.iterdir() if _TAG.match(p.name) and p.is_dir()), reverse=True)
    f = ckpt_dir / LATEST
    named = f.read_text().strip() if f.is_file() else None
    if named in tags:
        tags = [t for t in tags if t <= named]
    return tags


# ------------------------------------------------------------------------------------------ verification

# A verifier checks one tag (``tag_dir``, its marker) and raises CheckpointError when it may not be
# resumed; it may return a note (e.g. "no integrity record").
Verifier = Callable[[Path, dict], Optional[str]]


def check_sizes(tag_dir: Path, meta: dict) -> Optional[str]:
    """Every recorded file present with its recorded size, nothing extra: the pre-flight check (no
    reads, any process, no process group needed)."""
    return verify_marker_record(tag_dir, meta, sizes_only=True)


_VERIFIED: dict[tuple, tuple[Optional[str], Optional[CheckpointError]]] = {}


def verify_on_all_ranks(tag_dir: Path, meta: dict) -> Optional[str]:
    """The full check, split over the ranks of the process group (or done alone without one): each rank
    checksums and pickle-scans the files of its own share (:func:`owned_by`), the verdicts are gathered,
    and every rank returns the same note or raises the same error (the first bad file in rank order).
    The verdict is remembered for the process (keyed by the marker's identity), so the run and the
    trainer asking about the same tag cost one pass."""
    import torch.distributed as dist

    st = (tag_dir / MARKER).stat()
    key = (str(tag_dir.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _VERIFIED:
        multi = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if multi else (0, 1)
        verdict = None
        try:
            note = verify_marker_record(tag_dir, meta, only=owned_by(rank, world))
        except CheckpointError as e:
            note, verdict = None, e
        verdicts = all_gather_objects(None if verdict is None else (type(verdict).__name__, str(verdict),
                                                                    getattr(verdict, "path", None)))
        first = next((v for v in verdicts if v is not None), None)
        if first is not None:
            verdict = verdict if verdict is not None and str(verdict) == first[1] else \
                TagVerificationError(first[1], first[2], "remote")
        _VERIFIED[key] = (note, verdict)
    note, verdict = _VERIFIED[key]
    if verdict is not None:
        raise verdict
    return note


class ResumeError(CheckpointError):
    """The checkpoint the user named cannot be resumed (the CLI's exit code 2)."""


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
        mine = fsync_own_files(tag_dir, self.rank)
        # Each rank checksums what it wrote (re-read from the page cache, whatever engine wrote it).
        records = all_gather_objects(record_files(tag_dir, [f.relative_to(tag_dir).as_posix() for f in mine]))
        if self.rank == 0:  # the gather above was the barrier: every rank's shards and state are on disk
            merged = {k: v for part in records for k, v in part.items()}
            atomic_write_text(tag_dir / MARKER, json.dumps(dict(meta, step=step, world_size=self.world_size,
                                                                integrity=manifest(merged)), indent=2))
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
        return read_marker((src or self.dir) / tag)

    def universal_tag(self, tag: str, src: Optional[Path] = None, timeout_s: int = 21600) -> str:
        """Convert ``src/tag`` (verified by the caller) to DeepSpeed's universal format in THIS run's
        checkpoint dir, through the restricted converter, with an integrity record of its own. Rank 0
        converts; the others wait up to ``timeout_s`` (``train.convert_timeout_s``, not the collective
        timeout) and raise rank 0's error if it fails. Returns the new tag."""
        src = Path(src or self.dir)
        out = f"{tag}-universal"

        def convert():
            if (self.dir / out / MARKER).is_file():  # converted by an earlier attempt (the marker is written last)
                try:
                    verify_marker_record(self.dir / out, read_marker(self.dir / out))
                    return
                except CheckpointError as e:
                    log.warning("converting %s again: the earlier conversion does not verify (%s)", src / tag, e)
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.dir / out, ignore_errors=True)
            workers = str(max(1, min(4, (os.cpu_count() or 2) // 2)))
            cmd = [sys.executable, "-m", "megaflamingo.checkpoint.to_universal", "--input_folder",
                   str(src / tag), "--output_folder", str(self.dir / out), "--num_extract_workers", workers,
                   "--num_merge_workers", workers]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode == 2:  # a refused, corrupted or missing input file: one line naming it
                raise CheckpointError(res.stderr.strip().splitlines()[-1])
            if res.returncode != 0:
                raise RuntimeError(f"universal checkpoint conversion of {src / tag} failed:\n"
                                   f"{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
            (self.dir / "latest_universal").unlink(missing_ok=True)  # the converter's own pointer
            for f in (src / tag).glob("megaflamingo_rank*.pt"):
                shutil.copy2(f, self.dir / out / f.name)
            meta = dict(read_marker(src / tag), universal_of=str(src / tag),
                        integrity=manifest(record_files(self.dir / out)))
            atomic_write_text(self.dir / out / MARKER, json.dumps(meta, indent=2))

        on_rank0_others_wait(convert, self.rank, timeout_s, what=f"converting {src / tag} to a universal checkpoint")
        return out

    def load(self, engine, tag: str, universal: bool, src: Optional[Path] = None) -> tuple[dict, Optional[dict]]:
        """Load the engine state from ``src/tag`` (default: this run's dir), every file through the
        restricted loader; returns (meta, this rank's state or None when the world changed)."""
        src = Path(src or self.dir)
        meta = self.read_meta(tag, src)
        path, _ = safe_load.load_checkpoint(engine, src, tag, load_module_strict=True, load_optimizer_states=True,
                                            load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {src / tag}")
        if universal or meta.get("world_size") != self.world_size:
            return meta, None
        f = src / tag / f"megaflamingo_rank{self.rank}.pt"
        if not f.is_file():  # same world size: a lost state file is damage, not a world-size change
            raise CheckpointError(f"{f}: missing (rank {self.rank}'s data-loader and RNG state of {src / tag})")
        return meta, safe_load.restricted_load(f)


@dataclass(frozen=True)
class ResumePoint:
    """A complete checkpoint to resume from: ``dir/tag`` (``dir`` is some run's ``checkpoints/``).
    ``skipped``: newer tags passed over on the way, each with the reason (for the warnings)."""

    dir: Path
    tag: str
    skipped: tuple[str, ...] = field(default=(), compare=False)
    note: Optional[str] = field(default=None, compare=False)

    @property
    def path(self) -> Path:
        return self.dir / self.tag

    def meta(self) -> dict:
        return read_marker(self.path)


_NO_RESUME = ("none", "never", "false", "")
_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    # resolve_resume is asked by the CLI pre-flight, the run and the trainer: say each thing once.
    if msg not in _warned:
        _warned.add(msg)
        log.warning("%s", msg)


def _newest_verified(ckpt_dir: Path, verify: Verifier) -> tuple[Optional[ResumePoint], list[str]]:
    skipped = []
    for tag in _candidates(ckpt_dir):
        try:
            meta = read_marker(ckpt_dir / tag)
            note = verify(ckpt_dir / tag, meta)
        except CheckpointError as e:
            skipped.append(f"checkpoint {ckpt_dir / tag} skipped: {e}")
            continue
        return ResumePoint(ckpt_dir, tag, tuple(skipped), note), skipped
    return None, skipped


def resolve_resume(spec: str, run_dir: str | Path, verify: Verifier = check_sizes) -> Optional[ResumePoint]:
    """What ``train.resume`` / ``--resume`` means, in one place (the trainer resumes from it and the run
    skips ``train.init_from`` exactly when it is not None):

    * ``none`` (never, false, empty): start fresh;
    * ``auto``: the newest checkpoint of this run that is complete and verifies (``latest``, else older
      tags, newest first); each tag passed over is warned about with its reason (no marker: an
      interrupted save or a deleted marker; a named missing, extra, cut, corrupted or unsafe file).
      None when the run has no complete checkpoint; an error when it has some and none verifies (start
      over with ``--resume none`` if that is what you want);
    * a tag dir (``.../step-N``): exactly that one; it must verify, else :class:`ResumeError` naming the file;
    * a ``checkpoints/`` dir or a run dir: as ``auto`` there. A path that holds no complete checkpoint
      is an error, never a silent fresh start.

    ``verify`` decides what "verifies" means: :func:`check_sizes` (presence and sizes, cheap; the
    default, for pre-flight) or :func:`verify_on_all_ranks` (checksums and pickle scan, split over the
    ranks; the run and the trainer). Only ``step-<8 digits>`` tags count: a ``step-N-universal``
    conversion is a by-product of a resume on another world size, not a checkpoint of its own."""
    spec = str(spec)
    if spec.lower() in _NO_RESUME:
        return None
    p = Path(spec)
    if spec != "auto" and _TAG.match(p.name) and p.is_dir():
        try:
            note = verify(p, read_marker(p))
        except CheckpointError as e:
            raise ResumeError(f"train.resume={spec}: {e}") from None
        point = ResumePoint(p.parent, p.name, (), note)
    else:
        dirs = [Path(run_dir) / "checkpoints"] if spec == "auto" else [p, p / "checkpoints"]
        point, skipped = None, []
        for d in dirs:
            point, skipped = _newest_verified(d, verify)
            if point is not None or complete_tags(d):
                break
        for msg in skipped:
            _warn_once(msg)
        if point is None and any(complete_tags(d) for d in dirs):
            raise ResumeError(f"train.resume={spec}: no checkpoint there verifies ({'; '.join(skipped)}); pass "
                              "--resume none to start over, or --resume <tag dir> after repairing one")
        if point is None and spec != "auto":
            if not p.exists():
                raise FileNotFoundError(f"train.resume={spec!r}: no such directory")
            raise FileNotFoundError(f"train.resume={spec!r}: no complete checkpoint there (expected a step-N tag "
                                    f"dir with {MARKER}, a checkpoints/ dir or a run dir)")
    if point is not None and point.note:
        _warn_once(point.note)
    return point


def config_hash(cfg_dict: dict) -> str:
    import hashlib

    # Run bookkeeping fields may change between a run and its resume; the recipe may not.
    d = json.loads(json.dumps(cfg_dict, default=str))
    for k in ("run_dir", "run_name", "resume", "max_steps", "logging_steps", "eval_steps", "save_steps",
              "keep_last", "progress_bar", "init_from", "dist_timeout_s", "convert_timeout_s",
              "max_nonfinite_fraction", "max_bad_row_fraction"):
        d.get("train", {}).pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
