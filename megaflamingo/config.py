"""Typed configuration: dataclasses loaded from YAML, validated field by field.

Two YAML dialects are accepted:
  * ours: top-level sections ``model``, ``encoder``, ``data``, ``train``, ``deepspeed``;
  * AF1's: ``train_config``, ``data_config``, ``clap_config``, ``model_config``, ``sft_config``
    (as in the original ``foundation/configs/*.yaml``), mapped onto ours by :mod:`megaflamingo.config_af1`.

Every error names the field path and the file (``train.lr: expected float, got 'fast' (x.yaml)``).
Unknown keys are errors: a typo must never silently fall back to a default.

Placeholders such as ``YOUR_DATA_ROOT_DIR`` (AF1 style) and ``${VAR}`` / ``${VAR:-default}`` are
substituted from explicit ``placeholders`` (the CLI's ``--placeholder NAME=VALUE``) first, then the
environment. A placeholder left unresolved is an error naming the field.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the field and the file."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class AudioTransformerConfig:
    """AF1's 3-layer post-norm transformer over window embeddings (``audio_transformer_kwargs``)."""

    n_head: int = 8
    n_layers: int = 3
    d_inner: int = 2048
    # AF1 hard-codes 0.1 attention dropout; kept as the default for fidelity.
    dropout: float = 0.1
    # Number of sinusoidal position slots; AF1 requires >= max_num_window * max_num_fewshot.
    max_num_media: int = 128
    max_window_per_audio: int = 16


@dataclass
class XattnConfig:
    """Gated cross-attention (xattn-dense) blocks inserted before LM decoder layers."""

    every_n_layers: int = 1
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4


@dataclass
class ModelConfig:
    # HF path or hub name of the causal LM. Ignored for weights when ``lm_config`` is given.
    lm: str = "facebook/opt-iml-max-1.3b"
    # Tokenizer path / hub name; None = same as ``lm``; "tiny" = megaflamingo.testing's tokenizer.
    tokenizer: Optional[str] = None
    # A transformers config dict (must contain ``model_type``) to build a RANDOM-INIT LM:
    # used by tests and the CPU quickstart, never for real training.
    lm_config: Optional[dict] = None
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    cache_dir: Optional[str] = None
    audio_embed_dim: int = 1024
    max_num_window: int = 16
    max_num_fewshot: int = 8
    audio_transformer: AudioTransformerConfig = field(default_factory=AudioTransformerConfig)
    xattn: XattnConfig = field(default_factory=XattnConfig)

    @property
    def num_audio_slots(self) -> int:
        return self.max_num_window * self.max_num_fewshot


@dataclass
class EncoderConfig:
    """Audio encoder used offline (preprocessing) and at inference time."""

    name: Literal["clapcap", "laion-clap", "tiny"] = "clapcap"
    checkpoint: Optional[str] = None
    random_init: bool = False
    embed_dim: int = 1024
    sample_rate: int = 44100
    window_s: float = 7.0
    overlap_s: float = 5.25
    max_windows: int = 16
    # LAION-CLAP (kNN retrieval) settings.
    clip_checkpoint: Optional[str] = None
    clip_fusion: bool = True


@dataclass
class DatasetEntry:
    """One entry of AF1's ``dataset_blending_config``: ``<dataset>-<task>/<split>``."""

    weight: float = 1.0
    prefix_prob: float = 0.0
    augmentations: dict[str, float] = field(default_factory=lambda: {"do_nothing": 1.0})


