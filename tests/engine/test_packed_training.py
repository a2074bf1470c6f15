"""`megaflamingo-train` with packing and the fused layout (configs/tiny_cpu.yaml) on 2 ranks through the real
Arrow loader, 1-shot and 2-shot (kNN) samples mixed: the run finishes (the ranks agree on every collective),
counts samples, not rows, and a kill -9 + resume gives the uninterrupted loss sequence bit for bit."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megaflamingo.testing.tiny_task import write_tiny_dataset

from tests.data.data_fixtures import make_knn

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
REPO = Path(__file__).parents[2]
BLEND = ("data.blend={SynthTiny-EventClassification/train: {weight: 1.0}, "
         "SynthTiny-EventClassification/interleaved_knn-train: {weight: 0.5}}")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("packdata")
    train, _ = write_tiny_dataset(root, rows={"train": 40, "val": 8})
    make_knn(train, list(range(40)), [[(i + 7) % 40] for i in range(40)])
    return root


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(run_dir):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
            "-m", "megaflamingo.cli.train", "--config", "tiny_cpu", BLEND, "model.max_num_fewshot=2",
            "model.audio_transformer.max_num_media=8", "train.max_steps=8", "train.save_steps=3",
            "train.logging_steps=2", "train.eval_steps=100", "train.progress_bar=false", "train.dist_timeout_s=60",
            f"train.run_dir={run_dir}"]


def _env(data_root):
    env = dict(os.environ, MF_DATA_ROOT=str(data_root), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _losses(run_dir):
    """step -> loss (the last record of a step: a resumed run appends the steps it redoes)."""
    out = {}
    for line in (Path(run_dir) / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def _run(cmd, env, timeout=400):
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"no exit within {timeout} s (ranks disagreeing on a collective hang):\n{out[-3000:]}")
    return p.returncode, out


def test_two_ranks_packed_kill9_resume_is_exact(tmp_path, data_root):
    env = _env(data_root)
    rc, out = _run(_cmd(tmp_path / "ref"), env)
    assert rc == 0, out[-4000:]
    assert "packing epoch 0" in out and "repeated to fill the last group" in out
    ref = _losses(tmp_path / "ref")
    assert sorted(ref) == list(range(1, 9))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "ref" / "tensorboard"))
    acc.Reload()
    fill = [e.value for e in acc.Scalars("perf/fill_rate")]
    assert fill and all(0.3 < f <= 1.0 for f in fill)
    # a packed micro-batch of 4 rows x 64 tokens holds more than 4 samples: samples/s > rows/s
    sps = acc.Scalars("perf/samples_per_s")[-1].value
    step_s = acc.Scalars("time/step_s")[-1].value
    assert sps * step_s > 2 * 4

    crash = tmp_path / "crash"
    p = subprocess.Popen(_cmd(crash), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                         start_new_session=True)
    latest = crash / "checkpoints" / "latest"
    t0 = time.time()
    while p.poll() is None and not latest.exists() and time.time() - t0 < 400:
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.communicate()
    assert latest.exists(), "no checkpoint before the kill"
    resumed_from = int(latest.read_text().split("-")[-1])
    assert resumed_from < 8
    rc, out = _run(_cmd(crash), env)
    assert rc == 0, out[-4000:]
    assert "resumed from" in out
    got = _losses(crash)
    assert {s: got[s] for s in range(resumed_from + 1, 9)} == {s: ref[s] for s in range(resumed_from + 1, 9)}
