"""Streaming writers: one tensor resident at a time, hashed while written, renamed into place when complete.

The safetensors writer produces the format directly (8-byte little-endian header length, a JSON header
padded with spaces to a multiple of 8, then the raw little-endian tensor bytes in header order). Because
all offsets follow from shapes and dtypes, the header is written first and the tensors are streamed after
it, so peak memory is the largest tensor rather than the whole part. torch-format parts need the part's
dict in memory (``torch.save``), so their peak is the largest part.
"""
from __future__ import annotations

import json
import struct
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .integrity import CheckpointError, atomic_open, format_size
from .source import ST_DTYPES, TensorRef


@dataclass
class Entry:
    """A stored item of a part: the whole of ``ref`` or the flat element range [start, stop) of it."""
    key: str
    ref: TensorRef
    start: Optional[int] = None
    stop: Optional[int] = None

    @property
    def shape(self) -> tuple:
        return (self.stop - self.start,) if self.start is not None else tuple(self.ref.shape)

    @property
    def nbytes(self) -> int:
        if self.start is None:
            return self.ref.nbytes
        return (self.stop - self.start) * self.ref.dtype.itemsize

    def load(self) -> torch.Tensor:
        t = self.ref.load()
        if tuple(t.shape) != tuple(self.ref.shape) or t.dtype != self.ref.dtype:
            raise CheckpointError(f"tensor {self.ref.name!r}: loaded {tuple(t.shape)} {t.dtype}, expected "
                                  f"{tuple(self.ref.shape)} {self.ref.dtype}")
        if self.start is not None:
            t = t.reshape(-1)[self.start:self.stop]
        return t.contiguous()


@dataclass
class FileRecord:
    file: str
    size: int
    sha256: str
    num_tensors: int


class Progress:
    """Byte progress with throughput (tqdm on a terminal, one summary line otherwise)."""

    def __init__(self, total: int, desc: str, enabled: bool = True, release=None, release_every: int = 256 << 20):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.done = 0
        # ``release``: drops memory-mapped input pages from RSS every ``release_every`` bytes written
        self.release, self.release_every, self._since = release, release_every, 0
        self.t0 = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000,
                            file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        self._since += n
        if self.release is not None and self._since >= self.release_every:
            self.release()
            self._since = 0
        if self.bar is not None:
            self.bar.update(n)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    @property
    def rate(self) -> float:
        return self.done / max(self.seconds, 1e-9)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            print(f"{self.desc}: {format_size(self.done)} in {self.seconds:.1f} s ({self.rate / 1e9:.2f} GB/s)",
                  file=sys.stderr)


def _as_bytes(t: torch.Tensor):
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy()


def safetensors_header(entries: list[Entry], metadata: Optional[dict] = None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for e in entries:
        if e.ref.dtype not in ST_DTYPES:
            raise CheckpointError(f"tensor {e.key!r}: dtype {e.ref.dtype} cannot be stored in safetensors")
        header[e.key] = {"dtype": ST_DTYPES[e.ref.dtype], "shape": list(e.shape), "data_offsets": [off, off + e.nbytes]}
        off += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def safetensors_overhead(keys: list[str], metadata: Optional[dict] = None) -> int:
    """An upper bound of the header size for these keys (offsets/shapes counted at their longest)."""
    meta = len(json.dumps({str(k): str(v) for k, v in (metadata or {}).items()})) + 32
    return 16 + meta + sum(len(json.dumps(k)) + 120 for k in keys)


def write_safetensors(path, entries: list[Entry], metadata: Optional[dict] = None,
                      progress: Optional[Progress] = None) -> FileRecord:
    header = safetensors_header(entries, metadata)
    with atomic_open(path) as w:
        w.write(header)
        for e in entries:
            t = e.load()
            if tuple(t.shape) != tuple(e.shape):
                raise CheckpointError(f"tensor {e.key!r}: shape {tuple(t.shape)} != header {e.shape}")
            w.write(_as_bytes(t))
            if progress is not None:
                progress.update(e.nbytes)
            del t
        size, digest = w.size, w.hexdigest()
    return FileRecord(str(path), size, digest, len(entries))


def torch_overhead(keys: list[str]) -> int:
    """An upper bound of torch.save's zip/pickle overhead for these keys."""
    # measured: ~1.6 KB per file plus ~250 B + the key per tensor (zip entries, pickle, 64-byte alignment)
    return 2048 + sum(2 * len(k) + 320 for k in keys)


def write_torch(path, entries: list[Entry], wrap: Optional[str] = None,
                progress: Optional[Progress] = None, aliases: Optional[dict] = None,
                order: Optional[list[str]] = None) -> FileRecord:
    """``torch.save`` of ``{key: tensor}`` (or ``{wrap: {...}}``, AF1's ``model_state_dict``); ``aliases``
    (alias -> stored key in this part) are saved as the same tensor, so torch stores them once.
    ``order``: the key order of the saved dict (default: entries, then aliases)."""
    loaded = {}
    for e in entries:
        t = e.load()
        if t.untyped_storage().nbytes() != t.nbytes:
            t = t.clone()  # torch.save writes whole storages: never drag a larger one (slices, views) along
        loaded[e.key] = t
        if progress is not None:
            progress.update(e.nbytes)
    for alias, target in (aliases or {}).items():
        loaded[alias] = loaded[target]
    sd = {k: loaded[k] for k in order} if order is not None else loaded
    if len(sd) != len(loaded):
        raise CheckpointError(f"{path}: internal error: key order does not cover the part's keys")
    obj = {wrap: sd} if wrap else sd
    with atomic_open(path) as w:
        torch.save(obj, w)
        size, digest = w.size, w.hexdigest()
    return FileRecord(str(path), size, digest, len(entries))
