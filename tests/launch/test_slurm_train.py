"""The real launch/slurm_train.sbatch on a real Slurm: 2 nodes x 1 task, configs/tiny_cpu.yaml, gloo.

One job plays the whole story (two trainer start-ups instead of three keeps the suite fast):
it starts training; a second 2-node job on the same run dir is refused (exit 2, naming the first job)
while the first one's ranks are paused; the test sends the batch shell SIGUSR1 exactly as
``#SBATCH --signal=B:USR1@600`` would before the time limit; every rank checkpoints at the same step
and exits 75; the script requeues the job; the requeued run resumes from that checkpoint and trains
to the end.
(c) checks the refused second job; (d) the end state (job COMPLETED, TensorBoard events, checkpoints
of both ranks); (e) the stop / requeue / resume in between.
"""
import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.launch.launch_util import REPO, job_env, read_steps
from tests.launch.slurm_cluster import SlurmError

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.distributed]

MAX_STEPS = 100  # the signal lands within ~3 steps of the first; the rest is the resumed run


@pytest.fixture(scope="module")
def requeued_job(slurm_cluster, tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm_train")
    run_dir = tmp / "run"
    out = tmp / "job.out"
    job = slurm_cluster.sbatch(
        ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={out}",
         str(REPO / "launch/slurm_train.sbatch"), "configs/tiny_cpu.yaml",
         f"train.max_steps={MAX_STEPS}", "train.save_steps=1000", "train.eval_steps=1000", "train.logging_steps=20",
         "train.progress_bar=false", "train.dist_timeout_s=120",
         # A loader worker per rank: Slurm signals every process of the step, workers included,
         # and a worker killed by SIGUSR1 would turn the graceful stop into a crash.
         "data.num_workers=1"],
        env=job_env(MF_DATA_ROOT=str(tiny_data), MF_RUN_DIR=str(run_dir)), cwd=REPO)

    def log():
        return out.read_text(errors="replace") if out.exists() else "(no job output yet)"

    # 1. Wait until the trainer is inside its training loop (rank 0 logs every step).
    deadline = time.monotonic() + 300
    while not read_steps(run_dir):
        state = slurm_cluster.job_info(job)["JobState"]
        if state not in ("PENDING", "RUNNING") or time.monotonic() > deadline:
            pytest.fail(f"job {job} {state} before its first training step\n{log()}\n{slurm_cluster.logs_tail()}")
        time.sleep(0.2)
    # 2. A second job on the same run dir, both nodes, while the first one's ranks are paused (so the
    #    first cannot finish meanwhile): refused at start-up, every rank, exit 2.
    ranks = trainer_pids(job)
    assert len(ranks) == 2, ranks
    for pid in ranks:
        os.kill(pid, signal.SIGSTOP)
    second_out = tmp / "second.out"
    try:
        second = slurm_cluster.sbatch(
            ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--no-requeue",
             f"--output={second_out}", str(REPO / "launch/slurm_train.sbatch"), "configs/tiny_cpu.yaml",
             "train.progress_bar=false"],
            env=job_env(MF_DATA_ROOT=str(tiny_data), MF_RUN_DIR=str(run_dir)), cwd=REPO)
        second_info = slurm_cluster.wait_job(second, {"FAILED"}, timeout=300)
    except SlurmError as e:
        pytest.fail(f"{e}\n--- second job output\n{second_out.read_text() if second_out.exists() else '(none)'}")
    finally:
        for pid in ranks:
            os.kill(pid, signal.SIGCONT)
    # 3. What `--signal=B:USR1@600` does 10 minutes before the time limit.
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", str(job)])
    # 4. The script requeues; Slurm holds a requeued job back (BeginTime = now + ~2 min) so its
    #    nodes can clean up. Release it early: only the wait is skipped, not the requeue.
    deadline = time.monotonic() + 240
    while True:
        info = slurm_cluster.job_info(job)
        if info["JobState"] == "PENDING" and info.get("Restarts") == "1":
            break
        if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") or time.monotonic() > deadline:
            pytest.fail(f"job {job} was not requeued after SIGUSR1 ({info['JobState']})\n{log()}")
        time.sleep(0.3)
    stop_step = len(read_steps(run_dir))
    slurm_cluster.release_requeued(job)
    # 5. The requeued run resumes and finishes.
    try:
        final = slurm_cluster.wait_job(job, {"COMPLETED"}, timeout=300)
    except SlurmError as e:
        pytest.fail(f"{e}\n--- job output\n{log()}")
    return {"job": job, "info": final, "log": log(), "run_dir": run_dir, "stop_step": stop_step,
            "second": {"info": second_info, "log": second_out.read_text(errors="replace")}}


