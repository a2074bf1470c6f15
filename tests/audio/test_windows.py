"""AF1's sliding-window arithmetic, checked against an independent transcription of its rule."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from megaflamingo.audio.windows import frame_windows, max_span_seconds, quantize_int16, sliding_windows


def af1_reference(T: int, sr: int, window_s: float, overlap_s: float, max_n: int):
    # AF1: lengths truncated to ints, n from the three-way rule, float ceil division.
    wl, wo = int(float(window_s) * sr), int(float(overlap_s) * sr)
    longest = max_n * wl - (max_n - 1) * wo
    if T <= wl:
        n, full = 1, wl
    elif T >= longest:
        n, full = max_n, longest
    else:
        n = 1 + int(np.ceil((T - wl) / float(wl - wo)))
        full = n * wl - (n - 1) * wo
    return n, full, [(i * (wl - wo), i * (wl - wo) + wl) for i in range(n)]


RATES = [8000, 16000, 22050, 32000, 44100, 48000, 96000]


@settings(max_examples=400, deadline=None)
@given(T=st.integers(0, 40 * 96000), sr=st.sampled_from(RATES))
def test_matches_af1_default_settings(T, sr):
    assert sliding_windows(T, sr) == af1_reference(T, sr, 7.0, 5.25, 16)


@settings(max_examples=200, deadline=None)
@given(T=st.integers(0, 3_000_000), sr=st.sampled_from(RATES),
       window=st.floats(0.5, 12.0), frac=st.floats(0.0, 0.95), max_n=st.integers(1, 32))
def test_matches_af1_any_settings(T, sr, window, frac, max_n):
    overlap = window * frac
    if int(overlap * sr) >= int(window * sr):
        return
    assert sliding_windows(T, sr, window, overlap, max_n) == af1_reference(T, sr, window, overlap, max_n)


@pytest.mark.parametrize("sr", [44100, 48000])
def test_boundaries(sr):
    wl, hop = int(7.0 * sr), int(7.0 * sr) - int(5.25 * sr)
    longest = 16 * wl - 15 * int(5.25 * sr)
    assert sliding_windows(0, sr)[:2] == (1, wl)
    assert sliding_windows(wl, sr)[:2] == (1, wl)
    assert sliding_windows(wl + 1, sr)[:2] == (2, wl + hop)
    assert sliding_windows(wl + hop, sr)[:2] == (2, wl + hop)
    assert sliding_windows(wl + hop + 1, sr)[:2] == (3, wl + 2 * hop)
    assert sliding_windows(longest - 1, sr)[:2] == (16, longest)
    assert sliding_windows(longest, sr)[:2] == (16, longest)
    assert sliding_windows(10 * longest, sr)[:2] == (16, longest)
    assert longest == int(round(max_span_seconds() * sr))  # 33.25 s
    n, full, spans = sliding_windows(longest, sr)
    assert spans[-1][1] == full and all(e - s == wl for s, e in spans)


def test_frame_windows_equals_af1_padding_and_quantisation():
    sr = 8000
    rng = np.random.default_rng(0)
    for T in [100, 7 * sr, 7 * sr + 1, 20 * sr + 17, 40 * sr]:
        x = rng.uniform(-1.2, 1.2, T)
        got = frame_windows(x, sr)
        n, full, spans = af1_reference(T, sr, 7.0, 5.25, 16)
        padded = np.append(x, np.zeros(max(full - T, 0)))
        q = (np.clip(padded, -1, 1) * 32767.0).astype(np.int16) / 32767.0
        want = np.stack([q[s:e] for s, e in spans]).astype(np.float32)
        assert got.dtype == np.float32 and got.shape == (n, int(7.0 * sr))
        np.testing.assert_array_equal(got, want)


def test_quantize_truncates_toward_zero_like_af1():
    x = np.array([1.5, -1.5, 0.5 / 32767, -0.99999 / 32767, 0.25])
    q = quantize_int16(x)
    np.testing.assert_array_equal(q * 32767.0, np.array([32767, -32767, 0, 0, 8191], np.float32))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        sliding_windows(-1, 44100)
    with pytest.raises(ValueError):
        sliding_windows(10, 44100, window_s=1.0, overlap_s=1.0)
    with pytest.raises(ValueError):
        sliding_windows(10, 44100, max_windows=0)
