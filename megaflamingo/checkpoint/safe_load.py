"""The one restricted loader for torch checkpoint files, and the hooks that route DeepSpeed's loads through it.

A torch file is a pickle; unpickling an arbitrary one can run any code it names (``__reduce__``). Every
checkpoint we read is therefore loaded with ``weights_only=True`` plus an explicit allow-list of the few
plain data classes DeepSpeed 0.19 writes into its rank files:

=====================================================  ========================================================
allowed global                                         where DeepSpeed puts it
=====================================================  ========================================================
``deepspeed.runtime.fp16.loss_scaler.LossScaler``      ``loss_scaler`` of every ZeRO optimizer file (fp32/bf16)
``deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler``  the same with fp16 (dynamic loss scaling)
``deepspeed.runtime.zero.config.ZeroStageEnum``        ``zero_stage`` of every ZeRO optimizer file
``deepspeed.utils.tensor_fragment.fragment_address``   ``param_slice_mappings`` of ZeRO-1/2 optimizer files
=====================================================  ========================================================

(Found by scanning real ZeRO-2/3 checkpoints, 1 and 2 ranks, fp32 and bf16, with our client state, and their
universal conversions; ``python -m megaflamingo.checkpoint.safe_load --scan DIR`` repeats the survey on any
directory, e.g. checkpoints written on a GPU cluster.) Everything else a file names is refused *before* it is
called, with an error naming the file and the refused global.

DeepSpeed itself loads with ``weights_only=False`` in several places: its checkpoint engine (model and
optimizer states on resume), its universal-checkpoint loader and converter, and ``zero_to_fp32``. Three
hooks close them:

* :class:`RestrictedCheckpointEngine` / :func:`install_restricted_checkpoint_engine`: DeepSpeed's own
  extension point (``engine.checkpoint_engine``); saving is delegated to the engine DeepSpeed configured,
  loading goes through :func:`restricted_load`.
* :func:`guarded_torch_load`: while active, ``torch.load`` itself (and ``torch.serialization.load``) is the
  restricted loader whatever ``weights_only`` the caller passes, and ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` is
  set for code that holds its own reference to the original function. This covers DeepSpeed's direct
  ``torch.load`` calls (universal loading, ``zero_to_fp32``) and any we do not know of.
* :func:`load_checkpoint` = both of the above around ``engine.load_checkpoint``; ``python -m
  megaflamingo.checkpoint.to_universal`` runs DeepSpeed's converter under the guard.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import sys
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch

from .integrity import CheckpointError

PathLike = Union[str, os.PathLike]

log = logging.getLogger("megaflamingo.checkpoint")

_ZIP_MAGIC = b"PK\x03\x04"
_ORIGINAL_LOAD = torch.serialization.load  # captured once: the guard replaces torch.load


class FileCheckpointError(CheckpointError):
    """A CheckpointError about one file (``path``); picklable across the converter's worker processes."""

    def __init__(self, message: str, path: Optional[str] = None):
        super().__init__(message)
        self.path = path

    def __reduce__(self):
        return (type(self), (str(self), self.path))


class UnsafeCheckpointError(FileCheckpointError):
    """A checkpoint file names a global outside the allow-list (it could run code when unpickled)."""

    def __init__(self, message: str, path: Optional[str] = None, refused: Optional[str] = None):
        super().__init__(message, path)
        self.refused = refused

    def __reduce__(self):
        return (type(self), (str(self), self.path, self.refused))


class NotACheckpointError(FileCheckpointError):
    """The file is not a torch checkpoint at all (neither a zip archive nor a pickle)."""


class CorruptCheckpointError(FileCheckpointError):
    """The file looks like a torch checkpoint but cannot be read: truncated or corrupted."""


# ----------------------------------------------------------------------------------------------- allow-list

