"""Offline compute nodes: a model downloaded into $HF_HOME/hub on a login node is found whether the
config names the hub cache, HF_HOME itself, or nothing (transformers' default); a model that is not
there is a pre-flight problem naming where it was looked for."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from megaflamingo.hub import hf_cache_dir, missing_offline
from megaflamingo.testing import tiny_lm_config_dict

REPO = Path(__file__).resolve().parents[2]


def _fake_download(home: Path, repo: str = "fake/tiny-opt") -> None:
    """What huggingface-cli download leaves in $HF_HOME/hub: refs/main -> snapshots/<sha>/files."""
    d = home / "hub" / f"models--{repo.replace('/', '--')}"
    snap = d / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (d / "refs").mkdir()
    (d / "refs" / "main").write_text("a" * 40)
    (snap / "config.json").write_text(json.dumps(tiny_lm_config_dict("opt", vocab_size=96, hidden_size=16)))


def test_cache_dir_forms(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    _fake_download(home)
    monkeypatch.delenv("HF_HOME", raising=False)
    assert hf_cache_dir(None) is None
    assert hf_cache_dir(home) == str(home / "hub")          # an HF_HOME folder
    assert hf_cache_dir(home / "hub") == str(home / "hub")  # the hub cache itself
    other = tmp_path / "fresh"
    assert hf_cache_dir(other) == str(other)                # any other path is the cache
    monkeypatch.setenv("HF_HOME", str(other))
    assert hf_cache_dir(other) == str(other / "hub")        # $HF_HOME, even before its first download
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert missing_offline("fake/tiny-opt", home) is None
    assert missing_offline(str(home), None) is None          # a local directory
    msg = missing_offline("fake/absent", home)
    assert f"not in the Hugging Face cache {home / 'hub'} (no config.json)" in msg
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert missing_offline("fake/absent", home) is None      # online: transformers downloads it


def test_offline_node_loads_from_hf_home(tmp_path):
    """A fresh process with HF_HUB_OFFLINE=1 set before import, as on a compute node: the LM config
    loads through every cache_dir form, and a missing model is one pre-flight problem."""
    home = tmp_path / "hf"
    _fake_download(home)
    script = f"""
import json
from megaflamingo.model.build import lm_config_value
from megaflamingo.model.config import ModelConfig
from megaflamingo.engine.build import PreflightError, preflight
from megaflamingo.testing.tiny_task import make_config, tiny_raw_config
out = {{}}
for name, cache in (("hub", {str(home / 'hub')!r}), ("home", {str(home)!r}), ("default", None)):
    out[name] = lm_config_value(ModelConfig(lm="fake/tiny-opt", cache_dir=cache), "hidden_size")
raw = tiny_raw_config()
raw["model"].update(lm="fake/absent", tokenizer="fake/absent", lm_config=None, cache_dir={str(home)!r})
raw["data"] = {{"data_root": {str(tmp_path)!r}, "blend": {{}}}}
try:
    preflight(make_config(raw))
except PreflightError as e:
    out["problems"] = e.problems
print(json.dumps(out))
"""
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["hub"] == out["home"] == out["default"] == 16
    assert out["problems"][0] == "data.blend: no training datasets configured"
    assert out["problems"][1].startswith(f"model.lm: 'fake/absent' is not in the Hugging Face cache {home / 'hub'}")
    assert out["problems"][2].startswith("model.tokenizer: 'fake/absent' is not in the Hugging Face cache")
