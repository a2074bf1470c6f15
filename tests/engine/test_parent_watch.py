"""Workers die with their launcher: kill -9 only the launcher, the worker must be gone within seconds."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from megaflamingo.engine.parent_watch import Proc, alive, launcher_chain, proc_info
from tests.launch.launch_util import free_port

REPO = Path(__file__).parents[2]

WORKER = textwrap.dedent("""
    import json, os, sys, time
    mode, out = sys.argv[1], sys.argv[2]
    if mode != "none":
        from megaflamingo.engine.parent_watch import install
        # "pdeathsig": the kernel alone (the watchdog polls once an hour); "watchdog": the thread alone.
        install("torch", world_size=2, interval_s=3600 if mode == "pdeathsig" else 0.2,
                pdeathsig={"pdeathsig": True, "watchdog": False, "auto": "auto"}[mode])
    with open(out, "w") as f:
        json.dump({"pid": os.getpid()}, f)
    time.sleep(120)
""")

LAUNCHER = textwrap.dedent("""
    import os, subprocess, sys, threading, time
    mode, out, from_thread = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    cmd = [sys.executable, "-c", sys.argv[4], mode, out]

    def spawn_then_end():
        subprocess.Popen(cmd)
        while not os.path.exists(out):  # until the worker has set itself up, then this thread ends
            time.sleep(0.05)
        time.sleep(0.5)

    if from_thread:  # spawn from a short-lived thread, then keep running (the prctl caveat)
        t = threading.Thread(target=spawn_then_end)
        t.start()
        t.join()
    else:
        subprocess.Popen(cmd)
    time.sleep(120)
""")


def wait_file(p: Path, timeout=60):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if p.exists() and p.stat().st_size:
            try:
                return json.loads(p.read_text())
            except ValueError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"{p} not written within {timeout} s")


def wait_gone(pid: int, start: int, timeout: float) -> float:
    """Seconds until ``pid`` (with that start time) is gone or a zombie; inf if it outlives ``timeout``."""
    p = Proc(pid, 0, start, "")
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if not alive(p):
            return time.monotonic() - t
        time.sleep(0.05)
    return float("inf")


def kill_tree(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_case(tmp_path, mode, from_thread=False):
    out = tmp_path / f"{mode}.json"
    la = subprocess.Popen([sys.executable, "-c", LAUNCHER, mode, str(out), "1" if from_thread else "0", WORKER],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    worker = wait_file(out)["pid"]
    return la, worker, proc_info(worker).start


@pytest.mark.parametrize("mode", ["pdeathsig", "watchdog"])
def test_worker_exits_when_only_its_launcher_is_killed(tmp_path, mode):
    la, worker, start = run_case(tmp_path, mode)
    try:
        time.sleep(0.5)
        assert alive(Proc(worker, 0, start, ""))
        la.kill()
        la.wait()
        assert wait_gone(worker, start, 10) < 5
    finally:
        kill_tree([worker])


def test_control_an_unwatched_worker_outlives_its_launcher(tmp_path):
    la, worker, start = run_case(tmp_path, "none")
    try:
        la.kill()
        la.wait()
        assert wait_gone(worker, start, 2) == float("inf")  # the orphan keeps running: the bug being fixed
    finally:
        kill_tree([worker])


def test_pdeathsig_fires_on_the_spawning_thread_not_the_process(tmp_path):
    """prctl(2): the signal follows the parent THREAD. A launcher that spawns from a thread which then ends
    kills its live worker if PDEATHSIG is forced; "auto" does not use it under an unknown parent."""
    la, worker, start = run_case(tmp_path, "pdeathsig", from_thread=True)
    try:
        assert wait_gone(worker, start, 5) < 5  # killed although the launcher lives on
        assert la.poll() is None
    finally:
        la.kill()
        la.wait()
        kill_tree([worker])
    la, worker, start = run_case(tmp_path, "auto", from_thread=True)
    try:
        assert wait_gone(worker, start, 2) == float("inf")
        la.kill()
        la.wait()
        assert wait_gone(worker, start, 10) < 5  # ... and the watchdog still catches the real exit
    finally:
        kill_tree([worker])


def test_launcher_chain_recognises_launchers_from_their_command_lines():
    from megaflamingo.engine import parent_watch as pw

    kinds = {}
    for cmd in ("/usr/bin/python -m torch.distributed.run --nproc_per_node 2 x.py", "/venv/bin/torchrun x.py",
                "/venv/bin/python -u -m deepspeed.launcher.launch --world_info=e30= x.py",
                "/venv/bin/python /venv/bin/deepspeed --num_gpus 2 x.py", "mpirun -np 2 python x.py",
                "/usr/bin/prted --prtemca ess env", "slurmstepd: [12.0]", "bash", "python train.py"):
        kinds[cmd.split()[0] if "deepspeed" not in cmd else cmd] = next(
            (k for k, pat, _, _ in pw._LAUNCHERS if pat.search(cmd)), None)
    assert list(kinds.values()) == ["torchrun", "torchrun", "deepspeed-launch", "deepspeed", "mpirun", "mpi-daemon",
                                    "slurmstepd", None, None]
    assert launcher_chain() == [] or all(p.kind for p in launcher_chain())


SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    from megaflamingo.engine.distributed import discover_env
    from megaflamingo.engine.parent_watch import install, launcher_chain
    world = discover_env()
    if os.environ.get("MF_TEST_NO_WATCH") != "1":
        install(world.launcher, world.world_size)
    with open(f"{os.environ['MF_TEST_OUT']}.rank{world.rank}", "w") as f:  # argv: deepspeed adds --local_rank
        json.dump({"pid": os.getpid(), "chain": [p.kind for p in launcher_chain()]}, f)
    time.sleep(120)
""")


