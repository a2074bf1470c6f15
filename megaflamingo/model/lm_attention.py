"""How the HF LM's self-attention runs on a segment layout (packed rows: block-diagonal per sample,
positions restarting per sample), and which attention implementation a config's ``auto`` means.

transformers takes packed sequences in a form that depends on the attention implementation
(:func:`lm_attention_inputs`):

* ``sdpa``: a 4D boolean block-causal mask (HF passes a 4D mask through unchanged) + ``position_ids``.
  OPT's mask builder is not given ``position_ids``, so HF's own packed-sequence detection never fires
  for it: the explicit mask is what makes OPT attend per sample;
* ``eager``: the same mask as an additive float mask;
* ``flash_attention_2/3``: no mask; ``cu_seq_lens_q/k`` + ``max_length_q/k`` + ``position_ids`` (HF's
  padding-free flash path; the cumulative lengths cover the flattened R*T stream, padding runs included);
* ``megaflamingo_varlen`` (:func:`register_varlen_attention`): the same keywords, into torch's own
  varlen flash kernel on CUDA (no flash-attn package needed), the block mask through SDPA elsewhere,
  plain SDPA for calls without ``cu_seq_lens`` (unpacked batches, generation);
* ``flex_attention``: a BlockMask.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .attention_kernels import varlen_causal_attention, varlen_kernel_name
from .segments import PackedLayout, block_causal_mask

VARLEN_IMPL = "megaflamingo_varlen"
_VARLEN_IMPLS = ("flash_attention_2", "flash_attention_3", "flash_attention_4", VARLEN_IMPL)


def _varlen_lm_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                         scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                         cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """HF attention function: varlen causal attention when the call carries ``cu_seq_lens_*`` (a packed
    batch), plain SDPA with HF's own mask otherwise (unpacked batches, generation)."""
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q:  # identity: no device sync per layer
        raise ValueError(f"{VARLEN_IMPL} supports self-attention only (cu_seq_lens_k == cu_seq_lens_q)")
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"{VARLEN_IMPL} runs packed training batches: no KV cache")
    out = varlen_causal_attention(query, key, value, cu_seq_lens_q, int(max_length_q), scaling,
                                  dropout if module.training else 0.0)
    return out, None


@functools.lru_cache(maxsize=None)
def register_varlen_attention() -> str:
    """Register ``megaflamingo_varlen`` with transformers (attention function + SDPA mask builder) and
    return its name (then ``attn_implementation="megaflamingo_varlen"`` works)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN_IMPL, _varlen_lm_attention)
    AttentionMaskInterface.register(VARLEN_IMPL, sdpa_mask)
    return VARLEN_IMPL


def _flash_attn_installed() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True


def resolve_attn_implementation(name: str, cuda: Optional[bool] = None) -> str:
    """``model.attn_implementation`` as transformers takes it. ``auto``: ``flash_attention_2`` when the
    flash-attn package imports on a CUDA machine, else ``megaflamingo_varlen`` on CUDA when torch has a
    varlen kernel, else ``sdpa`` (CPU: the block-mask path). Registers ``megaflamingo_varlen`` when it is
    the answer."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if name == "auto":
        if cuda and _flash_attn_installed():
            return "flash_attention_2"
        name = VARLEN_IMPL if cuda and varlen_kernel_name() is not None else "sdpa"
    if name == VARLEN_IMPL:
        register_varlen_attention()
    return name


def check_lm_supports_packing(lm) -> None:
    """Packed rows replace the LM's own mask: sliding-window layers would lose their window."""
    types = getattr(lm.config, "layer_types", None) or []
    if any(t != "full_attention" for t in types):
        raise ValueError(f"packed batches: {type(lm).__name__} has non-full attention layers ({sorted(set(types))}); "
                         "the block-diagonal packing mask supports full causal attention only (set "
                         "data.packing: false and model.xattn.backend: dense)")


def lm_attention_inputs(layout: PackedLayout, attn_implementation: Optional[str], dtype: torch.dtype) -> dict:
    """The keyword arguments that make the HF LM attend block-diagonally per sample."""
    impl = attn_implementation or "sdpa"
    out = {"position_ids": layout.position_ids}
    if impl in _VARLEN_IMPLS:
        cu = layout.seq_cu.to(torch.int32)
        out.update(attention_mask=None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=layout.seq_max,
                   max_length_k=layout.seq_max)
    elif impl == "flex_attention":
        out["attention_mask"] = _flex_block_causal(layout)
    elif impl == "sdpa":
        out["attention_mask"] = block_causal_mask(layout)
    elif impl == "eager":
        m = block_causal_mask(layout)
        out["attention_mask"] = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(
            ~m, torch.finfo(dtype).min)
    else:
        raise ValueError(f"packed batches: attention implementation {impl!r} is not supported (use sdpa, eager, "
                         f"flex_attention, flash_attention_2/3 or {VARLEN_IMPL})")
    return out


def _flex_block_causal(layout: PackedLayout):
    from torch.nn.attention.flex_attention import create_block_mask

    seg = layout.segment_id

    def mask_mod(b, h, q, k):
        return (seg[b, q] == seg[b, k]) & (k <= q)

    R, T = seg.shape
    return create_block_mask(mask_mod, R, None, T, T, device=seg.device)
