"""AF1's audio transformer: a small post-norm encoder over the window embeddings of all audio slots.

Parameter names follow AF1 (``position_enc.pos_table``, ``layer_stack.N.slf_attn.w_qs`` ...) so an AF1
``audio_transformer.*`` state dict loads with no renaming. The quirks are reproduced on purpose:
  * the input is scaled by sqrt(d_model) and gets sinusoidal positions over *all* L slots (audio k owns
    slots [16k, 16k+16), so position encodes both the audio index and the window index);
  * the "final" LayerNorm (eps 1e-6) is applied to the INPUT, before the first layer;
  * layers are post-norm (residual, then LayerNorm eps 1e-6), attention projections have no bias,
    the ReLU feed-forward has biases;
  * nothing is masked: padded window slots take part in self-attention;
  * dropout only on the attention probabilities (AF1 hard-codes 0.1; configurable here).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoid_table(n_position: int, d: int) -> torch.Tensor:
    """[1, n_position, d] sinusoidal table, computed in float64 like AF1's numpy version, stored fp32."""
    pos = torch.arange(n_position, dtype=torch.float64)[:, None]
    j = torch.arange(d, dtype=torch.float64)
    angle = pos / torch.pow(torch.tensor(10000.0, dtype=torch.float64), 2 * torch.div(j, 2, rounding_mode="floor") / d)
    table = torch.empty_like(angle)
    table[:, 0::2] = torch.sin(angle[:, 0::2])
    table[:, 1::2] = torch.cos(angle[:, 1::2])
    return table.to(torch.float32)[None]


class PositionEncoding(nn.Module):
    def __init__(self, d: int, n_position: int):
        super().__init__()
        # Persistent buffer: AF1 checkpoints contain it (``audio_transformer.position_enc.pos_table``).
        self.register_buffer("pos_table", sinusoid_table(n_position, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pos_table[:, : x.shape[1]].to(x.dtype)


class SelfAttention(nn.Module):
    """Post-norm multi-head self-attention (no biases, no mask)."""

    def __init__(self, d_model: int, n_head: int, attn_dropout: float):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"audio transformer: d_model={d_model} not divisible by n_head={n_head}")
        self.n_head = n_head
        self.d_head = d_model // n_head
        self.attn_dropout = attn_dropout
        self.w_qs = nn.Linear(d_model, d_model, bias=False)
        self.w_ks = nn.Linear(d_model, d_model, bias=False)
        self.w_vs = nn.Linear(d_model, d_model, bias=False)
        self.fc = nn.Linear(d_model, d_model, bias=False)
        self.layer_norm = nn.LayerNorm(d_model, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = (w(x).view(B, L, self.n_head, self.d_head).transpose(1, 2) for w in (self.w_qs, self.w_ks, self.w_vs))
        p = self.attn_dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        o = o.transpose(1, 2).reshape(B, L, -1)
        return self.layer_norm(self.fc(o) + x)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_inner: int):
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_inner)
        self.w_2 = nn.Linear(d_inner, d_model)
        self.layer_norm = nn.LayerNorm(d_model, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.w_2(F.relu(self.w_1(x))) + x)


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, n_head: int, d_inner: int, attn_dropout: float):
        super().__init__()
        self.slf_attn = SelfAttention(d_model, n_head, attn_dropout)
        self.pos_ffn = FeedForward(d_model, d_inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pos_ffn(self.slf_attn(x))


class AudioTransformer(nn.Module):
    """[B, L, D] window embeddings -> [B, L, D] media features for the cross-attention blocks."""

    def __init__(self, d_model: int, n_head: int = 8, n_layers: int = 3, d_inner: int = 2048,
                 n_position: int = 128, attn_dropout: float = 0.1):
        super().__init__()
        self.d_model = d_model
        self.n_position = n_position
        self.position_enc = PositionEncoding(d_model, n_position)
        self.layer_stack = nn.ModuleList(
            [EncoderLayer(d_model, n_head, d_inner, attn_dropout) for _ in range(n_layers)]
        )
        self.layer_norm = nn.LayerNorm(d_model, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.n_position:
            raise ValueError(
                f"audio transformer: {x.shape[1]} window slots but only {self.n_position} positions "
                "(audio_transformer.max_num_media)"
            )
        x = self.position_enc(x * math.sqrt(self.d_model))
        x = self.layer_norm(x)  # AF1 applies its "final" norm here, at the input
        for layer in self.layer_stack:
            x = layer(x)
        return x
