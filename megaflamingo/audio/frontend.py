"""Per-file work done in decoding worker processes: file -> AF1-ready audio (no torch here, so
workers start fast and never touch the encoder's threads)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from megaflamingo.audio.decode import AF1_MIN_FILE_BYTES, AudioError, read_raw, resolve_in_root, to_target
from megaflamingo.audio.windows import max_span_seconds, quantize_int16, sliding_windows


@dataclass(frozen=True)
class FrontendConfig:
    data_root: str
    sample_rate: int = 44100
    window_s: float = 7.0
    overlap_s: float = 5.25
    max_windows: int = 16
    min_file_bytes: int = AF1_MIN_FILE_BYTES
    clip_sample_rate: int | None = None   # LAION-CLAP clip embedding input (48000) or None
    clip_seconds: float = 10.0
    allow_outside_root: bool = False     # user opt-in: manifest paths may leave data_root


@dataclass
class Prepared:
    index: int
    ok: bool
    audio: np.ndarray | None = None       # quantised, zero-padded to full_length, float32
    num_windows: int = 0
    duration: float = 0.0                 # seconds of real audio used
    clip_audio: np.ndarray | None = None  # LAION-CLAP input, repeat-padded to clip_seconds
    reason: str = ""
    detail: str = ""


def repeat_pad_np(x: np.ndarray, n: int) -> np.ndarray:
    """LAION-CLAP's 'repeatpad' (whole repeats, then zeros) and a deterministic cut at n."""
    if len(x) >= n:
        return x[:n]
    reps = n // len(x)
    y = np.zeros(n, dtype=x.dtype)
    y[: reps * len(x)] = np.tile(x, reps)
    return y


def prepare(index: int, rel_path: str, start: float, cfg: FrontendConfig) -> Prepared:
    try:
        path = resolve_in_root(cfg.data_root, rel_path, cfg.allow_outside_root)
        span = max_span_seconds(cfg.window_s, cfg.overlap_s, cfg.max_windows)
        raw = read_raw(path, start, span, cfg.min_file_bytes)
        audio = to_target(raw, cfg.sample_rate)
        n, full, _ = sliding_windows(len(audio), cfg.sample_rate, cfg.window_s, cfg.overlap_s,
                                     cfg.max_windows)
        padded = np.zeros(full, dtype=np.float64)
        used = min(len(audio), full)
        padded[:used] = audio[:used]
        clip = None
        if cfg.clip_sample_rate:
            # AF1's kNN embedding: first 10 s at 48 kHz, normalised, int16 round trip, repeat-pad.
            c = to_target(raw, cfg.clip_sample_rate, max_seconds=cfg.clip_seconds)
            clip = repeat_pad_np(quantize_int16(c), int(cfg.clip_seconds * cfg.clip_sample_rate))
        return Prepared(index, True, quantize_int16(padded), n, used / cfg.sample_rate, clip)
    except AudioError as e:
        # keep the report free of the machine-specific data-root prefix
        detail = e.detail.replace(os.path.join(cfg.data_root, ""), "")
        return Prepared(index, False, reason=e.reason, detail=detail)
    except MemoryError:
        raise
    except Exception as e:  # a decoder bug on one odd file must not kill a 10-hour run
        return Prepared(index, False, reason="error", detail=f"{type(e).__name__}: {e}")


def window_view(audio: np.ndarray, num_windows: int, cfg: FrontendConfig) -> np.ndarray:
    """[num_windows, window] strided view into the padded audio (no copy)."""
    _, _, spans = sliding_windows(len(audio), cfg.sample_rate, cfg.window_s, cfg.overlap_s,
                                  cfg.max_windows)
    window = spans[0][1] - spans[0][0]
    hop = spans[1][0] if len(spans) > 1 else window
    return np.lib.stride_tricks.sliding_window_view(audio, window)[::hop][:num_windows]


def init_worker() -> None:
    # One decoding process per core: keep BLAS/soxr single-threaded inside each.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"


def prepare_star(args) -> Prepared:
    return prepare(*args)
