"""ZeRO-1/2/3 checkpoint -> consolidated fp32 weights, on top of DeepSpeed's own ``zero_to_fp32`` code.

What we add around DeepSpeed's reconstruction (``deepspeed.utils.zero_to_fp32``):

* files are opened with ``weights_only=True`` (only DeepSpeed's plain metadata classes allow-listed) and
  memory-mapped, so nothing is read until a tensor is written;
* ZeRO-3 trainable parameters stay DeepSpeed's lazy ``GatheredTensor``s and frozen parameters are gathered
  lazily too (DeepSpeed concatenates all frozen fragments up front), so with the streaming safetensors
  writer the peak memory is about one tensor, not the model;
* tied parameters (DeepSpeed's ``shared_params``) are stored once and recorded as ties, because
  safetensors refuses shared tensors (``zero_to_fp32 --safe_serialization`` fails on them);
* keys come out in the model's own order, with the trainable / frozen split kept for trainable-only exports.

ZeRO-1/2 reconstruction is DeepSpeed's as is: it concatenates each parameter group's partitions, so its
peak memory is the trainable parameters (frozen ones stay lazy).
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
from pathlib import Path
from typing import Optional, Union

import torch

from .integrity import CheckpointError
from .safe_load import torch_load
from .tag_manifest import verify_saved_tag
from .source import TensorRef, TensorSource, madvise_dontneed
from .split import write_sharded

log = logging.getLogger("megaflamingo.checkpoint")
PathLike = Union[str, os.PathLike]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _has_model_states(d: Path) -> bool:
    return d.is_dir() and any(d.glob("*_model_states.pt"))


def is_zero_checkpoint(path: PathLike) -> bool:
    p = zero_checkpoint_dir(path)
    return p.is_dir() and ((p / "latest").is_file() or _has_model_states(p)
                           or any(_has_model_states(c) for c in p.iterdir() if c.is_dir()))


def zero_checkpoint_dir(path: PathLike) -> Path:
    """A training run directory means its ``checkpoints/`` folder; anything else is itself."""
    p = Path(path)
    if p.is_dir() and not (p / "latest").is_file() and not _has_model_states(p) and (p / "checkpoints").is_dir():
        return p / "checkpoints"
    return p


def resolve_tag_dir(ckpt_dir: PathLike, tag: Optional[str] = None) -> Path:
    """The directory holding the rank files: ``ckpt_dir/tag``, ``ckpt_dir/<latest>``, or ``ckpt_dir`` itself
    (a run directory: its ``checkpoints/``)."""
    d = zero_checkpoint_dir(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"DeepSpeed checkpoint directory not found: {d}")
    if tag is None:
        if (d / "latest").is_file():
            tag = (d / "latest").read_text().strip()
        elif _has_model_states(d):
            return d
        else:
            tags = sorted(c.name for c in d.iterdir() if _has_model_states(c))
            if len(tags) != 1:
                raise CheckpointError(f"{d}: no 'latest' file; choose a tag with --tag "
                                      f"(found: {', '.join(tags) or 'none'})")
            tag = tags[0]
    t = d / tag
    if not _has_model_states(t):
        raise CheckpointError(f"{t}: no *_model_states.pt files (tag {tag!r} not saved or incomplete)")
    return t


def _quiet():
    # DeepSpeed's reconstruction prints per-call chatter and a tqdm bar; keep our own progress output clean.
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


def _load_model_states(files: list[Path], trust: bool):
    from deepspeed.checkpoint import constants as C
    from deepspeed.utils import zero_to_fp32 as z

    states, module_keys = [], None
    for f in files:
        sd = torch_load(f, trust=trust)
        if hasattr(z, "_raise_if_autoep_zero3_partitioned_state"):
            z._raise_if_autoep_zero3_partitioned_state(sd)
        if not isinstance(sd, dict) or C.BUFFER_NAMES not in sd:
            raise CheckpointError(f"{f}: not a DeepSpeed model-states file (no {C.BUFFER_NAMES!r})")
        if module_keys is None:
            module_keys = list(sd.get("module", {}).keys())
        buffer_names = sd[C.BUFFER_NAMES]
        buffers = {k: v.float() if v.is_floating_point() else v for k, v in sd["module"].items() if k in buffer_names}
        states.append(z.zero_model_state(
            buffers=buffers, param_shapes=sd[C.PARAM_SHAPES],
            shared_params=[[k, v] for k, v in sd.get("shared_params", {}).items()],
            ds_version=sd.get(C.DS_VERSION), frozen_param_shapes=sd.get(C.FROZEN_PARAM_SHAPES),
            frozen_param_fragments=sd.get(C.FROZEN_PARAM_FRAGMENTS)))
    return states, module_keys or []


def _load_optim_states(files: list[Path], tag_dir: Path, trust: bool):
    from deepspeed.checkpoint import constants as C

    sds = []
    for f in files:
        sd = torch_load(f, trust=trust)
        osd = sd.get(C.OPTIMIZER_STATE_DICT) if isinstance(sd, dict) else None
        if not isinstance(osd, dict) or C.ZERO_STAGE not in osd:
            raise CheckpointError(f"{f}: not a ZeRO optimizer-states file")
        osd.pop("optimizer_state_dict", None)  # Adam moments: not needed for weights
        sds.append(osd)
    stage = int(sds[0][C.ZERO_STAGE])
    world = sds[0][C.PARTITION_COUNT]
    world = max(world) if isinstance(world, list) else int(world)
    if world != len(files):
        raise CheckpointError(f"{tag_dir}: expected {world} *_optim_states.pt files (one per rank), found "
                              f"{len(files)}: a rank's file is missing or a different save overwrote some")
    key = C.SINGLE_PARTITION_OF_FP32_GROUPS if stage <= 2 else C.FP32_FLAT_GROUPS
    groups = [sd[key] for sd in sds]
    paddings = sds[0].get(getattr(C, "PARAM_ALIGNMENT_PADDINGS", "param_alignment_paddings"))
    return stage, world, groups, paddings


def zero_source(ckpt_dir: PathLike, tag: Optional[str] = None, exclude_frozen: bool = False,
                dtype: Optional[str] = "fp32", trust: bool = False, verify: bool = True) -> TensorSource:
    """A lazy consolidated state dict of a ZeRO checkpoint (see the module docstring). ``verify``: a tag
    written by the trainer is checked against its integrity record first (every file's size and CRC-32,
    and a scan for refused pickles); one without a record is read with a warning."""
    from deepspeed.utils import zero_to_fp32 as z

    tag_dir = resolve_tag_dir(ckpt_dir, tag)
    if verify:
        warning = verify_saved_tag(tag_dir)
        if warning:
            log.warning("%s", warning)
    natural = z.natural_keys
    model_files = sorted(tag_dir.glob("*_model_states.pt"), key=lambda p: natural(p.name))
    optim_files = sorted(tag_dir.glob("*_optim_states.pt"), key=lambda p: natural(p.name))
    if not optim_files:
        raise CheckpointError(f"{tag_dir}: no *_optim_states.pt files (not a ZeRO checkpoint, or incomplete)")
    states, module_keys = _load_model_states(model_files, trust)
    stage, world, groups, paddings = _load_optim_states(optim_files, tag_dir, trust)
    if stage == 3 and len(model_files) != world:
        raise CheckpointError(f"{tag_dir}: ZeRO-3 needs {world} *_model_states.pt files, found {len(model_files)}")

    lazy: dict = dict(states[0].buffers)
    frozen_shapes = states[0].frozen_param_shapes or {}
    with _quiet():
        if stage <= 2:
            kw = {}
            if "param_alignment_paddings" in inspect.signature(z._get_fp32_state_dict_from_zero2_checkpoint).parameters:
                kw["param_alignment_paddings"] = paddings
            full = z._get_fp32_state_dict_from_zero2_checkpoint(world, groups, states, True, **kw)
            lazy.update({k: v for k, v in full.items() if k not in lazy})
            if not exclude_frozen:
                for name in frozen_shapes:
                    lazy[name] = states[0].frozen_param_fragments[name]
        else:
            trainable: dict = {}
            z._zero3_merge_trainable_params(trainable, world, groups, states)
            if not exclude_frozen:
                for name, shape in frozen_shapes.items():
                    lazy[name] = _FrozenZero3(name, shape, states)
            lazy.update(trainable)
    trainable_names = [n for shapes in states[0].param_shapes for n in shapes]
    ties = {}
    for alias, target in states[0].shared_params:
        if alias in lazy and target in lazy and lazy[alias] is lazy[target]:
            del lazy[alias]  # DeepSpeed's ZeRO-2 path already re-added the alias: keep it as a tie instead
        if target in lazy and alias not in lazy:
            ties[alias] = target
    pos = {k: i for i, k in enumerate(module_keys)}
    names = sorted(lazy, key=lambda k: pos.get(k, len(pos)))
    out_dtype = DTYPES[dtype] if dtype else None
    refs = []
    for name in names:
        t = lazy[name]
        src_dtype = t.dtype
        dt = out_dtype if (out_dtype is not None and src_dtype.is_floating_point) else src_dtype
        refs.append(TensorRef(name, tuple(t.shape), dt, _zero_loader(t, dt)))
    mapped = [g for rank in groups for g in rank]
    for s in states:
        mapped += list((s.frozen_param_fragments or {}).values())
    src = TensorSource(refs, ties, str(tag_dir), {}, mapped)
    src.meta.update(zero_stage=stage, world_size=world, trainable=trainable_names, frozen=list(frozen_shapes),
                    buffers=list(states[0].buffers), ds_version=states[0].ds_version, tag=tag_dir.name,
                    key_order=[k for k in module_keys if k in src] or None)
    return src


class _FrozenZero3:
    """Lazily gather a frozen ZeRO-3 parameter from its per-rank fragments (as DeepSpeed does eagerly)."""

    def __init__(self, name, shape, states):
        self.name, self.shape, self.states = name, torch.Size(shape), states
        self.dtype = states[0].frozen_param_fragments[name].dtype

    def contiguous(self) -> torch.Tensor:
        # Copy fragment by fragment and drop each mapped fragment's pages right away: peak memory is the
        # output plus one fragment, not output plus all of them (torch.cat would hold both).
        numel = self.shape.numel()
        out = torch.empty(numel, dtype=self.dtype)
        off = 0
        for s in self.states:
            frag = s.frozen_param_fragments[self.name].reshape(-1)
            n = min(frag.numel(), numel - off)
            if n > 0:
                out[off:off + n].copy_(frag[:n])
                off += n
            madvise_dontneed(frag)
        if off != numel:
            raise CheckpointError(f"frozen parameter {self.name!r}: fragments hold {off} of {numel} elements")
        return out.view(self.shape)


def _zero_loader(t, dtype):
    def load():
        x = t.contiguous()
        return x.to(dtype) if x.dtype != dtype else x.clone() if x.untyped_storage().nbytes() != x.nbytes else x
    return load


def zero_to_fp32(ckpt_dir: PathLike, out_dir: PathLike, tag: Optional[str] = None, exclude_frozen: bool = False,
                 fmt: str = "safetensors", max_shard_size: Optional[int] = None, dtype: str = "fp32",
                 trust: bool = False, progress: bool = True, verify: bool = True) -> dict:
    """Consolidate and write ``out_dir`` (safetensors or torch parts + index, ties recorded). Returns the index."""
    src = zero_source(ckpt_dir, tag, exclude_frozen, dtype, trust, verify)
    layout = {"safetensors": "safetensors", "torch": "torch"}.get(fmt)
    if layout is None:
        raise ValueError(f"--format must be safetensors or torch, got {fmt!r}")
    extra = {"source": {"kind": "deepspeed-zero", "stage": src.meta["zero_stage"], "world_size": src.meta["world_size"],
                        "tag": src.meta["tag"], "ds_version": src.meta["ds_version"], "dtype": dtype,
                        "exclude_frozen": exclude_frozen},
             "frozen_keys": [] if exclude_frozen else src.meta["frozen"]}
    return write_sharded(src, out_dir, max_shard_size, layout, progress=progress, extra_metadata=extra)
