"""A picture of what the model hears: log-mel spectrogram of the clip with AF1's windows marked.

Drawn with numpy only (an RGB array a web page shows as an image): the audio as the encoder gets it
(decoded, resampled and normalised by preprocessing's front end, first span seconds), a 64-band
log-mel (50 Hz - 8 kHz, the ClapCap/tiny front end's bands), and one bracket per 7 s window.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

# A perceptually ordered dark-to-bright colour ramp (anchor colours, linearly interpolated).
_RAMP = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                  [250, 193, 39], [252, 255, 164]], dtype=np.float64)
_PAD = np.array([236, 236, 240], np.uint8)
_PAD_LINE = np.array([205, 205, 215], np.uint8)
_WINDOW_COLOURS = np.array([[31, 119, 180], [255, 127, 14]], np.uint8)


def _colour(v: np.ndarray) -> np.ndarray:
    """[..] values in [0, 1] -> [.., 3] uint8 through the ramp."""
    x = np.clip(v, 0, 1) * (len(_RAMP) - 1)
    i = np.minimum(x.astype(int), len(_RAMP) - 2)
    f = (x - i)[..., None]
    return (_RAMP[i] * (1 - f) + _RAMP[i + 1] * f).astype(np.uint8)


def log_mel(audio: np.ndarray, sample_rate: int, n_mels: int = 64, hop_s: float = 0.02) -> np.ndarray:
    """[n_mels, frames] log-mel power in dB (torch STFT, HTK mel filters of the encoders)."""
    import torch

    from megaflamingo.audio.encoders import LogMel

    hop = max(int(sample_rate * hop_s), 1)
    n_fft = 1 << int(np.ceil(np.log2(max(2 * hop, 256))))
    mel = LogMel(sample_rate, n_fft, hop, n_mels, 50.0, min(8000.0, sample_rate / 2))
    x = torch.as_tensor(np.asarray(audio, dtype=np.float32))[None]
    if x.shape[1] < n_fft:  # reflect padding needs at least n_fft samples
        x = torch.nn.functional.pad(x, (0, n_fft - x.shape[1]))
    with torch.no_grad():
        return mel(x)[0].T.numpy()


def spectrogram_image(audio: np.ndarray, sample_rate: int, windows: Optional[dict] = None, width: int = 900,
                      height: int = 160, dynamic_range_db: float = 80.0) -> np.ndarray:
    """[H, W, 3] uint8: the spectrogram (low frequencies at the bottom; the zero padding up to the
    last window's end greyed out) above one bracket per model window (alternating colours, so
    overlaps show) and, where Pillow is installed, a time axis."""
    from megaflamingo.audio.windows import sliding_windows

    w = dict(windows or {})
    window_s, overlap_s = float(w.get("window_s", 7.0)), float(w.get("overlap_s", 5.25))
    n, full, spans = sliding_windows(len(audio), sample_rate, window_s, overlap_s, int(w.get("max_windows", 16)))
    spec = log_mel(audio, sample_rate)
    top = spec.max() if spec.size else 0.0
    norm = (spec - (top - dynamic_range_db)) / dynamic_range_db
    frames = norm.shape[1]
    # Time axis spans the padded length the windows cover (the model reads the padding too).
    total = max(full, len(audio), 1)
    t = np.arange(width) * total / width
    cols = np.minimum((t / max(len(audio), 1) * frames).astype(int), frames - 1)
    rows = np.linspace(norm.shape[0] - 1, 0, height).round().astype(int)  # low bands at the bottom
    img = _colour(norm[rows][:, cols])
    pad = t >= len(audio)
    img[:, pad] = _PAD
    img[::6, pad] = _PAD_LINE  # hatch: visibly "no audio here"
    strip_h = 6 * min(n, 4) + 8
    strip = np.full((strip_h, width, 3), 255, np.uint8)
    for i, (s0, e0) in enumerate(spans):
        x0 = int(s0 / total * width)
        x1 = max(int(e0 / total * width) - 1, x0 + 1)
        y = 4 + 6 * (i % 4)
        c = _WINDOW_COLOURS[i % 2]
        strip[y:y + 3, x0:x1] = c
        strip[y - 2:y + 5, x0] = c
        strip[y - 2:y + 5, x1 - 1] = c
    out = np.concatenate([img, strip], 0)
    return _annotate(out, total / sample_rate, len(audio) / sample_rate, n, height)


def _annotate(img: np.ndarray, total_s: float, audio_s: float, n: int, spec_h: int) -> np.ndarray:
    """Time ticks below the picture and a legend, drawn with Pillow's built-in font when present."""
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:  # the picture stays readable without the labels
        return img
    try:  # Pillow >= 10.1 scales its built-in font; pages show this image shrunk to about 2/3
        font = ImageFont.load_default(size=15)
    except TypeError:
        font = ImageFont.load_default()
    h, w = img.shape[:2]
    canvas = Image.new("RGB", (w, h + 22), (255, 255, 255))
    canvas.paste(Image.fromarray(img), (0, 0))
    d = ImageDraw.Draw(canvas)
    step = next(s for s in (0.5, 1, 2, 5, 10, 20, 60) if total_s / s <= 12)
    for k in range(int(total_s / step) + 1):
        x = min(int(k * step / total_s * w), w - 1)
        d.line([(x, h), (x, h + 4)], fill=(90, 90, 90))
        label = f"{k * step:g} s"
        lw = d.textlength(label, font=font)
        d.text((min(max(x - lw / 2, 0), w - lw - 1), h + 5), label, fill=(60, 60, 60), font=font)
    legend = f"{n} window{'s' if n != 1 else ''} of the model; {audio_s:.2f} s of audio"
    if total_s - audio_s > 1e-3:
        legend += f" + {total_s - audio_s:.2f} s zero padding"
    # top right: a page usually overlays its label on the top left of an image
    x = w - 7 - d.textlength(legend, font=font)
    x0, y0, x1, y1 = d.textbbox((x, 4), legend, font=font)
    d.rectangle([(x0 - 3, y0 - 2), (x1 + 3, y1 + 2)], fill=(255, 255, 255))
    d.text((x, 4), legend, fill=(30, 30, 30), font=font)
    return np.asarray(canvas)


def clip_view(path: str | os.PathLike, sample_rate: int, windows: Optional[dict] = None) -> np.ndarray:
    """:func:`spectrogram_image` of a file as the encoder reads it (preprocessing's decoder)."""
    from megaflamingo.audio.decode import load_audio
    from megaflamingo.audio.windows import max_span_seconds

    w = dict(windows or {})
    span = max_span_seconds(float(w.get("window_s", 7.0)), float(w.get("overlap_s", 5.25)),
                            int(w.get("max_windows", 16)))
    audio = load_audio(path, sample_rate, duration_s=span, min_file_bytes=0)
    return spectrogram_image(audio, sample_rate, w)
