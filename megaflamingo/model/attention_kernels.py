"""Attention kernels behind the segment layout (``megaflamingo.model.segments``), picked by name.

Cross-attention (``segment_cross_attention``), q [Nq, H, dh] against the compacted keys k/v [Nkv, H, dh]:

* ``dense``    the reference: SDPA over all S*L slots with a [Nq, S*L] mask (own sample, AF1 visibility;
               a fully-masked token sees all L slots of its sample with a zero query = AF1's uniform row);
* ``segments`` pure torch: segments padded to [G, max_q] x [G, max_k] and one batched SDPA call; exact on
               any device, and what the CPU path runs;
* ``varlen``   a varlen flash kernel with per-segment key lengths: ``flash_attn.flash_attn_varlen_func``
               when the package is installed, else torch's own (``torch.nn.attention.varlen``); CUDA,
               fp16/bf16 only;
* ``flex``     FlexAttention over the compacted keys with a block mask (same sample, key rank < c);
* ``auto``     ``varlen`` on CUDA in half precision when a kernel imports, else ``segments``.

Causal self-attention over the sequence segments (``varlen_causal_attention``) for the LM: the same
varlen kernels with ``cu_seqlens``, or SDPA with the block-causal mask where none is available.
"""
from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch
import torch.nn.functional as F

from .segments import repeat_counts

XATTN_BACKENDS = ("auto", "dense", "segments", "varlen", "flex")


# ------------------------------------------------------------------------------------------ kernels found


@functools.lru_cache(maxsize=None)
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:
        return None
    return flash_attn_varlen_func


@functools.lru_cache(maxsize=None)
def _torch_varlen():
    try:
        from torch.nn.attention import varlen
    except Exception:
        return None
    fn = getattr(varlen, "varlen_attn", None)
    if fn is None:
        return None
    params = inspect.signature(fn).parameters
    return fn, ("window_size" in params), ("is_causal" in params), ("enable_gqa" in params)


def varlen_kernel_name() -> Optional[str]:
    """Which varlen kernel ``varlen`` would use here (None: none importable)."""
    if _flash_attn_varlen() is not None:
        return "flash_attn"
    if _torch_varlen() is not None:
        return "torch.nn.attention.varlen"
    return None


def _varlen_usable(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and varlen_kernel_name() is not None


def resolve_backend(name: str, q: torch.Tensor) -> str:
    if name not in XATTN_BACKENDS:
        raise ValueError(f"xattn backend must be one of {XATTN_BACKENDS}, got {name!r}")
    if name == "auto":
        return "varlen" if _varlen_usable(q) else "segments"
    if name == "varlen" and not _varlen_usable(q):
        raise RuntimeError(
            "xattn backend 'varlen' needs a CUDA device, fp16/bf16 activations and flash-attn or "
            f"torch.nn.attention.varlen (device {q.device}, dtype {q.dtype}, kernel {varlen_kernel_name()}); "
            "use 'segments' (pure torch) or 'auto'")
    return name


def varlen_call(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: Optional[float] = None,
                dropout_p: float = 0.0) -> torch.Tensor:
    """One varlen flash call: q [Nq, H, dh], k/v [Nk, Hk, dh], int32 cumulative lengths -> [Nq, H, dh]."""
    cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
    fa = _flash_attn_varlen()
    if fa is not None:
        return fa(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout_p, softmax_scale=scale, causal=causal)
    found = _torch_varlen()
    if found is None:
        raise RuntimeError("no varlen attention kernel available (flash-attn / torch.nn.attention.varlen)")
    if dropout_p:
        raise RuntimeError("torch.nn.attention.varlen has no dropout; set attention dropout to 0")
    fn, has_window, has_causal, has_gqa = found
    kw = {"scale": scale}
    if k.shape[1] != q.shape[1]:
        if has_gqa:
            kw["enable_gqa"] = True
        else:  # older torch: expand the KV heads (kv head h // n_rep serves query head h, as HF's repeat_kv)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if has_window:
        kw["window_size"] = (-1, 0) if causal else (-1, -1)
    elif has_causal:
        kw["is_causal"] = causal
    elif causal:
        raise RuntimeError("this torch's varlen_attn cannot do causal attention")
    out = fn(q, k, v, cu_q, cu_k, int(max_q), int(max_k), **kw)
    return out[0] if isinstance(out, tuple) else out


# ------------------------------------------------------------------------------------------ cross-attention


def _pad_index(cu: torch.Tensor, n: int):
    """For the flat rows of a segmented stream: (segment, offset in segment), and segment lengths."""
    lens = (cu[1:] - cu[:-1]).long()
    seg = repeat_counts(torch.arange(lens.numel(), device=cu.device), lens, n)
    off = torch.arange(n, device=cu.device) - cu[:-1].long()[seg]
    return seg, off, lens


def _segments_sdpa(q, k, v, seg) -> torch.Tensor:
    """Pure torch varlen: pad every segment to [max_q] queries x [max_k] keys, one SDPA call."""
    Nq, H, dh = q.shape
    G = seg.num_segments
    qs, qo, _ = _pad_index(seg.cu_q, Nq)
    ks, ko, klen = _pad_index(seg.cu_k, seg.key_index.numel())
    qp = q.new_zeros(G, seg.max_q, H, dh)
    qp[qs, qo] = q
    kk, vv = k.index_select(0, seg.key_index), v.index_select(0, seg.key_index)
    kp = k.new_zeros(G, seg.max_k, H, dh)
    vp = v.new_zeros(G, seg.max_k, H, dh)
    kp[ks, ko] = kk
    vp[ks, ko] = vv
    key_ok = torch.arange(seg.max_k, device=q.device)[None, :] < klen[:, None]
    o = F.scaled_dot_product_attention(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2),
                                       attn_mask=key_ok[:, None, None, :])
    return o.transpose(1, 2)[qs, qo]


