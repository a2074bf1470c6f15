"""Running an AudioFlamingo on a segment layout: packed rows (several samples per row) or padded rows.

``packed_forward(model, batch)`` is what ``AudioFlamingo.forward`` does, sample by sample, on a batch whose
rows hold several samples (``megaflamingo.data.packing``) — or on an ordinary padded batch with the fused
cross-attention:

* audio: ``audio_embeds [S, L, D]`` (each sample its own ``max_num_fewshot * W`` slots); the audio
  transformer's batch dimension is the sample, so its attention never mixes samples (and still mixes all
  of a sample's slots, padding included, as AF1);
* cross-attention: the fused layout of ``megaflamingo.segments`` (each token sees only its own
  sample's slots, with AF1's visibility rule), kernel chosen by ``xattn_backend``;
* LM self-attention: block-diagonal per sample with positions restarting per sample (OPT's learned
  positions included), given to the HF LM in the form its attention implementation takes
  (:func:`lm_attention_inputs`): a 4D block-causal mask for ``sdpa``/``eager``, ``cu_seq_lens_*`` +
  ``position_ids`` (no mask) for ``flash_attention_2/3`` and for ``megaflamingo_varlen`` (registered by
  :func:`register_varlen_attention`: torch's own varlen flash kernel on CUDA, SDPA elsewhere), a
  BlockMask for ``flex_attention``;
* loss: logits only at supervised positions (a boolean ``logits_to_keep``, as ``_supervised_loss``), or
  the LM head fused into the cross-entropy (liger-kernel, CUDA) with ``loss_head="liger"``; per-sample
  sums and counts always come back, the scalar follows ``weighting`` (:func:`reduce_loss`).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .attention_kernels import XATTN_BACKENDS, varlen_causal_attention
from .injection import MEDIA_KWARG
from megaflamingo.segments import PackedLayout, block_causal_mask
from .xattn import MediaContext

IGNORE_INDEX = -100
VARLEN_IMPL = "megaflamingo_varlen"
WEIGHTINGS = ("token", "sample")
LOSS_HEADS = ("plain", "liger")
_VARLEN_IMPLS = ("flash_attention_2", "flash_attention_3", "flash_attention_4", VARLEN_IMPL)


class PackedLoss(NamedTuple):
    loss: torch.Tensor  # scalar, as ``weighting`` says
    loss_sum: torch.Tensor  # [S] float32 per-sample sum of token losses (detached)
    count: torch.Tensor  # [S] int64 per-sample number of supervised tokens
    logits: Optional[torch.Tensor] = None  # [R, T, V] with loss_logits="full"


# ------------------------------------------------------------------------------------------ LM attention


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
        raise ValueError("megaflamingo_varlen supports self-attention only (cu_seq_lens_k == cu_seq_lens_q)")
    if query.shape[2] != key.shape[2]:
        raise ValueError("megaflamingo_varlen runs packed training batches: no KV cache")
    out = varlen_causal_attention(query, key, value, cu_seq_lens_q, int(max_length_q), scaling,
                                  dropout if module.training else 0.0)
    return out, None


@functools.lru_cache(maxsize=None)
def register_varlen_attention() -> str:
    """Register ``megaflamingo_varlen`` with transformers (attention function + SDPA mask builder) and
    return its name; then ``lm.set_attn_implementation("megaflamingo_varlen")``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN_IMPL, _varlen_lm_attention)
    AttentionMaskInterface.register(VARLEN_IMPL, sdpa_mask)
    return VARLEN_IMPL


def check_lm_supports_packing(lm) -> None:
    """Packed rows replace the LM's own mask: sliding-window layers would lose their window."""
    cfg = lm.config
    types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in types):
        raise ValueError(f"packed batches: {type(lm).__name__} has non-full attention layers ({sorted(set(types))}); "
                         "the block-diagonal packing mask supports full causal attention only (use data.packing=false)")


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


# ------------------------------------------------------------------------------------------ loss