@dataclass
class DataConfig:
    # Root of the preprocessed Arrow datasets (AF1's ``dataset_file_root``).
    data_root: Optional[str] = None
    # Root of the raw audio files (AF1's ``data_root``); needed by preprocessing and inference.
    audio_root: Optional[str] = None
    blend: dict[str, DatasetEntry] = field(default_factory=dict)
    # AF1's ``dataset_blending_global_weight``: fraction of the blend drawn per virtual epoch.
    global_weight: float = 1.0
    valid: list[str] = field(default_factory=list)
    max_tokens: int = 512
    num_workers: int = 4
    # Sort-ish batching by token length to cut padding (not in AF1).
    group_by_length: bool = False
    # Let blend/valid names and kNN manifests reach dataset directories outside data_root (off: an
    # absolute or `..` path that escapes the root is refused, naming this field).
    allow_outside_root: bool = False
    # User-defined prompt templates / augmentations, merged into the built-in registry.
    templates: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    run_name: Optional[str] = None
    stage: Literal["pretrain", "sft", "chat"] = "pretrain"
    micro_batch_size: int = 6
    gradient_accumulation_steps: int = 8
    seed: int = 42
    lr: float = 1e-4
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 1875
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    optimizer: Literal["adamw"] = "adamw"
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    grad_clip: float = 1.0
    gradient_checkpointing: bool = False
    num_epochs: int = 100
    max_steps: Optional[int] = None
    loss_multiplier: float = 1.0
    # Embedding policy: frozen (AF1 pretrain), new_tokens (only <audio>/<|endofchunk|> rows), full.
    embeddings: Literal["frozen", "new_tokens", "full"] = "frozen"
    # SFT: train the LM decoder blocks too (AF1's ``unfreeze_full_lm``).
    unfreeze_lm: bool = False
    # Reproduce AF1's FSDP behaviour where "unfrozen" decoder blocks never actually moved.
    af1_exact: bool = False
    # Initialise from a previous stage: our export dir, a DeepSpeed checkpoint dir, or an AF1 .pt.
    init_from: Optional[str] = None
    logging_steps: int = 10
    eval_steps: int = 1000
    save_steps: int = 1000
    keep_last: int = 3
    resume: str = "auto"
    max_consecutive_nonfinite: int = 10
    # Engine extras (issue 6). Validation: at most this many batches per validation set (None = all).
    eval_max_batches: Optional[int] = None
    # Seconds a collective may block before the job fails (a dead rank must not hang the job).
    dist_timeout_s: int = 600
    # Seconds the other ranks wait while rank 0 converts a checkpoint to DeepSpeed's universal format
    # (resuming on another world size); a large checkpoint takes far longer than a collective.
    convert_timeout_s: int = 21600
    # Peak FLOP/s per device for MFU; None = a table for known GPUs, a measured matmul peak on CPU.
    peak_tflops: Optional[float] = None
    # Show a tqdm bar on rank 0 (the log line every ``logging_steps`` is printed either way).
    progress_bar: bool = True
    # Training/validation loss: "supervised" runs the LM head only where the shifted label is not -100
    # (same loss and gradients, ~14% less forward on OPT's 50k vocabulary); "full" computes [B, T, V] logits.
    loss_logits: Literal["supervised", "full"] = "supervised"


@dataclass
class DeepSpeedSection:
    # JSON under ds_configs/ (or any path); micro-batch, accumulation, precision and clipping
    # come from ``train`` and are merged in; the JSON may not contradict them.
    config: str = "ds_configs/zero3.json"
    # Extra keys merged over the JSON (dotted paths allowed through CLI overrides).
    overrides: dict[str, Any] = field(default_factory=dict)
    # Build the LM partitioned (zero.Init) so big LMs never materialise whole on one rank.
    zero_init: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    # Where the config came from (for error messages and run records); not a YAML key.
    source: Optional[str] = field(default=None, metadata={"internal": True})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source", None)
        return d


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\bYOUR_[A-Z0-9_]+\b")
_ENVVAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def load_config(
    path: Union[str, os.PathLike, None] = None,
    overrides: Optional[list[str]] = None,
    placeholders: Optional[dict[str, str]] = None,
) -> Config:
    """Load, map (AF1 dialect), override, substitute placeholders, type-check and validate."""
    src = str(path) if path is not None else "<defaults>"
    raw: dict = {}
    if path is not None:
        raw = read_yaml(path)
    if is_af1_dialect(raw):
        from megaflamingo.config_af1 import af1_to_ours

        raw = af1_to_ours(raw, src)
    for ov in overrides or []:
        apply_override(raw, ov, src)
    raw = substitute_placeholders(raw, dict(placeholders or {}), src)
    cfg = from_dict(Config, raw, "", src)
    cfg.source = src
    validate(cfg)
    return cfg


def read_yaml(path: Union[str, os.PathLike]) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"YAML syntax error{where}: {problem} ({p})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"top level must be a mapping of sections, got {type(data).__name__} ({p})")
    return data


