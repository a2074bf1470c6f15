"""When is an embed chunk finished, and may a rerun reuse an output directory?

A rerun must never count failed or damaged work as done:

* the run fingerprint (``_run.json``) holds the data root as a real path and the manifest's content hash,
  so a rerun with other settings is refused with the setting named (:func:`fingerprint_change_message`),
  unless the directory holds no finished chunk yet, in which case there is nothing to protect and the
  new settings replace the old ones (the usual case: a first run with a wrong ``--data-root``);
* a chunk whose items all failed for a *transient* reason (missing or unreadable files: a wrong root, an
  unmounted filesystem) is written but not finished (:func:`chunk_status`), so a rerun redoes it;
* a finished shard is skipped only while its file still has the size and CRC-32 its sidecar recorded at
  write (``data.arrow_format.DatasetWriter``); a shard truncated or damaged later is redone.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Mapping

from megaflamingo.io import crc32_file

# Reasons that say nothing about the audio itself: the same item may well succeed on a rerun.
TRANSIENT_REASONS = frozenset({"missing", "not_a_file", "unreadable"})

# Fingerprint key (flattened) -> the option that sets it.
_OPTION = {"data_root": "--data-root", "manifest_sha256": "--manifest (its content changed)",
           "num_items": "--manifest", "dataset": "--dataset", "task": "--task", "split": "--split",
           "dtype": "--dtype", "rows_per_shard": "--rows-per-shard", "min_file_bytes": "--min-file-bytes",
           "windows.window_s": "--window-s", "windows.overlap_s": "--overlap-s",
           "windows.max_windows": "--max-windows"}


def resolved_root(data_root: str | os.PathLike) -> str:
    """The data root as the fingerprint records it: a real path (a symlinked root and its target agree)."""
    return os.path.realpath(os.path.abspath(data_root))


def chunk_status(sidecar: Mapping, shard_path: str | os.PathLike, checksum: bool = True) -> tuple[bool, str]:
    """(finished, why). Not finished: all items failed transiently, or the shard file does not match the
    size (and, with ``checksum``, the CRC-32) recorded at write. A sidecar from before records existed
    is trusted (and says so)."""
    p = Path(shard_path)
    n = int(sidecar.get("num_items", 0))
    bad = sidecar.get("bad_files") or []
    reasons = Counter(b.get("reason") for b in bad)
    if n > 0 and len(bad) == n and set(reasons) <= TRANSIENT_REASONS:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))
        return False, (f"{p.name}: all {n} items failed for reasons that may pass on a rerun ({detail}); "
                       "not finished")
    if not p.is_file():
        return False, f"{p.name}: missing"
    if "file_size" not in sidecar:
        return True, f"{p.name}: finished (no size/checksum recorded by the version that wrote it)"
    size = p.stat().st_size
    if size != int(sidecar["file_size"]):
        return False, f"{p.name}: {size} bytes, {sidecar['file_size']} recorded when written (truncated?)"
    if checksum and crc32_file(p)[1] != sidecar["file_crc32"]:
        return False, f"{p.name}: its checksum differs from the one recorded when written (corrupted)"
    return True, f"{p.name}: finished"


def flatten(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_settings(old: Mapping, new: Mapping) -> list[str]:
    """Flattened keys whose values differ; a key the old fingerprint lacks (written by an older version,
    which did not record it) does not count."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in set(a) | set(b) if k in a and a.get(k) != b.get(k))


def fingerprint_change_message(out: str | os.PathLike, old: Mapping, new: Mapping) -> str:
    """One message: each changed setting with its old and new value and the option behind it, then how to
    resume (the old values) or start over."""
    a, b = flatten(old), flatten(new)
    lines = [f"{out} holds an embed run with other settings:"]
    for k in changed_settings(old, new):
        opt = _OPTION.get(k, "--clip-encoder/--clip-checkpoint" if k.startswith("clip_encoder") else
                          "--encoder/--checkpoint/--embed-dim" if k.startswith("encoder") else k)
        lines.append(f"  {k} ({opt}): existing {a.get(k)!r}, requested {b.get(k)!r}")
    lines.append(f"To resume it, rerun with the existing values; to start over, remove {out} or pass another --out.")
    return "\n".join(lines)
