"""Model directories: the one reader and writer of what a trained model is on disk.

A model directory is a Hugging Face model directory (``megaflamingo-convert export`` / ``af1-import`` /
``zero-to-fp32`` write it; ``AudioFlamingo.from_pretrained(dir)`` and ``AutoModelForCausalLM`` read it once
``megaflamingo`` is imported)::

    config.json                       the HF config (model_type "megaflamingo"): text_config (the LM's
                                      config, vocab = len(tokenizer)), flamingo (our model section),
                                      token_ids; the run's other config sections under "megaflamingo"
    tokenizer.json, tokenizer_config.json, ...     (when a tokenizer is available)
    model-0000i-of-0000N.safetensors + model.safetensors.index.json   (ties + sha256 under "metadata";
                                      tensors are never cut, so transformers reads the shards as they are)
    encoder.json                      the audio-encoder record (which encoder made the training
                                      embeddings, its checkpoint hash, the window layout, the
                                      embedding of a silent window), so new audio is embedded the same way
    af1_extra/                        (af1-import only: AF1 keys the model does not hold, e.g. clap.*)

``weights`` is "full" or "trainable" (audio transformer + xattn + whatever the run trained; the frozen LM
then comes from ``model.lm`` at load time, so only :func:`load_model_dir` reads those). A training run
directory has a ``config.json`` too (the bare Config) and ``encoder.json``, so everything here also reads
run directories, and directories written before the HF layout (``format_version`` 1).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from megaflamingo.config import Config, from_dict, load_config, validate
from megaflamingo.hub import hf_cache_dir
from megaflamingo.io import atomic_write_json, atomic_write_text
from megaflamingo.model.build import build_from_config
from megaflamingo.model.config import ModelConfig
from megaflamingo.model.flamingo import AudioFlamingo
from megaflamingo.model.hf_config import MODEL_TYPE, AudioFlamingoConfig
from megaflamingo.tokens import TINY_TOKENIZERS, SpecialTokens, build_tokenizer

from .integrity import CheckpointError, parse_size
from .load import load_state_dict
from .source import TensorSource
from .split import write_sharded

PathLike = Union[str, os.PathLike]
EXPORT_FORMAT = 2  # 1: {"megaflamingo": Config, "lm_config", "token_ids"} before the HF layout
CONFIG_FILE = "config.json"
# Where a config may sit next to a checkpoint: our model dir / run dir (config.json), or a YAML a user
# put there. The first found wins.
CONFIG_NAMES = (CONFIG_FILE, "megaflamingo_config.json", "config.yaml", "train_config.yaml")
ENCODER_FILE = "encoder.json"
AF1_EXTRA_DIR = "af1_extra"
_SECTIONS = ("model", "encoder", "data", "train", "deepspeed")


class ModelLoadError(CheckpointError):
    """A model directory (or what should become one) cannot be loaded; the message says why."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


# ------------------------------------------------------------------------------------------ config


def _nearby(path: PathLike, names: tuple[str, ...]) -> Optional[Path]:
    """The first of ``names`` next to ``path`` (a file or dir) or up to two levels above it (a run dir's
    files are found from ``run/checkpoints/step-N``)."""
    p = Path(path)
    d = p if p.is_dir() else p.parent
    for cand in (d, d.parent, d.parent.parent):
        for name in names:
            if (cand / name).is_file():
                return cand / name
    return None


def find_config(path: PathLike) -> Optional[Path]:
    return _nearby(path, CONFIG_NAMES)


def find_encoder_record(path: PathLike) -> Optional[Path]:
    return _nearby(path, (ENCODER_FILE,))


def read_config(path: PathLike) -> Config:
    """Our YAML (or AF1's YAML dialect), a model dir's / run dir's ``config.json``, or a directory
    holding one of those."""
    p = Path(path)
    if p.is_dir():
        found = find_config(p)
        if found is None:
            raise ModelLoadError(f"{p}: no megaflamingo config ({', '.join(CONFIG_NAMES)}) found")
        p = found
    if p.suffix != ".json":
        return load_config(p)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{p}: unreadable config ({e})") from None
    if isinstance(raw, dict) and raw.get("model_type") == MODEL_TYPE:  # HF layout: the model section apart
        raw = dict(raw.get("megaflamingo") or {}, model=raw.get("flamingo"))
    raw = raw.get("megaflamingo", raw) if isinstance(raw, dict) else raw
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise ModelLoadError(f"{p}: not a megaflamingo config (no 'model' section)")
    cfg = from_dict(Config, {k: v for k, v in raw.items() if k in _SECTIONS}, "", str(p))
    cfg.source = str(p)
    validate(cfg)
    return cfg


