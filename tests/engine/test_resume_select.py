"""Resume only from tags whose files verify; report every tag skipped; checkpoint file modes."""
import json
import logging
import os
import stat

import pytest
import torch

from megaflamingo.checkpoint.integrity import CheckpointError
from megaflamingo.checkpoint.tag_manifest import manifest, record_files
from megaflamingo.engine.resume_select import (MARKER, ResumeError, check_explicit_tag, choose_resume_tag,
                                               owned_by, verify_with_record)


def make_tag(ckpt, step, record=True, world=2):
    d = ckpt / f"step-{step:08d}"
    d.mkdir(parents=True)
    for r in range(world):
        torch.save({"w": torch.full((300,), float(step + r))}, d / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        torch.save({"loader": {"pos": step}}, d / f"megaflamingo_rank{r}.pt")
    torch.save({"module": {}}, d / "mp_rank_00_model_states.pt")
    meta = {"step": step, "world_size": world}
    if record:
        meta["integrity"] = manifest(record_files(d, exclude=[MARKER]))
    (d / MARKER).write_text(json.dumps(meta))
    return d


def flip(path, n=16):
    b = bytearray(path.read_bytes())
    for i in range(n):
        b[len(b) // 2 + i] ^= 0xFF
    path.write_bytes(bytes(b))


def test_auto_falls_back_to_the_newest_tag_that_verifies(tmp_path):
    for s in (4, 8, 12):
        make_tag(tmp_path, s)
    flip(tmp_path / "step-00000012" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    (tmp_path / "step-00000016").mkdir()  # an interrupted save: shards, no marker
    c = choose_resume_tag(tmp_path, verify_with_record())
    assert c.tag == "step-00000008" and c.meta["step"] == 8
    assert [t for t, _ in c.skipped] == ["step-00000016", "step-00000012"]
    assert "no completion marker" in c.skipped[0][1]
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt: checksum mismatch" in c.skipped[1][1]
    assert c.warnings()[1].startswith("checkpoint step-00000012 skipped: ")


def test_a_lost_rank_state_file_is_a_bad_tag_not_a_world_size_change(tmp_path):
    make_tag(tmp_path, 4)
    make_tag(tmp_path, 8)
    (tmp_path / "step-00000008" / "megaflamingo_rank1.pt").unlink()
    c = choose_resume_tag(tmp_path, verify_with_record())
    assert c.tag == "step-00000004" and "megaflamingo_rank1.pt: missing" in c.skipped[0][1]


def test_explicit_bad_tag_is_an_error_naming_the_file(tmp_path):
    d = make_tag(tmp_path, 4)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"cut")
    with pytest.raises(ResumeError, match=r"mp_rank_00_model_states.pt: truncated") as e:
        check_explicit_tag(d, verify_with_record())
    assert isinstance(e.value, CheckpointError)
    with pytest.raises(ResumeError, match="no such checkpoint directory"):
        check_explicit_tag(tmp_path / "step-00000099", verify_with_record())
    (d / MARKER).unlink()
    with pytest.raises(ResumeError, match="no completion marker"):
        check_explicit_tag(d, verify_with_record())


def test_tags_without_a_record_stay_resumable_with_a_note(tmp_path):
    make_tag(tmp_path, 4, record=False)
    c = choose_resume_tag(tmp_path, verify_with_record())
    assert c.tag == "step-00000004" and "not verified" in c.note
    assert choose_resume_tag(tmp_path / "nothing", verify_with_record()).tag is None


def test_ranks_split_the_verification(tmp_path):
    d = make_tag(tmp_path, 4)
    meta = json.loads((d / MARKER).read_text())
    flip(d / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert verify_with_record(owned_by(0, 2))(d, meta) is None  # rank 0's files are fine
    with pytest.raises(CheckpointError, match="zero_pp_rank_1"):
        verify_with_record(owned_by(1, 2))(d, meta)


# ---------------------------------------------------------------- today's CheckpointManager (xfail)

class FakeEngine:
    """The two DeepSpeed calls CheckpointManager makes, writing/reading real torch files."""

    def save_checkpoint(self, save_dir, tag, save_latest):
        d = os.path.join(save_dir, tag)
        os.makedirs(d, exist_ok=True)
        torch.save({"w": torch.randn(500)}, os.path.join(d, "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
        torch.save({"module": {"x": torch.ones(3)}}, os.path.join(d, "mp_rank_00_model_states.pt"))

    def load_checkpoint(self, load_dir, tag, **kw):
        for f in sorted(os.listdir(os.path.join(load_dir, tag))):
            if f.endswith("_states.pt"):
                torch.load(os.path.join(load_dir, tag, f), weights_only=True)
        return os.path.join(load_dir, tag), {}


@pytest.fixture
def saved(tmp_path):
    from megaflamingo.engine.checkpointing import CheckpointManager

    mgr = CheckpointManager(tmp_path, rank=0, world_size=1, keep_last=5)
    eng = FakeEngine()
    for step in (1, 2):
        mgr.save(eng, step, {"config_hash": "h"}, {"loader": {"pos": step}})
    return mgr, eng


@pytest.mark.xfail(strict=True, reason="latest_tag trusts the marker: a corrupted shard of the newest tag is resumed")
def test_checkpoint_manager_skips_a_corrupted_newest_tag(saved):
    mgr, _ = saved
    flip(mgr.dir / "step-00000002" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert mgr.latest_tag() == "step-00000001"


@pytest.mark.xfail(strict=True, reason="a missing megaflamingo_rank<R>.pt is treated like a world-size change "
                                      "(data order silently reset)")
def test_checkpoint_manager_refuses_a_tag_missing_its_rank_state(saved):
    mgr, eng = saved
    (mgr.dir / "step-00000002" / "megaflamingo_rank0.pt").unlink()
    with pytest.raises(CheckpointError, match="megaflamingo_rank0.pt"):
        mgr.load(eng, "step-00000002", universal=False)


@pytest.mark.xfail(strict=True, reason="a deleted marker makes latest_tag fall back silently")
def test_checkpoint_manager_warns_about_a_deleted_marker(saved, caplog):
    mgr, _ = saved
    (mgr.dir / "step-00000002" / MARKER).unlink()
    with caplog.at_level(logging.WARNING):
        assert mgr.latest_tag() == "step-00000001"
    assert "step-00000002" in caplog.text


@pytest.mark.xfail(strict=True, reason="`latest` and the marker are written through mkstemp (mode 0600) while "
                                      "shards are 0644")
def test_checkpoint_files_share_one_mode(saved):
    mgr, _ = saved
    files = [mgr.dir / "latest", *(mgr.dir / "step-00000002").iterdir()]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
    assert len(set(modes.values())) == 1, modes
