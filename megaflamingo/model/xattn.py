"""Gated cross-attention (xattn-dense) block and its vectorised media mask.

AF1 math, parameter names kept (``attn.norm``, ``attn.to_q``, ``attn.to_kv``, ``attn.to_out``,
``attn_gate``, ``ff.0`` .. ``ff.3``, ``ff_gate``) so AF1 checkpoints map one to one:

    x = x + tanh(attn_gate) * to_out(softmax(q k^T / sqrt(dh) | mask) v),  q = to_q(LN(x)), (k, v) = to_kv(media)
    x = x + tanh(ff_gate)   * W2 GELU(W1 LN(x))

Mask semantics (AF1, reproduced exactly): a text token whose prefix (itself included) holds n ``<audio>``
tokens sees window slots [0, W * max(n, 1)) (W = windows per audio), intersected with the valid-window
mask. AF1 fills masked logits with -finfo.max and subtracts the row max, so a row with *no* visible slot
becomes a uniform average over all L slots. SDPA would return 0 (bool mask) or NaN (-inf mask) there,
so we zero the query of such rows and unmask the whole row: q = 0 gives equal logits, hence the same
uniform average, with no branch and no extra kernel.

With ``MediaContext.segments`` set (the fused layout of ``megaflamingo.model.segments``: packed rows, or padded
rows run sample by sample) the attention branch goes through ``attention_kernels.segment_cross_attention``
instead: varlen segments over the compacted valid slots, same math, kernel picked by ``MediaContext.backend``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def media_visibility(
    media_count: torch.Tensor, audio_mask: torch.Tensor, windows_per_audio: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised AF1 few-shot mask.

    media_count: [B, T] number of ``<audio>`` tokens at or before each position (cumulative).
    audio_mask:  [B, L] bool, True for valid window slots.
    Returns (mask [B, 1, T, L] bool for SDPA, with fully-masked rows set all-True; has_any [B, T] bool).
    """
    L = audio_mask.shape[-1]
    end = windows_per_audio * media_count.clamp(min=1)  # [B, T]; text before the first <audio> sees audio 0
    slots = torch.arange(L, device=audio_mask.device)
    vis = (slots < end[..., None]) & audio_mask[:, None, :]  # [B, T, L]
    has_any = vis.any(dim=-1)
    vis = vis | ~has_any[..., None]
    return vis[:, None], has_any


@dataclass
class MediaContext:
    """Per-call conditioning passed as an argument through the LM to every wrapped decoder layer.

    Immutable inputs plus an optional per-call K/V memo (generation only), never stored on modules, so it
    is safe under activation checkpointing (the recompute receives the same object), ZeRO-3 and
    concurrent calls.
    """

    media: torch.Tensor  # [B, L, D_audio] audio-transformer output ([S, L, D_audio] with a segment layout)
    mask: Optional[torch.Tensor] = None  # [B, 1, T, L] bool (SDPA convention: True = attend)
    has_any: Optional[torch.Tensor] = None  # [B, T] bool; rows without any visible slot get the AF1 uniform average
    kv_memo: Optional[dict] = field(default=None)  # layer index -> (k, v), reused across decoding steps
    # Fused layout (megaflamingo.model.segments.CrossAttentionSegments): when set, mask/has_any are unused,
    # the batch may hold several samples per row and ``backend`` picks the kernel (attention_kernels).
    segments: Optional[object] = None
    audio_mask: Optional[torch.Tensor] = None  # [S, L]; only the dense reference backend reads it
    backend: str = "auto"


class MaskedCrossAttention(nn.Module):
    def __init__(self, dim: int, dim_audio: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner = heads * dim_head
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_audio, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def kv(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, L, _ = media.shape
        k, v = self.to_kv(media).chunk(2, dim=-1)
        k = k.view(B, L, self.heads, self.dim_head).transpose(1, 2)
        v = v.view(B, L, self.heads, self.dim_head).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, ctx: MediaContext, layer_idx: int = 0) -> torch.Tensor:
        if ctx.segments is not None:
            from .attention_kernels import segment_cross_attention

            return segment_cross_attention(self, x, ctx.media, ctx.segments, ctx.audio_mask, ctx.backend)
        B, T, _ = x.shape
        q = self.to_q(self.norm(x))
        q = q * ctx.has_any[..., None].to(q.dtype)  # see module docstring: uniform rows
        q = q.view(B, T, self.heads, self.dim_head).transpose(1, 2)
        memo = ctx.kv_memo
        if memo is not None and layer_idx in memo:
            k, v = memo[layer_idx]
        else:
            k, v = self.kv(ctx.media.to(q.dtype))
            if memo is not None:
                memo[layer_idx] = (k, v)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask)
        return self.to_out(o.transpose(1, 2).reshape(B, T, -1))


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, dim_audio: int, dim_head: int = 64, heads: int = 8, ff_mult: int = 4):
        super().__init__()
        self.attn = MaskedCrossAttention(dim, dim_audio, dim_head, heads)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        inner = int(dim * ff_mult)
        self.ff = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False)
        )
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, ctx: MediaContext, layer_idx: int = 0) -> torch.Tensor:
        x = x + self.attn(x, ctx, layer_idx) * self.attn_gate.tanh()
        x = x + self.ff(x) * self.ff_gate.tanh()
        return x
