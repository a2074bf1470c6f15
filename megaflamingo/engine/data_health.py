"""How much bad data a run tolerates before it stops: micro-batches skipped for a non-finite loss, and rows
the loader dropped for NaN/inf audio (``data.row_check``). Both are fractions of what the whole job saw
(every rank agrees: the non-finite vote is global, row counts are summed over ranks), carried in the
checkpoint so a resumed run keeps counting."""
from __future__ import annotations

from typing import Optional

import torch

from megaflamingo.config import TrainConfig
from megaflamingo.data.row_check import FractionBudget

from .distributed import all_reduce_sum

MIN_MICRO_BATCHES = 100  # judge the non-finite rate over at least this many micro-batches
MIN_ROWS = 1000          # and the bad-row rate over at least this many rows


class BadDataError(RuntimeError):
    """More of the training data was unusable than the config tolerates."""


class DataHealth:
    def __init__(self, t: TrainConfig):
        self.nonfinite = FractionBudget("micro-batches skipped for a non-finite loss", "train.max_nonfinite_fraction",
                                        t.max_nonfinite_fraction, MIN_MICRO_BATCHES)
        self.rows = FractionBudget("rows with NaN/inf audio", "train.max_bad_row_fraction", t.max_bad_row_fraction,
                                   MIN_ROWS)
        self.bad_rows_total = 0  # over ranks, as of the last check

    def micro_batch(self, finite: bool) -> Optional[str]:
        """Count one micro-batch (the same on every rank); the abort message when the skipped ones are
        now over budget."""
        self.nonfinite.add(0 if finite else 1, 1)
        return None if finite or not self.nonfinite.exceeded() else self.nonfinite.message()

    def check_rows(self, loader) -> int:
        """Sum the loader's row tally over ranks (a collective: call on every rank); raise BadDataError
        when the bad ones are over budget. Returns the job's bad rows so far."""
        tally = getattr(loader, "rows", None)
        mine = (tally.bad, tally.seen) if tally is not None else (0, 0)
        bad, seen = (int(x) for x in all_reduce_sum(torch.tensor(mine, dtype=torch.float64)).tolist())
        self.rows.bad, self.rows.seen = bad, seen
        self.bad_rows_total = bad
        if self.rows.exceeded():
            raise BadDataError(self.rows.message())
        return bad

    def state_dict(self) -> dict:
        return {"nonfinite": self.nonfinite.state_dict()}  # row counts live in each rank's loader state

    def load_state_dict(self, st: Optional[dict]) -> None:
        self.nonfinite.load_state_dict((st or {}).get("nonfinite"))
