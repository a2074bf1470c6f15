"""The Slurm harness and the Slurm helpers on a real cluster: two srun tasks on two nodes take their
ranks from Slurm's variables alone (megaflamingo.engine.distributed; the job exports only
MASTER_ADDR, as launch/slurm_train.sbatch does) and all-reduce over gloo; `engine.slurm.requeue`
really requeues a running job."""
import textwrap
import time

import pytest

from tests.launch.launch_util import job_env
from tests.launch.slurm_cluster import SlurmError

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.distributed]

RENDEZVOUS = textwrap.dedent("""
    import datetime, os
    import torch, torch.distributed as dist
    from megaflamingo.engine.distributed import discover_env
    world = discover_env()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    t = torch.tensor([float(world.rank + 1)])
    dist.all_reduce(t)
    print(f"RESULT rank={world.rank} world={world.world_size} local={world.local_rank} launcher={world.launcher} "
          f"master={os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} sum={t.item():g}", flush=True)
    dist.destroy_process_group()
""")


def test_srun_tasks_on_two_nodes_rendezvous_and_all_reduce(slurm_cluster, tmp_path):
    script = tmp_path / "rdzv.py"
    script.write_text(RENDEZVOUS)
    out = tmp_path / "rdzv.out"
    # The batch step's own environment (SLURM_PROCID=0, SLURM_NTASKS=2) must not be mistaken for a
    # rank: only the srun tasks take part.
    # The simulated nodes' names do not resolve: give the address, as the sbatch script does
    # (from NodeAddr). Rank, world size, local rank and port come from Slurm's variables.
    job = slurm_cluster.sbatch(["--nodes=2", "--ntasks-per-node=1", f"--output={out}",
                                "--wrap", f"srun --kill-on-bad-exit=1 python {script}"],
                               env=job_env(MASTER_ADDR="127.0.0.1"))
    try:
        slurm_cluster.wait_job(job, {"COMPLETED"}, timeout=180)
    except SlurmError as e:
        pytest.fail(f"{e}\n--- job output\n{out.read_text() if out.exists() else '(none)'}")
    lines = sorted(line for line in out.read_text().splitlines() if line.startswith("RESULT"))
    assert len(lines) == 2, out.read_text()
    port = 20000 + job % 20000  # megaflamingo.engine.slurm.master_port
    for rank, line in enumerate(lines):
        assert line == (f"RESULT rank={rank} world=2 local=0 launcher=slurm master=127.0.0.1:{port} sum=3"), line


def test_requeue_helper_requeues_a_running_job(slurm_cluster, tmp_path, monkeypatch):
    from megaflamingo.engine import slurm

    job = slurm_cluster.sbatch(["--nodes=1", "--requeue", f"--output={tmp_path}/sleep.out", "--wrap", "sleep 120"])
    slurm_cluster.wait_job(job, {"RUNNING"}, timeout=60)
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    monkeypatch.setenv("SLURM_JOB_ID", str(job))
    assert slurm.requeue() is True
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = slurm_cluster.job_info(job)
        if info["JobState"] == "PENDING" and info.get("Restarts") == "1":
            break
        time.sleep(0.3)
    else:
        pytest.fail(f"job {job} was not requeued: {info}")
    slurm_cluster.run(["scancel", str(job)])
    monkeypatch.delenv("SLURM_JOB_ID")
    assert slurm.requeue() is False  # not inside a job: nothing to requeue
