"""Logs that restart with the run: after a resume from step N, nothing the dead run logged past N stays.

The dead run wrote steps N+1..M to ``train_log.jsonl`` and TensorBoard before it died; the resumed run
writes N+1.. again with other values. Two fixes:

* :func:`truncate_jsonl` rewrites the JSONL keeping the records with ``step <= N`` (atomically, see
  ``megaflamingo.io``), dropping a torn last line too;
* TensorBoard: ``SummaryWriter(log_dir, purge_step=N + 1)`` (:func:`tensorboard_purge_step`) writes a
  ``SessionLog.START`` event at step N+1 into the new event file; TensorBoard's reader then hides every
  event with ``step >= N + 1`` from the older files. The old files are not modified.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from megaflamingo.io import atomic_write_bytes


def tensorboard_purge_step(resumed_step: Optional[int]) -> Optional[int]:
    """``purge_step`` for the SummaryWriter of a run resumed at ``resumed_step`` (None: a fresh run)."""
    return None if resumed_step is None else int(resumed_step) + 1


def truncate_jsonl(path: str | os.PathLike, keep_through_step: int, step_key: str = "step") -> int:
    """Keep the lines of ``path`` whose ``step_key`` is <= ``keep_through_step``; returns how many were
    dropped (records past the step, and unparsable lines such as a half-written last one)."""
    p = Path(path)
    if not p.is_file():
        return 0
    kept, dropped = [], 0
    with open(p, "rb") as f:
        for raw in f:
            try:
                rec = json.loads(raw)
                ok = int(rec[step_key]) <= keep_through_step
            except (ValueError, KeyError, TypeError):
                ok = False
            if ok:
                kept.append(raw if raw.endswith(b"\n") else raw + b"\n")
            else:
                dropped += 1
    if dropped == 0:
        return 0
    atomic_write_bytes(p, b"".join(kept))
    return dropped
