"""Synthetic audio clips (tones, chirps, noises, clicks, ...) written in any common format."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

AUDIO_KINDS = (
    "tone", "chirp_up", "chirp_down", "white_noise", "pink_noise", "clicks", "am_tone",
    "speech_like", "silence",
)


def synth_audio(kind: str, seconds: float, sr: int, seed: int = 0, freq: Optional[float] = None) -> np.ndarray:
    """A float32 mono signal in [-1, 1] of one of ``AUDIO_KINDS``; seeded, so reproducible."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n, dtype=np.float64) / sr
    nyq = sr / 2
    f0 = freq if freq is not None else float(rng.uniform(200, min(2000, 0.4 * nyq)))
    if kind == "tone":
        x = np.sin(2 * np.pi * f0 * t)
    elif kind in ("chirp_up", "chirp_down"):
        lo, hi = 150.0, min(4000.0, 0.45 * nyq)
        a, b = (lo, hi) if kind == "chirp_up" else (hi, lo)
        dur = max(seconds, 1e-9)
        # Linear sweep: phase is the integral of the instantaneous frequency.
        x = np.sin(2 * np.pi * (a * t + (b - a) * t**2 / (2 * dur)))
    elif kind == "white_noise":
        x = rng.standard_normal(n) * 0.3
    elif kind == "pink_noise":
        spec = np.fft.rfft(rng.standard_normal(max(n, 1)))
        f = np.fft.rfftfreq(max(n, 1), 1 / sr)
        spec[1:] /= np.sqrt(f[1:])
        spec[0] = 0
        x = np.fft.irfft(spec, max(n, 1))[:n]
        x = x / (np.abs(x).max() + 1e-9) * 0.8
    elif kind == "clicks":
        x = np.zeros(n)
        period = max(int(sr / float(rng.uniform(4, 12))), 1)
        x[::period] = 1.0
        width = max(int(0.002 * sr), 1)
        x = np.convolve(x, np.hanning(width * 2 + 1), mode="same")
    elif kind == "am_tone":
        fm = float(rng.uniform(3, 8))
        x = (0.5 + 0.5 * np.sin(2 * np.pi * fm * t)) * np.sin(2 * np.pi * f0 * t)
    elif kind == "speech_like":
        # Harmonic bursts with a wandering pitch: syllable-like energy envelope.
        pitch = 120 + 30 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))
        phase = 2 * np.pi * np.cumsum(pitch) / sr
        x = sum(np.sin(k * phase) / k for k in range(1, 8))
        env = (np.sin(2 * np.pi * 3.5 * t + rng.uniform(0, 6)) > 0.1).astype(np.float64)
        x = x * np.convolve(env, np.hanning(int(0.02 * sr) + 1) / (0.01 * sr + 1), mode="same")
    elif kind == "silence":
        x = np.zeros(n)
    else:
        raise ValueError(f"unknown audio kind {kind!r}; choose from {', '.join(AUDIO_KINDS)}")
    peak = np.abs(x).max() if n else 0.0
    if peak > 0:
        x = x / peak * 0.8
    return x.astype(np.float32)


def write_audio(
    path, kind: str = "tone", seconds: float = 2.0, sr: int = 44100, channels: int = 1,
    fmt: Optional[str] = None, seed: int = 0, freq: Optional[float] = None,
) -> Path:
    """Write a synthetic clip; the format follows ``fmt`` or the file extension (wav/flac/ogg/mp3)."""
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = synth_audio(kind, seconds, sr, seed=seed, freq=freq)
    if channels > 1:
        # Other channels differ (scaled, delayed) so "take the first channel" is observable.
        x = np.stack([np.roll(x, 37 * c) * (1.0 - 0.2 * c) for c in range(channels)], axis=1)
    fmt = (fmt or path.suffix.lstrip(".")).upper()
    subtype = {"WAV": "PCM_16", "FLAC": "PCM_16", "OGG": "VORBIS", "MP3": "MPEG_LAYER_III"}.get(fmt)
    if subtype is None:
        raise ValueError(f"unsupported synthetic audio format {fmt!r}")
    sf.write(str(path), x, sr, format=fmt, subtype=subtype)
    return path
