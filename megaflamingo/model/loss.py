"""Causal-LM losses: per sample sums and counts, from full logits or from the supervised positions only.

Convention (HF's ``ForCausalLMLoss``): position t predicts label t+1; labels equal to ``IGNORE_INDEX``
are not scored. Both paths return per-sample sums so callers can average over tokens of a whole step
(across micro-batches and ranks) rather than over each batch.

The scalar that is back-propagated follows a *weighting* (``train.loss_weighting``,
:func:`weighted_loss`): ``token`` = sum of the micro-batch's token losses / its supervised tokens (HF's
and AF1's rule; with packing the micro-batch simply holds more samples), ``sample`` = the mean over the
micro-batch's samples of each sample's own token mean (every sample weighs the same, whatever its
answer length).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from megaflamingo.tokens import IGNORE_INDEX

LOSS_LOGITS = ("full", "supervised")
LOSS_WEIGHTINGS = ("token", "sample")


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


def weighted_loss(tok: torch.Tensor, tok_sample: torch.Tensor, count: torch.Tensor,
                  weighting: str = "token") -> torch.Tensor:
    """The micro-batch's scalar loss from its token losses ``tok`` [N], the sample of each token
    ``tok_sample`` [N] and the supervised tokens per sample ``count`` [S] (see the module docstring).
    0 when nothing is supervised (never NaN)."""
    if weighting == "token":
        return tok.sum() / count.sum().clamp(min=1)
    if weighting != "sample":
        raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
    scored = (count > 0).sum().clamp(min=1)
    w = 1.0 / (count.clamp(min=1)[tok_sample].to(tok.dtype) * scored)
    return (tok * w).sum()


def per_sample_sums(tok: torch.Tensor, tok_sample: torch.Tensor, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(detached float32 sum [S], int64 count [S]) of token losses that arrive grouped by sample (row-major
    order): a float64 running sum differenced at the group ends, so deterministic (no atomics)."""
    count = torch.bincount(tok_sample, minlength=num_samples)
    ends = torch.cumsum(count, 0)
    csum = torch.cat([tok.new_zeros(1, dtype=torch.float64), torch.cumsum(tok.detach().double(), 0)])
    return (csum[ends] - csum[ends - count]).float(), count


def supervised_token_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                          weighting: str = "token") -> SupervisedLoss:
    """``logits`` [N, V] at the N supervised positions (row-major order of ``valid``), ``targets`` [N]."""
    tok = F.cross_entropy(logits.float(), targets.to(logits.device), reduction="none")
    # Scatter back to [B, T-1] and sum per row: deterministic (no atomics) and the same summation
    # order as the full-logits path.
    loss_sum = torch.zeros(valid.shape, dtype=tok.dtype, device=tok.device).masked_scatter(valid, tok).sum(1)
    count = valid.sum(1)
    if weighting == "token":
        return SupervisedLoss(loss_sum.sum() / count.sum().clamp(min=1), loss_sum, count)
    rows = valid.nonzero()[:, 0]
    return SupervisedLoss(weighted_loss(tok, rows, count, weighting), loss_sum, count)


def weighted_sums(loss_sum: torch.Tensor, count: torch.Tensor, weighting: str = "token") -> torch.Tensor:
    """:func:`weighted_loss` from per-sample sums (with their gradients) instead of token losses: the
    full-logits path, where ``token_losses`` already summed per sample."""
    if weighting == "token":
        return loss_sum.sum() / count.sum().clamp(min=1)
    if weighting != "sample":
        raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
    scored = count > 0
    return (loss_sum[scored] / count[scored]).sum() / scored.sum().clamp(min=1)
