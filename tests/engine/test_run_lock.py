"""One job per run dir: real processes contend for ``<run_dir>/.lock``."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from megaflamingo.engine.run_lock import LOCK_NAME, RunLock, RunLockedError, job_id

REPO = Path(__file__).parents[2]

HOLDER = textwrap.dedent("""
    import os, sys, time
    from megaflamingo.engine.run_lock import RunLock, RunLockedError
    lock = RunLock(sys.argv[1], heartbeat_s=0.2)
    try:
        warning = lock.acquire()
    except RunLockedError as e:
        print(f"megaflamingo-train: error: {e}", file=sys.stderr)
        sys.exit(2)
    if sys.argv[2] == "fork-child":  # a worker that inherits the lock descriptor, as a forked loader would
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
    print("ACQUIRED", warning or "", flush=True)
    sys.stdin.read()  # hold until the test closes stdin
    lock.release()
""")


def start(run_dir, mode="plain", **env):
    e = dict(os.environ, **env)
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e, cwd=REPO,
                            start_new_session=True)


def wait_acquired(p, timeout=30):
    line = p.stdout.readline()
    assert line.startswith("ACQUIRED"), (line, p.stderr.read() if p.poll() is not None else "")
    return line[len("ACQUIRED"):].strip()


def second(run_dir, timeout=20):
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-c", HOLDER.replace("sys.stdin.read()", "pass"), str(run_dir), "plain"],
                       capture_output=True, text=True, timeout=timeout, cwd=REPO, stdin=subprocess.DEVNULL)
    return r, time.monotonic() - t


@pytest.fixture
def procs():
    started = []
    yield started
    for p in started:
        try:  # the whole group: a forked child may outlive its parent
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def test_second_job_exits_2_at_once_naming_the_holder(tmp_path, procs):
    a = start(tmp_path, SLURM_JOB_ID="4242")
    procs.append(a)
    assert wait_acquired(a) == ""
    r, secs = second(tmp_path)
    assert r.returncode == 2, r.stderr
    assert f"host {socket.gethostname()} pid {a.pid}, job slurm:4242" in r.stderr
    assert str(tmp_path) in r.stderr and "another train.run_dir" in r.stderr
    assert secs < 10  # the interpreter start-up dominates
    rec = json.loads((tmp_path / LOCK_NAME).read_text())
    assert rec["pid"] == a.pid and rec["released"] is False  # the loser did not touch the record


def test_kill9_of_the_holder_frees_the_run_dir(tmp_path, procs):
    a = start(tmp_path)
    procs.append(a)
    wait_acquired(a)
    os.killpg(a.pid, signal.SIGKILL)
    a.wait()
    r, _ = second(tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"previous holder (host {socket.gethostname()} pid {a.pid}" in r.stdout and "stale" in r.stdout


def test_clean_exit_releases_without_warning(tmp_path, procs):
    a = start(tmp_path)
    procs.append(a)
    wait_acquired(a)
    a.stdin.close()
    assert a.wait(timeout=20) == 0
    assert json.loads((tmp_path / LOCK_NAME).read_text())["released"] is True
    r, _ = second(tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ACQUIRED", r.stdout + r.stderr


def test_an_orphan_that_inherited_the_lock_is_named(tmp_path, procs):
    """The job died but a forked worker lives on (and may still write): the run dir stays taken, and the
    message says which process holds it."""
    a = start(tmp_path, mode="fork-child")
    procs.append(a)
    wait_acquired(a)
    os.kill(a.pid, signal.SIGKILL)  # the job only; its child keeps running
    a.wait()
    r, _ = second(tmp_path)
    assert r.returncode == 2
    assert "process is gone but its lock is still held by pid(s)" in r.stderr
    assert "stop it first" in r.stderr


def _fake_holder(path: Path, host: str, beat_every: float | None, age: float = 0.0):
    """Write another host's record (no flock: as on a filesystem whose locks are node-local)."""
    stop = threading.Event()

    def write():
        rec = {"host": host, "pid": 12345, "job_id": "slurm:7", "started": time.time() - 100,
               "heartbeat": time.time() - age, "heartbeat_s": beat_every or 0.3, "released": False}
        path.write_text(json.dumps(rec).ljust(2048))

    write()
    t = None
    if beat_every:
        def loop():
            while not stop.wait(beat_every):
                write()
        t = threading.Thread(target=loop, daemon=True)
        t.start()
    return stop


def test_other_host_with_a_live_heartbeat_keeps_the_run_dir(tmp_path):
    stop = _fake_holder(tmp_path / LOCK_NAME, "node-a", beat_every=0.3)
    try:
        with pytest.raises(RunLockedError, match="host node-a pid 12345, job slurm:7") as e:
            RunLock(tmp_path, heartbeat_s=0).acquire()
        assert e.value.holder["host"] == "node-a"
    finally:
        stop.set()


def test_other_host_whose_heartbeat_stopped_is_taken_over(tmp_path):
    _fake_holder(tmp_path / LOCK_NAME, "node-a", beat_every=None)  # recent, but frozen: it crashed
    lock = RunLock(tmp_path, heartbeat_s=0)
    warning = lock.acquire()
    assert "node-a" in warning and "did not move" in warning
    lock.release()
    _fake_holder(tmp_path / LOCK_NAME, "node-b", beat_every=None, age=10_000)
    lock = RunLock(tmp_path, heartbeat_s=0)
    t = time.monotonic()
    assert "10000 s old" in lock.acquire() and time.monotonic() - t < 1  # old enough: no need to watch
    lock.release()


def test_without_flock_a_live_local_pid_keeps_it(tmp_path, procs):
    a = start(tmp_path)
    procs.append(a)
    wait_acquired(a)
    with pytest.raises(RunLockedError, match=f"pid {a.pid}"):
        RunLock(tmp_path, use_flock=False, heartbeat_s=0).acquire()


def test_heartbeat_moves_and_job_id_sources(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.1)
    lock.acquire()
    first = json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"]
    time.sleep(0.5)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] > first
    lock.release()
    assert job_id({"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "8", "SLURM_ARRAY_TASK_ID": "3"}) == "slurm:8_3"
    assert job_id({"PBS_JOBID": "77.server"}) == "pbs:77.server"
    assert job_id({}) is None