def allowed_globals() -> list:
    """DeepSpeed's plain data classes that its checkpoint files hold (see the module docstring).

    Nothing else: torch's own weights-only defaults already cover tensors, storages, ``torch.Size``,
    dtypes, ``OrderedDict`` and the builtin containers."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:  # no DeepSpeed here: then no file may need its classes
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def allowed_names() -> list[str]:
    return sorted(f"{g.__module__}.{g.__qualname__}" for g in allowed_globals())


def unsafe_globals(path: PathLike) -> list[str]:
    """Globals ``path`` names that neither torch's weights-only defaults nor our allow-list accept
    (a static scan of the pickle: nothing is executed)."""
    with torch.serialization.safe_globals(allowed_globals()):
        return sorted({_python3_name(g) for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))})


# ----------------------------------------------------------------------------------------------- the loader

def _kind(p: Path) -> str:
    """'zip' (torch >= 1.6 format), 'legacy' (a bare pickle), or raise naming the file."""
    if not p.is_file():
        raise CheckpointError(f"missing checkpoint file: {p}")
    size = p.stat().st_size
    if size == 0:
        raise CorruptCheckpointError(f"{p}: empty file (an interrupted write or copy?)", str(p))
    with open(p, "rb") as f:
        head = f.read(8)
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(p):  # the central directory lives at the end: a cut file loses it
            raise CorruptCheckpointError(f"{p}: truncated or corrupted torch checkpoint ({size} bytes; the "
                                         "zip archive has no central directory)", str(p))
        return "zip"
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:  # a pickle's PROTO opcode: torch's legacy format
        return "legacy"
    raise NotACheckpointError(f"{p}: not a PyTorch checkpoint (its first bytes are {head.hex(' ')}; a torch "
                              "file is a zip archive or a pickle)", str(p))


_GLOBAL_RE = re.compile(r"GLOBAL (\S+?)(?: was not| whose module|[.,]?\s*$)", re.M)


def _python3_name(full: str) -> str:
    # torch.save writes pickle protocol 2, which stores some globals under their Python 2 names
    # (subprocess.Popen as commands.Popen); report the name the unpickler would resolve.
    import _compat_pickle

    mod, _, name = full.rpartition(".")
    mod = mod or "builtins"  # torch prints builtins without their module
    mod, name = _compat_pickle.NAME_MAPPING.get((mod, name), (_compat_pickle.IMPORT_MAPPING.get(mod, mod), name))
    return f"{mod}.{name}"


def _refused_name(e: BaseException) -> Optional[str]:
    m = _GLOBAL_RE.search(str(e))
    return _python3_name(m.group(1)) if m else None


def _reason(e: BaseException) -> str:
    for line in str(e).strip().splitlines():
        line = line.strip()
        if line and "Weights only load failed" not in line and not line.startswith("(1)"):
            return line.replace("WeightsUnpickler error: ", "")[:300]
    return type(e).__name__


def restricted_load(path: PathLike, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path)`` with ``weights_only=True`` and exactly :func:`allowed_globals` added.

    Raises :class:`UnsafeCheckpointError` (naming the file and the refused global),
    :class:`NotACheckpointError`, :class:`CorruptCheckpointError` (truncated / corrupted), or a
    CheckpointError for a missing file; never a bare torch traceback."""
    p = Path(path)
    if p.suffix == ".safetensors":  # torch.load reads these itself; the format holds no code
        return _ORIGINAL_LOAD(str(p), map_location=map_location)
    kind = _kind(p)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return _ORIGINAL_LOAD(str(p), map_location=map_location, weights_only=True,
                                  mmap=bool(mmap) and kind == "zip")
    except pickle.UnpicklingError as e:
        refused = _refused_name(e)
        if refused is not None:
            raise UnsafeCheckpointError(
                f"{p}: refused to load: it needs {refused}, which is not a tensor, a container or one of "
                f"DeepSpeed's allow-listed data classes (unpickling it could run code)", str(p), refused) from None
        raise UnsafeCheckpointError(f"{p}: refused to load: {_reason(e)}", str(p), None) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as e:
        raise CorruptCheckpointError(f"{p}: cannot read the torch checkpoint (truncated or corrupted?): "
                                     f"{_reason(e)}", str(p)) from None


def torch_load(path: PathLike, trust: bool = False, mmap: bool = True) -> Any:
    """The checkpoint tools' load: :func:`restricted_load`, memory-mapped where the format allows it.

    ``trust`` exists for the converters' ``--trust-file`` only (a file the user vouches for that holds
    other objects, e.g. an old optimizer); it loads with ``weights_only=False`` after a loud warning. The
    training path never passes it."""
    if not trust:
        return restricted_load(path, mmap=mmap)
    p = Path(path)
    kind = _kind(p)
    msg = f"loading {p} with weights_only=False (--trust-file): unpickling it can run arbitrary code"
    log.warning("%s", msg)
    warnings.warn(msg, stacklevel=2)
    try:
        return _ORIGINAL_LOAD(str(p), map_location="cpu", weights_only=False, mmap=bool(mmap) and kind == "zip")
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as e:
        raise CorruptCheckpointError(f"{p}: cannot read the torch checkpoint (truncated or corrupted?): "
                                     f"{_reason(e)}", str(p)) from None


# ----------------------------------------------------------------------------------------------- torch.load guard

_guard_lock = threading.Lock()
_guard_depth = 0
_saved_env: Optional[str] = None


