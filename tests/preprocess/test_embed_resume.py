"""A rerun of `embed` never counts failed or damaged work as finished, and says exactly which setting
changed when it refuses to reuse an output directory."""
from __future__ import annotations

import json
import os

from megaflamingo.cli.preprocess import main
from megaflamingo.data import arrow_format as af
from megaflamingo.io import crc32_file
from megaflamingo.preprocess.shard_state import chunk_status, fingerprint_change_message, resolved_root
from tests.audio.audio_fixtures import GOOD

DIM = 16


def embed(manifest, data, out, *extra):
    return main(["embed", "--manifest", str(manifest), "--data-root", str(data), "--out", str(out), "--encoder",
                 "tiny", "--embed-dim", str(DIM), "--no-progress", "--workers", "0", "--rows-per-shard", "5",
                 "--max-bad-fraction", "0.9", *extra])


def rows(out):
    return [r for t in af.open_shards(out) for r in t.to_pylist()]


def test_chunk_status_rules(tmp_path):
    shard = tmp_path / "shard-00000.arrow"
    shard.write_bytes(b"x" * 100)
    size, crc = crc32_file(shard)
    rec = {"file_size": size, "file_crc32": crc}
    missing = [{"index": i, "reason": "missing"} for i in range(5)]
    assert chunk_status({"num_items": 5, "bad_files": missing, **rec}, shard)[0] is False
    mixed = missing[:4] + [{"index": 4, "reason": "undecodable"}]
    assert chunk_status({"num_items": 5, "bad_files": mixed, **rec}, shard) == (True, "shard-00000.arrow: finished")
    shard.write_bytes(b"x" * 60)
    ok, why = chunk_status({"num_items": 5, "bad_files": [], **rec}, shard)
    assert not ok and "60 bytes, 100 recorded" in why
    shard.write_bytes(b"y" * 100)
    ok, why = chunk_status({"num_items": 5, "bad_files": [], **rec}, shard)
    assert not ok and "checksum" in why
    assert chunk_status({"num_items": 5, "bad_files": [], **rec}, shard, checksum=False)[0] is True
    assert chunk_status({"num_items": 5, "bad_files": []}, shard)[0] is True  # an older sidecar: trusted


def test_fingerprint_names_the_changed_setting_and_the_way_out(tmp_path):
    os.symlink(tmp_path, tmp_path / "alias")
    assert resolved_root(tmp_path / "alias") == os.path.realpath(tmp_path)
    old = {"data_root": "/data/wrong", "dtype": "float16", "windows": {"window_s": 7.0, "max_windows": 16}}
    new = {"data_root": "/data/right", "dtype": "float16", "windows": {"window_s": 7.0, "max_windows": 8},
           "added_later": 1}
    msg = fingerprint_change_message("OUT", old, new)
    assert "data_root (--data-root): existing '/data/wrong', requested '/data/right'" in msg
    assert "windows.max_windows (--max-windows): existing 16, requested 8" in msg
    assert "dtype" not in msg and "added_later" not in msg and "remove OUT or pass another --out" in msg


def test_wrong_data_root_then_right_one_then_damage(audio_folder, tmp_path, capsys):
    """The issue as a user meets it: a first run with a wrong --data-root finds every file "missing" (exit
    1) and finishes nothing; the rerun with the right root embeds everything. Later a finished shard is
    cut: the next rerun redoes exactly that one. Once real work exists, another root is refused, naming
    the setting."""
    data, manifest, _ = audio_folder
    out = tmp_path / "toy-AudioCaptioning" / "train"
    assert embed(manifest, tmp_path / "wrong_root", out) == 1
    assert not (out / "metadata.json").exists()
    capsys.readouterr()
    assert embed(manifest, data, out) == 0
    assert "starting over with the new ones" in capsys.readouterr().err
    assert af.read_metadata(out)["num_rows"] == len(GOOD)
    assert json.loads((out / "_run.json").read_text())["data_root"] == os.path.realpath(data)
    want = rows(out)

    shard = out / "shard-00000.arrow"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert embed(manifest, data, out) == 0
    err = capsys.readouterr().err
    assert "redoing chunk 0: shard-00000.arrow:" in err and "truncated" in err and "redoing chunk 1" not in err
    assert rows(out) == want

    assert embed(manifest, tmp_path / "wrong_root", out) == 2
    err = capsys.readouterr().err
    assert "data_root (--data-root): existing" in err and "remove" in err