def is_af1_dialect(raw: dict) -> bool:
    return any(k.endswith("_config") for k in raw) and not any(
        k in raw for k in ("model", "encoder", "data", "train", "deepspeed")
    )


def apply_override(raw: dict, override: str, src: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to the raw dict, creating levels as needed."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value ({src})")
    key, _, text = override.partition("=")
    key = key.strip()
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: empty key component ({src})")
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section ({src})")
        node = nxt
    node[parts[-1]] = value


def substitute_placeholders(obj: Any, placeholders: dict[str, str], src: str, path: str = "") -> Any:
    if isinstance(obj, dict):
        return {k: substitute_placeholders(v, placeholders, src, _join(path, str(k))) for k, v in obj.items()}
    if isinstance(obj, list):
        return [substitute_placeholders(v, placeholders, src, f"{path}[{i}]") for i, v in enumerate(obj)]
    if not isinstance(obj, str):
        return obj

    def env_sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in placeholders:
            return placeholders[name]
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{path}: ${{{name}}} is not set (export it or pass --placeholder {name}=...) ({src})")

    def af1_sub(m: re.Match) -> str:
        name = m.group(0)
        if name in placeholders:
            return placeholders[name]
        if name in os.environ:
            return os.environ[name]
        raise ConfigError(
            f"{path}: placeholder {name} is not set (export {name}=... or pass --placeholder {name}=...) ({src})"
        )

    return _PLACEHOLDER.sub(af1_sub, _ENVVAR.sub(env_sub, obj))


