"""Resume only from tags whose files verify (the integrity record in the completion marker, a static
scan for refused pickles), say which tags were passed over and why, refuse an explicitly named bad tag,
and load everything through the restricted loader. Checkpoints are written by the real
CheckpointManager around a stand-in for the DeepSpeed engine."""
import json
import os
import stat

import pytest
import torch

from megaflamingo.checkpoint.integrity import CheckpointError
from megaflamingo.checkpoint.safe_load import UnsafeCheckpointError
from megaflamingo.checkpoint.tag_manifest import MARKER, owned_by, verify_marker_record
from megaflamingo.engine import checkpointing as ck
from megaflamingo.engine.checkpointing import (CheckpointManager, ResumeError, check_sizes, resolve_resume,
                                               verify_on_all_ranks)


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class FakeEngine:
    """What CheckpointManager uses of a DeepSpeed engine; loads go through ``checkpoint_engine`` as
    DeepSpeed's do, so the restricted engine the manager installs is the one that reads them."""

    def __init__(self, world=1):
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        self.world = world
        self.checkpoint_engine = TorchCheckpointEngine()

    def save_checkpoint(self, save_dir, tag, save_latest):
        d = os.path.join(save_dir, tag)
        os.makedirs(d, exist_ok=True)
        for r in range(self.world):
            torch.save({"w": torch.randn(500)}, os.path.join(d, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
        torch.save({"module": {"x": torch.ones(3)}}, os.path.join(d, "mp_rank_00_model_states.pt"))

    def load_checkpoint(self, load_dir, tag, **kw):
        for f in sorted(os.listdir(os.path.join(load_dir, tag))):
            if f.endswith("_states.pt"):
                self.checkpoint_engine.load(os.path.join(load_dir, tag, f))
        return os.path.join(load_dir, tag), {}


def flip(path, n=16):
    b = bytearray(path.read_bytes())
    for i in range(n):
        b[len(b) // 2 + i] ^= 0xFF
    path.write_bytes(bytes(b))


@pytest.fixture
def run(tmp_path):
    mgr = CheckpointManager(tmp_path / "run", rank=0, world_size=1, keep_last=5)
    for step in (1, 2, 3):
        mgr.save(FakeEngine(), step, {"config_hash": "h"}, {"loader": {"pos": step}})
    ck._VERIFIED.clear()
    return mgr


def tag(mgr, step):
    return mgr.dir / f"step-{step:08d}"


def test_the_marker_records_every_file_of_the_tag(run):
    meta = json.loads((tag(run, 3) / MARKER).read_text())
    assert sorted(meta["integrity"]["files"]) == ["megaflamingo_rank0.pt", "mp_rank_00_model_states.pt",
                                                 "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert verify_marker_record(tag(run, 3), meta) is None


def test_auto_falls_back_to_the_newest_tag_that_verifies_and_says_why(run, caplog):
    bad = tag(run, 3) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    flip(bad)  # same size: only the checksum sees it
    (tag(run, 2) / MARKER).unlink()  # a deleted marker
    (run.dir / "latest").write_text("step-00000003")
    assert resolve_resume("auto", run.dir.parent).tag == "step-00000003"  # the pre-flight's size check passes it
    with caplog.at_level("WARNING", logger="megaflamingo.train"):
        point = resolve_resume("auto", run.dir.parent, verify=verify_on_all_ranks)
    assert point.tag == "step-00000001"
    assert len(point.skipped) == 2
    assert f"{bad}: checksum mismatch" in point.skipped[0]
    assert "step-00000002" in point.skipped[1] and "no completion marker" in point.skipped[1]
    assert [r.getMessage() for r in caplog.records] == list(point.skipped)
    with caplog.at_level("WARNING", logger="megaflamingo.train"):
        resolve_resume("auto", run.dir.parent, verify=verify_on_all_ranks)  # asked again: said once
    assert len(caplog.records) == 2


def test_an_explicit_bad_tag_is_an_error_naming_the_file(run):
    f = tag(run, 3) / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ResumeError, match=rf"train.resume=.*{f}: truncated \(100 bytes on disk"):
        resolve_resume(str(tag(run, 3)), "elsewhere")  # already at pre-flight: sizes are cheap
    flip(tag(run, 2) / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(ResumeError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt: checksum mismatch"):
        resolve_resume(str(tag(run, 2)), "elsewhere", verify=verify_on_all_ranks)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        resolve_resume(str(run.dir / "step-00000099"), "elsewhere")


def test_no_tag_verifies_is_an_error_not_a_fresh_start(run):
    for s in (1, 2, 3):
        flip(tag(run, s) / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(ResumeError, match="no checkpoint there verifies.*--resume none"):
        resolve_resume("auto", run.dir.parent, verify=verify_on_all_ranks)


def test_a_lost_rank_state_file_is_damage_not_a_world_size_change(run):
    (tag(run, 3) / "megaflamingo_rank0.pt").unlink()
    point = resolve_resume("auto", run.dir.parent)
    assert point.tag == "step-00000002" and "megaflamingo_rank0.pt: missing" in point.skipped[0]
    # A tag of an older version (no record) with the same world size: the load refuses it.
    meta = json.loads((tag(run, 3) / MARKER).read_text())
    del meta["integrity"]
    (tag(run, 3) / MARKER).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="megaflamingo_rank0.pt: missing"):
        run.load(FakeEngine(), "step-00000003", universal=False)


def test_a_tag_without_a_record_stays_resumable_with_a_note(run):
    meta = json.loads((tag(run, 3) / MARKER).read_text())
    del meta["integrity"]
    (tag(run, 3) / MARKER).write_text(json.dumps(meta))
    point = resolve_resume("auto", run.dir.parent, verify=verify_on_all_ranks)
    assert point.tag == "step-00000003" and "no integrity record" in point.note


def test_a_planted_pickle_is_refused_before_loading_even_with_a_matching_record(run, tmp_path):
    """Someone who rewrites a shard can rewrite the marker too: the scan (and the loader) still refuse."""
    from megaflamingo.checkpoint.tag_manifest import manifest, record_files

    d = tag(run, 3)
    torch.save({"w": torch.ones(2), "x": Payload(tmp_path / "RAN")}, d / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    meta = json.loads((d / MARKER).read_text())
    meta["integrity"] = manifest(record_files(d))
    (d / MARKER).write_text(json.dumps(meta))
    with pytest.raises(ResumeError, match="optim_states.pt: refused to load: it needs posix.system"):
        resolve_resume(str(d), "elsewhere", verify=verify_on_all_ranks)
    with pytest.raises(UnsafeCheckpointError, match="optim_states.pt: refused to load: it needs posix.system"):
        run.load(FakeEngine(), "step-00000003", universal=False)  # the engine's own load is restricted too
    assert not (tmp_path / "RAN").exists()
    meta2, state = run.load(FakeEngine(), "step-00000002", universal=False)
    assert meta2["step"] == 2 and state["loader"] == {"pos": 2}


def test_ranks_split_the_checksums(tmp_path):
    mgr = CheckpointManager(tmp_path / "run", rank=0, world_size=1, keep_last=5)
    from megaflamingo.checkpoint.tag_manifest import manifest, record_files

    mgr.save(FakeEngine(world=2), 4, {}, {})  # shards of 2 ranks, as both would have written them
    d = tag(mgr, 4)
    meta = json.loads((d / MARKER).read_text())
    meta["integrity"] = manifest(record_files(d))
    flip(d / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert verify_marker_record(d, meta, only=owned_by(0, 2)) is None  # rank 0's share is fine
    with pytest.raises(CheckpointError, match="zero_pp_rank_1"):
        verify_marker_record(d, meta, only=owned_by(1, 2))
    assert check_sizes(d, meta) is None


def test_checkpoint_files_share_one_mode(run):
    files = [run.dir / "latest", *tag(run, 3).iterdir()]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
    assert len(set(modes.values())) == 1, modes
