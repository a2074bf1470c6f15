"""How much bad data a run tolerates: skipped non-finite micro-batches and dropped rows, as fractions of what
the job saw (the consecutive-skip limit alone let a run that skipped most micro-batches exit 0)."""
from types import SimpleNamespace

import pytest

from megaflamingo.config import TrainConfig
from megaflamingo.data.row_check import RowTally
from megaflamingo.engine.data_health import BadDataError, DataHealth
from megaflamingo.engine.trainer import NonFiniteLossError, Trainer


def stub_trainer(**train):
    cfg = SimpleNamespace(train=TrainConfig(**train))
    return SimpleNamespace(cfg=cfg, step=0, nonfinite_in_a_row=0, nonfinite_total=0, health=DataHealth(cfg.train),
                           world=SimpleNamespace(is_main=False))


def feed(t, pattern):
    """Run the trainer's bookkeeping of ``pattern`` (True = finite micro-batch) as train_step does."""
    for finite in pattern:
        if finite:
            t.nonfinite_in_a_row = 0
            t.health.micro_batch(finite=True)
        else:
            Trainer._skip_nonfinite(t, None)


def test_a_run_that_skips_most_micro_batches_aborts_naming_the_setting():
    t = stub_trainer(max_consecutive_nonfinite=100)
    with pytest.raises(NonFiniteLossError, match=r"6 of \d+ micro-batches skipped for a non-finite loss .*more than "
                                                 r"train.max_nonfinite_fraction=0.05"):
        feed(t, [True, False] * 20)  # never two in a row, half of them bad: over 5 % of the first 100
    assert t.nonfinite_total == 6


def test_rare_non_finite_micro_batches_are_tolerated_and_the_count_survives_a_resume():
    t = stub_trainer(max_consecutive_nonfinite=100)
    feed(t, ([True] * 49 + [False]) * 4)  # 2 %
    resumed = stub_trainer(max_consecutive_nonfinite=100)
    resumed.health.load_state_dict(t.health.state_dict())
    assert (resumed.health.nonfinite.bad, resumed.health.nonfinite.seen) == (4, 200)
    off = stub_trainer(max_consecutive_nonfinite=100, max_nonfinite_fraction=1.0)
    feed(off, [True, False] * 60)


def test_bad_rows_over_budget_stop_the_run():
    h = DataHealth(TrainConfig(max_bad_row_fraction=0.01))
    loader = SimpleNamespace(rows=RowTally())
    loader.rows.seen, loader.rows.bad = 500, 10
    assert h.check_rows(loader) == 10  # 10 <= 0.01 * max(500, 1000)
    loader.rows.seen, loader.rows.bad = 1500, 16
    with pytest.raises(BadDataError, match=r"16 of 1500 rows with NaN/inf audio .*train.max_bad_row_fraction=0.01"):
        h.check_rows(loader)
    assert DataHealth(TrainConfig()).check_rows(SimpleNamespace()) == 0  # a loader that does not count rows
