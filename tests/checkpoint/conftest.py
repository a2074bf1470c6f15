"""Fixtures for the checkpoint tests: a tiny model config file and a real 2-process ZeRO run."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.checkpoint.ckpt_helpers import TINY_CONFIG

HERE = Path(__file__).parent


@pytest.fixture
def tiny_config_path(tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_text(TINY_CONFIG)
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def zero_run(tmp_path_factory):
    """A real 2-process DeepSpeed run on CPU (gloo): ZeRO-3, ZeRO-2 and ZeRO-3 bf16 checkpoints, each with
    the live parameters gathered at save time."""
    out = tmp_path_factory.mktemp("zero_run")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(HERE / "ds_worker.py"), str(out), "3,2,3:bf16"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    if r.returncode != 0:
        raise AssertionError(f"DeepSpeed run failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return out
