"""Self-contained model directories: config + tokenizer + safetensors shards with an HF-style index.

Layout of ``OUT/``::

    config.json                       {"megaflamingo": <our Config>, "lm_config": <HF LM config>, ...}
    tokenizer.json, tokenizer_config.json, ...     (when a tokenizer is available)
    model-0000i-of-0000N.safetensors + model.safetensors.index.json   (ties + sha256 under "metadata")
    encoder.json                      (the audio-encoder record, when found next to the checkpoint)
    af1_extra/                        (af1-import only: AF1 keys the model does not hold, e.g. clap.*)

``weights`` is "full" or "trainable" (audio transformer + xattn + whatever the run trained; the frozen LM
then comes from ``megaflamingo.lm`` at load time). Keys are checked against the model the config builds
(on the meta device, so no memory) before anything is written.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from .consolidate import is_zero_checkpoint, zero_source
from .integrity import CheckpointError, atomic_write_text, parse_size
from .load import open_checkpoint
from .source import TensorSource, from_state_dict
from .split import write_sharded

PathLike = Union[str, os.PathLike]
EXPORT_FORMAT = 1
CONFIG_NAMES = ("config.json", "megaflamingo_config.json", "config.yaml", "train_config.yaml",
                "resolved_config.yaml", "config.resolved.yaml")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")
ENCODER_FILE = "encoder.json"
AF1_EXTRA = "af1_extra/model.safetensors.index.json"
# Always part of a trainable-only export: our new modules.
TRAINABLE_PATTERNS = (r"^audio_transformer\.", r"\.gated_cross_attn_layer\.")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


# ------------------------------------------------------------------------------------------ config

def _search_dirs(path: Path) -> list[Path]:
    p = path if path.is_dir() else path.parent
    return [p, p.parent, p.parent.parent]


def find_config(path: PathLike) -> Optional[Path]:
    for d in _search_dirs(Path(path)):
        for name in CONFIG_NAMES:
            if (d / name).is_file():
                return d / name
    return None


def load_any_config(path: PathLike):
    """Our YAML (or AF1's YAML dialect) via ``load_config``, or a model dir's ``config.json``."""
    from megaflamingo.config import load_config

    p = Path(path)
    if p.is_dir():
        found = find_config(p)
        if found is None:
            raise CheckpointError(f"{p}: no config file ({', '.join(CONFIG_NAMES)})")
        p = found
    if p.suffix == ".json":
        from megaflamingo.inference.load import read_config

        tmp = p.parent
        if p.name != "config.json" and p.name != "megaflamingo_config.json":
            raise CheckpointError(f"{p}: unsupported config file name")
        return read_config(tmp)
    return load_config(p)


def lm_config_dict(cfg) -> Optional[dict]:
    """The HF LM config as a dict (from ``model.lm_config`` or the local LM path); None if unavailable."""
    m = cfg.model
    if m.lm_config is not None:
        return dict(m.lm_config)
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(m.lm, cache_dir=m.cache_dir).to_dict()
    except Exception as e:  # hub name offline, or a path that is not there
        _log(f"note: LM config of {m.lm!r} unavailable ({type(e).__name__}); config.json will not embed it")
        return None


def get_tokenizer(cfg, tokenizer_path: Optional[PathLike] = None):
    from megaflamingo.inference.load import build_tokenizer

    if tokenizer_path is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer_path))
    try:
        return build_tokenizer(cfg)
    except Exception as e:
        _log(f"note: tokenizer unavailable ({e}); the export will not contain tokenizer files")
        return None


def expected_shapes(cfg, tokenizer=None) -> dict[str, tuple]:
    """Every state-dict key and shape of the model ``cfg`` builds (on the meta device: no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megaflamingo.model import build_model

    lmc = lm_config_dict(cfg)
    if lmc is None:
        raise CheckpointError("cannot check keys against the config: its LM config is unavailable")
    lmc = dict(lmc)
    conf = AutoConfig.for_model(lmc.pop("model_type"), **lmc)
    if tokenizer is not None:
        from megaflamingo.testing import token_ids

        ids = token_ids(tokenizer)
        vocab = len(tokenizer)
    else:
        ids, vocab = {"media": 0, "eoc": 1, "sep": 2, "pad": 0, "bos": 0, "eos": 0}, None
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(conf)
        if vocab and lm.get_input_embeddings().num_embeddings != vocab:  # as engine.build.build_lm
            lm.resize_token_embeddings(vocab)
        model = build_model(cfg.model, lm=lm, token_ids=ids)
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


def write_model_dir(out: PathLike, source: TensorSource, cfg, tokenizer=None, weights: str = "full",
                    lm_config: Optional[dict] = None, max_shard_size: Optional[int] = parse_size("5GB"),
                    extra: Optional[TensorSource] = None, encoder_record: Optional[Path] = None,
                    note: Optional[dict] = None, progress: bool = True) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index = write_sharded(source, out, max_shard_size, "safetensors", progress=progress,
                          extra_metadata={"weights": weights})
    token_ids = None
    if tokenizer is not None:
        from megaflamingo.testing import token_ids as get_ids

        tokenizer.save_pretrained(str(out))
        token_ids = get_ids(tokenizer)
    if extra is not None and extra.refs:
        write_sharded(extra, out / Path(AF1_EXTRA).parent, None, "safetensors", progress=False)
    if encoder_record is not None and Path(encoder_record).is_file():
        shutil.copyfile(encoder_record, out / ENCODER_FILE)
    conf = {"architecture": "megaflamingo.AudioFlamingo", "format_version": EXPORT_FORMAT, "weights": weights,
            "megaflamingo": cfg.to_dict(), "lm_config": lm_config, "token_ids": token_ids,
            "weights_index": "model.safetensors.index.json"}
    conf.update(note or {})
    atomic_write_text(out / "config.json", json.dumps(conf, indent=2, default=str) + "\n")
    return index


def export(src_path: PathLike, out: PathLike, config: Optional[PathLike] = None, trainable_only: bool = False,
           tag: Optional[str] = None, include: Optional[str] = None, tokenizer_path: Optional[PathLike] = None,
           max_shard_size: Optional[int] = parse_size("5GB"), trust: bool = False, verify: bool = True,
           check_keys: bool = True, progress: bool = True) -> dict:
    """A ZeRO checkpoint dir, a consolidated dir/file or another model dir -> a model dir."""
    src_path = Path(src_path)
    if is_zero_checkpoint(src_path):
        source = zero_source(src_path, tag, exclude_frozen=trainable_only, trust=trust)
    else:
        source = open_checkpoint(src_path, verify=verify, trust=trust, progress=progress)
    cfg_path = Path(config) if config else find_config(src_path)
    if cfg_path is None:
        raise CheckpointError(f"{src_path}: no config found next to the checkpoint; pass --config")
    cfg = load_any_config(cfg_path)
    tok = get_tokenizer(cfg, tokenizer_path)
    if trainable_only:
        source = source.select(trainable_filter(source, include))
        if not source.refs:
            raise CheckpointError(f"{src_path}: no trainable keys found for a trainable-only export")
    if check_keys:
        check_against(source, expected_shapes(cfg, tok), full=not trainable_only, what=str(src_path))
    enc = next((d / ENCODER_FILE for d in _search_dirs(src_path) if (d / ENCODER_FILE).is_file()), None)
    weights = "trainable" if trainable_only else "full"
    index = write_model_dir(out, source, cfg, tok, weights, lm_config_dict(cfg), max_shard_size,
                            encoder_record=enc, note={"source": str(src_path)}, progress=progress)
    source.release()
    return index


# ------------------------------------------------------------------------------------------ AF1

def af1_import(src: PathLike, out: PathLike, config: PathLike, trust: bool = False, verify: bool = True,
               max_shard_size: Optional[int] = parse_size("5GB"), progress: bool = True) -> dict:
    """AF1 ``foundation.pt``/``chat.pt`` (merged or parts) -> our model dir, via ``compat.af1.load_state_dict``.

    Keys the model does not hold (``clap.*``) are kept in ``af1_extra/`` so ``af1_export`` reproduces the
    original file exactly."""
    from megaflamingo.compat import af1
    from megaflamingo.inference.load import build_from_config

    from . import af1_io

    cfg = load_any_config(config)
    tok = get_tokenizer(cfg)
    if tok is None:
        raise CheckpointError(f"{config}: af1-import needs the tokenizer (model.tokenizer) to build the model")
    raw = af1_io.strip_module_prefix(af1_io.open_af1(src, trust=trust, verify=verify))
    model, _ = build_from_config(cfg, tok, "cpu")
    sd = raw.materialize()
    report = af1.load_state_dict(model, sd, strict=True)
    extra = raw.select(lambda k: k.startswith("clap."))
    own = from_state_dict(model.state_dict(), "imported model")
    index = write_model_dir(out, own, cfg, tok, "full", lm_config_dict(cfg), max_shard_size, extra=extra,
                            note={"source": str(src), "af1_import": {k: v for k, v in report.items()
                                                                     if k != "missing"}},
                            progress=progress)
    return index


def load_model_dir(model_dir: PathLike, verify: bool = True):
    """(model, tokenizer, config) from a full model dir (weights re-tied); the one-call loader."""
    from megaflamingo.inference.load import build_from_config

    from .load import load_state_dict

    d = Path(model_dir)
    cfg = load_any_config(d / "config.json")
    tok = get_tokenizer(cfg, d if (d / "tokenizer_config.json").is_file() else None)
    model, _ = build_from_config(cfg, tok, "cpu")
    sd = load_state_dict(d, verify=verify)
    conf = json.loads((d / "config.json").read_text())
    strict = conf.get("weights", "full") == "full"
    try:
        model.load_state_dict(sd, strict=strict)
    except RuntimeError as e:
        raise CheckpointError(f"{d}: weights do not match the model its config builds: {e}") from e
    return model, tok, cfg


def af1_export(src: PathLike, out: PathLike, max_size: Optional[int] = None, name: Optional[str] = None,
               verify: bool = True, progress: bool = True) -> dict:
    """Our model dir -> AF1's ``{'model_state_dict': ...}`` with AF1 key names and aliases (one ``.pt`` file,
    or AF1's ``<name>_partN.pt`` parts in directory ``out`` when ``max_size`` is given)."""
    from megaflamingo.compat import af1

    from . import af1_io
    from .load import open_checkpoint as _open

    model, _, _ = load_model_dir(src, verify=verify)
    sd = af1.export_state_dict(model)
    extra_path = Path(src) / Path(AF1_EXTRA).parent
    if extra_path.is_dir():
        sd.update(_open(extra_path, verify=verify).materialize())
    source = from_state_dict(sd, "AF1 export")
    source.meta["key_order"] = list(sd)
    out = Path(out)
    if max_size is None:
        af1_io.write_af1_file(out, source, progress=progress)
        return {"file": str(out), "keys": len(sd)}
    return write_sharded(source, out, max_size, "af1", name=name or "model", progress=progress)
