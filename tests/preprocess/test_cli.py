"""`megaflamingo-preprocess` end to end on a small folder with the tiny encoder: embed, knn,
merge, manifest; shard/worker independence; resume after kill -9; bad-input accounting."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.audio.audio_fixtures import GOOD
from megaflamingo.audio.decode import load_audio
from megaflamingo.audio.encoders import build_encoder
from megaflamingo.audio.windows import frame_windows, sliding_windows
from megaflamingo.data import arrow_format as af
from megaflamingo.data.knn import read_knn
from megaflamingo.cli.preprocess import main

DIM = 16
EXPECTED_WINDOWS = {"a/tone.wav": 1, "a/chirp.flac": 3, "b/noise.ogg": 4, "b/speech.mp3": 16,
                    "c/pink.wav": 1, "c/clicks.flac": 9}


def embed_args(manifest, data, out, *extra):
    return ["embed", "--manifest", str(manifest), "--data-root", str(data), "--out", str(out),
            "--encoder", "tiny", "--embed-dim", str(DIM), "--no-progress", *extra]


def files_of(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def rows_of(d: Path) -> list[dict]:
    return [r for t in af.open_shards(d) for r in t.to_pylist()]


@pytest.fixture(scope="module")
def embedded(audio_folder, tmp_path_factory):
    data, manifest, bad = audio_folder
    out = tmp_path_factory.mktemp("emb") / "toy-AudioCaptioning" / "train"
    rc = main(embed_args(manifest, data, out, "--workers", "0", "--rows-per-shard", "5",
                         "--max-bad-fraction", "0.9"))
    assert rc == 0
    return out


def test_embed_output(embedded, audio_folder):
    data, manifest, bad = audio_folder
    meta = af.read_metadata(embedded)
    assert meta["num_rows"] == len(GOOD)
    assert meta["dataset"] == "toy" and meta["task"] == "AudioCaptioning" and meta["split"] == "train"
    assert meta["encoder"]["name"] == "tiny" and meta["encoder"]["random_init"] is True
    assert meta["encoder"]["embed_dim"] == DIM and meta["dtype"] == "float16"
    assert meta["windows"] == {"window_s": 7.0, "overlap_s": 5.25, "max_windows": 16}
    assert meta["clip_encoder"]["config"]["pooling"] == "mean_of_windows"
    assert {b["path"]: b["reason"] for b in meta["bad_files"]} == bad
    enc = build_encoder("tiny", embed_dim=DIM)
    np.testing.assert_allclose(meta["silence_embedding"], enc.silence_embedding(), atol=1e-6)
    rows = rows_of(embedded)
    assert [r["path"] for r in rows] == [g[0] for g in GOOD]          # manifest order
    assert [r["index"] for r in rows] == list(range(len(GOOD)))
    secs = {g[0]: g[2] for g in GOOD}
    hours = 0.0
    for r in rows:
        if r["path"] in EXPECTED_WINDOWS:
            assert r["num_windows"] == EXPECTED_WINDOWS[r["path"]], r["path"]
        audio = load_audio(data / r["path"], 44100)
        n, full, _ = sliding_windows(len(audio), 44100)
        assert r["num_windows"] == n == len(r["windows"])
        assert abs(r["duration"] - min(len(audio), full) / 44100) < 1e-9
        assert abs(r["duration"] - min(secs[r["path"]], 33.25)) < 0.1
        hours += r["duration"] / 3600
        # the stored embeddings are the encoder applied to AF1's windows of this file
        want = enc.encode(frame_windows(audio, 44100))
        np.testing.assert_allclose(np.array(r["windows"], np.float32), want, atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(r["clip_embedding"], want.mean(0), atol=1e-5)
        assert r["prompt"] == "describe the sound." and r["output"].startswith("caption")
        assert r["task"] == "toy-AudioCaptioning" and r["dataset"] == "toy"
    assert abs(meta["audio_hours"] - hours) < 1e-9


def test_knn_cli(embedded, capsys):
    assert main(["knn", "--split-dir", str(embedded), "-k", "4", "--seed", "1"]) == 0
    table, info = read_knn(embedded)
    assert info["train_dir"] == "." and info["k"] == 4 and info["index_type"] == "flat"
    assert table.column("index").to_pylist() == list(range(len(GOOD)))
    for q, nb in zip(table.column("index").to_pylist(), table.column("neighbors").to_pylist()):
        assert len(nb) == 3 and q not in nb and len(set(nb)) == 3
        assert all(0 <= i < len(GOOD) for i in nb)


def test_shards_and_workers_do_not_change_output(audio_folder, tmp_path):
    data, manifest, _ = audio_folder
    ref, split = tmp_path / "ref", tmp_path / "split"
    common = ["--rows-per-shard", "3", "--max-bad-fraction", "1"]
    assert main(embed_args(manifest, data, ref, "--workers", "0", "--batch-size", "8", *common)) == 0
    assert main(embed_args(manifest, data, split, "--workers", "2", "--shard", "1/2",
                           "--batch-size", "8", *common)) == 0
    assert not (split / "metadata.json").exists()     # shard 0 still missing: no merge yet
    assert main(["merge", "--out", str(split), "--max-bad-fraction", "1"]) == 2  # refuses, clear error
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"}
    os.environ.update(env)
    try:
        assert main(embed_args(manifest, data, split, "--workers", "1", "--batch-size", "8", *common)) == 0
    finally:
        for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
            os.environ.pop(k, None)
    assert files_of(ref) == files_of(split)
    assert main(["merge", "--out", str(split), "--max-bad-fraction", "1"]) == 0
    assert files_of(ref) == files_of(split)


def test_bad_fraction_sets_exit_code_and_mismatch_is_refused(audio_folder, tmp_path, capsys):
    data, manifest, bad = audio_folder
    out = tmp_path / "o"
    assert main(embed_args(manifest, data, out, "--workers", "0")) == 1   # 10/18 bad > 5 %
    assert af.read_metadata(out)["num_rows"] == len(GOOD)                 # ...but the run completed
    capsys.readouterr()
    assert main(embed_args(manifest, data, out, "--workers", "0", "--embed-dim", "8")) == 2
    err = capsys.readouterr().err
    assert "encoder.embed_dim (--encoder/--checkpoint/--embed-dim)" in err and "another --out" in err


def _big_manifest(tmp_path, data, copies=3):
    lines = []
    for c in range(copies):
        for name, *_ in GOOD:
            lines.append(json.dumps({"path": name, "output": f"{name} {c}", "prompt": "p"}))
    m = tmp_path / "big.jsonl"
    m.write_text("\n".join(lines) + "\n")
    return m


@pytest.mark.slow
def test_resume_after_kill_is_identical(audio_folder, tmp_path):
    data, _, _ = audio_folder
    manifest = _big_manifest(tmp_path, data)
    args = ["--rows-per-shard", "3", "--dataset", "toy", "--task", "T", "--split", "train"]
    ref, out = tmp_path / "ref", tmp_path / "killed"
    assert main(embed_args(manifest, data, ref, "--workers", "0", *args)) == 0
    cmd = [sys.executable, "-m", "megaflamingo.cli.preprocess", *embed_args(manifest, data, out, "--workers", "1", *args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list(out.glob("shard-*.json"))) < 2:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)   # the CLI and its decoding worker, mid-run
    finally:
        proc.wait()
    done = len(list(out.glob("shard-*.json")))
    assert 2 <= done < 8 and not (out / "metadata.json").exists()
    # a chunk whose rename happened but whose sidecar did not: must be redone, not trusted
    (out / "shard-00000.json").unlink()
    assert main(embed_args(manifest, data, out, "--workers", "1", *args)) == 0
    assert {k: v for k, v in files_of(out).items()} == files_of(ref)
    assert not list(out.glob(".*.tmp"))


def test_manifest_subcommand_then_embed(tmp_path):
    from megaflamingo.testing import write_audio
    folder = tmp_path / "clips"
    write_audio(folder / "x/one.wav", "tone", 2.0, 16000)
    write_audio(folder / "two.flac", "white_noise", 8.0, 22050)
    write_audio(folder / "unlabelled.wav", "tone", 1.0, 16000)
    (tmp_path / "labels.csv").write_text("file,caption\none.wav,a beep\ntwo.flac,a hiss\nthree.wav,gone\n")
    out = tmp_path / "m.jsonl"
    assert main(["manifest", "--folder", str(folder), "--labels", str(tmp_path / "labels.csv"),
                 "--out", str(out), "--dataset", "mine", "--task", "AudioCaptioning",
                 "--split", "train"]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in recs] == ["x/one.wav", "two.flac"]
    assert [r["output"] for r in recs] == ["a beep", "a hiss"]
    assert main(embed_args(out, folder, tmp_path / "emb", "--workers", "0")) == 0
    rows = rows_of(tmp_path / "emb")
    assert [r["num_windows"] for r in rows] == [1, 2]


def test_cli_entry_point_runs_as_a_command(audio_folder, tmp_path):
    exe = Path(sys.executable).with_name("megaflamingo-preprocess")
    if not exe.exists():
        pytest.skip("console script not installed (pip install -e .)")
    r = subprocess.run([str(exe), "embed", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--shard" in r.stdout and "--random-init" in r.stdout


@pytest.mark.slow
def test_laion_clip_embeddings_for_knn(torchvision_stub, tmp_path):
    """AF1's kNN input: LAION-CLAP (random weights here) on the first 10 s at 48 kHz."""
    from megaflamingo.testing import write_audio
    data = tmp_path / "d"
    for i, (kind, sec, sr) in enumerate([("tone", 3.0, 16000), ("white_noise", 14.0, 48000),
                                         ("chirp_up", 6.0, 44100)]):
        write_audio(data / f"{i}.wav", kind, sec, sr, seed=i)
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps({"path": f"{i}.wav", "output": "o"}) + "\n" for i in range(3)))
    out = tmp_path / "x" / "train"
    assert main(embed_args(m, data, out, "--workers", "0", "--clip-encoder", "laion-clap",
                           "--random-init", "--dataset", "d", "--task", "T", "--split", "train")) == 0
    meta = af.read_metadata(out)
    assert meta["clip_encoder"]["name"] == "laion-clap" and meta["clip_encoder"]["random_init"] is True
    assert meta["clip_embed_dim"] == 512
    clips = np.array([r["clip_embedding"] for r in rows_of(out)])
    assert clips.shape == (3, 512)
    np.testing.assert_allclose(np.linalg.norm(clips, axis=1), 1.0, atol=1e-5)
    assert main(["knn", "--split-dir", str(out), "-k", "3"]) == 0
    assert [len(n) for n in read_knn(out)[0].column("neighbors").to_pylist()] == [2, 2, 2]