def _launch_real(tmp_path, name, cmd_prefix, env_extra=None):
    script = tmp_path / "w.py"
    script.write_text(SCRIPT)
    out = tmp_path / name
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MF_TEST_OUT=str(out), **(env_extra or {}))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.Popen([*cmd_prefix, str(script)], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, start_new_session=True)
    ranks = [wait_file(Path(f"{out}.rank{r}"), timeout=180) for r in (0, 1)]
    return p, ranks


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_workers_exit_when_the_deepspeed_command_is_killed(tmp_path):
    """``deepspeed`` -> ``deepspeed.launcher.launch`` -> workers: killing the top command alone leaves
    ``launch`` (the workers' parent) running; the workers watch the runner above it too."""
    ds = Path(sys.executable).with_name("deepspeed")
    ds = ds if ds.is_file() else Path(shutil.which("deepspeed") or ds)  # a venv layered over another
    p, ranks = _launch_real(tmp_path, "ds", [sys.executable, str(ds), "--num_gpus", "2", "--master_port",
                                             str(free_port())])
    workers = [(r["pid"], proc_info(r["pid"]).start) for r in ranks]
    launch = proc_info(proc_info(ranks[0]["pid"]).ppid)
    try:
        assert all(r["chain"] == ["deepspeed-launch", "deepspeed"] for r in ranks)
        os.kill(p.pid, signal.SIGKILL)  # the runner only
        p.wait()
        assert max(wait_gone(pid, st, 8) for pid, st in workers) < 5
    finally:
        kill_tree([pid for pid, _ in workers] + ([launch.pid] if launch else []))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not shutil.which("mpirun"), reason="no Open MPI")
def test_mpirun_workers_exit_when_mpirun_is_killed(tmp_path):
    p, ranks = _launch_real(tmp_path, "mpi", ["mpirun", "--allow-run-as-root", "-np", "2", sys.executable])
    workers = [(r["pid"], proc_info(r["pid"]).start) for r in ranks]
    try:
        assert all(r["chain"] == ["mpirun"] for r in ranks)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        assert max(wait_gone(pid, st, 8) for pid, st in workers) < 5
    finally:
        kill_tree([pid for pid, _ in workers])
