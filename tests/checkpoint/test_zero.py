"""zero-to-fp32 on real ZeRO-3 / ZeRO-2 checkpoints written by a 2-process DeepSpeed CPU run."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open

from megaflamingo.checkpoint import load_state_dict
from megaflamingo.checkpoint.consolidate import zero_source
from megaflamingo.checkpoint.integrity import CheckpointError
from megaflamingo.cli.convert import main as cli

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
FROZEN = ["frozen_proj.weight", "frozen_proj.bias"]


@pytest.mark.parametrize("stage", [3, 2])
def test_consolidated_equals_live_params_exactly(zero_run, tmp_path, stage):
    run = zero_run / f"zero{stage}"
    ref = torch.load(run / "reference.pt", weights_only=True)
    out = tmp_path / "fp32"
    assert cli(["zero-to-fp32", str(run / "ckpt"), str(out), "--no-progress"]) == 0
    sd = load_state_dict(out)
    assert set(sd) == set(ref) | {"head.weight"}
    for k, v in ref.items():
        assert sd[k].dtype == torch.float32 or k == "scale"
        assert torch.equal(sd[k], v), k  # bit-exact, not allclose
    assert sd["head.weight"] is sd["embed.weight"]  # re-tied on load
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["tied_weights"] == {"head.weight": "embed.weight"}
    assert sorted(index["metadata"]["frozen_keys"]) == sorted(FROZEN)
    assert index["metadata"]["source"]["stage"] == stage
    stored = [k for f in index["metadata"]["files"] for k in safe_open(str(out / f), "pt").keys()]
    assert "head.weight" not in stored and len(stored) == len(set(stored))
    # the same numbers as DeepSpeed's own consolidation
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ds = get_fp32_state_dict_from_zero_checkpoint(str(run / "ckpt"))
    for k, v in ds.items():
        assert torch.equal(sd[k], v), k


def test_bf16_run_consolidates_fp32_master_weights(zero_run, tmp_path):
    run = zero_run / "zero3-bf16"
    ref = torch.load(run / "reference.pt", weights_only=True)  # live bf16 params (as float)
    assert cli(["zero-to-fp32", str(run / "ckpt"), str(tmp_path / "o"), "--no-progress"]) == 0
    sd = load_state_dict(tmp_path / "o")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ds = get_fp32_state_dict_from_zero_checkpoint(str(run / "ckpt"))
    for k, v in ds.items():
        assert sd[k].dtype == torch.float32 and torch.equal(sd[k], v.float()), k
    trained = [k for k in ref if k not in FROZEN and k != "scale"]
    assert any(not torch.equal(sd[k], ref[k]) for k in trained)  # the fp32 masters, not the bf16 copies
    for k in ref:  # ... which round to exactly the live bf16 parameters
        assert torch.equal(sd[k].to(torch.bfloat16).float(), ref[k]), k
    assert cli(["zero-to-fp32", str(run / "ckpt"), str(tmp_path / "b"), "--dtype", "bf16", "--no-progress"]) == 0
    assert load_state_dict(tmp_path / "b")["embed.weight"].dtype == torch.bfloat16


def test_exclude_frozen_torch_format_and_shards(zero_run, tmp_path):
    run = zero_run / "zero3"
    ref = torch.load(run / "reference.pt", weights_only=True)
    out = tmp_path / "t"
    assert cli(["zero-to-fp32", str(run / "ckpt"), str(out), "--exclude-frozen", "--format", "torch",
                "--max-shard-size", "4KB", "--tag", "step3", "--no-progress"]) == 0
    index = json.loads((out / "pytorch_model.bin.index.json").read_text())
    assert len(index["metadata"]["files"]) > 2
    sd = load_state_dict(out)
    assert not set(FROZEN) & set(sd)
    for k in set(ref) - set(FROZEN):
        assert torch.equal(sd[k], ref[k]), k
    src = zero_source(run / "ckpt")
    assert sorted(src.meta["frozen"]) == sorted(FROZEN)
    assert "embed.weight" in src.meta["trainable"]


def test_split_reads_a_zero_checkpoint_directly(zero_run, tmp_path):
    run = zero_run / "zero3"
    ref = torch.load(run / "reference.pt", weights_only=True)
    assert cli(["split", str(run / "ckpt"), str(tmp_path / "p"), "--max-size", "3KB", "--no-progress"]) == 0
    index = json.loads((tmp_path / "p" / "model.safetensors.index.json").read_text())
    assert all(f["size"] <= 3000 for f in index["metadata"]["files"].values())
    assert index["metadata"]["sliced"]  # body.*.weight (7 KB) alone exceed 3 KB
    sd = load_state_dict(tmp_path / "p")
    for k, v in ref.items():
        assert torch.equal(sd[k], v), k


def test_zero_checkpoint_errors(zero_run, tmp_path):
    bad = tmp_path / "ckpt"
    shutil.copytree(zero_run / "zero3" / "ckpt", bad)
    with pytest.raises(CheckpointError, match="nosuchtag"):
        zero_source(bad, tag="nosuchtag")
    (bad / "step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match=r"expected 2 \*_optim_states.pt files .* found 1"):
        zero_source(bad)
    f = bad / "step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    f.write_bytes(f.read_bytes()[:1000])
    assert cli(["zero-to-fp32", str(bad), str(tmp_path / "o"), "--no-progress"]) == 2
    assert not (tmp_path / "o").exists()
