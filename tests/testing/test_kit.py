"""The test kit itself, the console scripts, and the hub guard."""
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from megaflamingo.testing import (
    AUDIO_KINDS, HubAccessError, synth_audio, tiny_llama_config, tiny_opt_config, tiny_qwen2_config,
    tiny_tokenizer, token_ids, write_audio,
)

SCRIPTS = ["megaflamingo-preprocess", "megaflamingo-train", "megaflamingo-convert", "megaflamingo-infer"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_console_scripts_answer_help(script):
    exe = shutil.which(script) or str((__import__("pathlib").Path(sys.executable).parent / script))
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert script in out.stdout and "usage" in out.stdout.lower()


def test_tokenizer_has_af1_specials_and_opt_bos(tiny_tok, tiny_token_ids):
    ids = tiny_token_ids
    assert ids.bos == ids.eos and len({ids.media, ids.eoc, ids.sep, ids.pad, ids.bos}) == 5
    enc = tiny_tok("</s>The task is audio captioning.<audio>describe<SEP>a tone<|endofchunk|></s>").input_ids
    # The tokenizer prepends its own bos, so AF1 samples start with two.
    assert enc[:2] == [ids.bos, ids.bos]
    assert enc.count(ids.media) == 1 and enc.count(ids.sep) == 1 and enc.count(ids.eoc) == 1
    assert tiny_tok.decode(tiny_tok("a pitched tone").input_ids, skip_special_tokens=True) == "a pitched tone"


def test_llama_style_tokenizer_has_distinct_bos_eos():
    ids = token_ids(tiny_tokenizer("llama"))
    assert ids.bos != ids.eos


def test_tiny_lm_configs_build_and_run():
    import torch
    from transformers import AutoModelForCausalLM

    for cfg in (tiny_opt_config(), tiny_llama_config(), tiny_qwen2_config()):
        model = AutoModelForCausalLM.from_config(cfg)
        out = model(torch.randint(0, cfg.vocab_size, (2, 7)))
        assert out.logits.shape == (2, 7, cfg.vocab_size)
        assert sum(p.numel() for p in model.parameters()) < 500_000


# MPEG audio has no 96 kHz mode, so mp3 is checked at 48 kHz.
@pytest.mark.parametrize(
    "fmt,sr,channels",
    [("wav", 8000, 1), ("wav", 96000, 2), ("flac", 96000, 2), ("flac", 22050, 1), ("ogg", 96000, 2),
     ("ogg", 16000, 1), ("mp3", 48000, 2), ("mp3", 8000, 1)],
)
def test_write_audio_formats_rates_channels(tmp_path, fmt, sr, channels):
    p = write_audio(tmp_path / f"a.{fmt}", "am_tone", seconds=1.5, sr=sr, channels=channels, seed=3)
    data, got_sr = sf.read(str(p), always_2d=True)
    assert got_sr == sr and data.shape[1] == channels
    # mp3 encoders pad the start/end; others are exact in length.
    assert abs(data.shape[0] - int(1.5 * sr)) <= (2500 if fmt == "mp3" else 0)
    assert np.abs(data).max() > 0.1


def test_synth_kinds_are_seeded_and_distinct():
    sigs = {k: synth_audio(k, 1.0, 16000, seed=1) for k in AUDIO_KINDS}
    np.testing.assert_array_equal(sigs["white_noise"], synth_audio("white_noise", 1.0, 16000, seed=1))
    assert not np.array_equal(sigs["white_noise"], synth_audio("white_noise", 1.0, 16000, seed=2))
    assert np.abs(sigs["silence"]).max() == 0
    # Every sounding kind has its own spectrum: no two normalised magnitude spectra are near-equal
    # (but the two chirps, one the time-reversal of the other: told apart over time below).
    spectra = {k: np.abs(np.fft.rfft(v)) for k, v in sigs.items() if k not in ("silence", "chirp_down")}
    spectra = {k: s / np.linalg.norm(s) for k, s in spectra.items()}
    kinds = sorted(spectra)
    for i, a in enumerate(kinds):
        for b in kinds[i + 1:]:
            assert float(spectra[a] @ spectra[b]) < 0.95, (a, b)

    # Chirps sweep in opposite directions: their first-half spectral centroids differ.
    def centroid(x):
        s = np.abs(np.fft.rfft(x))
        return (s * np.arange(s.size)).sum() / s.sum()
    assert centroid(sigs["chirp_up"][:8000]) < centroid(sigs["chirp_down"][:8000])
    with pytest.raises(ValueError, match="unknown audio kind"):
        synth_audio("kazoo", 1.0, 16000)


def test_hub_guard_refuses_non_loopback():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(HubAccessError, match="must not download"):
            s.connect(("93.184.216.34", 443))
    finally:
        s.close()


def test_from_pretrained_hub_name_fails_offline():
    from transformers import AutoConfig

    with pytest.raises(Exception) as err:
        AutoConfig.from_pretrained("facebook/opt-125m")
    assert "offline" in str(err.value).lower() or isinstance(err.value, (HubAccessError, OSError))