def lm_config_dict(model_cfg: ModelConfig) -> Optional[dict]:
    """The HF LM config as a dict (from ``model.lm_config`` or the local LM path); None if unavailable."""
    if model_cfg.lm_config is not None:
        return dict(model_cfg.lm_config)
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model_cfg.lm, cache_dir=hf_cache_dir(model_cfg.cache_dir)).to_dict()
    except Exception as e:  # hub name offline, or a path that is not there
        _log(f"note: LM config of {model_cfg.lm!r} unavailable ({type(e).__name__}); config.json will not embed it")
        return None


def config_tokenizer(cfg: Config, tokenizer_dir: Optional[PathLike] = None):
    """The run's tokenizer: saved tokenizer files in ``tokenizer_dir`` win (except for the run-time
    tiny tokenizer, which is rebuilt), else the config's, with AF1's tokens added as at training."""
    m = cfg.model
    name = m.tokenizer or m.lm
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer_config.json").is_file() \
            and name not in TINY_TOKENIZERS:
        return build_tokenizer(name, path=str(tokenizer_dir))
    try:
        return build_tokenizer(name, cache_dir=m.cache_dir)
    except Exception as e:  # offline / missing path: say what was tried
        raise ModelLoadError(f"cannot load the tokenizer {name!r} ({e})") from e


# ------------------------------------------------------------------------------------------ encoder record


def encoder_record_from_dataset(split_dir: PathLike) -> dict:
    """The encoder record of a preprocessed split (what ``encoder.json`` holds)."""
    from megaflamingo.data.arrow_format import read_metadata

    meta = read_metadata(split_dir)
    return {"encoder": meta["encoder"], "windows": meta["windows"],
            "silence_embedding": meta["silence_embedding"], "clip_encoder": meta.get("clip_encoder"),
            "clip_embed_dim": meta.get("clip_embed_dim"),
            "dataset": f"{meta['dataset']}-{meta['task']}/{meta.get('split', '')}".rstrip("/")}


def training_encoder_record(cfg: Config) -> Optional[dict]:
    """The encoder record of the config's training data while its preprocessed splits are where the
    config says; the first readable one wins (the data pipeline refuses blends of mixed encoders)."""
    from megaflamingo.data.reader import parse_blend_name

    root = cfg.data.data_root
    if not root or not Path(root).is_dir():
        return None
    for name in list(cfg.data.blend) + list(cfg.data.valid):
        d = Path(root) / parse_blend_name(name).split_dir
        if not (d / "metadata.json").is_file():
            continue
        try:
            rec = encoder_record_from_dataset(d)
        except (ValueError, OSError, KeyError):
            continue
        if int(rec["encoder"]["embed_dim"]) != int(cfg.model.audio_embed_dim):
            raise ModelLoadError(f"{d}: embed_dim {rec['encoder']['embed_dim']} != the model's "
                                 f"audio_embed_dim {cfg.model.audio_embed_dim}")
        return rec
    return None


def write_encoder_record(directory: PathLike, record: dict) -> Path:
    p = Path(directory) / ENCODER_FILE
    atomic_write_json(p, record, sort_keys=False)
    return p


def read_encoder_record(model_dir: PathLike, cfg: Config) -> dict:
    """``encoder.json`` of the model dir; else the training data's record (with a warning: it only
    works while the data stays where the config says); else the config's encoder section."""
    p = Path(model_dir) / ENCODER_FILE
    if p.is_file():
        rec = json.loads(p.read_text(encoding="utf-8"))
        if "encoder" not in rec or "windows" not in rec:
            raise ModelLoadError(f"{p}: expected keys encoder, windows, silence_embedding")
        return rec
    rec = training_encoder_record(cfg)
    if rec is not None:
        warnings.warn(f"{model_dir}: no {ENCODER_FILE}; took the encoder record from the training data under "
                      f"{cfg.data.data_root} (re-export the model to record it)", stacklevel=2)
        return rec
    warnings.warn(f"{model_dir}: no {ENCODER_FILE} and no training data found; using the config's encoder "
                  "section (no checkpoint hash to check against)", stacklevel=2)
    e = cfg.encoder
    return {
        "encoder": {"name": e.name, "checkpoint": e.checkpoint, "random_init": e.random_init,
                    "embed_dim": e.embed_dim, "sample_rate": e.sample_rate, "config": {}},
        "windows": {"window_s": e.window_s, "overlap_s": e.overlap_s, "max_windows": e.max_windows},
        "silence_embedding": None,
    }


# ------------------------------------------------------------------------------------------ write


