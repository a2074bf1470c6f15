"""``train.resume`` has one meaning (engine.checkpointing.resolve_resume), shared by the trainer (what it
restores) and the run (whether ``train.init_from`` applies): a run whose only checkpoint is a universal
conversion must not skip ``init_from`` while resuming nothing."""
import json

import pytest

from megaflamingo.engine import checkpointing as ck
from megaflamingo.engine.checkpointing import ResumePoint, resolve_resume


def _tag(ckpt_dir, name, latest=False):
    d = ckpt_dir / name
    d.mkdir(parents=True)
    (d / ck.MARKER).write_text(json.dumps({"step": 1, "world_size": 1}))
    if latest:
        (ckpt_dir / ck.LATEST).write_text(name)
    return d


def test_auto_none_and_latest(tmp_path):
    run = tmp_path / "run"
    assert resolve_resume("auto", run) is None  # no checkpoints dir at all
    assert resolve_resume("none", run) is None and resolve_resume("never", run) is None
    _tag(run / "checkpoints", "step-00000002")
    _tag(run / "checkpoints", "step-00000004", latest=True)
    _tag(run / "checkpoints", "step-00000006")  # newer, but `latest` names 4 and 4 is complete
    assert resolve_resume("auto", run) == ResumePoint(run / "checkpoints", "step-00000004")
    (run / "checkpoints" / ck.LATEST).unlink()  # `latest` lost: the newest complete tag
    assert resolve_resume("auto", run).tag == "step-00000006"
    (run / "checkpoints" / "step-00000006" / ck.MARKER).unlink()  # an interrupted save is not complete
    assert resolve_resume("auto", run).tag == "step-00000004"


def test_a_universal_conversion_alone_is_not_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    _tag(run / "checkpoints", "step-00000004-universal")
    assert resolve_resume("auto", run) is None


def test_explicit_paths(tmp_path):
    other = tmp_path / "other"
    tag = _tag(other / "checkpoints", "step-00000010", latest=True)
    want = ResumePoint(other / "checkpoints", "step-00000010")
    for spec in (tag, other / "checkpoints", other):
        assert resolve_resume(str(spec), tmp_path / "run") == want
    with pytest.raises(FileNotFoundError, match="no such directory"):
        resolve_resume(str(tmp_path / "missing"), tmp_path / "run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_resume(str(tmp_path / "empty"), tmp_path / "run")


def test_init_from_applies_exactly_when_nothing_is_resumed(tmp_path, monkeypatch):
    """The run consults the same function: with only a universal tag, init_from is applied."""
    import megaflamingo.engine.run as run_mod
    from megaflamingo.testing.tiny_task import make_config, tiny_raw_config

    raw = tiny_raw_config()
    raw["train"] = {"run_dir": str(tmp_path / "run"), "init_from": str(tmp_path / "stage1.pt"), "precision": "fp32"}
    raw["deepspeed"] = {"zero_init": False}  # no process group in this test
    cfg = make_config(raw)
    _tag(tmp_path / "run" / "checkpoints", "step-00000004-universal")
    applied = []

    class Stop(Exception):
        pass

    def fake_init(model, path, rank):
        applied.append(path)
        raise Stop

    monkeypatch.setattr(run_mod, "load_init_weights", fake_init)
    monkeypatch.setattr(run_mod, "init_distributed", lambda world, timeout: None)
    world = run_mod.World(rank=0, world_size=1, local_rank=0, launcher="single")
    with pytest.raises(Stop):
        run_mod.run(cfg, world)
    assert applied == [str(tmp_path / "stage1.pt")]

    _tag(tmp_path / "run" / "checkpoints", "step-00000004", latest=True)
    applied.clear()
    monkeypatch.setattr(run_mod, "build_loaders", lambda *a: (_ for _ in ()).throw(Stop()))
    with pytest.raises(Stop):
        run_mod.run(cfg, world)
    assert applied == []  # a real checkpoint is resumed instead