def from_dict(cls: type, raw: Any, path: str, src: str):
    """Build dataclass ``cls`` from ``raw`` with strict type checks; errors name ``path``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or '<root>'}: expected a mapping, got {_show(raw)} ({src})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        allowed = ", ".join(sorted(fields))
        raise ConfigError(f"{_join(path, str(unknown[0]))}: unknown key (allowed: {allowed}) ({src})")
    kwargs = {name: _coerce(value, hints[name], _join(path, name), src) for name, value in raw.items()}
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, path: str, src: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path, src)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_show(value)} ({src})")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{path}: expected one of {choices}, got {_show(value)} ({src})")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path, src)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {_show(value)} ({src})")
        return [_coerce(v, args[0], f"{path}[{i}]", src) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} values, got {_show(value)} ({src})")
        return tuple(_coerce(v, a, f"{path}[{i}]", src) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_show(value)} ({src})")
        vt = args[1] if args else Any
        return {str(k): _coerce(v, vt, _join(path, str(k)), src) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected bool, got {_show(value)} ({src})")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected int, got {_show(value)} ({src})")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept numeric strings of that form only.
        if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value.strip()):
            return float(value)
        raise ConfigError(f"{path}: expected float, got {_show(value)} ({src})")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected str, got {_show(value)} ({src})")
    raise ConfigError(f"{path}: unsupported field type {tp!r} ({src})")  # pragma: no cover


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (dict, list)):
        return type(value).__name__
    return repr(value)


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return " or ".join(getattr(a, "__name__", str(a)) for a in args)


# --------------------------------------------------------------------------------------------
# Cross-field validation
# --------------------------------------------------------------------------------------------


def validate(cfg: Config) -> None:
    src = cfg.source or "<config>"

    def bad(field_path: str, msg: str) -> None:
        raise ConfigError(f"{field_path}: {msg} ({src})")

    m, t, d, e = cfg.model, cfg.train, cfg.data, cfg.encoder
    positive = {
        "model.audio_embed_dim": m.audio_embed_dim,
        "model.max_num_window": m.max_num_window,
        "model.max_num_fewshot": m.max_num_fewshot,
        "model.audio_transformer.n_head": m.audio_transformer.n_head,
        "model.audio_transformer.n_layers": m.audio_transformer.n_layers,
        "model.audio_transformer.d_inner": m.audio_transformer.d_inner,
        "model.xattn.every_n_layers": m.xattn.every_n_layers,
        "model.xattn.heads": m.xattn.heads,
        "model.xattn.dim_head": m.xattn.dim_head,
        "model.xattn.ff_mult": m.xattn.ff_mult,
        "train.micro_batch_size": t.micro_batch_size,
        "train.gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train.lr": t.lr,
        "train.logging_steps": t.logging_steps,
        "train.save_steps": t.save_steps,
        "train.eval_steps": t.eval_steps,
        "train.keep_last": t.keep_last,
        "train.max_consecutive_nonfinite": t.max_consecutive_nonfinite,
        "train.dist_timeout_s": t.dist_timeout_s,
        "train.convert_timeout_s": t.convert_timeout_s,
        "data.max_tokens": d.max_tokens,
        "encoder.embed_dim": e.embed_dim,
        "encoder.sample_rate": e.sample_rate,
        "encoder.window_s": e.window_s,
        "encoder.max_windows": e.max_windows,
    }
    for name, value in positive.items():
        if value <= 0:
            bad(name, f"must be > 0, got {value!r}")
    if t.max_steps is not None and t.max_steps <= 0:
        bad("train.max_steps", f"must be > 0, got {t.max_steps}")
    if t.warmup_steps < 0:
        bad("train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    if not 0.0 <= t.weight_decay < 1.0:
        bad("train.weight_decay", f"must be in [0, 1), got {t.weight_decay}")
    if t.grad_clip < 0:
        bad("train.grad_clip", f"must be >= 0 (0 disables clipping), got {t.grad_clip}")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        bad("train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    if d.num_workers < 0:
        bad("data.num_workers", f"must be >= 0, got {d.num_workers}")
    if d.global_weight <= 0:
        bad("data.global_weight", f"must be > 0, got {d.global_weight}")
    if not 0 <= e.overlap_s < e.window_s:
        bad("encoder.overlap_s", f"must be in [0, window_s={e.window_s}), got {e.overlap_s}")
    at = m.audio_transformer
    if at.max_window_per_audio != m.max_num_window:
        bad(
            "model.audio_transformer.max_window_per_audio",
            f"must equal model.max_num_window ({m.max_num_window}), got {at.max_window_per_audio}",
        )
    if at.max_num_media < m.num_audio_slots:
        bad(
            "model.audio_transformer.max_num_media",
            f"must be >= max_num_window * max_num_fewshot = {m.num_audio_slots}, got {at.max_num_media}",
        )
    if not 0.0 <= at.dropout < 1.0:
        bad("model.audio_transformer.dropout", f"must be in [0, 1), got {at.dropout}")
    if e.max_windows != m.max_num_window:
        bad("encoder.max_windows", f"must equal model.max_num_window ({m.max_num_window}), got {e.max_windows}")
    if e.embed_dim != m.audio_embed_dim:
        bad("encoder.embed_dim", f"must equal model.audio_embed_dim ({m.audio_embed_dim}), got {e.embed_dim}")
    if m.lm_config is not None and "model_type" not in m.lm_config:
        bad("model.lm_config", "must contain 'model_type' (e.g. opt, llama, qwen2)")
    if t.af1_exact and t.stage == "pretrain" and t.unfreeze_lm:
        bad("train.af1_exact", "af1_exact with unfreeze_lm in pretrain is contradictory (AF1 never unfroze it there)")
    if t.unfreeze_lm and t.stage == "pretrain":
        bad("train.unfreeze_lm", "the pretrain stage keeps the LM frozen; use stage: sft or chat")
    for name, entry in d.blend.items():
        if entry.weight < 0:
            bad(f"data.blend.{name}.weight", f"must be >= 0, got {entry.weight}")
        if not 0.0 <= entry.prefix_prob <= 1.0:
            bad(f"data.blend.{name}.prefix_prob", f"must be in [0, 1], got {entry.prefix_prob}")
        if not entry.augmentations:
            bad(f"data.blend.{name}.augmentations", "must name at least one augmentation")
        if any(p < 0 for p in entry.augmentations.values()) or sum(entry.augmentations.values()) <= 0:
            bad(f"data.blend.{name}.augmentations", "probabilities must be >= 0 and sum to > 0")
        if "/" not in name:
            bad(f"data.blend.{name}", "dataset names look like '<dataset>-<task>/<split>'")
    for name in d.valid:
        if "/" not in name:
            bad("data.valid", f"{name!r}: dataset names look like '<dataset>-<task>/<split>'")
