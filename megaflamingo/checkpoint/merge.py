"""Merge parts (ours or AF1's) back into one file, verifying every part's size and sha256 first."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Union

from .af1_io import STATE_KEY
from .integrity import CheckpointError
from .load import open_checkpoint
from .source import TIES_METADATA_KEY
from .split import write_sharded
from .streaming import Entry, FileRecord, Progress, write_safetensors, write_torch


def merge(inputs: Union[str, Path, Sequence], out: Union[str, Path], af1: Optional[bool] = None,
          verify: bool = True, trust: bool = False, progress: bool = True) -> dict:
    """``out`` ending in ``.safetensors``: one safetensors file (ties in its metadata); ``.pt``/``.bin``/``.pth``:
    one torch file, wrapped as ``{'model_state_dict': ...}`` when the input is AF1's layout (or ``af1=True``);
    anything else: a directory with a single-part index."""
    src = open_checkpoint(list(inputs) if isinstance(inputs, (list, tuple)) else inputs,
                          verify=verify, trust=trust, progress=progress)
    out = Path(out)
    if out.exists() and out.is_dir() and out.suffix in (".pt", ".bin", ".pth", ".safetensors"):
        raise CheckpointError(f"{out} is a directory")
    prog = Progress(src.total_bytes, f"merging into {out}", enabled=progress, release=src.release)
    if out.suffix == ".safetensors":
        meta = {"format": "pt"}
        if src.ties:
            meta[TIES_METADATA_KEY] = json.dumps(src.ties, sort_keys=True)
        rec = write_safetensors(out, [Entry(r.name, r) for r in src.refs], meta, prog)
    elif out.suffix in (".pt", ".bin", ".pth"):
        wrap = af1 if af1 is not None else (src.meta.get("layout") == "af1" or src.meta.get("wrapper") == STATE_KEY)
        order = src.meta.get("key_order") or src.keys()
        order = [k for k in order if k in src]
        rec = write_torch(out, [Entry(r.name, r) for r in src.refs], wrap=STATE_KEY if wrap else None,
                          progress=prog, aliases=dict(src.ties), order=order)
    else:
        prog.enabled = False
        index = write_sharded(src, out, None, "safetensors", progress=progress)
        f, m = next(iter(index["metadata"]["files"].items()))
        rec = FileRecord(str(out / f), m["size"], m["sha256"], m["num_tensors"])
    prog.close()
    src.release()
    return {"file": str(rec.file), "size": rec.size, "sha256": rec.sha256, "tensors": len(src.refs),
            "tied": len(src.ties)}
