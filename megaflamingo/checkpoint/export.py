"""Export a checkpoint as a model directory (see :mod:`.model_dir`), and AF1 import/export.

Keys are checked against the model the config builds (on the meta device, so no memory) before
anything is written.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from megaflamingo.model.build import build_from_config, build_model
from megaflamingo.tokens import SpecialTokens

from .consolidate import is_zero_checkpoint, zero_checkpoint_dir, zero_source, zero_to_fp32
from .integrity import CheckpointError, parse_size
from .load import open_checkpoint
from .model_dir import (AF1_EXTRA_DIR, config_tokenizer, copy_model_files, find_config, find_encoder_record,
                        lm_config_dict, load_model_dir, read_config, write_model_config, write_model_dir)
from .source import TensorSource, from_state_dict
from .split import write_sharded

PathLike = Union[str, os.PathLike]
# Always part of a trainable-only export: our new modules.
TRAINABLE_PATTERNS = (r"^audio_transformer\.", r"\.gated_cross_attn_layer\.")


def _optional_tokenizer(cfg, tokenizer_path: Optional[PathLike] = None):
    if tokenizer_path is not None:  # the user's choice: its errors are theirs to see
        from megaflamingo.tokens import build_tokenizer

        return build_tokenizer(cfg.model.tokenizer or cfg.model.lm, path=str(tokenizer_path))
    try:
        return config_tokenizer(cfg)
    except CheckpointError as e:
        print(f"note: tokenizer unavailable ({e}); the export will not contain tokenizer files", file=sys.stderr)
        return None


def expected_shapes(cfg, tokenizer=None) -> dict[str, tuple]:
    """Every state-dict key and shape of the model ``cfg`` builds (on the meta device: no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    lmc = lm_config_dict(cfg.model)
    if lmc is None:
        raise CheckpointError("cannot check keys against the config: its LM config is unavailable")
    lmc = dict(lmc)
    conf = AutoConfig.for_model(lmc.pop("model_type"), **lmc)
    if tokenizer is not None:
        tokens, vocab = SpecialTokens.from_tokenizer(tokenizer), len(tokenizer)
    else:  # keys and shapes do not depend on the ids
        tokens, vocab = SpecialTokens(media=0, eoc=1, sep=2, pad=0, bos=0, eos=0), None
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(conf)
        if vocab and lm.get_input_embeddings().num_embeddings != vocab:  # as model.build.build_lm
            lm.resize_token_embeddings(vocab)
        model = build_model(cfg.model, lm, tokens)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_against(source: TensorSource, expected: dict[str, tuple], full: bool, what: str) -> None:
    """Keys/shapes of ``source`` vs the model: unexpected or mis-shaped keys always fail; missing keys fail
    for a full export."""
    keys = set(source.keys())
    unexpected = sorted(keys - set(expected))
    if unexpected:
        raise CheckpointError(f"{what}: {len(unexpected)} key(s) do not belong to the model built from the "
                              f"config, e.g. {unexpected[:5]}")
    bad = [k for k in keys if tuple(source.ref(k).shape) != tuple(expected[k])]
    if bad:
        k = sorted(bad)[0]
        raise CheckpointError(f"{what}: shape mismatch for {k!r}: checkpoint {tuple(source.ref(k).shape)}, "
                              f"model {tuple(expected[k])} ({len(bad)} mismatching key(s))")
    missing = sorted(set(expected) - keys)
    if missing and full:
        raise CheckpointError(f"{what}: {len(missing)} model key(s) missing from the checkpoint, e.g. {missing[:5]}")


# ------------------------------------------------------------------------------------------ export

def trainable_filter(source: TensorSource, include: Optional[str] = None) -> Callable[[str], bool]:
    """Keys of a trainable-only export: what DeepSpeed recorded as trainable (ZeRO sources), or our new
    modules + ``include`` (regex, e.g. unfrozen LM parts) otherwise; frozen keys recorded by
    zero-to-fp32 are excluded."""
    pats = [re.compile(p) for p in TRAINABLE_PATTERNS] + ([re.compile(include)] if include else [])
    recorded = source.meta.get("trainable")
    recorded = set(recorded) if recorded is not None else None
    frozen = set((source.meta.get("index") or {}).get("frozen_keys") or [])

    def keep(k: str) -> bool:
        if recorded is not None:
            return k in recorded or any(p.search(k) for p in pats)
        return k not in frozen and any(p.search(k) for p in pats)
    return keep


def export(src_path: PathLike, out: PathLike, config: Optional[PathLike] = None, trainable_only: bool = False,
           tag: Optional[str] = None, include: Optional[str] = None, tokenizer_path: Optional[PathLike] = None,
           max_shard_size: Optional[int] = parse_size("5GB"), trust: bool = False, verify: bool = True,
           check_keys: bool = True, progress: bool = True) -> dict:
    """A ZeRO checkpoint dir, a consolidated dir/file or another model dir -> a model dir."""
    src_path = zero_checkpoint_dir(src_path)
    if is_zero_checkpoint(src_path):
        source = zero_source(src_path, tag, exclude_frozen=trainable_only, trust=trust, verify=verify)
    else:
        source = open_checkpoint(src_path, verify=verify, trust=trust, progress=progress)
    cfg_path = Path(config) if config else find_config(src_path)
    if cfg_path is None:
        raise CheckpointError(f"{src_path}: no config found next to the checkpoint; pass --config")
    cfg = read_config(cfg_path)
    tok = _optional_tokenizer(cfg, tokenizer_path)
    if trainable_only:
        source = source.select(trainable_filter(source, include))
        if not source.refs:
            raise CheckpointError(f"{src_path}: no trainable keys found for a trainable-only export")
    if check_keys:
        check_against(source, expected_shapes(cfg, tok), full=not trainable_only, what=str(src_path))
    enc = find_encoder_record(src_path)
    weights = "trainable" if trainable_only else "full"
    index = write_model_dir(out, source, cfg, tok, weights, lm_config_dict(cfg.model), max_shard_size,
                            encoder_record=enc, note={"source": str(src_path)}, progress=progress)
    source.release()
    return index


def consolidate(src_path: PathLike, out: PathLike, tag: Optional[str] = None, exclude_frozen: bool = False,
                fmt: str = "safetensors", max_shard_size: Optional[int] = parse_size("5GB"), dtype: str = "fp32",
                trust: bool = False, progress: bool = True, verify: bool = True) -> dict:
    """``zero-to-fp32``: a ZeRO checkpoint (or the run directory holding it) -> consolidated weights, plus
    the run's config, encoder record and tokenizer beside them when they can be found, so the output is
    a model directory (``megaflamingo-infer --model`` and ``from_pretrained`` read it). Returns the index."""
    ckpt = zero_checkpoint_dir(src_path)
    index = zero_to_fp32(ckpt, out, tag, exclude_frozen, fmt, max_shard_size, dtype, trust, progress, verify)
    cfg_path = find_config(ckpt)
    if cfg_path is None:
        print(f"note: no config next to {ckpt}; {out} holds the weights only (export with --config for a "
              "model directory)", file=sys.stderr)
        return index
    cfg = read_config(cfg_path)
    source = open_checkpoint(out, verify=False, progress=False)
    write_model_config(out, cfg, _optional_tokenizer(cfg), "trainable" if exclude_frozen else "full",
                       lm_config_dict(cfg.model), source, find_encoder_record(ckpt), {"source": str(src_path)})
    source.release()
    return index


def split(src: PathLike, out: PathLike, max_size: int, layout: str = "auto", name: Optional[str] = None,
          verify: bool = True, trust: bool = False, progress: bool = True) -> dict:
    """Re-shard a state dict into parts of at most ``max_size`` (``auto``: AF1's layout for AF1 files,
    safetensors otherwise). A model directory's config, encoder record and tokenizer are copied beside
    the parts, so the result is a model directory too. Returns the index (``copied``: those files)."""
    source = open_checkpoint(src, verify=verify, trust=trust, progress=progress)
    if layout == "auto":
        af1_like = source.meta.get("wrapper") == "model_state_dict" or source.meta.get("layout") == "af1"
        layout = "af1" if af1_like else "safetensors"
    name = name or (Path(src).stem if layout == "af1" and Path(src).is_file() else "model")
    index = write_sharded(source, out, max_size, layout, name=name, progress=progress)
    source.release()
    index["layout"], index["copied"] = layout, copy_model_files(src, out) if Path(src).is_dir() else []
    return index


# ------------------------------------------------------------------------------------------ AF1

def af1_import(src: PathLike, out: PathLike, config: PathLike, trust: bool = False, verify: bool = True,
               max_shard_size: Optional[int] = parse_size("5GB"), progress: bool = True) -> dict:
    """AF1 ``foundation.pt``/``chat.pt`` (merged or parts) -> our model dir, via ``compat.af1.load_state_dict``.

    Keys the model does not hold (``clap.*``) are kept in ``af1_extra/`` so ``af1_export`` reproduces the
    original file exactly."""
    from megaflamingo.compat import af1

    from . import af1_io

    cfg = read_config(config)
    tok = config_tokenizer(cfg)  # af1-import needs it to build the model
    raw = af1_io.strip_module_prefix(af1_io.open_af1(src, trust=trust, verify=verify))
    model, _ = build_from_config(cfg.model, tok, "cpu")
    sd = raw.materialize()
    report = af1.load_state_dict(model, sd, strict=True)
    extra = raw.select(lambda k: k.startswith("clap."))
    own = from_state_dict(model.state_dict(), "imported model")
    index = write_model_dir(out, own, cfg, tok, "full", lm_config_dict(cfg.model), max_shard_size, extra=extra,
                            note={"source": str(src), "af1_import": {k: v for k, v in report.items()
                                                                     if k != "missing"}},
                            progress=progress)
    return index


def af1_export(src: PathLike, out: PathLike, max_size: Optional[int] = None, name: Optional[str] = None,
               verify: bool = True, progress: bool = True) -> dict:
    """Our model dir -> AF1's ``{'model_state_dict': ...}`` with AF1 key names and aliases (one ``.pt`` file,
    or AF1's ``<name>_partN.pt`` parts in directory ``out`` when ``max_size`` is given)."""
    from megaflamingo.compat import af1

    from . import af1_io
    from .load import open_checkpoint as _open

    model = load_model_dir(src, verify=verify, with_encoder=False).model
    sd = af1.export_state_dict(model)
    extra_path = Path(src) / AF1_EXTRA_DIR
    if extra_path.is_dir():
        sd.update(_open(extra_path, verify=verify).materialize())
    source = from_state_dict(sd, "AF1 export")
    source.meta["key_order"] = list(sd)
    out = Path(out)
    if max_size is None:
        af1_io.write_af1_file(out, source, progress=progress)
        return {"file": str(out), "keys": len(sd)}
    return write_sharded(source, out, max_size, "af1", name=name or "model", progress=progress)
