"""The integrity record of a checkpoint tag names the first missing / extra / cut / changed file."""
import zlib

import pytest
import torch

from megaflamingo.checkpoint.integrity import CheckpointError
from megaflamingo.checkpoint.tag_manifest import (MARKER, TagVerificationError, file_owner, manifest, record_files,
                                                  verify_tag)


@pytest.fixture
def tag(tmp_path):
    """A tag dir shaped like a 2-rank ZeRO-2 save (sizes differ so sorted order is not size order)."""
    d = tmp_path / "step-00000004"
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    for name, n in (("mp_rank_00_model_states.pt", 900), ("zero_pp_rank_0_mp_rank_00_optim_states.pt", 3000),
                    ("zero_pp_rank_1_mp_rank_00_optim_states.pt", 3000), ("megaflamingo_rank0.pt", 50),
                    ("megaflamingo_rank1.pt", 50)):
        torch.save({"x": torch.randn(n, generator=g)}, d / name)
    (d / "sub").mkdir()
    (d / "sub" / "extra_state.pt").write_bytes(b"\x00" * 1000)
    man = manifest(record_files(d, exclude=[MARKER], threads=3))
    (d / MARKER).write_text("{}")  # the marker itself is never part of its own record
    return d, man


def test_records_every_file_with_size_and_crc32(tag):
    d, man = tag
    assert man["algorithm"] == "crc32" and len(man["files"]) == 6 and MARKER not in man["files"]
    rec = man["files"]["zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    data = (d / "zero_pp_rank_1_mp_rank_00_optim_states.pt").read_bytes()
    assert rec == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}
    assert man["files"]["sub/extra_state.pt"]["size"] == 1000
    assert verify_tag(d, man, exclude=[MARKER]).files == 6


def test_flipped_bytes_are_named(tag):
    d, man = tag
    f = d / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(f.read_bytes())
    for i in range(16):  # 16 flipped bytes in the middle: same size, different content
        data[len(data) // 2 + i] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(TagVerificationError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt: checksum mismatch") as e:
        verify_tag(d, man, exclude=[MARKER])
    assert e.value.problem == "checksum" and e.value.path == str(f)
    assert isinstance(e.value, CheckpointError)


def test_truncated_and_missing_files(tag):
    d, man = tag
    f = d / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(TagVerificationError, match=r"mp_rank_00_model_states.pt: truncated \(100 bytes on disk") as e:
        verify_tag(d, man, exclude=[MARKER])
    assert e.value.problem == "size"
    f.unlink()
    with pytest.raises(TagVerificationError, match="mp_rank_00_model_states.pt: missing") as e:
        verify_tag(d, man, exclude=[MARKER])
    assert e.value.problem == "missing"
    # Our own per-rank state file is covered like DeepSpeed's shards (a lost one is not a world-size change).
    (d / "megaflamingo_rank1.pt").unlink()
    with pytest.raises(TagVerificationError, match="megaflamingo_rank1.pt: missing"):
        verify_tag(d, man, only=lambda n: n.startswith("megaflamingo_rank"), exclude=[MARKER])


def test_extra_file_is_named(tag):
    d, man = tag
    (d / "zero_pp_rank_2_mp_rank_00_optim_states.pt").write_bytes(b"other job")
    with pytest.raises(TagVerificationError, match="zero_pp_rank_2_mp_rank_00_optim_states.pt: not in the") as e:
        verify_tag(d, man, exclude=[MARKER])
    assert e.value.problem == "extra"
    # Listing the directory is cheap: a rank checksumming only its own share still sees it.
    with pytest.raises(TagVerificationError, match="not in the"):
        verify_tag(d, man, only=lambda n: file_owner(n) == 1, exclude=[MARKER])


def test_first_bad_file_in_sorted_order(tag):
    d, man = tag
    for name in ("zero_pp_rank_1_mp_rank_00_optim_states.pt", "megaflamingo_rank0.pt"):
        p = d / name
        b = bytearray(p.read_bytes())
        b[-30] ^= 1
        p.write_bytes(bytes(b))
    with pytest.raises(TagVerificationError) as e:
        verify_tag(d, man, exclude=[MARKER], threads=4)
    assert e.value.path == str(d / "megaflamingo_rank0.pt")


def test_no_record_is_an_error_not_a_pass(tag):
    d, _ = tag
    with pytest.raises(TagVerificationError, match="no integrity record") as e:
        verify_tag(d, None)
    assert e.value.problem == "no-manifest"
    with pytest.raises(TagVerificationError, match="'sha1'"):
        verify_tag(d, {"algorithm": "sha1", "files": {}})


def test_owner_split_covers_every_file_once(tag):
    d, man = tag
    owners = {n: file_owner(n) for n in man["files"]}
    assert owners == {"megaflamingo_rank0.pt": 0, "megaflamingo_rank1.pt": 1, "mp_rank_00_model_states.pt": 0,
                      "sub/extra_state.pt": 0, "zero_pp_rank_0_mp_rank_00_optim_states.pt": 0,
                      "zero_pp_rank_1_mp_rank_00_optim_states.pt": 1}
    counted = sum(verify_tag(d, man, only=lambda n, r=r: file_owner(n) == r, exclude=[MARKER]).files for r in (0, 1))
    assert counted == len(man["files"])
