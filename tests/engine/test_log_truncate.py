"""After a resume from step N, the JSONL log and TensorBoard show each step once, with the new run's value."""
import json

from megaflamingo.engine.log_truncate import tensorboard_purge_step, truncate_jsonl


def scalars(run_dir, tag="loss/train"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_truncate_jsonl_keeps_steps_up_to_the_checkpoint(tmp_path):
    f = tmp_path / "train_log.jsonl"
    f.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 9)) + '{"step": 9, "lo')
    f.chmod(0o644)
    assert truncate_jsonl(f, 4) == 5  # steps 5..8 and the torn line
    assert [json.loads(x)["step"] for x in f.read_text().splitlines()] == [1, 2, 3, 4]
    assert f.stat().st_mode & 0o777 == 0o644
    assert truncate_jsonl(f, 4) == 0 and truncate_jsonl(tmp_path / "none.jsonl", 3) == 0


def test_purge_step_hides_the_dead_runs_later_events(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path / "tensorboard"))
    for s in range(1, 9):
        w.add_scalar("loss/train", 1.0 * s, s)
    w.close()
    w = SummaryWriter(str(tmp_path / "tensorboard"), purge_step=tensorboard_purge_step(3))
    for s in range(4, 7):
        w.add_scalar("loss/train", 100.0 + s, s)
    w.close()
    assert scalars(tmp_path) == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 104.0), (5, 105.0), (6, 106.0)]
    assert tensorboard_purge_step(None) is None


def test_resumed_metrics_logger_shows_each_step_once(tmp_path):
    from megaflamingo.engine.metrics import MetricsLogger

    m = MetricsLogger(tmp_path, True, 10, 0, progress_bar=False)
    for s in range(1, 9):
        m.scalars({"loss/train": 1.0 * s}, s)
    m.close()
    # resumed from the step-3 checkpoint (as the trainer opens it)
    m = MetricsLogger(tmp_path, True, 10, 3, progress_bar=False, purge_step=tensorboard_purge_step(3))
    for s in range(4, 7):
        m.scalars({"loss/train": 100.0 + s}, s)
    m.close()
    steps = [s for s, _ in scalars(tmp_path)]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4, 5, 6]
