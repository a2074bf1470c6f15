"""DeepSpeed JSON + our ``train`` section -> the dict handed to ``deepspeed.initialize``.

One source of truth per number: micro-batch, accumulation, global batch, precision and clipping come
from ``train``; the JSON holds what only DeepSpeed knows (ZeRO stage, offload, buckets, prefetch).
The JSON may leave those numbers out or write ``"auto"``; a concrete value that contradicts
``train`` is a :class:`ConfigError` naming both places. The optimizer and scheduler are ours (param
groups, schedules), so ``optimizer``/``scheduler`` sections in the JSON are refused.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

from megaflamingo.config import Config, ConfigError
from megaflamingo.resources import packaged

def resolve_ds_json(path: str, config_source: Optional[str] = None) -> Path:
    """Absolute, or relative to the cwd, to the stage config's directory's parent, or one of the
    JSONs shipped with the package (``ds_configs/zero3.json`` works from any directory, installed or
    not)."""
    p = Path(path)
    candidates = [p] if p.is_absolute() else [Path.cwd() / p]
    if not p.is_absolute() and config_source and Path(config_source).exists():
        candidates.append(Path(config_source).resolve().parent.parent / p)
    for c in candidates:
        if c.is_file():
            return c
    if not p.is_absolute() and p.parts[:1] == ("ds_configs",) and len(p.parts) == 2:
        shipped = packaged("ds_configs", p.name)
        if shipped is not None:
            return shipped
        candidates.append(Path("<package>") / p)
    raise ConfigError(f"deepspeed.config: DeepSpeed JSON {path!r} not found (looked in "
                      f"{', '.join(str(c) for c in candidates)}) ({config_source or '<config>'})")


def _strip_comments(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_comments(v) for k, v in obj.items() if not str(k).startswith("_comment")}
    return obj


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        d = d.setdefault(part, {})
    d[parts[-1]] = value


def load_ds_json(path: Path) -> dict:
    try:
        return _strip_comments(json.loads(Path(path).read_text(encoding="utf-8")))
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config: invalid JSON in {path}: {e}") from None


def build_ds_config(cfg: Config, world_size: int, hidden_size: Optional[int] = None,
                    ds_json: Optional[dict] = None) -> dict:
    """Merge; ``ds_json`` (already loaded) wins over reading ``cfg.deepspeed.config``."""
    t = cfg.train
    src = cfg.deepspeed.config
    if ds_json is None:
        path = resolve_ds_json(cfg.deepspeed.config, cfg.source)
        src = str(path)
        ds = load_ds_json(path)
    else:
        ds = copy.deepcopy(_strip_comments(ds_json))
    for key, value in cfg.deepspeed.overrides.items():
        _set_dotted(ds, key, value)
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"{src}: remove the '{section}' section; the optimizer and LR schedule are "
                              f"set by train.lr / train.lr_scheduler / train.weight_decay ...")

    def own(key: str, value: Any, field: str, node: Optional[dict] = None) -> None:
        node = ds if node is None else node
        current = node.get(key, "auto")
        if current != "auto" and current != value:
            raise ConfigError(f"{src}: '{key}' is {current!r} but {field} gives {value!r}; "
                              f"remove it from the JSON (or write \"auto\") so {field} is the one source")
        node[key] = value

    own("train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size")
    own("gradient_accumulation_steps", t.gradient_accumulation_steps, "train.gradient_accumulation_steps")
    own("train_batch_size", t.micro_batch_size * t.gradient_accumulation_steps * world_size,
        f"train.micro_batch_size x train.gradient_accumulation_steps x world size ({world_size})")
    own("gradient_clipping", float(t.grad_clip), "train.grad_clip")
    for prec in ("bf16", "fp16"):
        node = ds.setdefault(prec, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{src}: '{prec}' must be an object")
        own("enabled", t.precision == prec, f"train.precision ({t.precision!r})", node)
    if t.precision == "fp16":
        ds["fp16"].setdefault("loss_scale", 0)  # dynamic scaling
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if hidden_size:
        # HF's rules of thumb for the bucket sizes, scaled to the model's width.
        auto = {
            "reduce_bucket_size": hidden_size * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size,
        }
        for key, value in auto.items():
            if zero.get(key) == "auto":
                zero[key] = value
    leftover = _find_auto(ds)
    if leftover:
        raise ConfigError(f"{src}: '{leftover}' is \"auto\" but nothing fills it (only micro-batch, "
                          "accumulation, batch size, clipping, precision and ZeRO bucket sizes are filled)")
    ds.setdefault("steps_per_print", 10**9)  # our logger prints; keep DeepSpeed's own quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _find_auto(obj: Any, path: str = "") -> Optional[str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            hit = _find_auto(v, f"{path}.{k}" if path else k)
            if hit:
                return hit
    elif obj == "auto":
        return path
    return None


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offload_optimizer_device(ds: dict) -> str:
    return str(ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none"))
