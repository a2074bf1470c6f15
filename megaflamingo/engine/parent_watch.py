"""Workers die with their launcher.

When only the launcher of a job is killed (``kill -9`` of torchrun, of the ``deepspeed`` command, of
mpirun), its workers are re-parented to init and keep training and writing checkpoints; a requeued job
then races them for the run dir. Each worker therefore watches the launcher processes above it and exits
within about a second when one of them is gone.

Who "the launcher" is, per launcher (the chain :func:`launcher_chain` walks up from the worker):

==========================  ==============================================================================
``torchrun``                the elastic agent is the worker's parent
``deepspeed`` (one node)    ``deepspeed`` (runner) -> ``python -m deepspeed.launcher.launch`` -> worker: the
                            parent AND the runner above it; killing the runner alone leaves ``launch``
                            (and so the workers' parent) alive
``mpirun`` (Open MPI)       the parent is ``mpirun``/``prterun`` on its node or the ``prted``/``orted``
                            daemon elsewhere (which kills its children when mpirun goes)
``srun``                    the parent is ``slurmstepd``; Slurm ends the tasks of a step itself (``srun``
                            runs on another host); watching slurmstepd covers a crash of the step daemon
==========================  ==============================================================================

Two mechanisms, because neither is enough alone:

* ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (Linux, via ctypes): the kernel kills the worker the moment its
  parent goes, even while the worker is stuck in a C call that holds the GIL. Caveats (prctl(2)): the
  signal fires when the parent *thread* that forked the worker exits, not the parent process, so it is
  only used when the parent is a launcher known to spawn workers from its main thread (torchrun's agent,
  DeepSpeed's ``launch``, mpirun and its daemons); it covers the parent only; a parent that died between
  fork and the ``prctl`` call is missed, which is why ``getppid()`` is compared with the parent seen at
  start right after setting it; it is cleared in forked children (DataLoader workers have torch's own
  parent watchdog).
* a daemon thread polling every ``interval_s`` whether each launcher in the chain still exists (same pid,
  same start time, not a zombie) and whether ``getppid()`` changed: portable, sees the runner above
  DeepSpeed's ``launch``, and prints which launcher is gone before ``os._exit`` (no atexit handler, no
  checkpoint: this process must stop writing).

A plain single-process run (no launcher) watches nothing: closing the terminal of a ``nohup`` run must not
stop it.
"""
from __future__ import annotations

import ctypes
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

EXIT_LAUNCHER_GONE = 1
PR_SET_PDEATHSIG = 1

# (kind, pattern on the command line, spawns workers from its main thread, keep walking up after it)
_LAUNCHERS = (
    ("torchrun", re.compile(r"torch\.distributed\.run|(^|/)torchrun(\s|$)|torch/distributed/run\.py"), True, False),
    ("deepspeed-launch", re.compile(r"deepspeed\.launcher\.launch"), True, True),
    ("deepspeed", re.compile(r"deepspeed\.launcher\.runner|(^|/)deepspeed(\s|$)"), True, False),
    ("mpirun", re.compile(r"(^|/)(mpirun|mpiexec|orterun|prterun)(\s|$)"), True, False),
    ("mpi-daemon", re.compile(r"(^|/)(orted|prted)(\s|$)"), True, False),
    ("slurmstepd", re.compile(r"(^|/)slurmstepd(:|\s|$)"), False, False),
)


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    start: int  # clock ticks since boot (/proc/<pid>/stat field 22): tells a reused pid apart
    cmdline: str
    kind: Optional[str] = None
    main_thread_spawner: bool = False


