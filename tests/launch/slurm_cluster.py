"""A real, throw-away Slurm cluster for tests: munge + slurmctld + two simulated slurmd nodes.

Everything (keys, sockets, state, spool, logs, slurm.conf) lives in one temporary directory; the
daemons run in the foreground as children of the test process and are stopped by PID, so nothing
outside that directory is touched and a crashed test cannot leave a daemon bound to a system path.

There is no systemd on these machines, so munged runs as the ``munge`` user, the Slurm daemons as
root, ``proctrack/linuxproc`` + ``task/none`` (no cgroups), and both nodes live on 127.0.0.1 with
their own ports (``SlurmdParameters=config_overrides`` lets them claim CPUs the host may not have).
Ports are picked free at start so two test sessions on one machine do not collide.

Usable outside pytest too::

    with SlurmCluster(tmpdir) as cluster:   # or: python tests/launch/slurm_cluster.py DIR
        job = cluster.sbatch(["launch/slurm_train.sbatch", ...])
        cluster.wait_job(job, {"COMPLETED"})
"""
from __future__ import annotations

import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterable, Optional

REQUIRED_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"}


def unavailable_reason() -> Optional[str]:
    """Why a real Slurm cannot be brought up here, or None when it can."""
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        return (f"Slurm/munge not installed (missing {', '.join(missing)}); "
                "scripts/bootstrap.sh installs slurm-wlm and munge")
    if os.geteuid() != 0:
        return "the Slurm test cluster needs root (slurmd launches jobs as their owner and munged runs as 'munge')"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' system user (the munge package creates it)"
    return None


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    """munge + slurmctld + ``nodes`` slurmd daemons rooted at ``root`` (created if missing)."""

    def __init__(self, root: os.PathLike, nodes: Iterable[str] = ("node1", "node2"), cpus_per_node: int = 2,
                 partition: str = "debug"):
        self.root = Path(root).resolve()
        self.nodes = list(nodes)
        self.cpus_per_node = cpus_per_node
        self.partition = partition
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"
        self.log_dir = self.root / "log"
        self.munge_dir = self.root / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "SlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm client commands (sbatch, squeue, ...) that talk to this cluster."""
        return self.client_env(os.environ)

    def client_env(self, base) -> dict[str, str]:
        """``base`` pointed at this cluster: our SLURM_CONF, and none of the SLURM_*/SBATCH_*
        variables a test running inside some other Slurm job would otherwise pass on."""
        env = {k: v for k, v in base.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def start(self, timeout: float = 60.0) -> None:
        reason = unavailable_reason()
        if reason:
            raise SlurmError(reason)
        try:
            self._write_files()
            self._start_munge()
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
            self._wait_for(lambda: self._ok(["scontrol", "ping"], r"is UP"), 30, "slurmctld to answer `scontrol ping`")
            for node in self.nodes:
                self._spawn(f"slurmd-{node}", [_which("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
            self._wait_for(self._all_idle, timeout, f"nodes {self.nodes} to be idle in sinfo")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every daemon we started, by PID; slurmd first so job steps die with their node."""
        order = [k for k in self.procs if k.startswith("slurmd")]
        order += [k for k in ("slurmctld", "munged") if k in self.procs]
        for name in order:
            proc = self.procs.pop(name)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        # Job processes are reparented away from slurmstepd when their node stops; any that were
        # started from our spool directory are ours to end (by PID, never by name).
        self._kill_leftover_job_processes()

    # ------------------------------------------------------------------ client helpers
    def run(self, args: list[str], check: bool = True, timeout: float = 30.0, **kw) -> subprocess.CompletedProcess:
        out = subprocess.run(args, env=kw.pop("env", self.env), capture_output=True, text=True, timeout=timeout, **kw)
        if check and out.returncode != 0:
            raise SlurmError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}\n{self.logs_tail()}")
        return out

    def sbatch(self, args: list[str], env: Optional[dict] = None, cwd: Optional[os.PathLike] = None) -> int:
        """Submit; ``env`` (default: ours) is the job's whole environment (sbatch exports it all)."""
        out = self.run(["sbatch", "--parsable", *args], env=self.client_env(env or os.environ), cwd=cwd)
        return int(out.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (no slurmdbd here, so sacct is not an option)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)])
        info = {}
        for tok in out.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                info.setdefault(k, v)
        return info

    def wait_job(self, job_id: int, states: Iterable[str] = ("COMPLETED",), timeout: float = 120.0,
                 poll: float = 0.5) -> dict[str, str]:
        """Poll until the job reaches one of ``states``; raise early when it ends in another terminal state."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            state = info.get("JobState", "")
            if state in wanted:
                return info
            if state in TERMINAL_STATES:
                raise SlurmError(f"job {job_id} ended {state} (wanted {sorted(wanted)}): {info}\n{self.logs_tail()}")
            time.sleep(poll)
        raise SlurmError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f}s "
                         f"(wanted {sorted(wanted)})\n{self.logs_tail()}")

    def release_requeued(self, job_id: int, grace: float = 2.0, timeout: float = 60.0) -> None:
        """Start a requeued job now instead of after Slurm's hold-back (BeginTime = requeue + ~2 min).

        The hold-back exists because slurmd refuses to launch a job it killed within the same
        second ("Job credential revoked"); so wait until every node is idle again and ``grace``
        seconds have passed, then clear the BeginTime. Only the waiting is skipped.
        """
        t0 = time.monotonic()
        self._wait_for(self._all_idle, timeout, f"nodes to be idle after requeueing job {job_id}")
        time.sleep(max(0.0, grace - (time.monotonic() - t0)))
        self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])

    def logs_tail(self, lines: int = 15) -> str:
        chunks = []
        for log in sorted(self.log_dir.glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            chunks.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(chunks)

    # ------------------------------------------------------------------ internals
    def _write_files(self) -> None:
        munge = pwd.getpwnam("munge")
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # munged (not root) must traverse to its own directory
        for sub in ("state", "log", *(f"spool/{n}" for n in self.nodes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.munge_dir.mkdir(mode=0o700, exist_ok=True)
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))  # a private key: this cluster cannot talk to any other munge
        os.chmod(key, 0o600)
        for path in (self.munge_dir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        os.chmod(self.munge_dir, 0o700)

        host = socket.gethostname().split(".")[0]
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        # Job ids seed MASTER_PORT (20000 + id % 20000): two clusters on one host (parallel test
        # sessions) must not both hand out job 1, or their ranks would meet at the same port.
        first_job_id = random.randrange(1, 12000)
        (self.root / "plugstack.conf").write_text("")  # ignore the system's SPANK plugins
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus_per_node} "
            f"RealMemory=1000 State=UNKNOWN"
            for n, p in zip(self.nodes, node_ports)
        )
        self.conf.write_text(f"""\
ClusterName=mftest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.log_dir}/slurmctld.log
SlurmdLogFile={self.log_dir}/slurmd-%n.log
PlugStackConfig={self.root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SlurmdParameters=config_overrides
ReturnToService=2
MailProg=/bin/true
MpiDefault=none
JobRequeue=1
FirstJobId={first_job_id}
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# Fast turnaround for tests: short kill grace, completed jobs stay visible to `scontrol show job`.
KillWait=5
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
{nodes}
PartitionName={self.partition} Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, argv: list[str], **kw) -> None:
        log = open(self.log_dir / f"{name}.stdout", "ab")
        try:
            self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                env=self.env, start_new_session=True, **kw)
        finally:
            log.close()

    def _start_munge(self) -> None:
        self._spawn("munged", [
            _which("munged"), "-F", "--force",
            f"--socket={self.munge_socket}", f"--key-file={self.munge_dir / 'munge.key'}",
            f"--pid-file={self.munge_dir / 'munged.pid'}", f"--seed-file={self.munge_dir / 'munged.seed'}",
            f"--log-file={self.munge_dir / 'munged.log'}",
        ], user="munge", group="munge", extra_groups=[])
        self._wait_for(self.munge_socket.exists, 15, f"munged socket {self.munge_socket}")

    def _ok(self, args: list[str], pattern: str) -> bool:
        try:
            out = self.run(args, check=False, timeout=10)
        except subprocess.TimeoutExpired:
            return False
        return out.returncode == 0 and re.search(pattern, out.stdout) is not None

    def _all_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, timeout=10)
        states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        return all(states.get(n) == "idle" for n in self.nodes)

    def _wait_for(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmError(f"{name} exited ({proc.returncode}) while waiting for {what}\n"
                                     f"{self.logs_tail()}\n{self._stdout_tail()}")
            if cond():
                return
            time.sleep(0.2)
        raise SlurmError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs_tail()}\n"
                         f"{self._stdout_tail()}")

    def _stdout_tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                         for p in sorted(self.log_dir.glob("*.stdout")))

    def _kill_leftover_job_processes(self) -> None:
        """End processes whose environment says they belong to this cluster (SLURM_CONF == ours)."""
        me = os.getpid()
        marker = f"SLURM_CONF={self.conf}".encode()
        victims = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                env = (entry / "environ").read_bytes()
            except OSError:
                continue
            if marker in env.split(b"\0"):
                victims.append(int(entry.name))
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    # Interactive use: `python tests/launch/slurm_cluster.py [DIR]`, then in another shell
    # `export SLURM_CONF=DIR/slurm.conf` and use sbatch / squeue as usual; Ctrl-C tears it down.
    import sys
    import tempfile

    root_dir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="mf-slurm-")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill PID` tears down too
    with SlurmCluster(root_dir) as cluster:
        print(f"Slurm is up: export SLURM_CONF={cluster.conf}   (Ctrl-C stops it)", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
