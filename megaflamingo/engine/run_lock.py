"""One job per run directory: an exclusive lock on ``<run_dir>/.lock`` held for the job's lifetime.

Two jobs on one run dir interleave checkpoints, ``latest`` and the logs, and each one's save deletes the
other's same-step directory. The global rank 0 takes the lock before anything is written; every other
rank waits for its verdict (one broadcast), so a multi-node ``srun`` job needs no shared-filesystem
locking from its other nodes.

How the lock works, and where it can fail:

* ``flock(LOCK_EX | LOCK_NB)`` on ``.lock`` (never deleted: deleting a lock file lets two processes lock
  two different inodes). The kernel drops the lock when the holder dies, including by ``kill -9``, so a
  crashed job never blocks its requeue. On NFS (Linux >= 2.6.12) ``flock`` is carried out as a POSIX lock
  by the server, across client hosts; a client that crashes loses it when its lease expires (NFSv4: about
  90 s).
* Some cluster filesystems do not lock across nodes (Lustre mounted with ``localflock``, some FUSE
  filesystems) or refuse (``ENOLCK``/``EOPNOTSUPP``). So the holder also writes a record into the file
  (host, pid, job id, start time, command) and refreshes a heartbeat in it every ``heartbeat_s``. A job
  that gets the ``flock`` but finds an unreleased record of another host with a recent heartbeat watches
  that heartbeat for two periods: if it moves, the holder is alive and flock is node-local here, so the
  run dir is taken. A record whose holder is gone (same host: the kernel released its lock, or without
  flock its pid is dead; other host: a heartbeat older than ``stale_after_s`` or one that stopped) is
  stale: the lock is taken over with a warning naming the old holder.
* A clean exit marks the record released.

A second job fails at once with :class:`RunLockedError` naming the holder (the CLI's exit code 2).
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Mapping, Optional

LOCK_NAME = ".lock"
_RECORD_BYTES = 2048  # fixed-size record, rewritten in one pwrite: a reader never sees a half-short file


class RunLockedError(RuntimeError):
    """The run dir is held by another live job; ``holder`` is its record (may be empty if unreadable)."""

    def __init__(self, message: str, holder: Optional[dict] = None):
        super().__init__(message)
        self.holder = holder or {}


def job_id(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The scheduler's id of this job (Slurm array tasks as ``<array job>_<task>``), or None."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"slurm:{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    for key, name in (("SLURM_JOB_ID", "slurm"), ("LSB_JOBID", "lsf"), ("PBS_JOBID", "pbs"),
                      ("JOB_ID", "sge"), ("TORCHELASTIC_RUN_ID", "torchrun")):
        if env.get(key):
            return f"{name}:{env[key]}"
    return None


def describe(holder: Mapping) -> str:
    if not holder:
        return "another process (its lock record is unreadable)"
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    job = f", job {holder['job_id']}" if holder.get("job_id") else ""
    return f"host {holder.get('host', '?')} pid {holder.get('pid', '?')}{job}, started {when}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def local_lock_holders(path: Path) -> list[int]:
    """PIDs that hold a lock on ``path`` according to /proc/locks (Linux; [] elsewhere). flock locks follow
    the open file: a child that inherited the descriptor keeps the lock after its parent died."""
    try:
        st = os.stat(path)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 6 and parts[5] == want and parts[1] == "FLOCK":
            try:
                pids.append(int(parts[4]))
            except ValueError:
                pass
    return sorted(set(pids))


class RunLock:
    def __init__(self, run_dir: str | os.PathLike, heartbeat_s: float = 15.0, stale_after_s: float = 120.0,
                 use_flock: bool = True):
        self.path = Path(run_dir) / LOCK_NAME
        self.heartbeat_s, self.stale_after_s, self.use_flock = heartbeat_s, stale_after_s, use_flock
        self.fd: Optional[int] = None
        self.record: dict = {}
        self._stop = threading.Event()
        self._beat: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ record
    def _read_record(self, fd: int) -> dict:
        try:
            raw = os.pread(fd, _RECORD_BYTES, 0).decode("utf-8", "replace").strip().strip("\x00")
            return json.loads(raw) if raw else {}
        except (OSError, ValueError):
            return {"unreadable": True}

    def _write_record(self) -> None:
        data = json.dumps(self.record).encode()
        if len(data) > _RECORD_BYTES:
            self.record["argv"] = self.record.get("argv", [])[:4]
            data = json.dumps(self.record).encode()[:_RECORD_BYTES]
        os.pwrite(self.fd, data.ljust(_RECORD_BYTES, b" "), 0)
        os.fsync(self.fd)

    def _stale_reason(self, fd: int, rec: dict, flocked: bool) -> Optional[str]:
        """None if ``rec`` describes a live holder; else why the lock may be taken (released, gone, stale)."""
        if not rec or rec.get("released"):
            return "released"
        if rec.get("unreadable"):
            # Nobody holds the kernel lock, so whoever wrote it is gone (same host) or flock is node-local.
            return "its lock record is unreadable and nobody holds the lock" if flocked else None
        if rec.get("host") == socket.gethostname():
            if flocked:  # the kernel released the holder's lock: it is gone (its pid may be reused already)
                return f"its process {rec.get('pid')} no longer holds the lock"
            pid = int(rec.get("pid", -1))
            return None if _pid_alive(pid) else f"its process {pid} is gone"
        age = time.time() - float(rec.get("heartbeat", 0))
        if age > self.stale_after_s:
            return f"its last heartbeat is {age:.0f} s old (> {self.stale_after_s:.0f} s)"
        # Another host, recent heartbeat, yet we got the flock: either its lease expired (it crashed) or
        # this filesystem does not lock across nodes. Only a heartbeat that moves tells them apart.
        wait = 2 * float(rec.get("heartbeat_s", self.heartbeat_s)) + 2
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            time.sleep(min(1.0, wait))
            now = self._read_record(fd)
            if now.get("heartbeat") != rec.get("heartbeat") or now.get("pid") != rec.get("pid"):
                return None
        return f"its heartbeat did not move for {wait:.0f} s"

    # ------------------------------------------------------------------ acquire / release
    def acquire(self) -> Optional[str]:
        """Take the lock or raise RunLockedError. Returns a warning when a stale holder was replaced."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        flocked = False
        try:
            if self.use_flock:
                try:
                    import fcntl

                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    flocked = True
                except BlockingIOError:
                    rec = self._read_record(fd)
                    raise RunLockedError(self._held_message(rec, flock=True), rec) from None
                except OSError as e:
                    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                        raise
                    # This filesystem cannot lock: the heartbeat record alone decides (see module doc).
            rec = self._read_record(fd)
            why = self._stale_reason(fd, rec, flocked)
            if why is None:
                raise RunLockedError(self._held_message(rec, flock=False), rec)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        now = time.time()
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": job_id(), "started": now,
                       "heartbeat": now, "heartbeat_s": self.heartbeat_s, "argv": sys.argv[:16], "released": False}
        self._write_record()
        if self.heartbeat_s > 0:
            self._beat = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
            self._beat.start()
        if why != "released":
            return f"took over the lock on {self.path.parent}: the previous holder ({describe(rec)}) is stale: {why}"
        return None

    def _held_message(self, rec: dict, flock: bool) -> str:
        text = f"run dir {self.path.parent} is in use by {describe(rec)}"
        if flock and rec.get("host") == socket.gethostname() and rec.get("pid") and not _pid_alive(int(rec["pid"])):
            others = local_lock_holders(self.path)
            text += ("; that process is gone but its lock is still held"
                     + (f" by pid(s) {', '.join(map(str, others))}" if others else "")
                     + " (a worker it started is still running: stop it first)")
        return (text + f". Two jobs on one run dir overwrite each other's checkpoints: wait for it, stop it, "
                f"or use another train.run_dir (lock file: {self.path})")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.record["heartbeat"] = time.time()
                self._write_record()
            except OSError:  # a transient filesystem error must not kill training; the next beat retries
                pass

    def release(self) -> None:
        if self.fd is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        try:
            self.record.update(released=True, released_at=time.time())
            self._write_record()
        except OSError:
            pass
        os.close(self.fd)  # drops the flock
        self.fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def take_run_lock(run_dir: str | os.PathLike, rank: int, **kw) -> tuple[Optional[RunLock], Optional[str]]:
    """Global rank 0 takes the lock; every rank learns its verdict by one broadcast (when a process group
    is up) and raises the same RunLockedError. Returns (the lock on rank 0 else None, a takeover warning)."""
    import torch.distributed as dist

    lock, verdict = None, {"error": None, "holder": None, "warning": None}
    if rank == 0:
        lock = RunLock(run_dir, **kw)
        try:
            verdict["warning"] = lock.acquire()
        except RunLockedError as e:
            lock, verdict = None, {"error": str(e), "holder": e.holder, "warning": None}
        except OSError as e:  # e.g. a read-only run dir: every rank must hear it, not wait forever
            lock, verdict = None, {"error": f"cannot lock run dir {run_dir}: {e}", "holder": None, "warning": None}
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [verdict]
        dist.broadcast_object_list(box, src=0)
        verdict = box[0]
    if verdict["error"] is not None:
        raise RunLockedError(verdict["error"], verdict["holder"])
    return lock, verdict["warning"]
