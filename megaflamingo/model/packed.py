"""Running an AudioFlamingo on a segment layout: packed rows (several samples per row) or padded rows.

:func:`segment_forward` is what ``AudioFlamingo.forward(..., layout=)`` runs, sample by sample, on a
batch whose rows hold several samples (``megaflamingo.data.packing``), or on an ordinary padded batch
with the fused cross-attention:

* audio: ``audio_embeds [S, L, D]`` (each sample its own ``max_num_fewshot * W`` slots); the audio
  transformer's batch dimension is the sample, so its attention never mixes samples (and still mixes all
  of a sample's slots, padding included, as AF1);
* cross-attention: the fused layout of :mod:`.segments` (each token sees only its own sample's slots,
  with AF1's visibility rule), kernel chosen by ``backend`` (:mod:`.attention_kernels`);
* LM self-attention: block-diagonal per sample, positions restarting per sample (OPT's learned
  positions included), in the form the LM's attention implementation takes (:mod:`.lm_attention`);
* loss: logits only at supervised positions (a boolean ``logits_to_keep``, as the unpacked
  ``loss_logits="supervised"`` path), or the LM head fused into the cross-entropy (liger-kernel, CUDA)
  with ``loss_head="liger"``; per-sample sums and counts always come back, the scalar follows
  ``weighting`` (:func:`~megaflamingo.model.loss.weighted_loss`).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from megaflamingo.tokens import IGNORE_INDEX

from .attention_kernels import XATTN_BACKENDS
from .injection import MEDIA_KWARG
from .lm_attention import check_lm_supports_packing, lm_attention_inputs
from .loss import LOSS_LOGITS, LOSS_WEIGHTINGS, per_sample_sums, weighted_loss
from .segments import PackedLayout
from .xattn import MediaContext

LOSS_HEADS = ("plain", "liger")


class PackedLoss(NamedTuple):
    """What a segment-layout forward with labels returns (field-compatible with ``SupervisedLoss``)."""

    loss: torch.Tensor  # scalar, as ``weighting`` says
    loss_sum: torch.Tensor  # [S] float32 per-sample sum of token losses (detached)
    count: torch.Tensor  # [S] int64 per-sample number of supervised tokens
    logits: Optional[torch.Tensor] = None  # [R, T, V] with loss_logits="full"


# ------------------------------------------------------------------------------------------ loss


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


def _context(model, input_ids, audio_embeds, audio_mask, layout: PackedLayout, backend: str):
    _check_batch(model, input_ids, audio_embeds, audio_mask, layout)
    media = model.encode_audio(audio_embeds)
    ctx = MediaContext(media=media, segments=layout.xattn, audio_mask=audio_mask.bool(), backend=backend)
    lm = model.lang_encoder
    check_lm_supports_packing(lm)
    return ctx, lm_attention_inputs(layout, getattr(lm.config, "_attn_implementation", None), media.dtype)


def segment_forward(model, input_ids: torch.Tensor, audio_embeds: torch.Tensor, audio_mask: torch.Tensor,
                    layout: PackedLayout, labels: Optional[torch.Tensor] = None, *, backend: str = "auto",
                    loss_logits: str = "supervised", weighting: str = "token", loss_head: str = "plain"):
    """``input_ids``/``labels`` [R, T], ``audio_embeds`` [S, L, D], ``audio_mask`` [S, L], ``layout`` on the
    model's device. Without labels: the logits [R, T, V]. With labels: a :class:`PackedLoss`.

    ``model`` is the AudioFlamingo itself, called from inside its ``forward`` (so that under DeepSpeed the
    engine's ``__call__`` runs it and ZeRO-3 hooks fire)."""
    if backend not in XATTN_BACKENDS:
        raise ValueError(f"xattn backend must be one of {XATTN_BACKENDS}, got {backend!r}")
    if loss_logits not in LOSS_LOGITS:
        raise ValueError(f"loss_logits must be one of {LOSS_LOGITS}, got {loss_logits!r}")
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
    if loss_head not in LOSS_HEADS:
        raise ValueError(f"loss_head must be one of {LOSS_HEADS}, got {loss_head!r}")
    ctx, lm_kw = _context(model, input_ids, audio_embeds, audio_mask, layout, backend)
    lm = model.lang_encoder
    if labels is None:
        if loss_head != "plain":
            raise ValueError(f"loss_head={loss_head!r} needs labels")
        out = lm(input_ids=input_ids, **{MEDIA_KWARG: ctx}, **lm_kw)
        return out.logits if hasattr(out, "logits") else out[0]
    keep = _check_labels(labels, layout, model.check_inputs)
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
                             f"{targets.shape[0]} supervised positions); use train.loss_logits: full")
        tok = F.cross_entropy(logits.float(), targets, reduction="none")
    else:
        out = lm(input_ids=input_ids, **{MEDIA_KWARG: ctx}, **lm_kw)
        logits_full = out.logits if hasattr(out, "logits") else out[0]
        tok = F.cross_entropy(logits_full[keep].float(), targets, reduction="none")
    loss_sum, count = per_sample_sums(tok, tok_sample, layout.num_samples)
    return PackedLoss(weighted_loss(tok, tok_sample, count, weighting), loss_sum, count, logits_full)


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
