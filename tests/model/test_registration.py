"""`import megaflamingo` registers model_type "megaflamingo" with transformers' auto classes, without
importing torch or transformers itself (preprocessing and its decoding workers never need them)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
import megaflamingo.config, megaflamingo.preprocess.recipes, megaflamingo.audio.frontend
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
from transformers import AutoConfig, AutoModelForCausalLM
config = AutoConfig.for_model("megaflamingo")
print(heavy, type(config).__name__, AutoModelForCausalLM._model_mapping[type(config)].__name__)
"""


def test_import_is_light_and_registers_once_transformers_is_imported():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[] AudioFlamingoConfig AudioFlamingo"
