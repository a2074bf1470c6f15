"""Split a state dict into parts no larger than a size limit, with an index (keys -> part, sizes, sha256).

Parts hold disjoint key subsets in the source's key order; a tensor is never cut unless it alone exceeds
the limit, in which case it is stored as flat slices (each in its own part) recorded in the index and
reassembled on load. Layouts:

* ``safetensors`` (default): ``model-00001-of-0000N.safetensors`` + ``model.safetensors.index.json``
  (Hugging Face's index format; our additions live under ``metadata``). Tied weights are stored once.
* ``torch``: the same with ``pytorch_model-0000i-of-0000N.bin`` + ``pytorch_model.bin.index.json``.
* ``af1``: AF1's release layout ``<name>_part<i>.pt`` (i from 1), each ``{'model_state_dict': {...}}``,
  merged by plain dict update; every key (aliases included) is present in a part, aliases sit in their
  target's part so torch stores the tensor once. The index ``<name>.index.json`` is an extra that AF1's
  code ignores and that ``merge`` uses to verify hashes.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megaflamingo.io import atomic_write_text

from .integrity import CheckpointError, format_size
from .source import ST_DTYPES, TensorSource
from .streaming import (Entry, FileRecord, Progress, safetensors_overhead, torch_overhead, write_safetensors,
                        write_torch)

INDEX_FORMAT = "megaflamingo-checkpoint/1"
LAYOUTS = ("safetensors", "torch", "af1")
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"


def slice_key(key: str, i: int, n: int) -> str:
    return f"{key}@@slice{i:05d}of{n:05d}"


def index_name(layout: str, name: str = "model") -> str:
    return {"safetensors": SAFETENSORS_INDEX, "torch": TORCH_INDEX}.get(layout) or f"{name}.index.json"


@dataclass
class Part:
    entries: list[Entry] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)  # af1 layout: alias -> stored key in this part
    order: list[str] = field(default_factory=list)  # af1 layout: dict key order
    est: int = 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def _overhead(layout: str, keys: list[str]) -> int:
    return torch_overhead(keys) if layout in ("torch", "af1") else safetensors_overhead(keys, {"format": "pt"})


def plan_parts(source: TensorSource, max_size: Optional[int], layout: str = "safetensors",
               log=print, slice_oversized: bool = True) -> tuple[list[Part], dict]:
    """Greedy packing in key order. Returns (parts, sliced) where sliced = {key: [piece keys]}.
    A tensor larger than ``max_size`` alone is sliced, or (``slice_oversized=False``: the Hugging Face
    layout, whose readers cannot join slices) stored whole in a part of its own."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (choose from {', '.join(LAYOUTS)})")
    if layout != "af1":
        for r in source.refs:
            if r.dtype not in ST_DTYPES and layout == "safetensors":
                raise CheckpointError(f"{source.description}: {r.name!r} has dtype {r.dtype}, not storable in safetensors")
    aliases_of: dict[str, list[str]] = {}
    if layout == "af1":
        for a, t in source.ties.items():
            aliases_of.setdefault(t, []).append(a)
    key_pos = {k: i for i, k in enumerate(_original_order(source))}
    parts: list[Part] = [Part()]
    sliced: dict[str, list[str]] = {}
    for ref in source.refs:
        group_keys = [ref.name] + aliases_of.get(ref.name, [])
        cost = ref.nbytes + _overhead(layout, group_keys) - _overhead(layout, [])
        cur = parts[-1]
        limit = max_size if max_size is not None else None
        oversized = limit is not None and ref.nbytes + _overhead(layout, group_keys) > limit
        if oversized and not slice_oversized:
            log(f"note: tensor {ref.name!r} ({format_size(ref.nbytes)}) alone exceeds the shard size "
                f"{format_size(limit)}: stored whole in a shard of its own")
            p = Part([Entry(ref.name, ref)], dict.fromkeys(aliases_of.get(ref.name, []), ref.name))
            p.est = ref.nbytes + _overhead(layout, group_keys)
            if not parts[-1].entries:
                parts[-1] = p
            else:
                parts.append(p)
            parts.append(Part())
            continue
        if oversized:
            if layout == "af1":
                raise CheckpointError(
                    f"tensor {ref.name!r} ({format_size(ref.nbytes)} + file overhead) alone exceeds --max-size "
                    f"{format_size(limit)}; AF1's layout cannot hold a sliced tensor (use the safetensors layout "
                    "or a larger --max-size)")
            per = (limit - _overhead(layout, [slice_key(ref.name, 0, 1)])) // ref.dtype.itemsize
            if per <= 0:
                raise CheckpointError(f"--max-size {limit} B is too small to hold even one element of {ref.name!r}")
            n = -(-ref.numel // per)
            log(f"note: tensor {ref.name!r} ({format_size(ref.nbytes)}) alone exceeds the part limit "
                f"{format_size(limit)}: stored as {n} slices, reassembled on load")
            keys = []
            for i in range(n):
                k = slice_key(ref.name, i, n)
                keys.append(k)
                p = Part([Entry(k, ref, i * per, min((i + 1) * per, ref.numel))])
                p.est = p.nbytes + _overhead(layout, [k])
                if not parts[-1].entries:
                    parts[-1] = p
                else:
                    parts.append(p)
            parts.append(Part())
            sliced[ref.name] = keys
            continue
        if limit is not None and cur.entries and cur.est + cost > limit:
            cur = Part()
            parts.append(cur)
        if not cur.entries:
            cur.est = _overhead(layout, [])
        cur.entries.append(Entry(ref.name, ref))
        for a in aliases_of.get(ref.name, []):
            cur.aliases[a] = ref.name
        cur.est += cost
    parts = [p for p in parts if p.entries]
    if layout == "af1":
        for p in parts:
            p.order = sorted([e.key for e in p.entries] + list(p.aliases), key=lambda k: key_pos.get(k, 0))
    return parts, sliced


def _original_order(source: TensorSource) -> list[str]:
    order = source.meta.get("key_order")
    return list(order) if order else source.keys()


def part_file_name(layout: str, i: int, n: int, name: str = "model") -> str:
    if layout == "safetensors":
        return f"{name}-{i + 1:05d}-of-{n:05d}.safetensors"
    if layout == "torch":
        return f"pytorch_{name}-{i + 1:05d}-of-{n:05d}.bin"
    return f"{name}_part{i + 1}.pt"


def write_sharded(source: TensorSource, out_dir, max_size: Optional[int] = None, layout: str = "safetensors",
                  name: str = "model", progress: bool = True, extra_metadata: Optional[dict] = None,
                  log=None, slice_oversized: bool = True) -> dict:
    """Write ``source`` as parts + index into ``out_dir``; returns the index dict.

    Each part is renamed into place when complete; the index is written last, so a directory without
    an index is an interrupted write (nothing to verify it against)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    out = Path(out_dir)
    parts, sliced = plan_parts(source, max_size, layout, log, slice_oversized)
    out.mkdir(parents=True, exist_ok=True)
    n = len(parts)
    prog = Progress(source.total_bytes, f"writing {n} part(s) to {out}", enabled=progress, release=source.release)
    records: list[FileRecord] = []
    weight_map: dict[str, str] = {}
    for i, part in enumerate(parts):
        fname = part_file_name(layout, i, n, name)
        path = out / fname
        if layout == "safetensors":
            rec = write_safetensors(path, part.entries, {"format": "pt"}, prog)
        else:
            rec = write_torch(path, part.entries, wrap="model_state_dict" if layout == "af1" else None,
                              progress=prog, aliases=part.aliases, order=part.order or None)
        if max_size is not None and rec.size > max_size and (slice_oversized or len(part.entries) > 1):
            raise CheckpointError(f"{path}: {rec.size} B exceeds --max-size {max_size} B (overhead estimate too low)")
        rec.file = fname
        records.append(rec)
        for k in part.order or [e.key for e in part.entries]:
            weight_map[k] = fname
        source.release()
    prog.close()
    ties = {} if layout == "af1" else dict(source.ties)
    meta = {
        "total_size": source.total_bytes,
        "format": INDEX_FORMAT,
        "layout": layout,
        "max_size": max_size,
        "tied_weights": ties,
        "sliced": {k: {"shape": list(source.ref(k).shape), "dtype": str(source.ref(k).dtype).replace("torch.", ""),
                       "pieces": v} for k, v in sliced.items()},
        "files": {r.file: {"size": r.size, "sha256": r.sha256, "num_tensors": r.num_tensors} for r in records},
    }
    meta.update(extra_metadata or {})
    index = {"metadata": meta, "weight_map": weight_map}
    atomic_write_text(out / index_name(layout, name), json.dumps(index, indent=2) + "\n")
    return index
