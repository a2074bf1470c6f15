"""When is an embed chunk finished, and may a rerun reuse an output directory?

Three holes let a rerun report failed work as done:

* the run fingerprint (``_run.json``) did not hold the data root: a run with a wrong ``--data-root`` (every
  file "missing") and the rerun with the right one looked alike, so the rerun skipped every chunk;
* a chunk whose items all failed for a *transient* reason (the file was missing or unreadable, e.g. a
  wrong root or an unmounted filesystem) was written and marked finished like real work;
* a finished shard truncated or damaged later was skipped on the strength of its sidecar alone.

Fixes: :func:`fingerprint_extras` (the resolved data root; the manifest's content hash is already
there), :func:`chunk_status` (transient-only chunks are not finished; the shard file must match the size
and CRC-32 its sidecar recorded at write, :func:`shard_record`), and :func:`fingerprint_change_message`
(which setting changed, and how to resume or start over).
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Mapping

from megaflamingo.checkpoint.tag_manifest import checksum_file

# Reasons that say nothing about the audio itself: the same item may well succeed on a rerun.
TRANSIENT_REASONS = frozenset({"missing", "not_a_file", "unreadable"})

# Fingerprint key (flattened) -> the option that sets it.
_OPTION = {"data_root": "--data-root", "manifest_sha256": "--manifest (its content changed)",
           "num_items": "--manifest", "dataset": "--dataset", "task": "--task", "split": "--split",
           "dtype": "--dtype", "rows_per_shard": "--rows-per-shard", "min_file_bytes": "--min-file-bytes",
           "windows.window_s": "--window-s", "windows.overlap_s": "--overlap-s",
           "windows.max_windows": "--max-windows"}


def fingerprint_extras(data_root: str | os.PathLike) -> dict:
    """Fields the run fingerprint needs on top of today's: the data root as a real path."""
    return {"data_root": os.path.realpath(os.path.abspath(data_root))}


def shard_record(shard_path: str | os.PathLike) -> dict:
    """What the sidecar records about its shard file right after writing it."""
    rec = checksum_file(shard_path)
    return {"file_size": rec.size, "file_crc32": rec.crc32}


def chunk_status(sidecar: Mapping, shard_path: str | os.PathLike) -> tuple[bool, str]:
    """(finished, why). Not finished: all items failed transiently, or the shard file does not match the
    size/CRC-32 recorded at write. A sidecar from before records existed is trusted (and says so)."""
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
        return False, f"{p.name}: {size} bytes, {sidecar['file_size']} recorded when written (truncated?): redoing it"
    if checksum_file(p).crc32 != sidecar["file_crc32"]:
        return False, f"{p.name}: checksum differs from the one recorded when written (corrupted): redoing it"
    return True, f"{p.name}: finished"


def _flatten(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and not k.startswith("encoder") and not k.startswith("clip_encoder"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def fingerprint_change_message(out: str | os.PathLike, old: Mapping, new: Mapping) -> str:
    """One message: each changed setting with its old and new value and the option behind it, then how to
    resume (the old values) or start over."""
    a, b = _flatten(old), _flatten(new)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    lines = [f"{out} holds an embed run with other settings:"]
    for k in changed:
        opt = _OPTION.get(k, "--encoder/--checkpoint/--clip-encoder" if k.startswith(("encoder", "clip_encoder"))
                          else k)
        lines.append(f"  {k} ({opt}): existing {a.get(k)!r}, requested {b.get(k)!r}")
    lines.append(f"To resume it, rerun with the existing values; to start over, remove {out} or pass another --out.")
    return "\n".join(lines)
