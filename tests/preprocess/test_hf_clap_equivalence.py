"""Would transformers' own CLAP give the LAION-CLAP package's embeddings on the same weights?

Random weights, offline. The answer these tests pin down:
* the audio towers are the same network: LAION's HTSAT-tiny audio branch + projection, renamed
  into `ClapAudioModelWithProjection` (qkv split into query/key/value, norm1/norm2 ->
  layernorm_before/after, ...), gives the same embeddings, fused and unfused;
* transformers' `ClapFeatureExtractor` does not reproduce LAION's input as is: its default
  frequency_min is 0 (LAION: 50 Hz), and with `truncation="fusion"` it marks one clip of every
  batch without a clip longer than 10 s as `is_longer` at random (LAION does that in training
  mode only), which sends that clip through the fusion branch.
So a switch must keep our own mel front end and pass is_longer = False.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


def laion_to_hf(sd: dict) -> dict:
    """LAION-CLAP audio state dict (audio_branch.*, audio_projection.*) -> transformers'
    ClapAudioModelWithProjection names."""
    out = {}
    skip = ("audio_branch.spectrogram_extractor", "audio_branch.logmel_extractor", "mel.",
            "audio_branch.tscam_conv", "audio_branch.head")
    for k, v in sd.items():
        if k.startswith(skip) or k.endswith("attn_mask"):   # front end, AudioSet head, buffers
            continue
        k2 = k.replace("audio_branch.", "audio_model.audio_encoder.").replace(".bn0.", ".batch_norm.")
        k2 = k2.replace("audio_projection.0.", "audio_projection.linear1.")
        k2 = k2.replace("audio_projection.2.", "audio_projection.linear2.")
        k2 = (k2.replace(".norm1.", ".layernorm_before.").replace(".norm2.", ".layernorm_after.")
                .replace(".attn.proj.", ".attention.output.dense.").replace(".attn.", ".attention.self.")
                .replace(".mlp.fc1.", ".intermediate.dense.").replace(".mlp.fc2.", ".output.dense."))
        if ".qkv." in k2:
            for name, t in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                out[k2.replace("qkv", name)] = t
        else:
            out[k2] = v
    return out


def pair(fusion: bool):
    from transformers import ClapAudioConfig, ClapAudioModelWithProjection

    from megaflamingo.audio.encoders import build_laion_clap
    ours = build_laion_clap(random_init=True, fusion=fusion, seed=0).module.eval()
    gen = torch.Generator().manual_seed(1)
    for m in ours.modules():  # non-trivial BatchNorm statistics, so a mis-mapped bn would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    hf = ClapAudioModelWithProjection(ClapAudioConfig(enable_fusion=fusion)).eval()
    res = hf.load_state_dict(laion_to_hf(ours.state_dict()), strict=False)
    assert not res.missing_keys and not res.unexpected_keys
    return ours, hf


def clips(seconds: float, n: int = 2) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(-0.5, 0.5, (n, int(seconds * 48000))).astype(np.float32)


def hf_embed(hf, features, is_longer):
    with torch.no_grad():
        out = hf(input_features=features, is_longer=is_longer).audio_embeds
    return torch.nn.functional.normalize(out, dim=-1).numpy()


def test_fused_tower_matches_on_our_mel(torchvision_stub):
    ours, hf = pair(fusion=True)
    x = torch.from_numpy(clips(3.0))
    with torch.no_grad():
        ref = ours(x).numpy()
        from megaflamingo.audio.encoders import LAION_AUDIO_CFG, repeat_pad
        mel = ours.mel(repeat_pad(x, LAION_AUDIO_CFG["clip_samples"]))
    feats = mel.unsqueeze(1).expand(-1, 4, -1, -1).contiguous()
    got = hf_embed(hf, feats, torch.zeros(2, 1, dtype=torch.bool))
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_unfused_matches_through_hf_feature_extractor_at_50hz(torchvision_stub):
    from transformers import ClapFeatureExtractor
    ours, hf = pair(fusion=False)
    x = clips(10.0)
    with torch.no_grad():
        ref = ours(torch.from_numpy(x)).numpy()
    fe = ClapFeatureExtractor(frequency_min=50, frequency_max=14000, truncation="rand_trunc")
    inp = fe(list(x), sampling_rate=48000, return_tensors="pt")
    np.testing.assert_allclose(hf_embed(hf, inp["input_features"], inp["is_longer"]), ref, atol=1e-5)
    fe0 = ClapFeatureExtractor(frequency_max=14000, truncation="rand_trunc")   # default 0 Hz floor
    inp0 = fe0(list(x), sampling_rate=48000, return_tensors="pt")
    assert np.abs(hf_embed(hf, inp0["input_features"], inp0["is_longer"]) - ref).max() > 1e-3


def test_hf_fusion_extractor_flags_a_random_short_clip(torchvision_stub):
    from transformers import ClapFeatureExtractor
    ours, hf = pair(fusion=True)
    x = clips(3.0)
    with torch.no_grad():
        ref = ours(torch.from_numpy(x)).numpy()
    fe = ClapFeatureExtractor(frequency_min=50, frequency_max=14000, truncation="fusion", padding="repeatpad")
    inp = fe(list(x), sampling_rate=48000, return_tensors="pt")
    assert int(inp["is_longer"].sum()) == 1                      # neither clip is longer than 10 s
    np.testing.assert_allclose(hf_embed(hf, inp["input_features"], torch.zeros_like(inp["is_longer"])),
                               ref, atol=1e-4)                     # its mel is right (within 1e-4 dB)
    flagged = int(inp["is_longer"].flatten().nonzero()[0])
    got = hf_embed(hf, inp["input_features"], inp["is_longer"])
    assert np.abs(got[flagged] - ref[flagged]).max() > 1e-3      # ... but that clip's embedding moves
