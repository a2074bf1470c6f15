"""Causal-LM losses: per sample sums and counts, from full logits or from the supervised positions only.

Convention (HF's ``ForCausalLMLoss``): position t predicts label t+1; labels equal to ``IGNORE_INDEX``
are not scored. Both paths return per-sample sums so callers can average over tokens of a whole step
(across micro-batches and ranks) rather than over each batch.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from megaflamingo.tokens import IGNORE_INDEX

LOSS_LOGITS = ("full", "supervised")


class SupervisedLoss(NamedTuple):
    """Causal-LM loss from the supervised positions only (position t predicts label t+1, -100 ignored)."""
    loss: torch.Tensor  # scalar: token-mean over the batch (0 when no token is supervised)
    loss_sum: torch.Tensor  # [B] float32: per-sample sum of token losses
    count: torch.Tensor  # [B] int64: per-sample number of supervised tokens


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From full ``[B, T, V]`` logits: (sum of token losses [B], number of scored tokens [B])."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    tok = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none").view(shift_labels.shape)
    valid = shift_labels != IGNORE_INDEX
    return (tok * valid).sum(dim=1), valid.sum(dim=1)


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``valid`` [B, T-1]: position t is scored (label t+1 set); ``keep`` [B, T]: the positions whose
    logits are needed (the last position predicts nothing)."""
    valid = labels[:, 1:] != IGNORE_INDEX
    return valid, F.pad(valid, (0, 1), value=False)


def supervised_token_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> SupervisedLoss:
    """``logits`` [N, V] at the N supervised positions (row-major order of ``valid``), ``targets`` [N]."""
    tok = F.cross_entropy(logits.float(), targets.to(logits.device), reduction="none")
    # Scatter back to [B, T-1] and sum per row: deterministic (no atomics) and the same summation
    # order as the full-logits path.
    loss_sum = torch.zeros(valid.shape, dtype=tok.dtype, device=tok.device).masked_scatter(valid, tok).sum(1)
    count = valid.sum(1)
    return SupervisedLoss(loss_sum.sum() / count.sum().clamp(min=1), loss_sum, count)
