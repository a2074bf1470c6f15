"""The restricted checkpoint loader: what it accepts, what it refuses and how it says so, and the guard
that makes ``torch.load`` itself restricted (no DeepSpeed run needed: see test_safe_load_deepspeed.py)."""
import os
import pickle
import random
import subprocess

import pytest
import torch

from megaflamingo.checkpoint import safe_load as S
from megaflamingo.checkpoint.integrity import CheckpointError


class SystemPayload:
    """Unpickling runs ``touch MARKER`` through os.system."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class PopenPayload(SystemPayload):
    def __reduce__(self):
        return (subprocess.Popen, (["touch", self.marker],))


class ExecPayload(SystemPayload):
    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.mark.parametrize("payload,refused", [(SystemPayload, "posix.system"), (PopenPayload, "subprocess.Popen"),
                                             (ExecPayload, "builtins.exec")])
def test_reduce_payload_is_refused_before_it_runs(tmp_path, payload, refused):
    marker = tmp_path / "MARKER"
    f = tmp_path / "shard.pt"
    torch.save({"w": torch.ones(3), "state": {"x": payload(marker)}}, f)
    with pytest.raises(S.UnsafeCheckpointError) as e:
        S.restricted_load(f)
    assert str(f) in str(e.value) and refused in str(e.value)
    assert e.value.refused == refused and e.value.path == str(f)
    assert isinstance(e.value, CheckpointError)  # the CLIs' exit-2 family
    assert not marker.exists()
    assert S.unsafe_globals(f) == [refused]  # the static scan sees it too, without running it
    assert not marker.exists()


def test_the_payload_is_live_without_the_restriction(tmp_path):
    """Control: the same file with weights_only=False runs the payload (so the test above can fail)."""
    marker = tmp_path / "MARKER"
    torch.save({"state": SystemPayload(marker)}, tmp_path / "shard.pt")
    torch.load(tmp_path / "shard.pt", weights_only=False)
    assert marker.exists()


def test_allow_list_is_exactly_deepspeeds_checkpoint_data_classes():
    assert S.allowed_names() == [
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    ]


def test_deepspeed_data_classes_round_trip(tmp_path):
    """Each allow-listed class as DeepSpeed stores it (fp16's dynamic scaler holds a torch dtype) loads back
    with its fields; no GPU needed to make an fp16 optimizer file's scaler."""
    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler, DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # As an fp16 ZeRO optimizer makes it (DeepSpeed's default dynamic loss-scale arguments).
    dyn = CreateLossScaler(torch.half, 0, True, dict(init_scale=2.0**16, scale_window=1000, min_scale=1,
                                                     delayed_shift=2, consecutive_hysteresis=False))
    assert type(dyn) is DynamicLossScaler
    dyn.cur_iter, dyn.last_overflow_iter = 7, 3
    obj = {"loss_scaler": dyn, "static": LossScaler(scale=4.0), "zero_stage": ZeroStageEnum.gradients,
           "param_slice_mappings": [{"w": fragment_address(numel=12, start=40)}]}
    torch.save(obj, tmp_path / "optim.pt")
    back = S.restricted_load(tmp_path / "optim.pt")
    assert type(back["loss_scaler"]) is DynamicLossScaler and back["loss_scaler"].__dict__ == dyn.__dict__
    assert back["static"].cur_scale == 4.0
    assert back["zero_stage"] is ZeroStageEnum.gradients
    assert back["param_slice_mappings"][0]["w"] == fragment_address(numel=12, start=40)


def test_our_rank_state_file_loads(tmp_path):
    from megaflamingo.engine.checkpointing import rng_state

    state = {"loader": {"epoch": 1, "batch_in_epoch": 5, "blend": [["a", 3, 1.0]]}, "epoch": 1, "rng": rng_state()}
    torch.save(state, tmp_path / "megaflamingo_rank0.pt")
    back = S.restricted_load(tmp_path / "megaflamingo_rank0.pt")
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"]) and back["loader"] == state["loader"]


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    f = tmp_path / "model.pt"
    f.write_bytes(random.Random(0).randbytes(4096))  # seeded: starts with neither "PK" nor a pickle PROTO
    with pytest.raises(S.NotACheckpointError, match=r"model\.pt: not a PyTorch checkpoint") as e:
        S.restricted_load(f)
    assert "trust" not in str(e.value)  # nothing to trust: it is not a checkpoint


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.99])
def test_truncated_file_names_the_file(tmp_path, keep):
    f = tmp_path / "shard.pt"
    torch.save({"w": torch.randn(256, 64)}, f)
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(S.CorruptCheckpointError, match="truncated or corrupted") as e:
        S.restricted_load(f)
    assert str(f) in str(e.value)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(S.CorruptCheckpointError, match=r"empty\.pt: empty file"):
        S.restricted_load(tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match=r"missing checkpoint file: .*gone\.pt"):
        S.restricted_load(tmp_path / "gone.pt")


def test_legacy_format_loads_and_is_restricted_too(tmp_path):
    f = tmp_path / "old.pt"
    torch.save({"w": torch.arange(4)}, f, _use_new_zipfile_serialization=False)
    assert torch.equal(S.restricted_load(f)["w"], torch.arange(4))
    torch.save({"x": SystemPayload(tmp_path / "M")}, f, _use_new_zipfile_serialization=False)
    with pytest.raises(S.UnsafeCheckpointError, match="posix.system"):
        S.restricted_load(f)
    assert not (tmp_path / "M").exists()