def _guarded_load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **pickle_load_args):
    """Stands in for ``torch.load`` while the guard is on: the caller's ``weights_only`` is ignored."""
    if pickle_module is not None:
        raise UnsafeCheckpointError(f"{f!r}: refused to load with a custom pickle_module "
                                    f"({getattr(pickle_module, '__name__', pickle_module)})", str(f), None)
    if isinstance(f, (str, os.PathLike)):
        return restricted_load(f, map_location=map_location, mmap=bool(mmap))
    try:  # a file object or buffer: the same restriction, no path to name
        with torch.serialization.safe_globals(allowed_globals()):
            return _ORIGINAL_LOAD(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        name = getattr(f, "name", repr(f))
        raise UnsafeCheckpointError(f"{name}: refused to load: it needs {_refused_name(e) or _reason(e)}",
                                    str(name), _refused_name(e)) from None


def install_guard() -> Callable[[], None]:
    """Make ``torch.load`` the restricted loader for the whole process until the returned undo is called
    (nested installs are counted). For a process that must never unpickle code, e.g. the converter
    wrapper or the trainer."""
    global _guard_depth, _saved_env
    with _guard_lock:
        if _guard_depth == 0:
            _saved_env = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
            torch.load = _guarded_load
            torch.serialization.load = _guarded_load
        _guard_depth += 1
    done = False

    def undo() -> None:
        global _guard_depth
        nonlocal done
        with _guard_lock:
            if done:
                return
            done = True
            _guard_depth -= 1
            if _guard_depth == 0:
                torch.load = _ORIGINAL_LOAD
                torch.serialization.load = _ORIGINAL_LOAD
                if _saved_env is None:
                    os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
                else:
                    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = _saved_env
    return undo


@contextlib.contextmanager
def guarded_torch_load() -> Iterator[None]:
    """Within the block every ``torch.load`` in the process is :func:`restricted_load`."""
    undo = install_guard()
    try:
        yield
    finally:
        undo()


def guard_active() -> bool:
    return torch.load is _guarded_load


# ----------------------------------------------------------------------------------------------- DeepSpeed hooks

def _checkpoint_engine_base():
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    return CheckpointEngine


def _make_engine_class():
    base = _checkpoint_engine_base()

    class RestrictedCheckpointEngine(base):
        """DeepSpeed's configured checkpoint engine with a restricted ``load``; everything else delegated."""

        def __init__(self, inner):
            self.inner = inner
            self.name = f"Restricted({getattr(inner, 'name', type(inner).__name__)})"

        def create(self, info):
            return self.inner.create(info)

        def save(self, state_dict, path: str):
            return self.inner.save(state_dict, path)

        def makedirs(self, path, exist_ok=False):
            return self.inner.makedirs(path, exist_ok=exist_ok)

        def load(self, path: str, map_location=None):
            return restricted_load(path, map_location=map_location)

        def commit(self, info):
            return self.inner.commit(info)

        def is_data_parallel_writer(self, dp_rank):
            return self.inner.is_data_parallel_writer(dp_rank)

        def is_decoupled(self):
            return self.inner.is_decoupled()

        def set_commit_info(self, info):
            return self.inner.set_commit_info(info)

        def get_commit_info(self):
            return self.inner.get_commit_info()

        def cleanup(self):
            return self.inner.cleanup()

        def preserves_storage_sharing(self):
            return self.inner.preserves_storage_sharing()

        def __getattr__(self, name):  # engine-specific attributes (e.g. zipfile_serialization)
            if name == "inner":
                raise AttributeError(name)
            return getattr(self.inner, name)

    return RestrictedCheckpointEngine


_ENGINE_CLASS = None


def restricted_checkpoint_engine_class():
    global _ENGINE_CLASS
    if _ENGINE_CLASS is None:
        _ENGINE_CLASS = _make_engine_class()
    return _ENGINE_CLASS


def install_restricted_checkpoint_engine(engine) -> None:
    """Route ``engine``'s checkpoint loads through :func:`restricted_load` (idempotent). Call after
    ``deepspeed.initialize``, which creates ``engine.checkpoint_engine``."""
    cls = restricted_checkpoint_engine_class()
    current = getattr(engine, "checkpoint_engine", None)
    if current is None:
        raise RuntimeError("the DeepSpeed engine has no checkpoint_engine yet (call after deepspeed.initialize)")
    if not isinstance(current, cls):
        engine.checkpoint_engine = cls(current)


def load_checkpoint(engine, load_dir: PathLike, tag: Optional[str] = None, **kwargs):
    """``engine.load_checkpoint`` with every file it (and DeepSpeed's universal loader) reads restricted."""
    install_restricted_checkpoint_engine(engine)
    with guarded_torch_load():
        return engine.load_checkpoint(str(load_dir), tag=tag, **kwargs)


def fp32_state_dict_from_zero_checkpoint(ckpt_dir: PathLike, tag: Optional[str] = None, **kwargs) -> dict:
    """DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` with its loads restricted."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with guarded_torch_load():
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag, **kwargs)


# ----------------------------------------------------------------------------------------------- survey CLI

def main(argv=None) -> int:
    """``python -m megaflamingo.checkpoint.safe_load --scan DIR``: list the globals each ``*.pt`` under DIR
    names beyond torch's defaults and our allow-list (static scan; prints JSON; exit 1 if any)."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m megaflamingo.checkpoint.safe_load", description=main.__doc__)
    ap.add_argument("--scan", required=True, help="directory to scan recursively")
    a = ap.parse_args(argv)
    found: dict[str, list[str]] = {}
    for f in sorted(Path(a.scan).rglob("*.pt")):
        try:
            names = unsafe_globals(f)
        except Exception as e:  # noqa: BLE001 - report, keep scanning
            names = [f"<unreadable: {type(e).__name__}: {e}>"]
        for n in names:
            found.setdefault(n, []).append(str(f.relative_to(a.scan)))
    print(json.dumps({"allowed": allowed_names(), "refused": {k: v[:5] for k, v in found.items()}}, indent=2))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
