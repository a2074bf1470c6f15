"""Decoding + resampling + AF1's normalisation, with a reason for every file that cannot be used.

Order of operations (AF1's loader, `foundation/data/data.py::load_audio`):
  1. seek to `start` and read min((start + duration) * sr, total) frames   [AF1's read length]
  2. if any sample is outside [-1, 1]: divide by the peak (float files)
  3. first channel, resample to the target rate (soxr HQ; channels resample independently, so
     taking the first channel before resampling gives AF1's "resample then channel 0")
  4. if min >= 0: 2 * x / max - 1 (AF1's quirk for non-negative signals), else x / peak
FIX vs AF1: an all-zero signal stays zero (AF1 divides 0 by 0 and feeds NaNs to the encoder);
mp3 goes through the same path as every other format (AF1 used pydub for mp3: channel average,
a low-quality resampler and an `audio_start` that was ignored for short files).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from megaflamingo.io import PathEscapeError, path_inside

AF1_MIN_FILE_BYTES = 16000  # AF1's manifest scripts drop files smaller than this


class AudioError(Exception):
    """A file that cannot be used; `reason` is a short stable key for the bad-file report."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def resolve_in_root(data_root: str | os.PathLike, rel: str, allow_outside: bool = False) -> Path:
    """Join `rel` under `data_root`, refusing absolute paths, `..` escapes and symlinks whose target
    lies outside the root (links between places inside the root are fine). ``allow_outside`` is the
    user's explicit opt-in (``--allow-outside-root``) for manifests that point elsewhere on purpose."""
    if not isinstance(rel, str) or not rel:
        raise AudioError("bad_path", f"empty or non-string path {rel!r}")
    try:
        return path_inside(data_root, rel, allow_outside)
    except PathEscapeError as e:
        raise AudioError("outside_data_root", str(e)) from None


@dataclass
class RawAudio:
    """First channel at the source rate after AF1's step 2 (float64)."""
    samples: np.ndarray
    sample_rate: int
    channels: int


