"""AF1's sliding-window layout, reproduced exactly.

AF1 converts the window and overlap lengths from seconds to samples with `int(float(s) * sr)`
(truncation), then picks the number of windows from the sample count T:
  - T <= window            -> 1 window
  - T >= the span of max_windows windows -> max_windows
  - otherwise              -> 1 + ceil((T - window) / hop)   (float division, hop = window - overlap)
The audio is zero-padded to `full_length = n * window - (n - 1) * overlap` and window i covers
samples [i * hop, i * hop + window).
"""
from __future__ import annotations

import math

import numpy as np


def window_samples(sample_rate: int, window_s: float = 7.0, overlap_s: float = 5.25) -> tuple[int, int]:
    """(window length, overlap) in samples, truncated like AF1."""
    window = int(float(window_s) * sample_rate)
    overlap = int(float(overlap_s) * sample_rate)
    if window <= 0 or not 0 <= overlap < window:
        raise ValueError(f"need 0 <= overlap < window, got window={window_s}s overlap={overlap_s}s "
                         f"at {sample_rate} Hz")
    return window, overlap


def max_span_seconds(window_s: float = 7.0, overlap_s: float = 5.25, max_windows: int = 16) -> float:
    """Seconds of audio AF1 reads per sample (33.25 s for the defaults)."""
    return max_windows * (window_s - overlap_s) + overlap_s


def sliding_windows(num_samples: int, sample_rate: int, window_s: float = 7.0,
                    overlap_s: float = 5.25, max_windows: int = 16
                    ) -> tuple[int, int, list[tuple[int, int]]]:
    """-> (num_windows, full_length, [(start, end), ...]) with `end` exclusive, all in samples."""
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    window, overlap = window_samples(sample_rate, window_s, overlap_s)
    hop = window - overlap
    longest = max_windows * window - (max_windows - 1) * overlap
    if num_samples <= window:
        n = 1
    elif num_samples >= longest:
        n = max_windows
    else:
        n = 1 + int(math.ceil((num_samples - window) / float(hop)))
    full_length = n * window - (n - 1) * overlap
    return n, full_length, [(i * hop, i * hop + window) for i in range(n)]


def quantize_int16(x: np.ndarray) -> np.ndarray:
    """AF1's int16 round trip: clip to [-1, 1], scale by 32767, truncate to int16, scale back."""
    q = (np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)
    return (q / 32767.0).astype(np.float32)


def frame_windows(audio: np.ndarray, sample_rate: int, window_s: float = 7.0,
                  overlap_s: float = 5.25, max_windows: int = 16) -> np.ndarray:
    """Normalised mono audio -> [num_windows, window] float32 clips, zero-padded to the full
    length and int16-quantised exactly as AF1 did before its encoder (a strided view, no loop)."""
    n, full, spans = sliding_windows(len(audio), sample_rate, window_s, overlap_s, max_windows)
    window = spans[0][1]
    hop = spans[1][0] if n > 1 else window
    padded = np.zeros(max(full, len(audio)), dtype=np.float64)
    padded[:len(audio)] = audio
    padded = quantize_int16(padded[:full])
    idx = np.lib.stride_tricks.sliding_window_view(padded, window)[::hop]
    return np.array(idx[:n], dtype=np.float32, copy=True)
