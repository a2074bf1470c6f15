"""``pip install .`` (not editable) into a fresh virtualenv: the console scripts work from any directory
and find the DeepSpeed JSONs and stage configs shipped inside the package; nothing but ``megaflamingo``
is installed."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("installed")
    src = tmp / "src"
    src.mkdir()
    # A copy of what a clean checkout holds (the build writes build/ and *.egg-info next to setup.py).
    for name in ("setup.py", "README.md", "megaflamingo", "ds_configs", "configs"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(
            REPO / name, src / name, **({"symlinks": True, "ignore": shutil.ignore_patterns("__pycache__")}
                                        if (REPO / name).is_dir() else {}))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
          str(src)])
    (wheel,) = (tmp / "dist").glob("megaflamingo-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    # The dependencies (torch, deepspeed, ...) come from this interpreter's environment; the package
    # itself only from the wheel.
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "_deps.pth").write_text("".join(p + "\n" for p in deps))
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps",
          "--no-index", str(wheel)])
    return venv, site


@pytest.mark.slow
def test_console_scripts_of_a_plain_install_find_their_configs(installed, tmp_path):
    from megaflamingo.testing.tiny_task import write_tiny_dataset

    venv, site = installed
    assert (site / "megaflamingo" / "resources" / "ds_configs" / "zero3.json").is_file()
    assert (site / "megaflamingo" / "resources" / "configs" / "tiny_cpu.yaml").is_file()
    assert not (site / "preprocess").exists() and not (site / "tools").exists()
    where = _run([str(venv / "bin" / "python"), "-c", "import megaflamingo; print(megaflamingo.__file__)"],
                 cwd=tmp_path).stdout
    assert str(site) in where
    for script in ("megaflamingo-preprocess", "megaflamingo-convert", "megaflamingo-infer", "megaflamingo-eval",
                   "megaflamingo-demo"):
        assert "usage" in _run([str(venv / "bin" / script), "--help"], cwd=tmp_path).stdout.lower()
    # The benchmark registry is package data: listed from the installed package.
    listing = _run([str(venv / "bin" / "megaflamingo-eval"), "--list"], cwd=tmp_path).stdout
    assert (site / "megaflamingo" / "eval" / "af1_benchmarks.yaml").is_file() and "clotho-v2-caption" in listing
    write_tiny_dataset(tmp_path / "data")
    env = dict(os.environ, MF_DATA_ROOT=str(tmp_path / "data"), MF_RUN_DIR=str(tmp_path / "run"),
               OMP_NUM_THREADS="1")
    # A bare config name and the JSON it names (ds_configs/zero3.json) resolve inside the package,
    # from a directory that has neither.
    r = _run([str(venv / "bin" / "megaflamingo-train"), "--config", "tiny_cpu", "--dry-run"], cwd=tmp_path, env=env)
    plan = json.loads(r.stdout[r.stdout.index("{"):r.stdout.rindex("}") + 1])
    assert plan["zero_stage"] == 3 and plan["datasets"] == ["SynthTiny-EventClassification/train"]