def declared_frames(path: Path) -> int | None:
    """Frame count promised by a WAV/FLAC header (libsndfile silently shortens truncated files
    to what is present, so this is how truncation is noticed). None when unknown."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head[:4] == b"fLaC" and len(head) >= 42 and head[4] & 0x7F == 0:
        total = int.from_bytes(head[18:26], "big") & ((1 << 36) - 1)
        return total or None
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        pos, block_align = 12, None
        while pos + 8 <= len(head):
            cid, size = head[pos:pos + 4], int.from_bytes(head[pos + 4:pos + 8], "little")
            if cid == b"fmt " and pos + 22 <= len(head):
                block_align = int.from_bytes(head[pos + 20:pos + 22], "little")
            if cid == b"data":
                if not block_align or size in (0, 0xFFFFFFFF):
                    return None
                return size // block_align
            pos += 8 + size + (size & 1)
    return None


def _read_soundfile(path: Path, start_s: float, duration_s: float) -> RawAudio:
    with sf.SoundFile(str(path)) as f:
        sr, channels, total = f.samplerate, f.channels, f.frames
        promised = declared_frames(path) if f.format in ("WAV", "WAVEX", "FLAC") else None
        if promised is not None and promised > total:
            raise AudioError("truncated", f"header declares {promised} frames, file holds {total}")
        if total <= 0:
            raise AudioError("no_audio_frames", "the file has a header but no audio")
        first = int(start_s * sr)
        if first >= total:
            raise AudioError("start_beyond_end", f"audio_start={start_s}s, file is {total / sr:.3f}s")
        # AF1 reads (start + duration) * sr frames after seeking to start (not duration * sr).
        want = min(int((start_s + duration_s) * sr), total)
        f.seek(first)
        try:
            data = f.read(want, dtype="float64", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as e:  # opened fine, body is damaged
            raise AudioError("corrupt", f"decoding failed mid-file: {e}") from None
        if len(data) < min(want, total - first):
            raise AudioError("truncated", f"header declares {total} frames, read stopped at "
                                          f"{first + len(data)}")
    return _finish_raw(data, sr, channels)


def _ffprobe(path: Path) -> tuple[int, int]:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries",
         "stream=sample_rate,channels", "-of", "json", str(path)],
        capture_output=True, text=True, timeout=60)
    streams = json.loads(out.stdout or "{}").get("streams") or []
    if out.returncode != 0 or not streams:
        raise AudioError("undecodable", (out.stderr.strip() or "no audio stream").splitlines()[-1])
    return int(streams[0]["sample_rate"]), int(streams[0]["channels"])


def _read_ffmpeg(path: Path, start_s: float, duration_s: float) -> RawAudio:
    sr, channels = _ffprobe(path)
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-xerror", "-ss", repr(float(start_s)), "-i", str(path),
           "-t", repr(float(start_s + duration_s)), "-map", "0:a:0", "-f", "f64le",
           "-acodec", "pcm_f64le", "-"]
    out = subprocess.run(cmd, capture_output=True, timeout=600)
    if out.returncode != 0:
        msg = out.stderr.decode(errors="replace").strip().splitlines()
        raise AudioError("undecodable", msg[-1] if msg else f"ffmpeg exit {out.returncode}")
    data = np.frombuffer(out.stdout, dtype="<f8")
    if data.size == 0:
        raise AudioError("no_audio_frames", "ffmpeg decoded no samples (or audio_start is past the end)")
    return _finish_raw(data[: data.size - data.size % channels].reshape(-1, channels), sr, channels)


def _finish_raw(data: np.ndarray, sr: int, channels: int) -> RawAudio:
    if data.size == 0:
        raise AudioError("no_audio_frames", "no samples")
    if not np.isfinite(data).all():
        raise AudioError("non_finite", "NaN or inf samples")
    peak_hi, peak_lo = data.max(), data.min()
    if peak_hi > 1 or peak_lo < -1:
        data = data / max(abs(peak_hi), abs(peak_lo))
    return RawAudio(np.ascontiguousarray(data[:, 0]), int(sr), int(channels))


def read_raw(path: str | os.PathLike, start_s: float = 0.0, duration_s: float = 33.25,
             min_file_bytes: int = AF1_MIN_FILE_BYTES) -> RawAudio:
    """Decode a file's first channel (libsndfile, then ffmpeg for what it cannot read)."""
    path = Path(path)
    if not path.exists():
        raise AudioError("missing", str(path))
    if not path.is_file():
        raise AudioError("not_a_file", str(path))
    size = path.stat().st_size
    if size == 0:
        raise AudioError("empty_file", "0 bytes")
    if size < min_file_bytes:
        raise AudioError("too_small", f"{size} bytes < {min_file_bytes} (AF1's file-size floor)")
    if not np.isfinite(start_s) or start_s < 0:
        raise AudioError("bad_audio_start", f"audio_start={start_s}")
    try:
        return _read_soundfile(path, start_s, duration_s)
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, ValueError) as e:
        sf_error = str(e)
    if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
        raise AudioError("undecodable", f"libsndfile: {sf_error}; ffmpeg not installed for a fallback")
    try:
        return _read_ffmpeg(path, start_s, duration_s)
    except subprocess.TimeoutExpired:
        raise AudioError("undecodable", "ffmpeg timed out") from None
    except AudioError as e:
        raise AudioError(e.reason, f"{e.detail} (libsndfile: {sf_error})") from None


def resample(x: np.ndarray, sr: int, target_sr: int) -> np.ndarray:
    if sr == target_sr:
        return x
    return soxr.resample(x, sr, target_sr, quality="HQ")


def af1_normalize(x: np.ndarray) -> np.ndarray:
    """AF1's final peak normalisation (see module docstring; all-zero input stays zero)."""
    hi, lo = x.max(), x.min()
    if hi == 0 and lo == 0:
        return x
    if lo >= 0:
        return 2 * x / abs(hi) - 1.0
    return x / max(abs(hi), abs(lo))


def to_target(raw: RawAudio, target_sr: int, max_seconds: float | None = None) -> np.ndarray:
    """Resample + normalise; `max_seconds` cuts the read length (e.g. LAION-CLAP's first 10 s)."""
    x = raw.samples
    if max_seconds is not None:
        x = x[: int(max_seconds * raw.sample_rate)]
    y = resample(x, raw.sample_rate, target_sr)
    if y.size == 0:
        raise AudioError("too_short", f"{x.size} samples at {raw.sample_rate} Hz resample to nothing")
    if not np.isfinite(y).all():
        raise AudioError("non_finite", "resampling produced NaN/inf")
    return af1_normalize(y)


def load_audio(path: str | os.PathLike, target_sr: int, start_s: float = 0.0,
               duration_s: float = 33.25, min_file_bytes: int = AF1_MIN_FILE_BYTES) -> np.ndarray:
    """AF1's `load_audio`: mono float64 at `target_sr`, normalised."""
    return to_target(read_raw(path, start_s, duration_s, min_file_bytes), target_sr)
