"""Bad rows at train time: detect, skip, count, and stop when there are too many.

A row whose window embeddings hold NaN/inf would make the model refuse the whole batch ("audio_embeds
contain NaN/inf in batch row(s) [1]": no dataset, no row id) and kill the job. Instead the sample builder
checks each row (:func:`bad_windows`; vectorised, a few microseconds per row), the collator drops it
and reports it (:class:`BadRow`: dataset, row id, reason), the loader counts it (``train/bad_rows``) and
logs the dataset and row id, and :class:`FractionBudget` aborts the run once more than
``train.max_bad_row_fraction`` of the rows seen were bad. The same budget, with its own limit, bounds
the micro-batches the trainer skips for a non-finite loss (a run that skipped 63% of them must not exit 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


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


class BudgetExceededError(RuntimeError):
    pass


class FractionBudget:
    """Abort when ``bad > max_fraction * max(seen, min_count)``: a rate judged over what was seen, without
    aborting on the first bad row of a young run (before ``min_count`` items the budget is fixed at
    ``max_fraction * min_count``). ``max_fraction`` 1.0 disables it."""

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

    def check(self) -> None:
        if self.exceeded():
            raise BudgetExceededError(
                f"{self.bad} of {self.seen} {self.what} ({100 * self.bad / max(self.seen, 1):.1f}%) were bad, more "
                f"than {self.key}={self.max_fraction}; aborting (the log names each one)")

    def state_dict(self) -> dict:  # carried in the checkpoint so a resumed run keeps counting
        return {"bad": self.bad, "seen": self.seen}

    def load_state_dict(self, st: dict) -> None:
        self.bad, self.seen = int(st.get("bad", 0)), int(st.get("seen", 0))
