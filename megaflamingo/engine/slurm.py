"""Slurm specifics shared by the trainer and the tests: node lists, the job's master port, requeue.

Rank discovery itself (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID -> RANK/WORLD_SIZE/LOCAL_RANK, and the
same for mpirun and torchrun) lives in :mod:`megaflamingo.engine.distributed`; the stop flag that turns
SIGUSR1/SIGTERM into "checkpoint, exit 75" lives in the trainer; ``launch/slurm_train.sbatch`` picks
MASTER_ADDR (the first node's NodeAddr, asked once from the batch shell rather than by every rank)
and requeues. This module holds the pure pieces they share:

* which hosts a node list names (``node[01-04,07]``), without calling ``scontrol``;
* which master port a job uses (derived from the job id, so jobs sharing a node do not collide);
* how to requeue the current job from Python.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Optional

DEFAULT_MASTER_PORT = 29500


# ---------------------------------------------------------------------------------------- hostlists
def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm hostlist (``gpu[01-03,07],login1``, ``r[1-2]-n[1-2]``) without calling scontrol.

    Zero padding is kept (``n[08-10]`` -> n08, n09, n10) exactly as Slurm writes host names.
    """
    hosts: list[str] = []
    for item in _split_top_level(hostlist):
        hosts.extend(_expand_one(item))
    return hosts


def _split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text.strip():
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in Slurm hostlist {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ValueError(f"unbalanced '[' in Slurm hostlist {text!r}")
    parts.append("".join(cur))
    return [p for p in (p.strip() for p in parts) if p]


def _expand_one(item: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if not m:
        return [item]
    head, tail = item[: m.start()], item[m.end():]
    out = []
    for rng in m.group(1).split(","):
        lo, _, hi = rng.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"bad range {rng!r} in Slurm hostlist {item!r}")
        width = len(lo)
        for i in range(int(lo), int(hi or lo) + 1):
            out.extend(_expand_one(f"{head}{i:0{width}d}{tail}"))
    return out


def master_port(job_id: Optional[str]) -> int:
    """A port derived from the job id, so two jobs sharing a node do not fight over one port.

    Same rule as ``launch/slurm_train.sbatch`` (20000 + id % 20000), which exports it for srun;
    the trainer falls back to it under a bare ``srun``.
    """
    if job_id and str(job_id).isdigit():
        return 20000 + int(job_id) % 20000
    return DEFAULT_MASTER_PORT


def requeue(job_id: Optional[str] = None) -> bool:
    """``scontrol requeue <job>`` for the current (or given) Slurm job; False when not under Slurm.

    ``launch/slurm_train.sbatch`` requeues from the batch shell once every rank has exited (the
    trainer exits 75 after its stop checkpoint); this is for Python callers that own their job, for
    example a job submitted with ``--signal=USR1@...`` and no batch-script trap.
    """
    job_id = job_id or os.environ.get("SLURM_JOB_ID")  # for an array task this is the task's own id
    if not job_id or not shutil.which("scontrol"):
        return False
    out = subprocess.run(["scontrol", "requeue", str(job_id)], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"scontrol requeue {job_id} failed: {out.stderr.strip()}")
    return True
