"""Faults a cluster inflicts, as a user meets them: `megaflamingo-train` under `torchrun --nproc_per_node 2`
(gloo, configs/tiny_cpu.yaml with its default dropout, the real Arrow loader, a dataset holding two rows
with NaN audio). One campaign, several checks per run (each 2-rank start costs most of a minute here):

1. a job trains; a second job on the same run dir is refused at once (exit 2 on every rank, the message
   names the holder) while the first is paused;
2. only the first job's torchrun is killed (-9): both workers exit within seconds (no orphan training on);
3. its newest checkpoint gets 16 flipped bytes in one optimizer shard, the next one loses its marker;
   `--resume DIR` of the damaged tag exits 2 naming the file;
4. `--resume auto` warns about both (log and TensorBoard), resumes from the newest tag that verifies and
   repeats the lost steps with exactly the losses the dead job logged; train_log.jsonl and TensorBoard
   show each step once; the bad rows were skipped, counted (`data/bad_rows`) and named.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megaflamingo.testing.tiny_task import write_tiny_dataset
from tests.launch.launch_util import free_port

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
REPO = Path(__file__).parents[2]
COMMON = ["--config", "tiny_cpu", "train.logging_steps=1", "train.eval_steps=1000", "train.progress_bar=false",
          "train.save_steps=2", "train.keep_last=10", "train.max_bad_row_fraction=0.2"]
NAN_ROWS = [5, 17]
SHARD = "zero_pp_rank_1_mp_rank_00_optim_states.pt"


def env_for(data_root, run_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1", MF_DATA_ROOT=str(data_root), MF_RUN_DIR=str(run_dir),
               PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "-m", "megaflamingo.cli.train", *COMMON, *args]


def run(cmd, env, timeout=400):
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                out.append(int(d))
    return sorted(out)


def running(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def log_steps(run_dir):
    f = run_dir / "train_log.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.is_file() else []


def wait_for(cond, proc, timeout, what):
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {what}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.1)


def flip(path, n=16):
    b = bytearray(path.read_bytes())
    for i in range(n):
        b[len(b) // 2 + i] ^= 0xFF
    path.write_bytes(bytes(b))


def tb_events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    data, run_dir = tmp / "data", tmp / "run"
    write_tiny_dataset(data, rows={"train": 48, "val": 8}, nan_rows={"train": NAN_ROWS})
    env = env_for(data, run_dir)
    out = {"tmp": tmp, "run": run_dir}

    # 1. The first job trains; paused, it still holds the run dir against a second job.
    first_log = open(tmp / "first.log", "w")  # a file, not a pipe: a full pipe would stall the job
    first = subprocess.Popen(torchrun("train.max_steps=40"), stdout=first_log, stderr=subprocess.STDOUT,
                             text=True, env=env, cwd=REPO, start_new_session=True)
    try:
        wait_for(lambda: len(log_steps(run_dir)) >= 1, first, 300, "a first step")
        workers = children(first.pid)  # torchrun starts each worker in a session of its own
        assert len(workers) == 2
        for w in workers:
            os.kill(w, signal.SIGSTOP)
        out["holder"] = json.loads((run_dir / ".lock").read_text())
        out["workers"] = workers
        out["rank_of"] = {w: dict(kv.split("=", 1) for kv in Path(f"/proc/{w}/environ").read_text().split("\0")
                                  if "=" in kv)["RANK"] for w in workers}
        out["second"] = run(torchrun("train.max_steps=40"), env, timeout=300)
        for w in workers:
            os.kill(w, signal.SIGCONT)

        # 2. Kill only the launcher once checkpoints 2, 4 and 6 exist.
        wait_for(lambda: len(log_steps(run_dir)) >= 7, first, 300, "step 7")
        out["dead_log"] = {r["step"]: r["loss"] for r in log_steps(run_dir)}
        os.kill(first.pid, signal.SIGKILL)
        t0 = time.time()
        while any(running(w) for w in workers) and time.time() - t0 < 30:
            time.sleep(0.1)
        out["workers_left"] = [w for w in workers if running(w)]
        out["dead_log"] = {r["step"]: r["loss"] for r in log_steps(run_dir)}  # what they logged until the end
        first.wait(30)
    finally:
        for w in children(first.pid) + out.get("workers", []):
            try:
                os.kill(w, signal.SIGKILL)
            except OSError:
                pass
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first_log.close()
    out["first_log"] = (tmp / "first.log").read_text()

    # 3. Damage: flipped bytes in the newest complete tag, a deleted marker in the one before.
    ckpt = run_dir / "checkpoints"
    complete = sorted(p.name for p in ckpt.glob("step-*") if (p / "megaflamingo.json").is_file())
    assert len(complete) >= 3, complete
    out["corrupt"], out["unmarked"], out["expected"] = complete[-1], complete[-2], complete[-3]
    flip(ckpt / out["corrupt"] / SHARD)
    (ckpt / out["unmarked"] / "megaflamingo.json").unlink()
    single = [sys.executable, "-m", "megaflamingo.cli.train", *COMMON, "train.max_steps=12"]
    out["explicit"] = run(single + ["--resume", str(ckpt / out["corrupt"])], env_for(data, tmp / "other"))

    # 4. Resume auto on 2 ranks, to step 10.
    out["resumed"] = run(torchrun("train.max_steps=10"), env)
    return out


def test_a_second_job_on_the_run_dir_is_refused_naming_the_holder(campaign):
    r, holder = campaign["second"], campaign["holder"]
    assert campaign["rank_of"][holder["pid"]] == "0" and holder["host"] == socket.gethostname()  # rank 0 holds it
    msg = f"run dir {campaign['run']} is in use by host {holder['host']} pid {holder['pid']}"
    assert r.stderr.count(msg) == 1, r.stderr[-4000:]  # rank 0 says it; rank 1 exits with the same verdict
    assert "exitcode  : 2" in r.stderr  # torchrun's report of its workers (under srun the step exits 2)
    assert re.search(r'File "[^"]*megaflamingo/', r.stderr) is None  # no traceback of ours (torchrun prints its own)


def test_workers_exit_when_only_their_launcher_is_killed(campaign):
    assert campaign["workers_left"] == []


def test_an_explicitly_named_damaged_tag_exits_2_naming_the_file(campaign):
    r = campaign["explicit"]
    assert r.returncode == 2, r.stderr[-4000:]
    assert f"{campaign['corrupt']}/{SHARD}: checksum mismatch" in r.stderr and "Traceback" not in r.stderr


def test_resume_auto_falls_back_with_warnings_and_repeats_the_lost_steps_exactly(campaign):
    r, run_dir = campaign["resumed"], campaign["run"]
    assert r.returncode == 0, r.stderr[-5000:]
    assert f"{campaign['corrupt']}/{SHARD}: checksum mismatch" in r.stderr
    assert f"{campaign['unmarked']}: no completion marker" in r.stderr
    assert f"resumed from {run_dir / 'checkpoints' / campaign['expected']}" in r.stderr
    dead, log = campaign["dead_log"], log_steps(run_dir)
    assert [x["step"] for x in log] == list(range(1, 11))  # each step once: the dead job's tail is gone
    # Default dropout, the real loader: every step the dead job had logged comes out bit for bit the same.
    assert {x["step"]: x["loss"] for x in log if x["step"] in dead} == dead
    acc = tb_events(run_dir)
    tb = [e.step for e in acc.Scalars("loss/train")]
    assert tb == list(range(1, 11))
    text = acc.Tensors("checkpoint/resume/text_summary")[0].tensor_proto.string_val[0].decode()
    assert SHARD in text and "no completion marker" in text


def test_bad_rows_are_skipped_counted_and_named(campaign):
    """Every epoch holds both NaN rows (the config packs, so an epoch of 48 rows is a few steps): the dead
    job and the resumed one named them between them, and the count carried over the resume is the two
    rows once per epoch passed (each is counted when its micro-batch is built, as in training)."""
    text = campaign["first_log"] + campaign["resumed"].stderr
    for i in NAN_ROWS:
        assert f"skipped a bad row: SynthTiny-EventClassification/train row {i} (id train-{i:05d}): shot 0: " \
               "1 window embedding(s) contain NaN/inf" in text
    acc = tb_events(campaign["run"])
    counts = {e.step: e.value for e in acc.Scalars("data/bad_rows")}
    epochs = {e.step: e.value for e in acc.Scalars("optim/epoch")}  # the epoch the step's batches came from
    assert list(counts.values()) == sorted(counts.values())
    for step in (6, 10):  # epochs before this one: both rows seen; the current one: not yet, one, or both
        assert len(NAN_ROWS) * epochs[step] <= counts[step] <= len(NAN_ROWS) * (epochs[step] + 1), (step, counts, epochs)
    assert counts[10] >= len(NAN_ROWS)  # at least one whole epoch has passed by step 10
