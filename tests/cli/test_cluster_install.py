"""The GPU-cluster install resolves: `scripts/install_cluster.sh` (pip install -e ".[encoders,gpu]"
+ laion-clap / msclap without their impossible pins) in a fresh environment, as pip --dry-run.

torch is never downloaded: the fresh environment holds a stand-in torch distribution (version
2.13.0+cpu, the CPU pin), exactly like a cluster environment that already has its CUDA torch, and
the script pins every pip call to the installed torch."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NO_EXTRA = ("laion-clap", "laion_clap", "msclap", "flash-attn", "flash_attn")


def setup_kwargs(monkeypatch) -> dict:
    import runpy

    import setuptools
    captured: dict = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.chdir(REPO)
    runpy.run_path(str(REPO / "setup.py"))
    return captured


def test_extras_hold_nothing_a_resolver_cannot_install(monkeypatch):
    """laion-clap / msclap pin numpy<2 next to the core's numpy>=2; flash-attn cannot build in
    pip's isolated build environment (it imports torch). None of them may sit in an extra the
    cluster command installs; the script installs them its own way."""
    kw = setup_kwargs(monkeypatch)
    assert any(r.startswith("numpy>=2") for r in kw["install_requires"])
    for extra in ("encoders", "gpu"):
        names = [re.split(r"[<>=\[; ]", r, maxsplit=1)[0].lower() for r in kw["extras_require"][extra]]
        assert not set(names) & set(NO_EXTRA), (extra, names)
    script = (REPO / "scripts" / "install_cluster.sh").read_text()
    assert '-e ".[encoders,gpu]"' in script and "--no-deps" in script and "laion-clap==" in script
    # the README's cluster command is the one tested below
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Installing on a GPU cluster"):]
    command = section[section.index("```bash"):section.index("```", section.index("```bash") + 7)]
    assert "bash scripts/install_cluster.sh" in command, command


def _fresh_env_with_stand_in_torch(tmp_path) -> Path:
    env = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=300)
    sp = next((env / "lib").glob("python*/site-packages"))
    (sp / "torch").mkdir()
    (sp / "torch" / "__init__.py").write_text('__version__ = "2.13.0+cpu"\n')
    info = sp / "torch-2.13.0+cpu.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.13.0+cpu\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("torch/__init__.py,,\n")
    return env / "bin" / "python"


def _index_reachable() -> bool:
    probe = "import urllib.request; urllib.request.urlopen('https://pypi.org/simple/pip/', timeout=15)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=60).returncode == 0


@pytest.mark.slow
def test_cluster_install_resolves_without_downloading_torch(tmp_path):
    if not _index_reachable():
        pytest.skip("package index not reachable")
    py = _fresh_env_with_stand_in_torch(tmp_path)
    env = dict(os.environ, PYTHON=str(py), PIP_CONSTRAINT=str(REPO / "constraints" / "cpu.txt"),
               PIP_PROGRESS_BAR="off")
    report = tmp_path / "report.json"
    r = subprocess.run(["bash", str(REPO / "scripts" / "install_cluster.sh"), "--dry-run",
                        "--report", str(report)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=1500)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    installed = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
                 for i in json.loads(report.read_text())["install"]}
    assert "torch" not in installed                                    # the installed torch is kept
    assert not re.search(r"Downloading torch-\d", out), "pip fetched a torch wheel"
    for name in ("megaflamingo", "transformers", "deepspeed", "pyarrow", "torchlibrosa", "librosa",
                 "h5py", "ninja"):
        assert name in installed, (name, sorted(installed))
    assert installed["numpy"].split(".")[0] == "2"
    assert not set(installed) & set(NO_EXTRA)
    assert re.search(r"Would install laion[-_]clap-1\.1\.7 msclap-1\.3\.4", out)  # the --no-deps step

    # The same harness does catch the conflict this install avoids (the old extra).
    bad = subprocess.run([str(py), "-m", "pip", "install", "--dry-run", "msclap==1.3.4"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "numpy" in bad.stdout + bad.stderr
