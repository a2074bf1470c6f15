"""Lazy state dicts: a list of tensor references that are loaded one at a time, plus weight ties.

Every converter reads through a ``TensorSource`` and writes through the streaming writers, so only the
tensor (or the part) being written is resident. ``ties`` maps an alias key to the stored key it shares
its tensor with (a tied embedding, AF1's duplicate module aliases): the tensor is stored once and the
alias is recreated on load.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from .integrity import CheckpointError, check_tensor_dict
from .safe_load import torch_load

# safetensors dtype names (the format's spec) <-> torch dtypes
ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        ST_DTYPES[getattr(torch, _name)] = _code
ST_TO_TORCH = {v: k for k, v in ST_DTYPES.items()}

TIES_METADATA_KEY = "megaflamingo.tied_weights"


@dataclass
class TensorRef:
    """One stored tensor: its name, shape, dtype and a loader returning a contiguous CPU tensor."""
    name: str
    shape: tuple
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass
class TensorSource:
    refs: list[TensorRef]
    ties: dict[str, str] = field(default_factory=dict)  # alias -> stored key
    description: str = ""
    meta: dict = field(default_factory=dict)
    # memory-mapped tensors backing the refs; their pages are dropped from RSS after each written part
    mapped: list = field(default_factory=list)

    def __post_init__(self):
        names = [r.name for r in self.refs]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise CheckpointError(f"{self.description}: duplicate keys {dup[:5]}")
        self._by_name = {r.name: r for r in self.refs}
        for alias, target in list(self.ties.items()):
            if target not in self._by_name:
                raise CheckpointError(f"{self.description}: tied weight {alias!r} points to {target!r}, "
                                      "which is not stored")
            if alias in self._by_name:
                raise CheckpointError(f"{self.description}: {alias!r} is both stored and tied to {target!r}")

    # ------------------------------------------------------------------ views
    def keys(self) -> list[str]:
        """All keys (stored and tied), stored order first."""
        return [r.name for r in self.refs] + list(self.ties)

    def __contains__(self, key: str) -> bool:
        return key in self._by_name or key in self.ties

    def ref(self, key: str) -> TensorRef:
        key = self.ties.get(key, key)
        try:
            return self._by_name[key]
        except KeyError:
            raise CheckpointError(f"{self.description}: no tensor named {key!r}") from None

    @property
    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self.refs)

    def materialize(self) -> dict[str, torch.Tensor]:
        """Load everything (ties re-created as the same tensor object)."""
        sd = {r.name: r.load() for r in self.refs}
        for alias, target in self.ties.items():
            sd[alias] = sd[target]
        return sd

    def select(self, keep: Callable[[str], bool], description: Optional[str] = None) -> "TensorSource":
        """Keys for which ``keep(key)`` is true. A kept alias whose target is dropped becomes stored."""
        refs = [r for r in self.refs if keep(r.name)]
        kept = {r.name for r in refs}
        ties = {}
        for alias, target in self.ties.items():
            if not keep(alias):
                continue
            if target in kept:
                ties[alias] = target
            else:
                t = self._by_name[target]
                refs.append(TensorRef(alias, t.shape, t.dtype, t.load))
                kept.add(alias)
        return TensorSource(refs, ties, description or self.description, dict(self.meta), self.mapped)

    def rename(self, fn: Callable[[str], str]) -> "TensorSource":
        refs = [TensorRef(fn(r.name), r.shape, r.dtype, r.load) for r in self.refs]
        ties = {fn(a): fn(t) for a, t in self.ties.items()}
        return TensorSource(refs, ties, self.description, dict(self.meta), self.mapped)

    def release(self) -> None:
        """Drop the pages of memory-mapped inputs from this process's RSS (they stay in the page cache)."""
        for t in self.mapped:
            madvise_dontneed(t)


# ---------------------------------------------------------------------------------------------- helpers