def _segments_varlen(q, k, v, seg) -> torch.Tensor:
    kk, vv = k.index_select(0, seg.key_index), v.index_select(0, seg.key_index)
    return varlen_call(q, kk.contiguous(), vv.contiguous(), seg.cu_q, seg.cu_k, seg.max_q, seg.max_k,
                       causal=False)


def _key_owner(seg, n_keys: int, device):
    """Sample and rank (position in the sample's compacted list; -1 for the mean row) of each key row."""
    nv = seg.kv_slots.numel()
    S = seg.num_samples
    owner = torch.empty(n_keys, dtype=torch.long, device=device)
    rank = torch.empty(n_keys, dtype=torch.long, device=device)
    counts = torch.diff(seg.sample_key_offset, append=seg.sample_key_offset.new_tensor([nv]))
    owner[:nv] = repeat_counts(torch.arange(S, device=device), counts, nv)
    rank[:nv] = torch.arange(nv, device=device) - seg.sample_key_offset[owner[:nv]]
    if n_keys > nv:
        owner[nv:] = torch.arange(S, device=device)
        rank[nv:] = -1
    return owner, rank


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # shapes change with every batch (Nq, Nkv): compile once for dynamic shapes
    return torch.compile(flex_attention, dynamic=True)


def _flex(q, k, v, seg) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    owner, rank = _key_owner(seg, k.shape[0], q.device)
    ts, tc = seg.token_sample, seg.token_visible

    def mask_mod(b, h, qi, kj):
        same = ts[qi] == owner[kj]
        c = tc[qi]
        return same & (((c > 0) & (rank[kj] >= 0) & (rank[kj] < c)) | ((c == 0) & (rank[kj] < 0)))

    bm = create_block_mask(mask_mod, None, None, q.shape[0], k.shape[0], device=q.device)
    # the fused kernel on CUDA; on the CPU the (uncompiled) reference implementation, forward only
    fn = _compiled_flex() if q.is_cuda else flex_attention
    o = fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=bm)
    return o[0].transpose(0, 1)


