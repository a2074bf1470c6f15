"""The same evaluation on 2 processes (torchrun, gloo) equals the 1-process one."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megaflamingo.cli.eval import main

from .conftest import read_jsonl

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_equal_one(evalkit, tmp_path):
    common = ["--model", str(evalkit["model"]), "--data-root", str(evalkit["arrow"]),
              "--benchmarks", "synth-cls,synth-cap", "--registry", str(evalkit["registry"]),
              "--batch-size", "3", "--no-progress"]
    one = tmp_path / "one"
    assert main(common + ["--out", str(one)]) == 0
    two = tmp_path / "two"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                        "--nproc_per_node", "2", "-m", "megaflamingo.cli.eval", *common, "--out", str(two)],
                       env=env, cwd=str(REPO), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a = json.loads((one / "results.json").read_text())["benchmarks"]
    b = json.loads((two / "results.json").read_text())["benchmarks"]
    assert b["synth-cls"]["settings"]["world_size"] == 2
    for name in a:
        assert a[name]["metrics"] == b[name]["metrics"] and a[name]["n"] == b[name]["n"], name
        pa = {x["id"]: x for x in read_jsonl(one / f"{name}.predictions.jsonl")}
        pb = {x["id"]: x for x in read_jsonl(two / f"{name}.predictions.jsonl")}
        assert pa == pb  # every item once, same answer, whichever rank produced it
