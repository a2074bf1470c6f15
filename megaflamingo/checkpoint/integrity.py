"""Safe file handling for checkpoints: hashed atomic writes, sha256, size parsing, content checks.

Every write goes through :func:`megaflamingo.io.atomic_path` (a temporary file in the destination
directory, renamed into place once complete and fsynced), so a crash never leaves a half-written part
under its final name. Loading torch files is :mod:`megaflamingo.checkpoint.safe_load`'s job (the one
restricted loader).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

from megaflamingo.io import atomic_path, file_chunks

PathLike = Union[str, os.PathLike]
_CHUNK = 16 << 20


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupted, untrusted, or does not match its target."""


# ----------------------------------------------------------------------------------------------- sizes

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: Union[str, int]) -> int:
    """'17GB' -> 17_000_000_000 (decimal units as on the hub; KiB/MiB/GiB are binary)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"cannot parse size {text!r} (examples: 17GB, 500MB, 64KiB, 1048576)")
    n = int(float(m.group(1)) * _UNITS[m.group(2)])
    if n <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return n


def format_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


# ----------------------------------------------------------------------------------------------- hashing

_HASH_POOL = None
_PIPE_CHUNK = 32 << 20


def _hash_pool():
    global _HASH_POOL
    if _HASH_POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _HASH_POOL = ThreadPoolExecutor(1, thread_name_prefix="sha256")
    return _HASH_POOL


class HashingWriter:
    """A binary file wrapper that hashes (sha256) and counts every byte written through it.

    Large writes are cut into chunks; each chunk is hashed on a helper thread while the same chunk is
    written (both release the GIL), so hashing costs little on top of the disk write."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        n = mv.nbytes
        if n < _PIPE_CHUNK:
            self.sha.update(mv)
            self.f.write(mv)
        else:
            pool = _hash_pool()
            for off in range(0, n, _PIPE_CHUNK):
                chunk = mv[off:off + _PIPE_CHUNK]
                fut = pool.submit(self.sha.update, chunk)
                self.f.write(chunk)
                fut.result()
        self.size += n
        return n

    def flush(self) -> None:
        self.f.flush()

    def hexdigest(self) -> str:
        return self.sha.hexdigest()


def sha256_file(path: PathLike, progress=None) -> str:
    sha = hashlib.sha256()
    for part in file_chunks(path, _CHUNK):
        sha.update(part)
        if progress is not None:
            progress(len(part))
    return sha.hexdigest()


def verify_file(path: PathLike, size: Optional[int], sha256: Optional[str], progress=None) -> None:
    """Raise CheckpointError naming ``path`` when it is missing, has the wrong size or the wrong hash."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"missing checkpoint part: {p}")
    actual = p.stat().st_size
    if size is not None and actual != size:
        kind = "truncated" if actual < size else "larger than recorded"
        raise CheckpointError(f"{p}: {kind} ({actual} bytes on disk, index records {size})")
    if sha256 is not None:
        digest = sha256_file(p, progress)
        if digest != sha256:
            raise CheckpointError(f"{p}: sha256 mismatch (file {digest}, index records {sha256}); "
                                  "the part is corrupted or belongs to another checkpoint")


# ----------------------------------------------------------------------------------------------- atomic writes

@contextlib.contextmanager
def atomic_open(path: PathLike) -> Iterator[HashingWriter]:
    """Open ``path`` for binary writing through a temp file; yields a HashingWriter (``.size``, ``.hexdigest()``)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            w = HashingWriter(f)
            yield w
            f.flush()


# ----------------------------------------------------------------------------------------------- contents

def check_tensor_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """A plain ``{str: Tensor}`` mapping or a CheckpointError naming ``source`` and the offending key."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a dict of tensors, found {type(obj).__name__}")
    for k, v in obj.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{source}: key {k!r} is not a string")
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{source}: entry {k!r} is a {type(v).__name__}, not a tensor")
    return obj
