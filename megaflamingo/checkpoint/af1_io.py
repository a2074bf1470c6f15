"""AF1's checkpoint file layout (no key mapping here: that is ``megaflamingo.compat.af1``).

AF1 saves ``{'model_state_dict': {...}}`` (plus, in training checkpoints, optimizer/scheduler state we do
not need) and released its 17.66 GB checkpoints also as 5 parts ``<name>_part<N>.pt``, each
``{'model_state_dict': <disjoint key subset>}``, merged by dict update. Keys may carry DDP/DeepSpeed
``module.`` prefixes; the duplicate module aliases are the same tensors under two names.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence, Union

import torch

from .integrity import CheckpointError, check_tensor_dict, verify_file
from .safe_load import torch_load
from .source import TensorSource, concat_sources, from_state_dict

PART_RE = re.compile(r"^(?P<name>.+)_part(?P<n>\d+)\.(?:pt|pth|bin)$")
STATE_KEY = "model_state_dict"


def find_parts(path: Union[str, Path]) -> list[Path]:
    """The parts of an AF1 split checkpoint, ordered by part number, given its directory or any one part."""
    p = Path(path)
    if p.is_file():
        m = PART_RE.match(p.name)
        if not m:
            return []
        name, d = m.group("name"), p.parent
    elif p.is_dir():
        names = {PART_RE.match(f.name).group("name") for f in p.iterdir() if PART_RE.match(f.name)}
        if not names:
            return []
        if len(names) > 1:
            raise CheckpointError(f"{p}: parts of several checkpoints ({', '.join(sorted(names))}); "
                                  "pass one part file to choose")
        name, d = names.pop(), p
    else:
        raise CheckpointError(f"checkpoint not found: {p}")
    parts = {}
    for f in d.iterdir():
        m = PART_RE.match(f.name)
        if m and m.group("name") == name:
            parts[int(m.group("n"))] = f
    nums = sorted(parts)
    first = nums[0]
    missing = [n for n in range(first, nums[-1] + 1) if n not in parts]
    if missing:
        raise CheckpointError(f"{d}: AF1 checkpoint {name!r} is missing part(s) "
                              + ", ".join(f"{name}_part{n}.pt" for n in missing))
    sidecar = d / f"{name}.index.json"
    if sidecar.is_file():
        import json

        listed = json.loads(sidecar.read_text()).get("metadata", {}).get("files", {})
        absent = [f for f in listed if not (d / f).is_file()]
        if absent:
            raise CheckpointError(f"missing checkpoint part: {d / absent[0]} (listed in {sidecar.name})")
    return [parts[n] for n in nums]


def read_af1_file(path: Union[str, Path], trust: bool = False) -> dict[str, torch.Tensor]:
    """The ``model_state_dict`` of one AF1 file (memory-mapped, weights_only). A bare tensor dict is accepted."""
    obj = torch_load(path, trust=trust)
    if isinstance(obj, dict) and STATE_KEY in obj:
        obj = obj[STATE_KEY]
    return check_tensor_dict(obj, str(path))


def open_af1(path: Union[str, Path, Sequence], trust: bool = False, verify: bool = True) -> TensorSource:
    """One AF1 file, or its parts (a directory, one part, or a list of files), merged by dict update.

    A key present in two parts must hold identical tensors (AF1's parts are disjoint)."""
    if isinstance(path, (list, tuple)):
        files = [Path(p) for p in path]
    else:
        files = find_parts(path) or [Path(path)]
    if verify and len(files) > 1:
        _verify_sidecar(files)
    sources, seen = [], {}
    for f in files:
        sd = read_af1_file(f, trust)
        for k in list(sd):
            if k in seen:
                prev = seen[k]
                if not torch.equal(prev[1], sd[k]):
                    raise CheckpointError(f"{f}: key {k!r} also in {prev[0]} with a different tensor")
                del sd[k]
        for k, v in sd.items():
            seen[k] = (f, v)
        src = from_state_dict(sd, str(f), mapped=True)
        sources.append(src)
    out = concat_sources(sources, str(files[0].parent if len(files) > 1 else files[0]))
    out.meta["key_order"] = list(seen)
    out.meta["layout"] = "af1"
    out.meta["af1_files"] = [str(f) for f in files]
    return out


def _verify_sidecar(files: list[Path]) -> None:
    import json

    m = PART_RE.match(files[0].name)
    if not m:
        return
    sidecar = files[0].parent / f"{m.group('name')}.index.json"
    if not sidecar.is_file():
        return  # AF1's own release has no hashes; loadability is still checked part by part
    listed = json.loads(sidecar.read_text()).get("metadata", {}).get("files", {})
    for f in files:
        rec = listed.get(f.name)
        if rec is None:
            raise CheckpointError(f"{f}: not listed in {sidecar}")
        verify_file(f, rec.get("size"), rec.get("sha256"))


def strip_module_prefix(source: TensorSource) -> TensorSource:
    """``module.x`` -> ``x`` (repeatedly, as DDP/DeepSpeed wrappers nest)."""
    def fn(k: str) -> str:
        while k.startswith("module."):
            k = k[len("module."):]
        return k
    out = source.rename(fn)
    if len(set(out.keys())) != len(source.keys()):
        raise CheckpointError(f"{source.description}: keys collide after stripping 'module.'")
    return out


def write_af1_file(path, source: TensorSource, progress: bool = False) -> None:
    """One merged AF1 file ``{'model_state_dict': {...}}`` (aliases saved as the same tensor)."""
    from .streaming import Entry, Progress, write_torch

    prog = Progress(source.total_bytes, f"writing {path}", enabled=progress)
    order = source.meta.get("key_order") or source.keys()
    write_torch(path, [Entry(r.name, r) for r in source.refs], wrap=STATE_KEY, progress=prog,
                aliases=dict(source.ties), order=[k for k in order if k in source])
    prog.close()
