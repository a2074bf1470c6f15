"""Every DeepSpeed-side load restricted, on real checkpoints of 2-process CPU runs: each file kind loads
through the allow-list; a malicious pickle planted in any kind is refused (its marker file is never
created) on resume, by the universal converter and loader, and by zero-to-fp32; clean ones resume
bit-exactly."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megaflamingo.checkpoint import safe_load as S
from tests.launch.launch_util import free_port

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
HERE = Path(__file__).parent
REPO = HERE.parents[1]


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path) -> None:
    sd = S.restricted_load(path)
    sd = dict(sd, planted=Payload(marker)) if isinstance(sd, dict) else {"payload": sd, "planted": Payload(marker)}
    torch.save(sd, path)


def convert(src: Path, out: Path, ours: bool = True) -> subprocess.CompletedProcess:
    mod = "megaflamingo.checkpoint.to_universal" if ours else "deepspeed.checkpoint.ds_to_universal"
    cmd = [sys.executable, "-m", mod, "--input_folder", str(src), "--output_folder", str(out),
           "--num_extract_workers", "2", "--num_merge_workers", "2"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def ours_universal(zero_run, tmp_path_factory):
    """The ZeRO-3 tag converted to the universal format by our restricted converter."""
    out = tmp_path_factory.mktemp("universal") / "ours"
    r = convert(zero_run / "zero3" / "ckpt" / "step3", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_every_file_of_real_checkpoints_passes_the_allow_list(zero_run, ours_universal):
    """ZeRO-3, ZeRO-2 and ZeRO-3 bf16 rank files (and a universal conversion) name no global outside
    the allow-list, and each loads through restricted_load."""
    files = sorted(zero_run.rglob("*.pt")) + sorted(ours_universal.rglob("*.pt"))
    kinds = {f.name for f in files}
    assert {"zero_pp_rank_1_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt", "fp32.pt", "exp_avg.pt",
            "optimizer_state.pt"} <= kinds
    for f in files:
        assert S.unsafe_globals(f) == [], f
        S.restricted_load(f)


def test_universal_converter_is_restricted_and_unchanged(zero_run, ours_universal, tmp_path):
    src = zero_run / "zero3" / "ckpt" / "step3"
    assert convert(src, tmp_path / "theirs", ours=False).returncode == 0
    ours = sorted(p.relative_to(ours_universal) for p in ours_universal.rglob("*.pt"))
    assert ours == sorted(p.relative_to(tmp_path / "theirs") for p in (tmp_path / "theirs").rglob("*.pt"))
    for rel in ours:
        a, b = S.restricted_load(ours_universal / rel), S.restricted_load(tmp_path / "theirs" / rel)
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), rel
    marker, kind = tmp_path / "MARKER", "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    plant(bad / kind, marker)
    r = convert(bad, tmp_path / "out")
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert str(bad / kind) in r.stderr and "posix.system" in r.stderr
    assert not marker.exists()


def test_zero_to_fp32_through_the_guard(zero_run, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    for stage in ("zero3", "zero2"):
        ckpt = zero_run / stage / "ckpt"
        ours = S.fp32_state_dict_from_zero_checkpoint(ckpt, tag="step3")
        theirs = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="step3")
        assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
        bad = tmp_path / stage
        shutil.copytree(ckpt, bad)
        plant(bad / "step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", tmp_path / "MARKER")
        with pytest.raises(S.UnsafeCheckpointError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt"):
            S.fp32_state_dict_from_zero_checkpoint(bad, tag="step3")
        assert not (tmp_path / "MARKER").exists()


def test_init_from_a_deepspeed_dir_never_runs_a_planted_pickle(zero_run, tmp_path):
    from megaflamingo.engine.build import _read_init_weights

    bad = tmp_path / "ckpt"
    shutil.copytree(zero_run / "zero2" / "ckpt", bad)
    for f in (bad / "step3").glob("*optim_states.pt"):
        plant(f, tmp_path / "MARKER")
    with pytest.raises(ValueError, match=r"train.init_from=.*optim_states.pt: refused to load: it needs posix.system"):
        _read_init_weights(torch.nn.Linear(1, 1), str(bad / "step3"))
    assert not (tmp_path / "MARKER").exists()


def test_engine_resume_is_restricted_and_exact(tmp_path):
    """2 ranks, ZeRO-2 and ZeRO-3: through safe_load.load_checkpoint a clean checkpoint resumes bit for bit
    (also a universal one), a planted optimizer shard / model-states file / universal fp32.pt is refused on
    every rank naming the file, and no payload ever runs, while DeepSpeed's own load does run it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(HERE / "restricted_resume_worker.py"), str(tmp_path), "2,3"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=540, cwd=REPO,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert r.returncode == 0, r.stderr[-5000:]
    for rank in (0, 1):
        res = json.loads((tmp_path / f"result.rank{rank}.json").read_text())
        for stage, v in res.items():
            assert v["clean"]["losses"] == v["ref"], (stage, rank)  # bit-exact
            assert v["clean"]["engine"] == "RestrictedCheckpointEngine"
            assert f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in v["clean"]["read"]
            for case, kind in (("evil_optim", "optim_states.pt"), ("evil_model", "model_states.pt")):
                assert v[case]["type"] == "UnsafeCheckpointError" and v[case]["refused"] == "posix.system"
                assert f"/{case}/" in v[case]["error"] and kind in v[case]["error"], v[case]["error"]
            assert v["marker_exists"] is False
        assert res["zero2"]["control_marker_exists"] is True  # the payload is live
        uni = res["zero3"]
        assert uni["convert_rc"] == 0 if rank == 0 else True
        assert uni["universal"]["losses"] == uni["ref"]
        assert {"fp32.pt", "exp_avg.pt", "optimizer_state.pt"} <= set(uni["universal"]["read"])
        assert uni["evil_universal"]["type"] == "UnsafeCheckpointError"
        assert "evil-universal/zero/" in uni["evil_universal"]["error"]
