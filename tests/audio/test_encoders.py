"""Encoders: the tiny one (deterministic, batch-independent), the shared log-mel front end, and
the real HTSAT encoders built offline with random weights, including checkpoint loading."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megaflamingo.audio.encoders import EncoderError, LogMel, build_encoder
from megaflamingo.testing import synth_audio


def _clips(n, sr=44100, seconds=7.0):
    kinds = ["tone", "white_noise", "chirp_up", "speech_like", "clicks", "silence"]
    return np.stack([synth_audio(kinds[i % len(kinds)], seconds, sr, seed=i) for i in range(n)])


def test_tiny_is_deterministic_and_seeded():
    x = _clips(4)
    a, b = build_encoder("tiny", embed_dim=24, seed=1), build_encoder("tiny", embed_dim=24, seed=1)
    c = build_encoder("tiny", embed_dim=24, seed=2)
    ea = a.encode(x)
    assert ea.shape == (4, 24) and ea.dtype == np.float32 and np.isfinite(ea).all()
    np.testing.assert_array_equal(ea, b.encode(x))
    assert not np.allclose(ea, c.encode(x))
    # different sounds give different embeddings; batch composition barely matters
    assert np.linalg.norm(ea[0] - ea[1]) > 0.1
    np.testing.assert_allclose(a.encode(x[1:2])[0], ea[1], atol=1e-5)
    sil = a.silence_embedding()
    assert sil.shape == (24,) and not np.allclose(sil, 0)
    d = a.describe()
    assert d["name"] == "tiny" and d["random_init"] is True and d["embed_dim"] == 24


def test_encoder_argument_errors():
    with pytest.raises(EncoderError, match="--checkpoint"):
        build_encoder("clapcap")
    with pytest.raises(EncoderError, match="tiny"):
        build_encoder("clapcap", random_init=True, embed_dim=8)
    with pytest.raises(EncoderError, match="unknown encoder"):
        build_encoder("wav2vec")
    with pytest.raises(EncoderError, match="does not exist"):
        build_encoder("clapcap", checkpoint="/nonexistent/clapcap.pth")


def test_logmel_matches_librosa_htk_power_db():
    librosa = pytest.importorskip("librosa")
    sr = 48000
    x = synth_audio("speech_like", 1.0, sr, seed=1).astype(np.float64)
    ref = librosa.feature.melspectrogram(y=x, sr=sr, n_fft=1024, hop_length=480, win_length=1024,
                                         center=True, pad_mode="reflect", power=2.0, n_mels=64,
                                         norm=None, htk=True, fmin=50, fmax=14000)
    ref_db = 10 * np.log10(np.maximum(ref, 1e-10)).T
    ours = LogMel(sr, 1024, 480, 64, 50, 14000)(torch.tensor(x, dtype=torch.float32)[None])[0].numpy()
    assert ours.shape == ref_db.shape
    loud = ref_db > ref_db.max() - 60  # compare where float32 rounding cannot dominate
    np.testing.assert_allclose(ours[loud], ref_db[loud], atol=0.05)


@pytest.mark.slow
def test_clapcap_random_init_shapes_and_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    enc = build_encoder("clapcap", random_init=True, seed=3)
    x = _clips(2)
    y = enc.encode(x)
    assert y.shape == (2, 1024) and np.isfinite(y).all() and not np.allclose(y[0], y[1])
    x, y = x[:1], y[:1]
    assert enc.describe()["random_init"] is True and enc.sample_rate == 44100
    # a clapcap_weights_2023.pth-shaped file: {"model": {"clap.<audio encoder>": ..., other parts}}
    inner = enc.module.inner
    sd = {f"clap.{k}": v for k, v in inner.state_dict().items()}
    sd["caption_decoder.some.weight"] = torch.zeros(2)  # ignored, as the GPT-2 part would be
    ckpt = tmp_path / "clapcap.pth"
    torch.save({"model": sd}, ckpt)
    loaded = build_encoder("clapcap", checkpoint=str(ckpt), seed=99)
    np.testing.assert_allclose(loaded.encode(x), y, atol=1e-5)
    d = loaded.describe()
    assert d["random_init"] is False and d["checkpoint"] == str(ckpt) and len(d["checkpoint_sha256"]) == 64


@pytest.mark.slow
def test_laion_clap_random_init_shapes_and_checkpoint(torchvision_stub, tmp_path):
    # (the fusion variant runs end to end in test_cli.py::test_laion_clip_embeddings_for_knn)
    fusion = False
    enc = build_encoder("laion-clap", random_init=True, fusion=fusion, seed=0)
    assert enc.sample_rate == 48000 and enc.embed_dim == 512
    x = _clips(2, sr=48000, seconds=3.0)
    y = enc.encode(x)
    assert y.shape == (2, 512)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    # 630k-*.pt layout: {"state_dict": {"module.audio_branch...", "module.audio_projection...", text...}}
    sd = {f"module.{k}": v for k, v in enc.module.state_dict().items() if not k.startswith("mel.")}
    sd["module.text_branch.w"] = torch.zeros(1)
    torch.save({"state_dict": sd, "epoch": 1}, tmp_path / "laion.pt")
    loaded = build_encoder("laion-clap", checkpoint=str(tmp_path / "laion.pt"), fusion=False, seed=5)
    np.testing.assert_allclose(loaded.encode(x), y, atol=1e-5)
    assert loaded.describe()["random_init"] is False
    torch.save({"state_dict": dict(list(sd.items())[:10])}, tmp_path / "partial.pt")
    with pytest.raises(EncoderError, match="missing"):
        build_encoder("laion-clap", checkpoint=str(tmp_path / "partial.pt"), fusion=False)
