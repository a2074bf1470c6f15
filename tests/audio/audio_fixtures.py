"""Helpers for the preprocessing tests: a small folder of real audio in several formats, rates and
channel counts plus broken files, and its JSONL manifest. (A uniquely named module, so the test
files can import it; conftest.py only holds fixtures.)"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from megaflamingo.testing import write_audio

# (name, kind, seconds, sample rate, channels): durations cover 1 window, several and the cap.
GOOD = [
    ("a/tone.wav", "tone", 3.0, 16000, 1),
    ("a/chirp.flac", "chirp_up", 9.5, 44100, 2),
    ("b/noise.ogg", "white_noise", 12.0, 48000, 1),
    ("b/speech.mp3", "speech_like", 36.0, 22050, 2),
    ("c/pink.wav", "pink_noise", 1.5, 96000, 1),
    ("c/clicks.flac", "clicks", 20.0, 8000, 1),
    ("c/am.wav", "am_tone", 7.0, 44100, 1),
    ("c/chirp_down.wav", "chirp_down", 8.75, 32000, 2),
]


def write_bad_files(root: Path) -> dict[str, str]:
    """name -> expected reason."""
    bad = {}
    (root / "bad").mkdir(parents=True, exist_ok=True)
    (root / "bad/text.wav").write_text("this is not audio\n" * 2000)
    bad["bad/text.wav"] = "undecodable"
    (root / "bad/empty.wav").write_bytes(b"")
    bad["bad/empty.wav"] = "empty_file"
    write_audio(root / "bad/short.wav", "tone", 0.2, 16000)  # 6.4 kB < AF1's 16000-byte floor
    bad["bad/short.wav"] = "too_small"
    full = write_audio(root / "bad/full.wav", "tone", 4.0, 16000).read_bytes()
    (root / "bad/truncated.wav").write_bytes(full[: len(full) // 2])
    (root / "bad/full.wav").unlink()
    bad["bad/truncated.wav"] = "truncated"
    flac = write_audio(root / "bad/full.flac", "white_noise", 4.0, 44100).read_bytes()
    (root / "bad/truncated.flac").write_bytes(flac[: len(flac) // 2])
    (root / "bad/full.flac").unlink()
    bad["bad/truncated.flac"] = "corrupt"
    import soundfile as sf
    x = np.zeros(44100, np.float32)
    x[100] = np.nan
    sf.write(str(root / "bad/nan.wav"), x, 44100, subtype="FLOAT")
    bad["bad/nan.wav"] = "non_finite"
    (root / "bad/codec.wav").write_bytes(unsupported_codec_wav())
    bad["bad/codec.wav"] = "undecodable"
    bad["bad/missing.wav"] = "missing"
    bad["../outside.wav"] = "outside_data_root"
    return bad


def unsupported_codec_wav(frames: int = 20000) -> bytes:
    """A RIFF/WAVE file whose format tag (0x7777) no decoder knows."""
    data = bytes(frames * 2)
    fmt = struct.pack("<HHIIHH", 0x7777, 1, 16000, 32000, 2, 16)
    return (b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE"
            + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data)


def make_folder(root: Path, with_bad: bool = True) -> tuple[Path, Path, dict[str, str]]:
    data = root / "data"
    for i, (name, kind, sec, sr, ch) in enumerate(GOOD):
        write_audio(data / name, kind, sec, sr, ch, seed=i)
    bad = write_bad_files(data) if with_bad else {}
    (root / "outside.wav").write_bytes((data / GOOD[0][0]).read_bytes())  # exists, but outside
    manifest = root / "train.jsonl"
    with open(manifest, "w") as f:
        names = [g[0] for g in GOOD] + list(bad)
        for i, name in enumerate(names):
            f.write(json.dumps({"path": name, "prompt": "describe the sound.", "output": f"caption {i}",
                                "dataset": "toy", "task": "AudioCaptioning", "split": "train"}) + "\n")
    return data, manifest, bad