def _dense(q, media_kv, seg) -> torch.Tensor:
    """Reference: q [Nq, H, dh] against k/v of ALL S*L slots [S*L, H, dh] with a dense mask."""
    k, v, valid = media_kv
    S, L = seg.num_samples, seg.num_slots
    slot = torch.arange(S * L, device=q.device)
    owner = slot // L
    ts = seg.token_sample
    # visible: own sample, valid, and among the first c valid slots (c counts valid slots < W*max(n,1))
    rank = torch.cumsum(valid.reshape(-1).long(), 0) - 1 - seg.sample_key_offset[owner]
    mine = ts[:, None] == owner[None, :]
    vis = mine & valid.reshape(-1)[None, :] & (rank[None, :] < seg.token_visible[:, None])
    has_any = seg.token_visible > 0
    vis = torch.where(has_any[:, None], vis, mine)  # uniform over the sample's L slots
    q = q * has_any[:, None, None].to(q.dtype)
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       attn_mask=vis[None, None])
    return o[0].transpose(0, 1)


def segment_cross_attention(attn, x: torch.Tensor, media: torch.Tensor, seg, audio_mask: Optional[torch.Tensor],
                            backend: str = "auto") -> torch.Tensor:
    """The gated block's attention branch (before ``attn_gate``) on a segment layout.

    ``attn``: the MaskedCrossAttention module (its norm/to_q/to_kv/to_out); x [R, T, dim];
    media [S, L, D_audio]. Returns [R, T, dim] with zeros at padding positions."""
    R, T, dim = x.shape
    H, dh = attn.heads, attn.dim_head
    xq = x.reshape(R * T, dim).index_select(0, seg.tokens)
    q = attn.to_q(attn.norm(xq)).view(-1, H, dh)
    S, L, Da = media.shape
    media = media.to(q.dtype)
    name = resolve_backend(backend, q)
    if name == "dense":
        if audio_mask is None:
            raise ValueError("the dense cross-attention reference needs audio_mask")
        k, v = attn.to_kv(media.reshape(S * L, Da)).chunk(2, dim=-1)
        o = _dense(q, (k.reshape(-1, H, dh), v.reshape(-1, H, dh), audio_mask.bool()), seg)
    else:
        rows = media.reshape(S * L, Da).index_select(0, seg.kv_slots)
        if seg.has_uniform:
            rows = torch.cat([rows, media.mean(dim=1)], 0)
        k, v = attn.to_kv(rows).chunk(2, dim=-1)
        k, v = k.reshape(-1, H, dh), v.reshape(-1, H, dh)
        if name == "segments":
            o = _segments_sdpa(q, k, v, seg)
        elif name == "varlen":
            o = _segments_varlen(q, k, v, seg)
        else:
            o = _flex(q, k, v, seg)
    out = attn.to_out(o.reshape(-1, H * dh))
    return out.new_zeros(R * T, out.shape[-1]).index_copy(0, seg.tokens, out).view(R, T, -1)


# ------------------------------------------------------------------------------------------ LM self-attention


def segment_ids_from_cu(cu: torch.Tensor, rows: int, seq_len: int) -> torch.Tensor:
    n = rows * seq_len
    lens = (cu[1:] - cu[:-1]).long()
    return repeat_counts(torch.arange(lens.numel(), device=cu.device), lens, n).view(rows, seq_len)


def varlen_causal_attention(query, key, value, cu_seq_lens, max_length: int, scale: Optional[float],
                            dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention inside the sequence segments of the flattened [B*T] stream.

    query [B, H, T, dh], key/value [B, Hk, T, dh] (HF's layout) -> [B, T, H, dh] (HF's output layout)."""
    B, H, T, dh = query.shape
    Hk = key.shape[1]
    if _varlen_usable(query):
        q = query.transpose(1, 2).reshape(B * T, H, dh)
        k = key.transpose(1, 2).reshape(B * T, Hk, dh)
        v = value.transpose(1, 2).reshape(B * T, Hk, dh)
        out = varlen_call(q, k, v, cu_seq_lens, cu_seq_lens, max_length, max_length, causal=True, scale=scale,
                          dropout_p=dropout_p)
        return out.view(B, T, H, dh)
    seg = segment_ids_from_cu(cu_seq_lens.to(query.device), B, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=query.device).tril()
    mask = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]
    if Hk != H:
        key = key.repeat_interleave(H // Hk, dim=1)
        value = value.repeat_interleave(H // Hk, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2)