def test_guard_overrides_weights_only_false_and_restores(tmp_path):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pt"
    torch.save({"x": SystemPayload(marker)}, evil)
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    original = torch.load
    env_before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    with S.guarded_torch_load():
        assert S.guard_active()
        with S.guarded_torch_load():  # nested: the inner exit must not lift the outer guard
            pass
        assert S.guard_active()
        with pytest.raises(S.UnsafeCheckpointError, match="posix.system"):
            torch.load(evil, weights_only=False)  # what DeepSpeed passes
        with pytest.raises(S.UnsafeCheckpointError):
            torch.serialization.load(str(evil), map_location="cpu", weights_only=False)
        with open(evil, "rb") as fh:  # a file object instead of a path
            with pytest.raises(S.UnsafeCheckpointError):
                torch.load(fh, weights_only=False)
        # Code that kept the original function: the environment variable still forces weights_only.
        with pytest.raises(pickle.UnpicklingError, match="posix.system"):
            S._ORIGINAL_LOAD(evil, weights_only=False)
        assert torch.equal(torch.load(tmp_path / "ok.pt", weights_only=False)["w"], torch.ones(2))
    assert not marker.exists()
    assert torch.load is original and torch.serialization.load is original
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == env_before


def test_restricted_engine_delegates_saving(tmp_path):
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo, CheckpointEngine

    inner = TorchCheckpointEngine()
    eng = S.restricted_checkpoint_engine_class()(inner)
    assert isinstance(eng, CheckpointEngine)
    info = CheckpointCommitInfo(tag="t", save_dir=str(tmp_path), save_latest=False)
    eng.create(info)
    eng.makedirs(str(tmp_path / "t"), exist_ok=True)
    eng.save({"w": torch.ones(3)}, str(tmp_path / "t" / "a.pt"))
    assert eng.commit(info) is True
    assert torch.equal(eng.load(str(tmp_path / "t" / "a.pt"), map_location=lambda s, loc: s)["w"], torch.ones(3))
    assert eng.zipfile_serialization == inner.zipfile_serialization  # engine-specific attributes reach through
    torch.save({"x": SystemPayload(tmp_path / "M")}, tmp_path / "t" / "b.pt")
    with pytest.raises(S.UnsafeCheckpointError):
        eng.load(str(tmp_path / "t" / "b.pt"))
    assert not (tmp_path / "M").exists()


class NotATensor:
    def __init__(self):
        self.payload = "arbitrary object"


def test_converter_load_refuses_pickled_objects_unless_trusted(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {"w": torch.ones(2)}, "extra": NotATensor()}, p)
    with pytest.raises(S.UnsafeCheckpointError, match=r"evil\.pt: refused to load: it needs .*NotATensor"):
        S.torch_load(p)
    with pytest.warns(UserWarning, match="weights_only=False"):
        obj = S.torch_load(p, trust=True)
    assert isinstance(obj["extra"], NotATensor)


def test_converter_load_truncated_empty_missing(tmp_path):
    p = tmp_path / "w.pt"
    torch.save({"w": torch.randn(1000)}, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(S.CorruptCheckpointError, match=r"w\.pt: truncated"):
        S.torch_load(p)
    p.write_bytes(b"")
    with pytest.raises(S.CorruptCheckpointError, match=r"w\.pt: empty file"):
        S.torch_load(p, trust=True)  # trusting a file does not make an empty one loadable
    with pytest.raises(CheckpointError, match="missing checkpoint file"):
        S.torch_load(tmp_path / "nope.pt")


def test_random_bytes_are_not_a_checkpoint_from_the_convert_cli(tmp_path, capsys):
    """The tool says what the file is, not "pass --trust-file" (trusting random bytes cannot help);
    a refused pickle gets the hint, since --trust-file exists there."""
    from megaflamingo.cli.convert import main

    f = tmp_path / "model.pt"
    f.write_bytes(random.Random(0).randbytes(4096))
    assert main(["split", str(f), str(tmp_path / "out"), "--max-size", "1MB", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "model.pt: not a PyTorch checkpoint" in err and "trust" not in err and err.count("\n") == 1
    torch.save({"w": torch.ones(2), "extra": NotATensor()}, f)
    assert main(["split", str(f), str(tmp_path / "out"), "--max-size", "1MB", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "model.pt: refused to load" in err and "NotATensor" in err and "--trust-file" in err


def test_scan_lists_refused_globals_per_file(tmp_path, capsys):
    import json

    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    (tmp_path / "sub").mkdir()
    torch.save({"x": SystemPayload(tmp_path / "M")}, tmp_path / "sub" / "bad.pt")
    assert S.main(["--scan", str(tmp_path)]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["refused"] == {"posix.system": ["sub/bad.pt"]} and len(out["allowed"]) == 4
    assert not (tmp_path / "M").exists()
    (tmp_path / "sub" / "bad.pt").unlink()
    assert S.main(["--scan", str(tmp_path)]) == 0
