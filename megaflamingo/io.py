"""Crash-safe file writes: the one helper every writer of the package goes through.

A reader (or a resumed job) must never see half a file: data goes to a temp file in the same
directory, is flushed to disk, then renamed over the target, and the directory entry itself is
flushed, so after a power loss the path holds either the old or the new content. Finished files get
the permissions the user's umask gives (``mkstemp``'s 0600 would hide run records from colleagues).

Also here, because every layer needs them and this module depends on nothing: the CRC-32 of a file
(checkpoint and dataset-shard integrity records) and the one check that a path from a manifest or a
config stays inside its root, also through symlinks. Append-only JSONL files (predictions written
as they come) get the other half of crash safety: :func:`cut_torn_tail` drops the partial last line
a kill can leave.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zlib
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


# --------------------------------------------------------------------------------------- checksums

_CRC_CHUNK = 8 << 20


def file_chunks(path: PathLike, chunk: int = _CRC_CHUNK) -> Iterator[memoryview]:
    """The bytes of a file as views of one reused buffer (unbuffered reads: no second copy). A view
    is valid until the next one is produced."""
    buf = bytearray(chunk)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                return
            yield mv[:n]


def crc32_file(path: PathLike) -> tuple[int, str]:
    """``(size, CRC-32 as 8 hex digits)`` of a file (zlib releases the GIL, so several files hash in
    parallel threads). CRC-32 is for accidents (bit rot, truncation, torn writes), not for attackers:
    nothing that executes code is ever loaded from a file we only hash."""
    crc, size = 0, 0
    for part in file_chunks(path):
        crc = zlib.crc32(part, crc)
        size += len(part)
    return size, f"{crc & 0xFFFFFFFF:08x}"


# --------------------------------------------------------------------------------------- data-root paths


class PathEscapeError(ValueError):
    """A path leaves the root it must stay in. ``reason``: absolute | parent | symlink | empty."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):
        return (type(self), (str(self), self.reason))


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def path_inside(root: PathLike, rel: PathLike, allow_outside: bool = False) -> Path:
    """``root/rel`` (normalised), refused with :class:`PathEscapeError` when it leaves ``root``: an
    absolute path, a ``..`` escape, or a symlink on the way whose target lies outside the root (real
    paths of both are compared, so the root itself may be a symlink, and links between places inside
    the root are fine). ``allow_outside`` is the user's explicit opt-in (``--allow-outside-root`` /
    ``data.allow_outside_root``): then anything goes."""
    rel = os.fspath(rel)
    if not rel:
        raise PathEscapeError("empty path", "empty")
    lexical_root = os.path.normpath(os.path.abspath(root))
    full = os.path.normpath(os.path.join(lexical_root, rel))
    if allow_outside:
        return Path(full)
    if os.path.isabs(rel):
        raise PathEscapeError(f"absolute path {rel!r} (paths are relative to {lexical_root})", "absolute")
    if not _under(full, lexical_root):
        raise PathEscapeError(f"{rel!r} escapes {lexical_root}", "parent")
    real = os.path.realpath(full)
    if not _under(real, os.path.realpath(lexical_root)):
        raise PathEscapeError(f"{rel!r} leads outside {lexical_root} through a symlink (to {real})", "symlink")
    return Path(full)


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
