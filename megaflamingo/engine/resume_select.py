"""Which checkpoint tag to resume from, trusting only tags whose files verify.

``--resume auto`` walks the run's tags newest first and takes the first whose completion marker exists and
whose files match the marker's integrity record; every newer tag it passes over is reported with the
reason (no marker: an interrupted save or a deleted marker; a named bad, missing or extra file), so the
caller can warn on the console and in TensorBoard. An explicit ``--resume DIR`` naming a tag that does not
verify is an error (exit 2) naming the file: the user asked for that one.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from megaflamingo.checkpoint.integrity import CheckpointError
from megaflamingo.checkpoint.tag_manifest import file_owner, verify_tag

MARKER = "megaflamingo.json"
_TAG = re.compile(r"^step-(\d{8})$")

Verifier = Callable[[Path, dict], Optional[str]]  # raises CheckpointError if bad; may return a note


class ResumeError(CheckpointError):
    """The checkpoint the user named cannot be used (the CLI's exit code 2)."""


@dataclass
class ResumeChoice:
    tag: Optional[str]
    meta: Optional[dict] = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (tag, why), newest first
    note: Optional[str] = None  # e.g. "written without an integrity record: not verified"

    def warnings(self) -> list[str]:
        return [f"checkpoint {tag} skipped: {why}" for tag, why in self.skipped]


def read_marker(tag_dir: Path) -> dict:
    try:
        meta = json.loads((tag_dir / MARKER).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{tag_dir}: no completion marker {MARKER} (an interrupted save, or the marker "
                              "was deleted)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{tag_dir / MARKER}: unreadable completion marker ({e})") from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise CheckpointError(f"{tag_dir / MARKER}: not a completion marker (no 'step')")
    return meta


def owned_by(rank: int, world_size: int) -> Callable[[str], bool]:
    """Split a tag's files over the ranks that verify it (each file once, writers' own files first)."""
    return lambda name: file_owner(name) % max(1, world_size) == rank


def verify_with_record(only: Optional[Callable[[str], bool]] = None) -> Verifier:
    def verify(tag_dir: Path, meta: dict) -> Optional[str]:
        record = meta.get("integrity")
        if record is None:  # checkpoints of a version that wrote no record stay resumable
            return f"{tag_dir.name} was written without an integrity record: its files are not verified"
        verify_tag(tag_dir, record, only=only, exclude=[MARKER])
        return None
    return verify


def choose_resume_tag(ckpt_dir: str | Path, verify: Verifier) -> ResumeChoice:
    """The newest tag under ``ckpt_dir`` that has a marker and verifies (``--resume auto``)."""
    d = Path(ckpt_dir)
    tags = sorted((p.name for p in d.iterdir() if _TAG.match(p.name) and p.is_dir()), reverse=True) \
        if d.is_dir() else []
    choice = ResumeChoice(None)
    for tag in tags:
        try:
            meta = read_marker(d / tag)
            note = verify(d / tag, meta)
        except CheckpointError as e:
            choice.skipped.append((tag, str(e)))
            continue
        choice.tag, choice.meta, choice.note = tag, meta, note
        break
    return choice


def check_explicit_tag(tag_dir: str | Path, verify: Verifier) -> ResumeChoice:
    """``--resume DIR`` of one tag: it must verify, else ResumeError naming the file."""
    p = Path(tag_dir)
    if not p.is_dir():
        raise ResumeError(f"train.resume={p}: no such checkpoint directory")
    try:
        meta = read_marker(p)
        note = verify(p, meta)
    except CheckpointError as e:
        raise ResumeError(f"train.resume={p}: {e}") from None
    return ResumeChoice(p.name, meta, [], note)
