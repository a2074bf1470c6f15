"""``<out>/<benchmark>.predictions.jsonl``: the evaluation's crash-safe state.

One JSON object per line, written whole with its newline and fsynced per batch by one process
(rank 0), so a kill can leave at most a torn final line. Opening the file for a resumed run cuts
that torn tail off (a line that is not a JSON record anywhere else is an error: the file is not
ours) and returns the ids already answered. ``<benchmark>.settings.json`` beside it records what
produced the predictions; a resume with other settings is refused instead of mixing two runs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Sequence

from megaflamingo.io import atomic_write_json, cut_torn_tail


class PredictionsError(ValueError):
    pass


def predictions_path(out_dir: str | Path, benchmark: str) -> Path:
    return Path(out_dir) / f"{benchmark}.predictions.jsonl"


def settings_path(out_dir: str | Path, benchmark: str) -> Path:
    return Path(out_dir) / f"{benchmark}.settings.json"


def iter_records(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise PredictionsError(f"{path}: line {n} is not a JSON record; not a predictions file "
                                       "this tool wrote (move it away)") from None
            if not isinstance(rec, dict) or "id" not in rec:
                raise PredictionsError(f"{path}: line {n} has no 'id'; not a predictions file")
            yield rec


def load_done(path: Path) -> dict[str, dict]:
    """id -> record of a (repaired) predictions file; the last record of an id wins."""
    if not path.is_file():
        return {}
    return {str(r["id"]): r for r in iter_records(path)}


def prepare(out_dir: Path, benchmark: str, settings: dict, resume: bool) -> dict[str, dict]:
    """Make the benchmark's files ready for appending; return the records already there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pred, sett = predictions_path(out_dir, benchmark), settings_path(out_dir, benchmark)
    has = pred.is_file() and pred.stat().st_size > 0
    if has and not resume:
        raise PredictionsError(f"{pred} exists: pass --resume to continue it, or choose another --out "
                               "(nothing was overwritten)")
    if has and sett.is_file():
        old = json.loads(sett.read_text(encoding="utf-8"))
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            k = diff[0]
            raise PredictionsError(f"{pred}: was produced with {k}={old.get(k)!r}, this run has {settings.get(k)!r}; "
                                   "resuming would mix two evaluations (use another --out)")
    cut_torn_tail(pred)
    done = load_done(pred)
    atomic_write_json(sett, settings)
    return done


class Appender:
    """Appends whole records and makes them durable (one writer: rank 0)."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "a", encoding="utf-8")

    def write(self, records: Sequence[dict]) -> None:
        if not records:
            return
        self.f.write("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records))
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> "Appender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
