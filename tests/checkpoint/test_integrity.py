"""Atomic writes, size parsing and the restricted torch loads."""

import pytest
import torch

from megaflamingo.checkpoint.integrity import (CheckpointError, atomic_open, parse_size, sha256_file, torch_load,
                                               verify_file)


def test_parse_size():
    assert parse_size("17GB") == 17 * 10**9
    assert parse_size("64KiB") == 65536
    assert parse_size("1.5 MB") == 1_500_000
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="cannot parse size"):
        parse_size("17 parsecs")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "part.bin"
    with pytest.raises(RuntimeError):
        with atomic_open(target) as w:
            w.write(b"x" * 1000)
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    with atomic_open(target) as w:
        w.write(b"hello")
        digest = w.hexdigest()
    assert target.read_bytes() == b"hello"
    assert digest == sha256_file(target)
    assert list(tmp_path.iterdir()) == [target]


class NotATensor:
    def __init__(self):
        self.payload = "arbitrary object"


def test_torch_load_refuses_pickled_objects_unless_trusted(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {"w": torch.ones(2)}, "extra": NotATensor()}, p)
    with pytest.raises(CheckpointError, match=r"evil\.pt.*refused.*--trust-file"):
        torch_load(p)
    with pytest.warns(UserWarning, match="weights_only=False"):
        obj = torch_load(p, trust=True)
    assert isinstance(obj["extra"], NotATensor)


def test_torch_load_truncated_and_empty(tmp_path):
    p = tmp_path / "w.pt"
    torch.save({"w": torch.randn(1000)}, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"w\.pt"):
        torch_load(p)
    p.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"w\.pt: empty file"):
        torch_load(p)
    with pytest.raises(CheckpointError, match="missing checkpoint file"):
        torch_load(tmp_path / "nope.pt")


def test_verify_file_errors(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"0123456789")
    good = sha256_file(p)
    verify_file(p, 10, good)
    with pytest.raises(CheckpointError, match=r"a\.bin: truncated"):
        verify_file(p, 11, good)
    with pytest.raises(CheckpointError, match=r"a\.bin: sha256 mismatch"):
        verify_file(p, 10, "0" * 64)
    with pytest.raises(CheckpointError, match="missing checkpoint part"):
        verify_file(tmp_path / "b.bin", 10, good)