def _embedding_rows(source: TensorSource, lm_config: dict) -> Optional[int]:
    """Rows of the LM's input embedding in ``source`` (the vocabulary after resizing)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = dict(lm_config)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(conf.pop("model_type"), **conf))
    weight = lm.get_input_embeddings().weight
    name = next(n for n, p in lm.named_parameters() if p is weight)
    key = f"lang_encoder.{name}"
    return int(source.ref(key).shape[0]) if key in source.keys() else None


def hf_config(cfg: Config, tokens: Optional[SpecialTokens], lm_config: Optional[dict], vocab: Optional[int],
              weights: str = "full", dtype: Optional[torch.dtype] = None, note: Optional[dict] = None) -> dict:
    """``config.json`` of a model directory: the HF config of the model ``cfg`` describes. ``lm_config``
    gets ``vocab`` rows (the resized embedding); without it (the LM's config unreadable, e.g. offline)
    only :func:`load_model_dir` can build the model, from ``model.lm``."""
    sections = cfg.to_dict()
    model = sections.pop("model")
    text = None
    if lm_config is not None:
        text = dict(lm_config)
        if vocab:
            text["vocab_size"] = int(vocab)
    conf = AudioFlamingoConfig(
        text_config=text, flamingo=model, token_ids=tokens, megaflamingo=sections, weights=weights,
        format_version=EXPORT_FORMAT, architectures=[AudioFlamingo.__name__],
        dtype=str(dtype).replace("torch.", "") if dtype is not None else None).to_dict()
    conf.update(note or {})
    return conf


def write_model_config(out: PathLike, cfg: Config, tokenizer=None, weights: str = "full",
                       lm_config: Optional[dict] = None, source: Optional[TensorSource] = None,
                       encoder_record: Optional[PathLike] = None, note: Optional[dict] = None) -> None:
    """Everything of a model directory but the weights: tokenizer, encoder record, then ``config.json``
    last (a directory without it is an interrupted write)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokens, vocab = None, None
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
        tokens, vocab = SpecialTokens.from_tokenizer(tokenizer), len(tokenizer)
    elif source is not None and lm_config is not None:
        vocab = _embedding_rows(source, lm_config)
    if encoder_record is not None and Path(encoder_record).is_file():
        shutil.copyfile(encoder_record, out / ENCODER_FILE)
    dtype = next((r.dtype for r in source.refs if r.dtype.is_floating_point), None) if source is not None else None
    conf = hf_config(cfg, tokens, lm_config, vocab, weights, dtype, note)
    atomic_write_text(out / CONFIG_FILE, json.dumps(conf, indent=2, default=str) + "\n")


def write_model_dir(out: PathLike, source: TensorSource, cfg: Config, tokenizer=None, weights: str = "full",
                    lm_config: Optional[dict] = None, max_shard_size: Optional[int] = parse_size("5GB"),
                    extra: Optional[TensorSource] = None, encoder_record: Optional[PathLike] = None,
                    note: Optional[dict] = None, progress: bool = True) -> dict:
    """Weights (sharded safetensors + index; a tensor larger than ``max_shard_size`` gets a shard of its
    own, as ``save_pretrained`` does), tokenizer, encoder record, then ``config.json`` last."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index = write_sharded(source, out, max_shard_size, "safetensors", progress=progress,
                          extra_metadata={"weights": weights}, slice_oversized=False)
    if extra is not None and extra.refs:
        write_sharded(extra, out / AF1_EXTRA_DIR, None, "safetensors", progress=False)
    write_model_config(out, cfg, tokenizer, weights, lm_config, source, encoder_record, note)
    return index


def copy_model_files(src: PathLike, out: PathLike) -> list[str]:
    """The files of model directory ``src`` that are not its weights (config, encoder record, tokenizer,
    af1_extra/) into ``out``, so a re-sharded copy of the weights is a model directory too. Returns the
    names copied."""
    src, out = Path(src), Path(out)
    copied = []
    for p in sorted(src.iterdir()) if src.is_dir() else []:
        weights = p.suffix in (".safetensors", ".bin", ".pt", ".pth") or p.name.endswith(".index.json")
        if p.is_file() and not weights:
            shutil.copyfile(p, out / p.name)
            copied.append(p.name)
        elif p.is_dir() and p.name == AF1_EXTRA_DIR:
            shutil.copytree(p, out / p.name, dirs_exist_ok=True)
            copied.append(p.name)
    return copied


# ------------------------------------------------------------------------------------------ load


@dataclass
class LoadedModel:
    """A model ready for inference and what it needs besides its weights."""

    model: torch.nn.Module
    tokenizer: object
    tokens: SpecialTokens
    config: Config
    encoder: dict  # {"encoder": <metadata encoder block>, "windows": {...}, "silence_embedding": [...]}
    source: str
    kind: str = "export"  # export | deepspeed | af1
    extra: dict = field(default_factory=dict)

    @property
    def model_config(self) -> ModelConfig:
        return self.config.model

    @property
    def max_tokens(self) -> int:
        return int(self.config.data.max_tokens)

    @property
    def silence_embedding(self):
        s = self.encoder.get("silence_embedding")
        if s is None:
            raise ModelLoadError(f"{self.source}: no silence embedding recorded (needed to pad audio slots)")
        return s


def apply_weights(model: torch.nn.Module, sd: dict, source: str, allow_missing_lm: bool) -> dict:
    """Load ``sd`` into ``model``: unexpected or mis-shaped keys fail; missing keys fail unless they are
    frozen LM weights of a trainable-only export (``allow_missing_lm``: the LM came from its own path)."""
    own = model.state_dict()
    unexpected = [k for k in sd if k not in own]
    if unexpected:
        raise ModelLoadError(f"{source}: {len(unexpected)} weights do not belong to the model, e.g. {unexpected[:5]}")
    bad = [k for k in sd if tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        raise ModelLoadError(f"{source}: shape mismatch for {bad[:5]} "
                             f"(e.g. {tuple(sd[bad[0]].shape)} vs {tuple(own[bad[0]].shape)})")
    # Tied weights (e.g. OPT's lm_head = embed_tokens) are stored once: one name of a tied group
    # present counts for all.
    groups: dict = {}
    for k, v in own.items():
        groups.setdefault((v.data_ptr(), tuple(v.shape)), []).append(k)
    covered = {k for g in groups.values() if any(x in sd for x in g) for k in g}
    missing = [k for k in own if k not in covered]
    new = [k for k in missing if not k.startswith("lang_encoder.") or "gated_cross_attn" in k]
    if new or (missing and not allow_missing_lm):
        raise ModelLoadError(f"{source}: {len(missing)} model weights missing, e.g. {(new or missing)[:5]}")
    model.load_state_dict(sd, strict=False)
    return {"loaded": len(sd), "missing_from_file": len(missing)}


def _no_init():
    """Build without initialising weights: every one of them is loaded next."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers 5 releases
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _build(d: Path, conf: dict, cfg: Config, tok) -> tuple[torch.nn.Module, SpecialTokens, bool]:
    """The model skeleton of a model dir and whether LM weights may be missing from it. A full HF-layout
    dir is built from its own config (no access to the base LM's checkpoint needed); a trainable-only
    or format-1 dir around the LM that ``model.lm`` names, exactly as training built it."""
    trainable_only = conf.get("weights", "full") == "trainable" and cfg.model.lm_config is None
    if conf.get("model_type") == MODEL_TYPE and conf.get("text_config") and not trainable_only:
        hf = AudioFlamingoConfig.from_dict(conf)
        with _no_init():
            model = AudioFlamingo(hf)
        tokens = model.tokens
        if tok is not None and SpecialTokens.from_tokenizer(tok) != tokens:
            raise ModelLoadError(f"{d}: the tokenizer's special-token ids {SpecialTokens.from_tokenizer(tok).as_dict()} "
                                 f"differ from the model's {tokens.as_dict()} (config.json token_ids)")
        return model, tokens, False
    try:
        model, tokens = build_from_config(cfg.model, tok, "cpu")
    except OSError as e:
        raise ModelLoadError(f"cannot load the language model {cfg.model.lm!r} ({e})") from e
    return model, tokens, trainable_only


def load_model_dir(model_dir: PathLike, device: str = "cpu", dtype: Optional[str] = None,
                   encoder_record: Optional[dict] = None, verify: bool = True,
                   with_encoder: bool = True) -> LoadedModel:
    """Everything of a model directory: config, tokenizer, model with its weights (verified against the
    index's sizes and sha256, ties re-tied; sliced tensors of ``convert split`` parts reassembled),
    encoder record (``with_encoder=False``: weights only, e.g. for a format conversion that never embeds
    audio)."""
    d = Path(model_dir)
    cfg = read_config(d / CONFIG_FILE if (d / CONFIG_FILE).is_file() else d)
    tok = config_tokenizer(cfg, d)
    conf = json.loads((d / CONFIG_FILE).read_text(encoding="utf-8")) if (d / CONFIG_FILE).is_file() else {}
    model, tokens, allow_missing_lm = _build(d, conf, cfg, tok)
    apply_weights(model, load_state_dict(d, verify=verify), str(d), allow_missing_lm=allow_missing_lm)
    # In memory the model is whole: model.save_pretrained(...) writes a full, self-describing dir.
    sections = cfg.to_dict()
    sections.pop("model")
    model.config.megaflamingo, model.config.weights = sections, "full"
    model.config.format_version = EXPORT_FORMAT
    if dtype:
        model.to({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype])
    model.to(device).eval()
    rec = encoder_record or (read_encoder_record(d, cfg) if with_encoder else {})
    return LoadedModel(model=model, tokenizer=tok, tokens=tokens, config=cfg, encoder=rec, source=str(d))
