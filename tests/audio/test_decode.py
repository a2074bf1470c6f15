"""Decoding, resampling, channel choice, normalisation and every bad-input case."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from megaflamingo.audio.decode import (AudioError, af1_normalize, load_audio, read_raw,
                                       resolve_in_root)
from megaflamingo.audio.frontend import FrontendConfig, prepare
from megaflamingo.testing import synth_audio, write_audio

from tests.audio.audio_fixtures import make_folder, unsupported_codec_wav


# MPEG audio has no mode above 48 kHz, so mp3 is not paired with 96 kHz.
FORMAT_RATES = [(f, sr) for f in ("wav", "flac", "ogg", "mp3") for sr in (8000, 22050, 44100, 96000)
                if not (f == "mp3" and sr > 48000)]


@pytest.mark.parametrize("fmt,sr", FORMAT_RATES)
@pytest.mark.parametrize("channels", [1, 2])
def test_formats_rates_channels(tmp_path, fmt, sr, channels):
    path = write_audio(tmp_path / f"x.{fmt}", "tone", 2.0, sr, channels, freq=440.0)
    y = load_audio(path, 44100, min_file_bytes=0)
    assert y.ndim == 1
    # mp3 encoders add a few ms of priming; the others must keep the duration exactly (±1 sample)
    tol = 0.08 * 44100 if fmt == "mp3" else 1
    assert abs(len(y) - 2.0 * 44100) <= tol
    assert np.isclose(np.abs(y).max(), 1.0)  # AF1's peak normalisation
    spec = np.abs(np.fft.rfft(y[: 44100]))
    assert abs(np.argmax(spec) - 440) <= 2  # 1 Hz bins: still a 440 Hz tone after resampling


def test_first_channel_is_used(tmp_path):
    # write_audio makes channel 1 a delayed, quieter copy; lossless, so channel 0 == mono file
    stereo = write_audio(tmp_path / "s.wav", "speech_like", 3.0, 22050, 2, seed=3)
    mono = write_audio(tmp_path / "m.wav", "speech_like", 3.0, 22050, 1, seed=3)
    np.testing.assert_array_equal(load_audio(stereo, 44100), load_audio(mono, 44100))
    x, sr = sf.read(str(stereo))
    assert not np.allclose(x[:, 0], x[:, 1])


def test_af1_normalisation_rules():
    np.testing.assert_allclose(af1_normalize(np.array([-0.25, 0.5])), [-0.5, 1.0])
    # AF1 maps a non-negative signal to [-1, 1] with 2x/max - 1
    np.testing.assert_allclose(af1_normalize(np.array([0.0, 0.25, 0.5])), [-1.0, 0.0, 1.0])
    # FIX: silence stays silence (AF1 produced NaN here)
    np.testing.assert_array_equal(af1_normalize(np.zeros(4)), np.zeros(4))


def test_float_file_above_full_scale_is_peak_normalised(tmp_path):
    x = 3.0 * synth_audio("tone", 1.0, 44100, freq=300.0)
    sf.write(str(tmp_path / "loud.wav"), x, 44100, subtype="FLOAT")
    y = load_audio(tmp_path / "loud.wav", 44100)
    np.testing.assert_allclose(y, x / np.abs(x).max(), atol=1e-6)


def test_audio_start_and_af1_read_length(tmp_path):
    sr = 16000
    x = np.linspace(-0.9, 0.9, 10 * sr).astype(np.float32)
    sf.write(str(tmp_path / "ramp.wav"), x, sr, subtype="FLOAT")
    raw = read_raw(tmp_path / "ramp.wav", start_s=2.0, duration_s=3.0)
    # AF1 seeks to start and reads (start + duration) * sr frames
    assert len(raw.samples) == 5 * sr
    np.testing.assert_allclose(raw.samples[0], x[2 * sr], atol=1e-7)
    with pytest.raises(AudioError) as e:
        read_raw(tmp_path / "ramp.wav", start_s=11.0)
    assert e.value.reason == "start_beyond_end"


def test_every_bad_input_gets_its_reason(tmp_path):
    data, _, bad = make_folder(tmp_path)
    cfg = FrontendConfig(str(data))
    for name, reason in bad.items():
        p = prepare(0, name, 0.0, cfg)
        assert not p.ok, name
        assert p.reason == reason, (name, p.reason, p.detail)
        assert str(tmp_path) not in p.detail or reason == "outside_data_root"


def test_zero_frames_and_absolute_paths(tmp_path):
    sf.write(str(tmp_path / "zero.wav"), np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError) as e:
        read_raw(tmp_path / "zero.wav", min_file_bytes=0)
    assert e.value.reason == "no_audio_frames"
    with pytest.raises(AudioError) as e:
        resolve_in_root(tmp_path, str(tmp_path / "zero.wav"))
    assert e.value.reason == "outside_data_root"
    with pytest.raises(AudioError):
        resolve_in_root(tmp_path, "a/../../b.wav")
    assert resolve_in_root(tmp_path, "a/../b.wav") == tmp_path / "b.wav"
    # The user's explicit opt-in lets a manifest point outside the root.
    assert resolve_in_root(tmp_path / "root", "../b.wav", allow_outside=True) == tmp_path / "b.wav"
    assert resolve_in_root(tmp_path, "/abs/x.wav", allow_outside=True) == Path("/abs/x.wav")


def test_unsupported_codec_bytes_are_a_wav_that_nothing_decodes(tmp_path):
    (tmp_path / "c.wav").write_bytes(unsupported_codec_wav())
    with pytest.raises(AudioError) as e:
        read_raw(tmp_path / "c.wav")
    assert e.value.reason == "undecodable" and "libsndfile" in e.value.detail


def test_ffmpeg_fallback_reads_what_libsndfile_cannot(tmp_path):
    import shutil
    import subprocess
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg not installed")
    src = write_audio(tmp_path / "src.wav", "tone", 2.0, 44100, freq=440.0)
    out = tmp_path / "x.m4a"
    r = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(src), "-c:a", "aac", str(out)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"ffmpeg cannot encode aac here: {r.stderr[-200:]!r}")
    with pytest.raises(sf.LibsndfileError):
        sf.info(str(out))
    y = load_audio(out, 44100, min_file_bytes=0)
    assert abs(len(y) - 2.0 * 44100) < 0.1 * 44100
    assert abs(np.argmax(np.abs(np.fft.rfft(y[:44100]))) - 440) <= 2


def _af1_style_windows(path, sr_out=44100):
    """AF1's loader + windowing, transcribed independently (librosa >= 0.10 resamples with
    soxr_hq, the resampler we use, so the result must match bit for bit)."""
    import librosa
    with sf.SoundFile(str(path)) as f:
        sr, ch = f.samplerate, f.channels
        data = f.read(min(int(33.25 * sr), f.frames))
    if sr != sr_out:
        data = librosa.resample(data.T if ch > 1 else data, orig_sr=sr, target_sr=sr_out)
        data = data[0] if ch > 1 else data
    elif ch > 1:
        data = data.T[0]
    data = data / max(abs(data.max()), abs(data.min()))
    T, wl, wo = len(data), int(7.0 * sr_out), int(5.25 * sr_out)
    n = 1 if T <= wl else min(16, 1 + int(np.ceil((T - wl) / float(wl - wo))))
    full = n * wl - (n - 1) * wo
    data = np.append(data, np.zeros(max(full - T, 0)))
    q = (np.clip(data, -1, 1) * 32767.0).astype(np.int16) / 32767.0
    return np.stack([q[i * (wl - wo): i * (wl - wo) + wl] for i in range(n)]).astype(np.float32)


@pytest.mark.parametrize("sr,seconds,channels", [(48000, 12.0, 2), (22050, 40.0, 1), (44100, 5.0, 2)])
def test_front_end_equals_af1_loader_bit_for_bit(tmp_path, sr, seconds, channels):
    pytest.importorskip("librosa")
    from megaflamingo.audio.frontend import window_view
    write_audio(tmp_path / "x.flac", "speech_like", seconds, sr, channels, seed=1)
    cfg = FrontendConfig(str(tmp_path))
    p = prepare(0, "x.flac", 0.0, cfg)
    np.testing.assert_array_equal(window_view(p.audio, p.num_windows, cfg),
                                  _af1_style_windows(tmp_path / "x.flac"))
