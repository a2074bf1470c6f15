"""What one micro-batch counts for the throughput metrics, read from its host copy (no device sync).

Padded and packed batches count alike: ``samples`` are samples (a packed row holds several),
``tokens`` the real (non-padding) positions, ``positions`` every position the model computed (rows x
padded length; ``tokens / positions`` is the fill rate, 1 - the padding fraction), ``flops`` the model
FLOPs of the project's convention (:mod:`megaflamingo.engine.flops`).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from megaflamingo.tokens import IGNORE_INDEX

from .flops import FlopSpec


class BatchCounts(NamedTuple):
    samples: int
    tokens: float
    positions: int
    flops: float


def batch_counts(batch: dict, spec: FlopSpec, supervised_head: bool) -> BatchCounts:
    """``supervised_head``: the LM head ran on the supervised rows only (``train.loss_logits:
    supervised``), counted on the host copy of the labels as the model counts them."""
    B, T = batch["input_ids"].shape
    mask = batch.get("attention_mask")
    tokens = float(mask.sum()) if mask is not None else float(B * T)
    head_rows: Optional[int] = None
    if supervised_head:
        head_rows = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    layout = batch.get("layout")
    if layout is not None:
        return BatchCounts(int(layout.num_samples), tokens, B * T, spec.per_packed_batch(layout, head_rows))
    audio = batch.get("audio_embeds")
    L = audio.shape[1] if audio is not None else 0
    return BatchCounts(B, tokens, B * T, spec.per_batch(B, T, L, head_rows))
