"""Paths from manifests and configs stay inside the data root, also through symlinks.

A lexical check (no absolute paths, no ``..``) is not enough: ``root/a.wav -> /etc/...`` or a dataset
directory symlinked to another user's files passes it. :func:`resolve_inside` resolves the real path of
both the root and the target (the root itself may be a symlink) and refuses a target whose real path
leaves the real root, unless the user opted in (``--allow-outside-root`` / ``data.allow_outside_root``).
Datasets that live elsewhere on purpose are linked in with that opt-in, or copied/bind-mounted under the
root.
"""
from __future__ import annotations

import os
from pathlib import Path


class PathEscapeError(ValueError):
    """``reason``: absolute | parent | symlink | empty."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):
        return (type(self), (str(self), self.reason))


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def resolve_inside(root: str | os.PathLike, rel: str | os.PathLike, allow_outside: bool = False) -> Path:
    """``root/rel`` as a real path; PathEscapeError when it (or a symlink on the way) leaves ``root``."""
    rel = os.fspath(rel)
    if not rel:
        raise PathEscapeError("empty path", "empty")
    lexical_root = os.path.normpath(os.path.abspath(root))
    full = os.path.normpath(os.path.join(lexical_root, rel))
    if allow_outside:
        return Path(os.path.realpath(full))
    if os.path.isabs(rel):
        raise PathEscapeError(f"absolute path {rel!r} (paths are relative to {lexical_root})", "absolute")
    if not _under(full, lexical_root):
        raise PathEscapeError(f"{rel!r} escapes {lexical_root}", "parent")
    real_root = os.path.realpath(lexical_root)
    real = os.path.realpath(full)
    if not _under(real, real_root):
        raise PathEscapeError(f"{rel!r} is a symlink (or lies under one) that leads outside {lexical_root}: "
                              f"{real}", "symlink")
    return Path(real)