def _per_sample(tok: torch.Tensor, tok_sample: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample sums of token losses that arrive grouped by sample (row-major order): deterministic
    (a float64 running sum differenced at the group ends, no atomics)."""
    count = torch.bincount(tok_sample, minlength=S)
    ends = torch.cumsum(count, 0)
    csum = torch.cat([tok.new_zeros(1, dtype=torch.float64), torch.cumsum(tok.detach().double(), 0)])
    return (csum[ends] - csum[ends - count]).float(), count


def reduce_loss(tok: torch.Tensor, tok_sample: torch.Tensor, count: torch.Tensor, weighting: str = "token",
                normalizer: Optional[float] = None) -> torch.Tensor:
    """The scalar to back-propagate from token losses ``tok`` [N] of samples ``tok_sample`` [N].

    * ``token``  (default; what the unpacked trainer does): sum of token losses / number of supervised
      tokens of the micro-batch, or / ``normalizer`` (e.g. the supervised tokens of the whole optimizer
      step, which makes the step's gradient independent of how samples were grouped into micro-batches:
      pass ``normalizer = step_tokens / gradient_accumulation_steps`` since DeepSpeed divides by it);
    * ``sample`` every sample with a supervised token weighs the same (mean of per-sample means)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"loss weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if weighting == "token":
        denom = float(normalizer) if normalizer is not None else count.sum().clamp(min=1)
        return tok.sum() / denom
    n = (count > 0).sum().clamp(min=1)
    w = 1.0 / (count.clamp(min=1)[tok_sample].to(tok.dtype) * n)
    return (tok * w).sum()


def _check_labels(labels: torch.Tensor, layout: PackedLayout, check: bool = True) -> torch.Tensor:
    """The [R, T] mask of positions that predict a supervised label; a label may not be predicted from
    another sample (every sample's first labels are -100 in AF1's rules; anything else is a packing bug).
    ``check`` (the model's ``check_inputs``) costs one device sync."""
    if labels.shape != layout.sample_index.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(layout.sample_index.shape)}")
    sup = labels[:, 1:] != IGNORE_INDEX
    sid = layout.sample_index
    cross = sup & (sid[:, 1:] != sid[:, :-1])
    if check and bool(cross.any()):
        r, t = (int(x) for x in cross.nonzero()[0])
        raise ValueError(f"labels row {r} position {t + 1}: a supervised label whose previous position belongs to "
                         "another sample (the first label of every packed sample must be -100)")
    return F.pad(sup, (0, 1), value=False)


# ------------------------------------------------------------------------------------------ forward


def _check_batch(model, input_ids, audio_embeds, audio_mask, layout: PackedLayout) -> None:
    if layout.sample_index.shape != input_ids.shape:
        raise ValueError(f"layout is for [{layout.rows}, {layout.seq_len}] but input_ids is {tuple(input_ids.shape)}")
    if audio_embeds is None or audio_embeds.ndim != 3:
        raise ValueError("audio_embeds must be [S, L, D]: one set of window slots per packed sample")
    S, L, D = audio_embeds.shape
    if S != layout.num_samples:
        raise ValueError(f"audio_embeds holds {S} samples but the batch has {layout.num_samples}")
    if L != model.num_audio_slots and L % model.windows_per_audio:
        raise ValueError(f"audio_embeds has L={L} slots, not a multiple of {model.windows_per_audio} windows")
    if L > model.audio_transformer.n_position:
        raise ValueError(f"audio_embeds has L={L} slots > audio transformer positions {model.audio_transformer.n_position}")
    if D != model.audio_embed_dim:
        raise ValueError(f"audio_embeds last dim {D} != model audio_embed_dim {model.audio_embed_dim}")
    if audio_mask is None or tuple(audio_mask.shape) != (S, L):
        raise ValueError(f"audio_mask must be [S, L]=[{S}, {L}], got "
                         f"{None if audio_mask is None else tuple(audio_mask.shape)}")
    if model.check_inputs:
        none = layout.sample_media == 0
        if bool(none.any()):
            raise ValueError(f"packed sample(s) {none.nonzero().flatten().tolist()} contain no <audio> token "
                             f"(id {model.media_token_id}); every sample needs at least one audio")
        bad = ~torch.isfinite(audio_embeds).flatten(1).all(dim=1)
        if bool(bad.any()):
            raise ValueError(f"audio_embeds contain NaN/inf for packed sample(s) {bad.nonzero().flatten().tolist()}")


