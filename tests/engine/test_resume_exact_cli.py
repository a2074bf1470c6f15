"""Resume through the real CLI, the real Arrow loader and the default config (the audio transformer's
dropout 0.1 is on): a run that died after step 6 with its last checkpoint at step 3 continues exactly as
the uninterrupted run, and its logs show every step once."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megaflamingo.engine.synthetic import write_tiny_dataset

pytestmark = [pytest.mark.slow]
REPO = Path(__file__).parents[2]
CFG = str(REPO / "configs" / "tiny_cpu.yaml")
COMMON = ["train.logging_steps=2", "train.eval_steps=100", "train.eval_max_batches=1", "train.progress_bar=false"]


def train(data_root, run_dir, *overrides):
    env = dict(os.environ, OMP_NUM_THREADS="1", MF_DATA_ROOT=str(data_root), MF_RUN_DIR=str(run_dir))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "megaflamingo.engine.cli", "--config", CFG, *COMMON, *overrides],
                       capture_output=True, text=True, timeout=400, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def jsonl(run_dir):
    return [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume_cli")
    write_tiny_dataset(tmp / "data", rows={"train": 48, "val": 8})
    # The uninterrupted reference: 8 steps.
    train(tmp / "data", tmp / "ref", "train.max_steps=8", "train.save_steps=100")
    # The "crashed" run: checkpoints at 3 and 6; losing step 6's checkpoint leaves a run that logged
    # steps 4-6 after its last checkpoint (what a kill -9 between saves leaves behind).
    crash = tmp / "crash"
    train(tmp / "data", crash, "train.max_steps=6", "train.save_steps=3", "train.keep_last=5")
    shutil.rmtree(crash / "checkpoints" / "step-00000006")
    (crash / "checkpoints" / "latest").write_text("step-00000003")
    train(tmp / "data", crash, "train.max_steps=8", "train.save_steps=100")  # --resume auto
    return tmp


def test_uninterrupted_runs_are_deterministic(runs):
    """Guard for the tests below: the first 6 logged steps of both runs agree (same process, same seed)."""
    ref = {r["step"]: r["loss"] for r in jsonl(runs / "ref")}
    first = {}
    for r in jsonl(runs / "crash"):
        first.setdefault(r["step"], r["loss"])
    assert [first[s] for s in range(1, 7)] == [ref[s] for s in range(1, 7)]


@pytest.mark.xfail(strict=True, reason="the training DataLoader draws its base seed from the global RNG after "
                                      "the trainer restored it, shifting dropout masks after a resume")
def test_resume_with_the_real_loader_and_dropout_is_exact(runs):
    ref = {r["step"]: r["loss"] for r in jsonl(runs / "ref")}
    last = {}
    for r in jsonl(runs / "crash"):
        last[r["step"]] = r["loss"]  # the resumed run's values come last
    assert [last[s] for s in range(4, 9)] == [ref[s] for s in range(4, 9)]


@pytest.mark.xfail(strict=True, reason="train_log.jsonl and TensorBoard keep the dead run's steps after a resume")
def test_logs_after_resume_show_each_step_once(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = [r["step"] for r in jsonl(runs / "crash")]
    assert steps == list(range(1, 9))
    acc = EventAccumulator(str(runs / "crash" / "tensorboard"))
    acc.Reload()
    tb = [e.step for e in acc.Scalars("train/loss")]
    assert tb == sorted(set(tb))
