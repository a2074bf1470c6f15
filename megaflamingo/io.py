"""Crash-safe file writes: the one helper every writer of the package goes through.

A reader (or a resumed job) must never see half a file: data goes to a temp file in the same
directory, is flushed to disk, then renamed over the target, and the directory entry itself is
flushed, so after a power loss the path holds either the old or the new content. Finished files get
the permissions the user's umask gives (``mkstemp``'s 0600 would hide run records from colleagues).
Append-only JSONL files (predictions written as they come) get the other half of crash safety:
:func:`cut_torn_tail` drops the partial last line a kill can leave.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

PathLike = Union[str, os.PathLike]


def default_mode() -> int:
    """The mode ``open()`` would give a new file under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_path(path: PathLike) -> None:
    """Flush a file's or a directory's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds the file written there is
    fsynced, given default permissions and renamed over ``path`` (then the directory is fsynced).
    On any error the temp file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        fsync_path(tmp)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any, sort_keys: bool = True) -> None:
    """JSON with a trailing newline; sorted keys by default so reruns write identical bytes."""
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, allow_nan=False) + "\n"
    atomic_write_text(path, text)


def cut_torn_tail(path: PathLike) -> int:
    """Cut an append-only JSONL file (records written whole, newline last) back to its last complete
    line, the only damage a kill during a write can leave; returns the bytes removed. Reads back from
    the end only as far as the last newline."""
    path = Path(path)
    size = path.stat().st_size if path.is_file() else 0
    if size == 0:
        return 0
    with open(path, "rb") as f:
        back = min(size, 1 << 16)
        while True:
            f.seek(size - back)
            nl = f.read(back).rfind(b"\n")
            if nl >= 0 or back == size:
                break
            back = min(size, back * 4)
    end = size - back + nl + 1 if nl >= 0 else 0
    if end < size:
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return size - end
