"""Load a model for inference from whatever the user has.

* a model directory (``megaflamingo-convert export``, ``zero-to-fp32`` or ``split`` output, or an
  ``af1-import``): config + weights (+ tokenizer, + the encoder record the training data was made with), read by
  :func:`megaflamingo.checkpoint.model_dir.load_model_dir`;
* a raw DeepSpeed training checkpoint (a run directory or its ``checkpoints/`` folder): exported
  first (:func:`megaflamingo.checkpoint.export.export`) into a temporary model dir;
* an AF1 checkpoint (``foundation.pt`` / ``chat.pt`` or its 5 parts): imported first
  (:func:`megaflamingo.checkpoint.export.af1_import`; needs a config for the LM/tokenizer).

Conversion errors reach the caller as they are (they name the file and the problem).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

from megaflamingo.checkpoint.export import af1_import, export
from megaflamingo.checkpoint.load import find_index
from megaflamingo.checkpoint.model_dir import (CONFIG_FILE, LoadedModel, ModelLoadError, encoder_record_from_dataset,
                                               load_model_dir)

__all__ = ["LoadedModel", "ModelLoadError", "detect_kind", "encoder_record_from_dataset", "load_model"]


def detect_kind(path: Path) -> str:
    if path.is_file():
        if path.suffix in (".pt", ".pth", ".bin"):
            return "af1"
        raise ModelLoadError(f"{path}: not a model directory or an AF1 .pt checkpoint")
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} does not exist")
    # a model dir: export / af1-import output, or zero-to-fp32 / split output (config copied beside)
    if any((path / n).is_file() for n in (CONFIG_FILE, "megaflamingo_config.json")) and (
            list(path.glob("*.safetensors")) or find_index(path) is not None):
        return "export"
    if (path / "latest").is_file() or list(path.glob("global_step*")) or (path / "checkpoints").is_dir():
        return "deepspeed"
    if list(path.glob("*_part*.pt")):
        return "af1"
    raise ModelLoadError(f"{path}: not an exported model dir, a DeepSpeed checkpoint or an AF1 checkpoint")


def load_model(path: str | os.PathLike, device: str = "cpu", dtype: Optional[str] = None,
               config: Optional[str] = None, encoder_record: Optional[dict] = None,
               cache_dir: Optional[str | os.PathLike] = None) -> LoadedModel:
    """A DeepSpeed checkpoint or an AF1 file is converted to a model dir first: a temporary one,
    removed once the weights are in memory, or ``<cache_dir>/<name>`` (kept, reused by later calls
    when ``cache_dir`` is given)."""
    path = Path(path)
    kind = detect_kind(path)
    if kind == "export":
        loaded = load_model_dir(path, device, dtype, encoder_record)
    else:
        if kind == "af1" and config is None:
            raise ModelLoadError(f"{path}: an AF1 checkpoint needs --config (the model/LM/tokenizer settings)")
        convert = _from_deepspeed if kind == "deepspeed" else (lambda p, o: _from_af1(p, o, config))
        if cache_dir is not None:
            out = Path(cache_dir) / f"{kind}-{path.resolve().name}"
            if not (out / CONFIG_FILE).is_file():
                _convert_into(convert, path, out)
            loaded = load_model_dir(out, device, dtype, encoder_record)
        else:
            with tempfile.TemporaryDirectory(prefix=f"megaflamingo-{kind}-") as tmp:
                convert(path, Path(tmp))
                loaded = load_model_dir(Path(tmp), device, dtype, encoder_record)
    loaded.kind, loaded.source = kind, str(path)
    return loaded


def _convert_into(convert: Callable[[Path, Path], None], path: Path, out: Path) -> None:
    """Convert into a temp dir next to ``out``, then rename: a half-converted dir is never reused."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        convert(path, tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _from_deepspeed(path: Path, out: Path) -> None:
    export(path, out, progress=False)  # a run dir means its checkpoints/


def _from_af1(path: Path, out: Path, config: str) -> None:
    af1_import(path, out, config, progress=False)
