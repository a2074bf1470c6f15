"""Open any checkpoint we produce or accept as a lazy TensorSource, verifying it on the way.

Accepted: a directory with one of our indexes (safetensors / torch / AF1 parts layout), a DeepSpeed ZeRO
checkpoint directory (consolidated on the fly), a directory of AF1 parts without an index, a single ``.safetensors`` / ``.pt`` / ``.bin`` file, or a list of AF1 part
files. ``load_state_dict`` materialises it with tied weights re-tied (the same tensor object).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .integrity import CheckpointError, verify_file
from .source import TensorRef, TensorSource, concat_sources, from_safetensors_file, from_torch_file
from .split import INDEX_FORMAT, SAFETENSORS_INDEX, TORCH_INDEX
from .streaming import Progress

PathLike = Union[str, os.PathLike]


def find_index(d: Path) -> Optional[Path]:
    for name in (SAFETENSORS_INDEX, TORCH_INDEX):
        if (d / name).is_file():
            return d / name
    others = sorted(p for p in d.glob("*.index.json"))
    return others[0] if len(others) == 1 else None


def read_index(path: PathLike) -> dict:
    p = Path(path)
    try:
        index = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: unreadable index ({e})") from e
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise CheckpointError(f"{p}: not a checkpoint index (no 'weight_map')")
    return index


def open_index_dir(index_path: PathLike, verify: bool = True, trust: bool = False,
                   progress: bool = False) -> TensorSource:
    """Open the parts listed by an index, after checking every part exists with the recorded size and
    sha256 (``verify``); keys in the files must be exactly those the index assigns to them."""
    index_path = Path(index_path)
    d = index_path.parent
    index = read_index(index_path)
    meta = index.get("metadata") or {}
    weight_map: dict = index["weight_map"]
    files_meta: dict = meta.get("files") or {}
    files = list(dict.fromkeys(weight_map.values()))
    for f in files_meta:
        if f not in files:
            files.append(f)
    ours = meta.get("format") == INDEX_FORMAT
    if verify and not ours:
        verify = False  # a foreign (e.g. Hugging Face) index records no hashes
    if verify:
        total = sum(int(files_meta.get(f, {}).get("size", 0)) for f in files)
        prog = Progress(total, f"verifying {len(files)} part(s) in {d}", enabled=progress)
        for f in files:
            if f not in files_meta:
                raise CheckpointError(f"{index_path}: part {f} has no recorded size/sha256")
            verify_file(d / f, files_meta[f].get("size"), files_meta[f].get("sha256"), prog.update)
        prog.close()
    else:
        for f in files:
            if not (d / f).is_file():
                raise CheckpointError(f"missing checkpoint part: {d / f} (listed in {index_path.name})")
    sources = []
    for f in files:
        src = open_file(d / f, trust=trust)
        expected = {k for k, v in weight_map.items() if v == f}
        got = set(src.keys())
        if got != expected:
            extra, missing = sorted(got - expected), sorted(expected - got)
            raise CheckpointError(f"{d / f}: keys disagree with {index_path.name}: "
                                  f"missing {missing[:5]}, not in index {extra[:5]}")
        sources.append(src)
    src = concat_sources(sources, str(d))
    # reassemble tensors stored as slices
    sliced = meta.get("sliced") or {}
    if sliced:
        refs = {r.name: r for r in src.refs}
        new_refs, consumed = [], set()
        for key, info in sliced.items():
            pieces = [refs[p] for p in info["pieces"] if p in refs]
            if len(pieces) != len(info["pieces"]):
                raise CheckpointError(f"{d}: slices of {key!r} are missing")
            consumed.update(info["pieces"])
            new_refs.append(_joined_ref(key, tuple(info["shape"]), pieces))
        src = TensorSource([r for r in src.refs if r.name not in consumed] + new_refs, src.ties, str(d),
                           {}, src.mapped)
    ties = dict(meta.get("tied_weights") or {})
    ties.update(src.ties)
    out = TensorSource(src.refs, ties, str(d), {"index": meta, "layout": meta.get("layout")}, src.mapped)
    out.meta["key_order"] = list(weight_map)
    return out


def _joined_ref(key: str, shape: tuple, pieces: list[TensorRef]) -> TensorRef:
    dtype = pieces[0].dtype
    numel = sum(p.numel for p in pieces)
    expect = 1
    for s in shape:
        expect *= s
    if numel != expect:
        raise CheckpointError(f"slices of {key!r} hold {numel} elements, its shape {shape} needs {expect}")

    def load():
        return torch.cat([p.load().reshape(-1) for p in pieces]).view(shape)
    return TensorRef(key, shape, dtype, load)


def open_file(path: PathLike, trust: bool = False) -> TensorSource:
    p = Path(path)
    if p.suffix == ".safetensors":
        return from_safetensors_file(p)
    return from_torch_file(p, trust=trust)


def open_checkpoint(path: Union[PathLike, Sequence[PathLike]], verify: bool = True, trust: bool = False,
                    progress: bool = False) -> TensorSource:
    """Dispatch on what ``path`` is (see the module docstring)."""
    from . import af1_io

    if isinstance(path, (list, tuple)):
        if len(path) == 1:
            return open_checkpoint(path[0], verify, trust, progress)
        return af1_io.open_af1(path, trust=trust, verify=verify)
    p = Path(path)
    if p.is_dir():
        idx = find_index(p)
        if idx is not None:
            return open_index_dir(idx, verify=verify, trust=trust, progress=progress)
        from .consolidate import is_zero_checkpoint, zero_source

        if is_zero_checkpoint(p):  # a DeepSpeed checkpoint: consolidated on the fly (fp32, frozen included)
            return zero_source(p, trust=trust, verify=verify)
        if af1_io.find_parts(p):
            return af1_io.open_af1(p, trust=trust, verify=verify)
        single = sorted(p.glob("*.safetensors"))
        if len(single) == 1:
            return from_safetensors_file(single[0])
        raise CheckpointError(f"{p}: no checkpoint index, AF1 parts or single safetensors file found")
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if af1_io.PART_RE.match(p.name):
        return af1_io.open_af1(p, trust=trust, verify=verify)
    return open_file(p, trust=trust)


def load_state_dict(path: Union[PathLike, Sequence[PathLike]], verify: bool = True,
                    trust: bool = False) -> dict[str, torch.Tensor]:
    """The full state dict of a checkpoint, tied weights re-tied (alias and target are the same tensor)."""
    return open_checkpoint(path, verify=verify, trust=trust).materialize()