def trainer_pids(job: int) -> list[int]:
    """The trainer processes (srun tasks) of ``job``: the simulated nodes run them on this host."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            env = Path(f"/proc/{d}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
            ppid = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1]
            parent = Path(f"/proc/{ppid}/comm").read_text().strip()
        except OSError:
            continue
        # a task of the job's srun step (its parent is slurmstepd), not the srun client or the batch shell
        if f"SLURM_JOB_ID={job}".encode() in env and parent == "slurmstepd" and \
                any(c.endswith(b"megaflamingo-train") for c in cmd[:2]):
            out.append(int(d))
    return sorted(out)


def test_c_a_second_job_on_the_run_dir_is_refused_naming_the_first(requeued_job):
    info, log = requeued_job["second"]["info"], requeued_job["second"]["log"]
    assert info["ExitCode"] == "2:0" and info["Restarts"] == "0", info
    assert f"run dir {requeued_job['run_dir']} is in use by host" in log, log
    assert f"job slurm:{requeued_job['job']}" in log, log  # the holder's Slurm job id
    assert "srun finished with status 2" in log and "requeueing" not in log, log


def test_d_sbatch_job_completes_with_tensorboard_and_checkpoints(requeued_job):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    info, log, run_dir = requeued_job["info"], requeued_job["log"], requeued_job["run_dir"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    assert "world size 2 (slurm)" in log, log  # both srun tasks joined one process group
    assert "srun finished with status 0" in log, log

    ckpt = run_dir / "checkpoints"
    final_tag = f"step-{MAX_STEPS:08d}"
    assert (ckpt / "latest").read_text().strip() == final_tag
    for rank in (0, 1):  # ZeRO-3 shards of both ranks, i.e. of both nodes
        assert (ckpt / final_tag / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").is_file()
        assert (ckpt / final_tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file()

    events = sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 2, events  # one writer per run (first run, requeued run)
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    loss = acc.Scalars("loss/train")
    assert loss[-1].step == MAX_STEPS and all(e.value == e.value for e in loss)
    assert {"optim/lr", "perf/tokens_per_s", "loss/valid"} <= set(acc.Tags()["scalars"])


def test_e_signal_checkpoints_requeues_and_the_requeued_run_resumes(requeued_job):
    log, run_dir, k = requeued_job["log"], requeued_job["run_dir"], requeued_job["stop_step"]
    assert 1 <= k < MAX_STEPS, k
    assert "SIGUSR1 (time limit near)" in log, log
    # Every rank exited 75 ("stopped after a checkpoint") and the script requeued on that status.
    assert "trainer stopped after a checkpoint (status 75): requeueing" in log, log
    m = re.search(r"stopped by signal at step (\d+); checkpoint saved", log)
    assert m and int(m.group(1)) == k, log
    # The stop checkpoint is complete (keep_last=2 keeps it next to the final one).
    assert (run_dir / "checkpoints" / f"step-{k:08d}" / "megaflamingo.json").is_file()
    assert "restart 1] nodes" in log, log  # the same script ran again as the requeued job
    assert requeued_job["info"]["Restarts"] == "1"

    # Resumed, not restarted: the second run's first step is k + 1, every step is logged exactly
    # once across both runs, and the loss keeps falling from where the first run left off.
    steps = [r["step"] for r in read_steps(run_dir)]
    assert steps == list(range(1, MAX_STEPS + 1)), steps
    losses = [r["loss"] for r in read_steps(run_dir)]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.5, losses


def test_a_failing_trainer_fails_the_job_without_requeue(slurm_cluster, tmp_path):
    out = tmp_path / "bad.out"
    job = slurm_cluster.sbatch(
        ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={out}",
         str(REPO / "launch/slurm_train.sbatch"), str(tmp_path / "missing.yaml")],
        env=job_env(), cwd=REPO)
    try:
        info = slurm_cluster.wait_job(job, {"FAILED"}, timeout=180)
    except SlurmError as e:
        pytest.fail(f"{e}\n--- job output\n{out.read_text() if out.exists() else '(none)'}")
    log = out.read_text()
    # The CLI's "bad config" status (2) is the job's exit code; nothing is requeued.
    assert info["ExitCode"] == "2:0" and info["Restarts"] == "0", info
    assert "missing.yaml" in log and "srun finished with status 2" in log and "requeueing" not in log, log
