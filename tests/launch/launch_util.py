"""Helpers shared by the launcher tests (not a test module)."""
import os
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def job_env(**extra: str) -> dict:
    """Environment for a launched trainer: this interpreter's scripts first on PATH, offline hub,
    one intra-op thread, and none of an enclosing launcher's rank variables."""
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_steps(run_dir: Path) -> list[dict]:
    """The trainer's per-step log (``<run_dir>/train_log.jsonl``, appended by rank 0)."""
    import json

    path = Path(run_dir) / "train_log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
