"""A slow, obviously-correct re-statement of AF1's model math (explicit loops), used only by the tests.

Written from AF1's semantics (measured by running the original code), independent of megaflamingo.model's code paths: its own
sinusoid table (numpy, per-element formula), its own attention with -finfo.max filling and row-max
subtraction, a per-token loop for the few-shot mask, and AF1's *stateful* layer conditioning (media
stashed on the layer objects) instead of our per-call kwargs.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def sinusoid(n, d):
    table = np.array([[p / np.power(10000, 2 * (j // 2) / d) for j in range(d)] for p in range(n)])
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.tensor(table, dtype=torch.float32)


def _heads(x, h):
    B, N, D = x.shape
    return x.view(B, N, h, D // h).permute(0, 2, 1, 3)


def _merge(x):
    B, h, N, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(B, N, h * d)


def audio_transformer(at, x):
    d = at.d_model
    h = x * d ** 0.5 + sinusoid(at.n_position, d)[: x.shape[1]]
    h = F.layer_norm(h, (d,), at.layer_norm.weight, at.layer_norm.bias, 1e-6)
    for layer in at.layer_stack:
        a = layer.slf_attn
        nh = a.n_head
        q, k, v = (_heads(h @ w.weight.T, nh) for w in (a.w_qs, a.w_ks, a.w_vs))
        attn = torch.softmax((q / math.sqrt(d // nh)) @ k.transpose(2, 3), dim=-1)
        o = _merge(attn @ v) @ a.fc.weight.T + h
        h = F.layer_norm(o, (d,), a.layer_norm.weight, a.layer_norm.bias, 1e-6)
        f = layer.pos_ffn
        o = F.relu(h @ f.w_1.weight.T + f.w_1.bias) @ f.w_2.weight.T + f.w_2.bias + h
        h = F.layer_norm(o, (d,), f.layer_norm.weight, f.layer_norm.bias, 1e-6)
    return h


def few_shot_mask(input_ids, audio_mask, wpa, media_id):
    """Per token: slots [0, wpa*max(n,1)) where n = #<audio> at or before it, AND valid windows."""
    B, T = input_ids.shape
    L = audio_mask.shape[1]
    m = torch.zeros(B, T, L, dtype=torch.bool)
    for b in range(B):
        n = 0
        for t in range(T):
            if int(input_ids[b, t]) == media_id:
                n += 1
            end = wpa * max(n, 1)
            for l in range(L):
                m[b, t, l] = l < end and bool(audio_mask[b, l])
    return m


def xattn(block, x, media, mask):
    a = block.attn
    h = F.layer_norm(x, (x.shape[-1],), a.norm.weight, a.norm.bias, 1e-5)
    q = _heads(h @ a.to_q.weight.T, a.heads) * a.dim_head ** -0.5
    k, v = (media @ a.to_kv.weight.T).chunk(2, dim=-1)
    k, v = _heads(k, a.heads), _heads(v, a.heads)
    sim = q @ k.transpose(2, 3)
    sim = sim.masked_fill(~mask[:, None], -torch.finfo(sim.dtype).max)
    sim = sim - sim.amax(dim=-1, keepdim=True).detach()
    out = _merge(sim.softmax(dim=-1) @ v) @ a.to_out.weight.T
    x = out * block.attn_gate.tanh() + x
    ff = block.ff
    y = F.layer_norm(x, (x.shape[-1],), ff[0].weight, ff[0].bias, 1e-5)
    y = F.gelu(y @ ff[1].weight.T) @ ff[3].weight.T
    return y * block.ff_gate.tanh() + x


class StatefulLayer(nn.Module):
    """AF1-style: the conditioning is stashed on the layer before the LM forward."""

    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped
        self.media = self.mask = None

    def forward(self, hidden_states, *args, **kwargs):
        if self.wrapped.gated_cross_attn_layer is not None:
            hidden_states = xattn(self.wrapped.gated_cross_attn_layer, hidden_states, self.media, self.mask)
        return self.wrapped.decoder_layer(hidden_states, *args, **kwargs)


def forward(model, input_ids, attention_mask, audio_embeds, audio_mask, labels=None, **kw):
    media = audio_transformer(model.audio_transformer, audio_embeds)
    mask = few_shot_mask(input_ids, audio_mask, model.windows_per_audio, model.media_token_id)
    layers = model.lang_encoder.get_submodule(model.decoder_layers_path)
    orig = list(layers)
    try:
        for i, l in enumerate(orig):
            s = StatefulLayer(l)
            s.media, s.mask = media, mask
            layers[i] = s
        return model.lang_encoder(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kw)
    finally:
        for i, l in enumerate(orig):
            layers[i] = l