def packed_forward(model, batch: dict, *, xattn_backend: str = "auto", loss_logits: str = "supervised",
                   weighting: str = "token", normalizer: Optional[float] = None, loss_head: str = "plain"
                   ) -> PackedLoss:
    """Loss of a packed (or padded, with a layout) batch: ``input_ids``, ``labels`` [R, T],
    ``audio_embeds`` [S, L, D], ``audio_mask`` [S, L], ``layout`` (a PackedLayout on the model's device).

    Pass the AudioFlamingo module itself (under DeepSpeed: ``engine.module``, called inside the engine's
    forward, or through a forward that calls this function, so ZeRO-3 hooks fire)."""
    if xattn_backend not in XATTN_BACKENDS:
        raise ValueError(f"xattn_backend must be one of {XATTN_BACKENDS}, got {xattn_backend!r}")
    if loss_logits not in ("full", "supervised"):
        raise ValueError(f"loss_logits must be 'full' or 'supervised', got {loss_logits!r}")
    if loss_head not in LOSS_HEADS:
        raise ValueError(f"loss_head must be one of {LOSS_HEADS}, got {loss_head!r}")
    input_ids, labels, layout = batch["input_ids"], batch["labels"], batch["layout"]
    audio_embeds, audio_mask = batch["audio_embeds"], batch["audio_mask"]
    _check_batch(model, input_ids, audio_embeds, audio_mask, layout)
    keep = _check_labels(labels, layout, model.check_inputs)
    media = model.encode_audio(audio_embeds)
    ctx = MediaContext(media=media, segments=layout.xattn, audio_mask=audio_mask.bool(), backend=xattn_backend)
    lm = model.lang_encoder
    check_lm_supports_packing(lm)
    lm_kw = lm_attention_inputs(layout, getattr(lm.config, "_attn_implementation", None), media.dtype)
    S = layout.num_samples
    tok_sample = layout.sample_index[keep]
    targets = labels[:, 1:][keep[:, :-1]]
    logits_full = None
    if loss_head == "liger":
        tok = _liger_token_losses(lm, input_ids, keep, targets, ctx, lm_kw)
    elif loss_logits == "supervised":
        out = lm(input_ids=input_ids, logits_to_keep=keep, **{MEDIA_KWARG: ctx}, **lm_kw)
        logits = out.logits if hasattr(out, "logits") else out[0]
        if logits.ndim != 2 or logits.shape[0] != targets.shape[0]:
            raise ValueError(f"{type(lm).__name__} ignored a boolean logits_to_keep (logits {tuple(logits.shape)} for "
                             f"{targets.shape[0]} supervised positions); use loss_logits='full'")
        tok = F.cross_entropy(logits.float(), targets, reduction="none")
    else:
        out = lm(input_ids=input_ids, **{MEDIA_KWARG: ctx}, **lm_kw)
        logits_full = out.logits if hasattr(out, "logits") else out[0]
        tok = F.cross_entropy(logits_full[keep].float(), targets, reduction="none")
    loss_sum, count = _per_sample(tok, tok_sample, S)
    loss = reduce_loss(tok, tok_sample, count, weighting, normalizer)
    return PackedLoss(loss, loss_sum, count, logits_full)


def packed_logits(model, batch: dict, *, xattn_backend: str = "auto") -> torch.Tensor:
    """Full logits [R, T, V] of a packed batch (no loss): for tests and evaluation."""
    layout = batch["layout"]
    _check_batch(model, batch["input_ids"], batch["audio_embeds"], batch["audio_mask"], layout)
    media = model.encode_audio(batch["audio_embeds"])
    ctx = MediaContext(media=media, segments=layout.xattn, audio_mask=batch["audio_mask"].bool(),
                       backend=xattn_backend)
    lm = model.lang_encoder
    check_lm_supports_packing(lm)
    lm_kw = lm_attention_inputs(layout, getattr(lm.config, "_attn_implementation", None), media.dtype)
    out = lm(input_ids=batch["input_ids"], **{MEDIA_KWARG: ctx}, **lm_kw)
    return out.logits if hasattr(out, "logits") else out[0]