def _stat(pid: int) -> Optional[tuple[str, int, int]]:
    """(state, ppid, start time) from /proc, or None if the process does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2:].split()  # the command name may contain spaces and parentheses
    return rest[0], int(rest[1]), int(rest[19])


def proc_info(pid: int) -> Optional[Proc]:
    st = _stat(pid)
    if st is None:
        return None
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\x00", b" ").decode("utf-8", "replace").strip()
    except OSError:
        cmd = ""
    for kind, pat, main_thread, _ in _LAUNCHERS:
        if pat.search(cmd):
            return Proc(pid, st[1], st[2], cmd, kind, main_thread)
    return Proc(pid, st[1], st[2], cmd)


def alive(p: Proc) -> bool:
    st = _stat(p.pid)
    return st is not None and st[0] not in ("Z", "X") and st[2] == p.start


def launcher_chain(pid: Optional[int] = None) -> list[Proc]:
    """The launcher processes above ``pid`` (default: this process), nearest first: the parent if it is a
    known launcher, and further up while a launcher says it is started by another (DeepSpeed's launch)."""
    if not Path("/proc/self/stat").exists():
        return []
    me = proc_info(pid or os.getpid())
    chain: list[Proc] = []
    cur = proc_info(me.ppid) if me else None
    while cur is not None and cur.kind is not None and len(chain) < 4:
        chain.append(cur)
        keep_walking = next(k for kind, _, _, k in _LAUNCHERS if kind == cur.kind)
        if not keep_walking:
            break
        cur = proc_info(cur.ppid)
    return chain


def set_pdeathsig(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` when the parent (thread) exits. False where not supported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(int(sig)), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class ParentWatch:
    def __init__(self, chain: list[Proc], parent_pid: int, interval_s: float = 1.0,
                 exit_code: int = EXIT_LAUNCHER_GONE):
        self.chain, self.parent_pid, self.interval_s, self.exit_code = chain, parent_pid, interval_s, exit_code
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="launcher-watch", daemon=True)

    def gone(self) -> Optional[str]:
        if os.getppid() != self.parent_pid:
            return f"parent pid {self.parent_pid} exited (re-parented to {os.getppid()})"
        for p in self.chain:
            if not alive(p):
                return f"{p.kind} (pid {p.pid}) exited"
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            why = self.gone()
            if why is not None:
                self._die(why)

    def _die(self, why: str) -> None:
        try:
            sys.stderr.write(f"[pid {os.getpid()}] launcher gone: {why}; exiting at once so this orphan stops "
                             "training and writing checkpoints\n")
            sys.stderr.flush()
        finally:
            os._exit(self.exit_code)

    def start(self) -> "ParentWatch":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()


def install(launcher: str, world_size: int = 2, interval_s: float = 1.0, pdeathsig: str | bool = "auto",
            chain: Optional[list[Proc]] = None) -> Optional[ParentWatch]:
    """Make this worker exit when its launcher goes. ``launcher`` is ``World.launcher`` (torch | mpi | slurm
    | single); nothing is watched for ``single``, nor for a world of one whose parent is no known launcher
    (RANK/WORLD_SIZE exported by hand in a shell). ``pdeathsig``: "auto" (only under a parent known to
    spawn from its main thread), True, or False. Returns the watch (None if there is nothing to watch)."""
    if launcher == "single":
        return None
    parent = os.getppid()
    chain = launcher_chain() if chain is None else chain
    if not chain and world_size <= 1:
        return None  # RANK/WORLD_SIZE exported by hand for one process: nobody to outlive
    watch = ParentWatch(chain, parent, interval_s)
    if not chain and parent <= 1:
        # Launched, yet our parent is init and no launcher: it died before we got here (a launcher that
        # is itself PID 1, e.g. torchrun as a container's entrypoint, is in the chain).
        watch._die(f"started by a launcher ({launcher}) that is already gone (parent is pid {parent})")
    use_sig = pdeathsig is True or (pdeathsig == "auto" and bool(chain) and chain[0].main_thread_spawner
                                    and chain[0].pid == parent)
    if use_sig:
        set_pdeathsig(signal.SIGKILL)
    why = watch.gone()  # the parent may have died before prctl took effect
    if why is not None:
        watch._die(why)
    return watch.start()