def _loader(t: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: t.contiguous()


def _storage_key(t: torch.Tensor):
    if t.device.type == "meta" or t.numel() == 0:
        return None
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def from_state_dict(sd: dict, description: str = "state dict", detect_ties: bool = True,
                    mapped: bool = False) -> TensorSource:
    """Wrap an in-memory (or memory-mapped) ``{key: tensor}``; keys that are views of the very same storage
    (tied weights, aliases registered twice) become ties to the first key."""
    check_tensor_dict(sd, description)
    refs, ties, seen = [], {}, {}
    for k, v in sd.items():
        sk = _storage_key(v) if detect_ties else None
        if sk is not None and sk in seen:
            ties[k] = seen[sk]
            continue
        if sk is not None:
            seen[sk] = k
        refs.append(TensorRef(k, tuple(v.shape), v.dtype, _loader(v)))
    backing = []
    if mapped:
        storages = {}
        for v in sd.values():
            if v.numel():
                storages.setdefault(v.untyped_storage().data_ptr(), v)
        backing = list(storages.values())
    return TensorSource(refs, ties, description, {}, backing)


def from_torch_file(path, trust: bool = False, unwrap: tuple = ("model_state_dict", "state_dict", "module"),
                    detect_ties: bool = True) -> TensorSource:
    """A torch file holding ``{key: tensor}`` or such a dict under one of ``unwrap`` (AF1: model_state_dict)."""
    obj = torch_load(path, trust=trust)
    wrapper = None
    if isinstance(obj, dict):
        for w in unwrap:
            if w in obj and isinstance(obj[w], dict):
                wrapper, obj = w, obj[w]
                break
    src = from_state_dict(obj, str(path), detect_ties=detect_ties, mapped=True)
    src.meta["wrapper"] = wrapper
    return src


def from_safetensors_file(path) -> TensorSource:
    """A safetensors file, read with plain positioned reads (not mmap): loading a tensor costs exactly its
    bytes of anonymous memory and nothing stays resident after it is written out. The header is validated
    against the file size, so a truncated file fails here, naming it."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"missing checkpoint file: {p}")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{p}: not a readable safetensors file (truncated: {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > (100 << 20):
            raise CheckpointError(f"{p}: not a readable safetensors file (header length {n} for a {size}-byte "
                                  "file: truncated or corrupted)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{p}: corrupted safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{p}: corrupted safetensors header")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    items = []
    for k, info in header.items():
        try:
            dtype = ST_TO_TORCH[info["dtype"]]
            shape = tuple(int(x) for x in info["shape"])
            b, e = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{p}: bad header entry for {k!r} ({err!r})") from None
        numel = 1
        for d in shape:
            numel *= d
        if e - b != numel * dtype.itemsize or b < 0:
            raise CheckpointError(f"{p}: header entry {k!r} has {e - b} bytes for shape {shape} {dtype}")
        if base + e > size:
            raise CheckpointError(f"{p}: truncated: tensor {k!r} ends at byte {base + e}, file has {size}")
        items.append((b, TensorRef(k, shape, dtype, _pread_loader(p, base + b, e - b, dtype, shape))))
    items.sort(key=lambda x: x[0])  # file order: sequential reads
    ties = json.loads(meta[TIES_METADATA_KEY]) if TIES_METADATA_KEY in meta else {}
    return TensorSource([r for _, r in items], ties, str(p), {"safetensors_metadata": meta})


def _pread_loader(p: Path, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple):
    def load() -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            mv = memoryview(buf.numpy())
            with open(p, "rb", buffering=0) as f:
                f.seek(offset)
                got = 0
                while got < nbytes:
                    r = f.readinto(mv[got:])
                    if not r:
                        raise CheckpointError(f"{p}: truncated while reading a tensor at byte {offset + got}")
                    got += r
        return buf.view(dtype).reshape(shape)
    return load


def concat_sources(sources: Iterable[TensorSource], description: str) -> TensorSource:
    refs, ties, mapped = [], {}, []
    owner = {}
    for s in sources:
        for r in s.refs:
            if r.name in owner:
                raise CheckpointError(f"{description}: key {r.name!r} appears in both {owner[r.name]} and "
                                      f"{s.description}")
            owner[r.name] = s.description
            refs.append(r)
        ties.update(s.ties)
        mapped += s.mapped
    return TensorSource(refs, ties, description, {}, mapped)


# ---------------------------------------------------------------------------------------------- RSS control

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_libc = None


def madvise_dontneed(t: torch.Tensor) -> None:
    """Tell the kernel we no longer need the resident pages of a *file-backed, read-only* mapping.

    Clean private file pages are simply re-read from the page cache if touched again, so this is safe for
    the memory-mapped checkpoint inputs we never write to; it keeps RSS bounded while streaming."""
    global _libc
    if os.name != "posix" or t.numel() == 0:
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    st = t.untyped_storage()
    start = st.data_ptr()
    end = start + st.nbytes()
    a0 = (start + _PAGE - 1) // _PAGE * _PAGE  # only whole pages inside the storage
    a1 = end // _PAGE * _PAGE
    # MADV_DONTNEED on anonymous memory would zero it: only ever touch ranges backed by a regular file.
    if a1 > a0 and _file_backed(a0, a1):
        _libc.madvise(ctypes.c_void_p(a0), ctypes.c_size_t(a1 - a0), _MADV_DONTNEED)


_MAPS: list = []


def _read_maps() -> list:
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            path = parts[5].strip() if len(parts) > 5 else ""
            out.append((lo, hi, path))
    return out


def _file_backed(a0: int, a1: int) -> bool:
    global _MAPS
    for attempt in range(2):
        for lo, hi, path in _MAPS:
            if lo <= a0 < hi:
                # the whole range must sit in this one mapping of a regular file
                if a1 <= hi and path.startswith("/") and os.path.isfile(path.replace(" (deleted)", "")):
                    return True
                break
        if attempt == 0:
            try:
                _MAPS = _read_maps()  # mappings change as files are opened: refresh once on a miss
            except OSError:
                return False
    return False
