"""YAML -> typed, validated :class:`Config`.

Two YAML dialects are accepted:
  * ours: top-level sections ``model``, ``encoder``, ``data``, ``train``, ``deepspeed``;
  * AF1's: ``train_config``, ``data_config``, ``clap_config``, ``model_config``, ``sft_config`` (as in the
    original ``foundation/configs/*.yaml``), mapped onto ours by :mod:`megaflamingo.compat.af1_config`.

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
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from megaflamingo.compat import af1_config
from megaflamingo.errors import ConfigError
from megaflamingo.resources import packaged

from .schema import Config
from .validate import validate


_PLACEHOLDER = re.compile(r"\bYOUR_[A-Z0-9_]+\b")
_ENVVAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def load_config(
    path: Union[str, os.PathLike, None] = None,
    overrides: Optional[list[str]] = None,
    placeholders: Optional[dict[str, str]] = None,
) -> Config:
    """Load, map (AF1 dialect), override, substitute placeholders, type-check and validate."""
    if path is not None:
        path = resolve_config_path(path)
    src = str(path) if path is not None else "<defaults>"
    raw: dict = {}
    if path is not None:
        raw = read_yaml(path)
    notes: list[str] = []
    if is_af1_dialect(raw):
        notes = af1_config.ignored_af1_keys(raw)
        raw = af1_config.af1_to_ours(raw, src)
    for ov in overrides or []:
        apply_override(raw, ov, src)
    raw = substitute_placeholders(raw, dict(placeholders or {}), src)
    cfg = from_dict(Config, raw, "", src)
    cfg.source = src
    cfg.notes = notes
    validate(cfg)
    return cfg


def resolve_config_path(path: Union[str, os.PathLike]) -> Path:
    """``path`` as given, else (a bare name such as ``tiny_cpu`` or ``pretrain.yaml``) the stage config
    of that name shipped with the package, so an installed package runs its configs from anywhere."""
    p = Path(path)
    if p.is_file() or len(p.parts) != 1:
        return p
    for name in (p.name, f"{p.name}.yaml"):
        shipped = packaged("configs", name)
        if shipped is not None:
            return shipped
    return p


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
