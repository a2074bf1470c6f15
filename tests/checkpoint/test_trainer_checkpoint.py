"""The tools on a checkpoint written by our real trainer (configs/tiny_cpu.yaml, ZeRO-3, 1 CPU process)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megaflamingo.checkpoint import load_state_dict
from megaflamingo.cli.convert import main as cli

from tests.checkpoint.ckpt_helpers import logits, tiny_batch

pytestmark = pytest.mark.slow
REPO = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from megaflamingo.testing.tiny_task import write_tiny_dataset

    root = tmp_path_factory.mktemp("trainer")
    write_tiny_dataset(root / "data", rows={"train": 16, "val": 4})
    env = dict(os.environ, MF_DATA_ROOT=str(root / "data"), MF_RUN_DIR=str(root / "run"), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "megaflamingo.cli.train", "--config", "configs/tiny_cpu.yaml",
                        "train.max_steps=2", "train.save_steps=2", "train.eval_steps=100"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    return root / "run"


def test_trainer_checkpoint_export_and_inference_load(run_dir, tmp_path):
    ckpt = run_dir / "checkpoints"
    assert cli(["zero-to-fp32", str(ckpt), str(tmp_path / "fp32"), "--no-progress"]) == 0
    assert cli(["export", str(ckpt), str(tmp_path / "export"), "--no-progress"]) == 0  # config found in run dir
    assert cli(["export", str(ckpt), str(tmp_path / "trainable"), "--trainable-only", "--no-progress"]) == 0
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ds = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    fp32 = load_state_dict(tmp_path / "fp32")
    assert set(fp32) == set(ds)
    assert all(torch.equal(fp32[k], v) for k, v in ds.items())
    # inference path: one call; its weights are DeepSpeed's consolidation exactly, and so are its logits
    from megaflamingo.inference.load import load_model
    from megaflamingo.model import build_from_config

    loaded = load_model(tmp_path / "export")
    ref, _ = build_from_config(loaded.config.model, loaded.tokenizer)
    ref.load_state_dict(ds, strict=True)
    batch = tiny_batch(loaded.model, loaded.tokens)
    assert torch.equal(logits(loaded.model.eval(), batch), logits(ref.eval(), batch))
    # trainable-only: exactly what DeepSpeed trained (pretrain: audio transformer + xattn) + buffers
    tr = load_state_dict(tmp_path / "trainable")
    index = json.loads((tmp_path / "fp32" / "model.safetensors.index.json").read_text())
    frozen = set(index["metadata"]["frozen_keys"])
    assert tr and not (set(tr) & frozen)
    assert all(k.startswith("audio_transformer.") or ".gated_cross_attn_layer." in k for k in tr)
    assert json.loads((tmp_path / "trainable" / "config.json").read_text())["weights"] == "trainable"