# ------------------------------------------------------------------------------------------ fused head


@functools.lru_cache(maxsize=None)
def liger_available() -> bool:
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def _liger_token_losses(lm, input_ids, keep, targets, ctx, lm_kw) -> torch.Tensor:
    """Token losses with the LM head fused into the cross-entropy (liger-kernel): the [N, V] logits are
    never materialised. Runs the LM's base model for the final hidden states, then the head weight.

    Only for LMs whose head is a plain linear map of the final hidden state (OPT, Llama, Qwen2, ...: no
    logit scaling or soft-capping, which this path would skip). Under ZeRO-3 the head weight is gathered
    for the call; liger computes the input and weight gradients inside its forward, so this works for a
    frozen head (pretraining); a trainable partitioned head is refused."""
    if not liger_available():
        raise RuntimeError("loss_head='liger' needs liger-kernel and a CUDA device (pip install liger-kernel)")
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    cfg = lm.config
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(cfg, attr, None) not in (None, 1.0):
            raise ValueError(f"loss_head='liger': {type(lm).__name__} sets {attr}; use loss_head='plain'")
    base = getattr(lm, lm.base_model_prefix)
    hidden = base(input_ids=input_ids, **{MEDIA_KWARG: ctx}, **lm_kw).last_hidden_state
    head = lm.get_output_embeddings()
    w, b = head.weight, getattr(head, "bias", None)
    h = hidden[keep]
    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="none")
    if hasattr(w, "ds_id"):
        if w.requires_grad:
            raise ValueError("loss_head='liger' with a trainable ZeRO-3-partitioned LM head is not supported")
        import deepspeed

        with deepspeed.zero.GatheredParameters([w] + ([b] if b is not None else [])):
            return loss_fn(w, h, targets, b).float()
    return loss_fn(w, h, targets, b).float()


# ------------------------------------------------------------------------------------------ FLOPs


def packed_flops(spec, layout: PackedLayout, head_rows: Optional[int] = None) -> float:
    """Model FLOPs of a packed batch under the project's convention (``engine.flops.FlopSpec``): weight
    matrices on every position of the R x T rows (padding included: the hardware computes them) and on
    the S x L audio slots; LM attention per sequence segment (sum of n^2, what a varlen kernel computes;
    a block-masked dense kernel computes R T^2 but the extra work is masked out); xattn attention over L
    slots per position, as for unpacked batches."""
    R, T, S = layout.rows, layout.seq_len, layout.num_samples
    L = layout.xattn.num_slots
    lens = (layout.seq_cu[1:] - layout.seq_cu[:-1]).double()
    attn_lm = 12.0 * spec.lm_width * spec.lm_layers * float((lens * lens).sum())
    per_text = spec.text_linear + 12.0 * L * spec.xattn_inner * spec.xattn_blocks
    per_slot = spec.audio_linear + 12.0 * L * spec.audio_width * spec.audio_layers
    rows = R * T if head_rows is None else head_rows
    return R * T * per_text + attn_lm + S * L * per_slot + rows * spec.head_linear


class PackedTrainModule(torch.nn.Module):
    """``packed_forward`` behind a module ``forward``, so that a DeepSpeed engine built around it runs the
    packed step through its own ``__call__`` (ZeRO-3 gathers in module hooks). Submodule names are the
    AudioFlamingo's under ``flamingo.``; checkpoint the inner model, not this wrapper."""

    def __init__(self, flamingo, xattn_backend: str = "auto", weighting: str = "token", loss_head: str = "plain"):
        super().__init__()
        self.flamingo = flamingo
        self.xattn_backend, self.weighting, self.loss_head = xattn_backend, weighting, loss_head

    def forward(self, batch: dict, normalizer: Optional[float] = None) -> PackedLoss:
        return packed_forward(self.flamingo, batch, xattn_backend=self.xattn_backend, weighting=self.weighting,
                              normalizer=normalizer, loss_head=self.loss_head)
