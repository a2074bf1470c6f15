"""Process-group discovery and set-up for every launcher we support.

``deepspeed``/``torchrun`` export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT themselves.
``mpirun`` (Open MPI) and ``srun`` export their own variables; :func:`discover_env` translates them so
the rest of the code (and DeepSpeed) only ever reads the torch names. A plain ``python`` / console
script start becomes a world of one.
"""
from __future__ import annotations

import datetime
import os
import socket
import warnings
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # torch | mpi | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def discover_env(env: dict | None = None) -> World:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from the launcher's variables (in place)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torch"
    elif "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        launcher = "mpi"
        env["RANK"] = env.get("OMPI_COMM_WORLD_RANK", env.get("PMI_RANK"))
        env["WORLD_SIZE"] = env.get("OMPI_COMM_WORLD_SIZE", env.get("PMI_SIZE"))
        env["LOCAL_RANK"] = env.get("OMPI_COMM_WORLD_LOCAL_RANK", env.get("MPI_LOCALRANKID", "0"))
        if "MASTER_ADDR" not in env:
            local_size = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", env["WORLD_SIZE"]))
            if local_size == int(env["WORLD_SIZE"]):
                env["MASTER_ADDR"] = "127.0.0.1"
            else:  # several nodes: rank 0's host name travels over MPI itself
                from mpi4py import MPI

                env["MASTER_ADDR"] = MPI.COMM_WORLD.bcast(socket.gethostname(), root=0)
        env.setdefault("MASTER_PORT", "29500")
    elif "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        # Started by `srun` with one task per GPU; a 1-task step is simply a world of one.
        launcher = "slurm"
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        from .slurm import expand_hostlist, master_port

        if "MASTER_ADDR" not in env:
            # launch/slurm_train.sbatch exports the first node's NodeAddr; bare srun gets its first host name.
            nodes = expand_hostlist(env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "")))
            env["MASTER_ADDR"] = nodes[0] if nodes else "127.0.0.1"
        # A port derived from the job id so concurrent jobs on a node do not collide.
        env.setdefault("MASTER_PORT", str(master_port(env.get("SLURM_JOB_ID"))))
    else:
        launcher = "single"
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = "0", "1", "0"
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    env.setdefault("LOCAL_RANK", "0")
    return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), launcher)


def device_for(world: World) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


def init_distributed(world: World, timeout_s: int) -> None:
    """Start the process group (NCCL on GPU, gloo on CPU) with a bounded collective timeout, so a
    dead rank turns into an error on the others instead of an endless hang."""
    import deepspeed
    import torch.distributed as dist

    # DeepSpeed 0.19 calls torch collectives that torch 2.13 deprecates, once per bucket: keep logs readable.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":
        disable_cpu_shm_comm()
    if backend == "nccl":
        # Make NCCL surface a failed peer as an exception (and so a non-zero exit) within the timeout.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                               auto_mpi_discovery=False, verbose=False)


def shutdown() -> None:
    """Tear the process group down before the interpreter exits. Left to interpreter shutdown, the
    backend's worker threads can be destroyed while still joinable, and a rank that finished cleanly
    dies with SIGABRT ("terminate called without an active exception"), failing the whole launch."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def disable_cpu_shm_comm() -> None:
    """Route DeepSpeed's CPU collectives through gloo instead of its shared-memory op.

    The shm op (a) is JIT-built under a file lock in ~/.cache/torch_extensions that a process killed at
    the wrong moment leaves behind, blocking every later start forever, and (b) busy-waits on shared
    flags with no timeout, so a dead peer hangs the survivors. gloo raises on a closed connection and
    honours ``train.dist_timeout_s``. CPU runs are for tests and quickstarts, so speed does not matter."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def on_rank0_others_wait(fn, rank: int, timeout_s: int, what: str) -> None:
    """Run ``fn`` on rank 0 while the other ranks wait up to ``timeout_s``, in a gloo group of its
    own: a long job on rank 0 (a checkpoint conversion) must not be cut by the training collectives'
    ``dist_timeout_s``. ``fn``'s exception is raised on rank 0 and reported on every other rank."""
    import torch.distributed as dist

    multi = _multi()
    # Created before the work: making a group is itself a collective under the default timeout.
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s)) if multi else None
    error = None
    if rank == 0:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - every rank must hear about it before it is raised
            error = e
    if multi:
        try:
            box = [None if error is None else f"{type(error).__name__}: {error}"]
            dist.broadcast_object_list(box, src=0, group=group)
        finally:
            dist.destroy_process_group(group)
        if error is None and box[0] is not None:
            raise RuntimeError(f"rank 0 failed {what}: {box[0]}")
    if error is not None:
        raise error


def comm_device() -> torch.device:
    """Where tensors must live for the process group's collectives (NCCL: this rank's GPU)."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _multi() -> bool:
    import torch.distributed as dist

    return dist.is_initialized() and dist.get_world_size() > 1


def any_rank(flag: torch.Tensor | bool) -> bool:
    """Whether ``flag`` (a bool, or a bool tensor of any shape) holds anywhere on any rank. A tensor
    is reduced without a host round trip before the collective; the one ``.item()`` is the only sync."""
    import torch.distributed as dist

    t = torch.as_tensor(flag).any().to(torch.float32).reshape(1)
    if _multi():
        t = t.to(comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if _multi():
        dev = t.device
        t = t.to(comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = t.to(dev)
    return t


def all_gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` in a world of one). For small host-side records
    (per-dataset sums of a logging window), never for tensors on the hot path."""
    import torch.distributed as dist

    if not _multi():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
