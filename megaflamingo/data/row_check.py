"""Bad rows at train time: detect, skip, count, and stop when there are too many.

A row whose window embeddings hold NaN/inf would make the model refuse the whole batch (no dataset, no
row id) and kill the job. Instead the sample builder checks each row (:func:`bad_row`; vectorised, a few
microseconds per row) and hands the collator a marker instead of a sample; the collator drops it and
reports it under ``batch["bad_rows"]``; the loader's :class:`RowTally` logs the dataset and row id and
counts it (part of the loader state, so a resumed run keeps counting); the trainer sums the counts over
ranks (``data/bad_rows``) and :class:`FractionBudget` stops the run once more than
``train.max_bad_row_fraction`` of the rows seen were bad. The same budget, with its own limit
(``train.max_nonfinite_fraction``), bounds the micro-batches the trainer skips for a non-finite loss.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

log = logging.getLogger("megaflamingo.data")

BAD_ROW = "bad_row"  # key of the marker a dataset returns instead of a sample


@dataclass(frozen=True)
class BadRow:
    dataset: str
    row_id: str
    reason: str

    def __str__(self) -> str:
        return f"{self.dataset} row {self.row_id}: {self.reason}"


def bad_windows(windows: Sequence[np.ndarray]) -> Optional[str]:
    """Why a row's window embeddings (one [n, D] array per shot) cannot be trained on, or None."""
    for k, w in enumerate(windows):
        a = np.asarray(w)
        if a.size == 0:
            return f"shot {k} has no windows"
        if not np.isfinite(a).all():
            n = int((~np.isfinite(a)).any(axis=-1).sum()) if a.ndim > 1 else 1
            return f"shot {k}: {n} window embedding(s) contain NaN/inf"
    return None


def bad_row(source, j: int, item) -> Optional[BadRow]:
    """A :class:`BadRow` for item ``j`` of ``source`` (a ``data.sources.Source``) when its audio cannot be
    trained on, naming the row by its position in the split and its ``id``."""
    why = bad_windows([s.windows for s in item.shots])
    if why is None:
        return None
    row = int(source.knn.index[j]) if source.knn is not None else int(j)
    try:
        rid = source.ds.text(row, "id")
    except Exception:  # noqa: BLE001 - the id is a courtesy; the row number is enough
        rid = None
    return BadRow(source.name, f"{row}" + (f" (id {rid})" if rid else ""), why)


class RowTally:
    """Rows a loader handed over and bad rows it dropped (this rank's; the trainer sums over ranks)."""

    def __init__(self, what: str = "train"):
        self.what = what
        self.seen = 0
        self.bad = 0

    def take(self, batch: dict) -> dict:
        """Count one collated batch (its rows, the rows it dropped) and log each bad row."""
        bad = batch.pop("bad_rows", None) or []
        rows = batch.get("num_samples", batch["input_ids"].shape[0])  # a packed row holds several samples
        self.seen += int(rows) + int(batch.get("num_skipped", 0))
        self.take_bad(bad)
        return batch

    def take_bad(self, bad) -> None:
        """Count and log rows dropped before collation (packing finds them in its length pass)."""
        self.seen += len(bad)
        self.bad += len(bad)
        for b in bad:
            log.warning("%s data: skipped a bad row: %s", self.what, b)

    def state_dict(self) -> dict:
        return {"seen": self.seen, "bad": self.bad}

    def load_state_dict(self, st: Optional[dict]) -> None:
        st = st or {}  # loader states written before rows were counted
        self.seen, self.bad = int(st.get("seen", 0)), int(st.get("bad", 0))


class FractionBudget:
    """Over budget when ``bad > max_fraction * max(seen, min_count)``: a rate judged over what was seen,
    without stopping at the first bad item of a young run (before ``min_count`` items the allowance is
    fixed at ``max_fraction * min_count``). ``max_fraction`` 1.0 disables it."""

    def __init__(self, what: str, config_key: str, max_fraction: float, min_count: int = 100):
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"{config_key}: must be in [0, 1], got {max_fraction}")
        self.what, self.key, self.max_fraction, self.min_count = what, config_key, float(max_fraction), int(min_count)
        self.bad = 0
        self.seen = 0

    def add(self, bad: int, seen: int) -> None:
        self.bad += int(bad)
        self.seen += int(seen)

    def exceeded(self) -> bool:
        return self.max_fraction < 1.0 and self.bad > self.max_fraction * max(self.seen, self.min_count)

    def message(self) -> str:
        return (f"{self.bad} of {self.seen} {self.what} ({100 * self.bad / max(self.seen, 1):.1f}%) were bad, more "
                f"than {self.key}={self.max_fraction} allows; aborting (the log names each one)")

    def state_dict(self) -> dict:  # carried in the checkpoint so a resumed run keeps counting
        return {"bad": self.bad, "seen": self.seen}

    def load_state_dict(self, st: Optional[dict]) -> None:
        st = st or {}
        self.bad, self.seen = int(st.get("bad", 0)), int(st.get("seen", 0))
