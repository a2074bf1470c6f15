"""Audio a person hands in (an upload, a microphone recording): checked before the model runs.

The decoding is preprocessing's (`megaflamingo.audio.decode`), so a file the demo accepts is one
`megaflamingo-preprocess embed` would accept, and every refusal is a sentence for the page, not a
traceback: not audio, too short for AF1's file-size floor, silent, or longer than the demo takes.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from megaflamingo.audio.decode import AF1_MIN_FILE_BYTES, AudioError, read_raw
from megaflamingo.audio.windows import max_span_seconds, sliding_windows

# Quieter than this (peak, dB relative to full scale) is treated as silence: about 10 LSB of 16-bit
# audio. AF1's loader would peak-normalise such a file into loud noise.
SILENCE_DBFS = -70.0
DEFAULT_MAX_SECONDS = 600.0

_REASONS = {
    "missing": "the audio file is gone (upload it again)",
    "not_a_file": "that is not an audio file",
    "empty_file": "the file is empty",
    "no_audio_frames": "the file holds no audio samples",
    "truncated": "the file is truncated (its header promises more audio than it holds)",
    "corrupt": "the file is damaged (decoding failed part way)",
    "undecodable": "this file could not be decoded as audio (wav, flac, ogg and mp3 work, and whatever ffmpeg reads)",
    "non_finite": "the file contains invalid (NaN/inf) samples",
    "too_short": "the clip is too short to resample",
}


class UploadError(ValueError):
    """A clip the model cannot use; the message is meant for the person who gave it."""


@dataclass(frozen=True)
class AudioInfo:
    path: str
    duration_s: float      # the whole file
    used_s: float          # what the model hears (AF1 reads the first span seconds)
    sample_rate: int
    channels: int
    num_windows: int
    peak_dbfs: float

    def summary(self) -> str:
        ch = "mono" if self.channels == 1 else f"{self.channels} channels (the first is used)"
        cut = f", the model hears the first {self.used_s:.2f} s" if self.used_s + 1e-6 < self.duration_s else ""
        return (f"{self.duration_s:.2f} s, {self.sample_rate / 1000:g} kHz, {ch}, peak {self.peak_dbfs:.1f} dBFS "
                f"-> {self.num_windows} window{'s' if self.num_windows != 1 else ''}{cut}")


def file_duration(path: str | os.PathLike) -> Optional[float]:
    """Seconds in the file from its header (libsndfile, else ffprobe); None when unknown."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
        if info.samplerate > 0 and info.frames > 0:
            return info.frames / info.samplerate
    except Exception:  # not a libsndfile format: ask ffprobe
        pass
    if shutil.which("ffprobe") is None:
        return None
    try:
        out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "json", str(path)],
                             capture_output=True, text=True, timeout=30)
        d = float(json.loads(out.stdout or "{}").get("format", {}).get("duration", "nan"))
    except (subprocess.SubprocessError, ValueError, OSError):
        return None
    return d if math.isfinite(d) and d > 0 else None


def inspect_upload(path: Optional[str | os.PathLike], windows: Optional[dict] = None, sample_rate: int = 44100,
                   max_seconds: float = DEFAULT_MAX_SECONDS, min_file_bytes: int = AF1_MIN_FILE_BYTES,
                   silence_dbfs: float = SILENCE_DBFS) -> AudioInfo:
    """Check a clip the way preprocessing would read it; raise :class:`UploadError` with a reason.
    ``windows``: the model's window layout; ``sample_rate``: its encoder's rate."""
    if not path:
        raise UploadError("no audio yet: upload a file or record one with the microphone")
    w = dict(windows or {})
    window_s, overlap_s = float(w.get("window_s", 7.0)), float(w.get("overlap_s", 5.25))
    max_windows = int(w.get("max_windows", 16))
    span = max_span_seconds(window_s, overlap_s, max_windows)
    p = Path(path)
    if p.is_file() and p.stat().st_size >= min_file_bytes:
        total = file_duration(p)  # before decoding: refuse an hour-long file without reading it
        if total is not None and total > max_seconds:
            raise UploadError(f"the clip is {total:.1f} s long; this demo takes clips up to {max_seconds:g} s "
                              f"(the model hears the first {span:g} s: trim it first)")
    try:
        raw = read_raw(p, 0.0, span, min_file_bytes)
    except AudioError as e:
        if e.reason == "too_small":
            raise UploadError(f"the file is too small ({p.stat().st_size} bytes; training used files of at least "
                              f"{min_file_bytes} bytes): record or upload a longer clip") from None
        raise UploadError(_REASONS.get(e.reason, f"the audio cannot be used ({e.reason})")) from None
    peak = float(np.abs(raw.samples).max()) if raw.samples.size else 0.0
    peak_db = 20.0 * math.log10(peak) if peak > 0 else float("-inf")
    if peak_db < silence_dbfs:
        level = "all zeros" if peak == 0 else f"peak {peak_db:.0f} dBFS"
        raise UploadError(f"the clip is silent ({level}): record or upload a clip with sound in it")
    total = file_duration(p) or raw.samples.size / raw.sample_rate
    used = min(raw.samples.size / raw.sample_rate, span)
    n, _, _ = sliding_windows(int(round(used * sample_rate)), sample_rate, window_s, overlap_s, max_windows)
    return AudioInfo(str(p), float(total), float(used), int(raw.sample_rate), int(raw.channels), int(n), peak_db)