def test_shard_selection_from_flag_and_environment():
    from megaflamingo.preprocess.embed import EmbedError, parse_shard
    assert parse_shard("2/5", {}) == (2, 5)
    assert parse_shard(None, {}) == (0, 1)
    assert parse_shard(None, {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}) == (3, 4)
    assert parse_shard(None, {"SLURM_ARRAY_TASK_ID": "11", "SLURM_ARRAY_TASK_MIN": "10",
                              "SLURM_ARRAY_TASK_MAX": "13"}) == (1, 4)
    assert parse_shard(None, {"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)
    for bad in ("3/3", "x", "1/0"):
        with pytest.raises(EmbedError):
            parse_shard(bad, {})


def test_audio_start_is_applied_and_recorded(tmp_path):
    from megaflamingo.testing import write_audio
    write_audio(tmp_path / "d/long.wav", "chirp_up", 20.0, 16000)
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"path": "long.wav", "output": "o", "audio_start": 5.0}) + "\n"
                 + json.dumps({"path": "long.wav", "output": "o", "audio_start": 30.0}) + "\n")
    out = tmp_path / "o"
    assert main(embed_args(m, tmp_path / "d", out, "--workers", "0", "--dataset", "d", "--task", "T",
                           "--split", "s", "--max-bad-fraction", "0.5")) == 0
    (row,) = rows_of(out)
    assert row["start"] == 5.0 and abs(row["duration"] - 15.0) < 1e-6
    assert row["num_windows"] == 1 + int(np.ceil((15.0 - 7.0) / 1.75)) == 6
    assert [b["reason"] for b in af.read_metadata(out)["bad_files"]] == ["start_beyond_end"]


def test_outside_root_is_refused_unless_allowed(tmp_path):
    from megaflamingo.testing import write_audio

    root = tmp_path / "root"
    write_audio(root / "in.wav", "tone", 2.0, 22050)
    write_audio(tmp_path / "elsewhere" / "out.wav", "chirp_up", 2.0, 22050)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"name": "in.wav", "prompt": "p", "output": "o"}\n'
                        '{"name": "../elsewhere/out.wav", "prompt": "p", "output": "o"}\n')
    common = ["--dataset", "toy", "--task", "AC", "--split", "train", "--workers", "0",
              "--max-bad-fraction", "0.9"]
    refused = tmp_path / "refused"
    assert main(embed_args(manifest, root, refused, *common)) == 0
    meta = af.read_metadata(refused)
    assert meta["num_rows"] == 1
    assert [b["reason"] for b in meta["bad_files"]] == ["outside_data_root"]
    allowed = tmp_path / "allowed"
    assert main(embed_args(manifest, root, allowed, *common, "--allow-outside-root")) == 0
    meta = af.read_metadata(allowed)
    assert meta["num_rows"] == 2 and meta["bad_files"] == []
