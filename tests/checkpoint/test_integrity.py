"""Atomic writes, size parsing and part verification."""

import pytest
import torch

from megaflamingo.checkpoint.integrity import CheckpointError, atomic_open, parse_size, sha256_file, verify_file


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
