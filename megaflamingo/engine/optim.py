"""Optimizer parameter groups and learning-rate schedules.

AF1 decays only the gated cross-attention parameters (all of them, gates and norms included) with
weight decay 0.1 and leaves everything else undecayed; frozen parameters never reach the optimizer.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Iterable

import torch
from torch import nn

from megaflamingo.config import TrainConfig

log = logging.getLogger("megaflamingo.train")

XATTN_MARK = "gated_cross_attn"


def decays(name: str) -> bool:
    """AF1's rule: weight decay on xattn parameters only."""
    return XATTN_MARK in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if decays(name) else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (check train.stage / the freeze policy)")
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def build_optimizer(model: nn.Module, t: TrainConfig, offload_device: str = "none") -> torch.optim.Optimizer:
    """torch AdamW on CPU (no op build), FusedAdam on GPU, DeepSpeedCPUAdam with optimizer offload."""
    groups = param_groups(model, t.weight_decay)
    kw = dict(lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)
    if offload_device in ("cpu", "nvme"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    if torch.cuda.is_available():
        try:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **kw)
        except Exception as e:  # noqa: BLE001 - the op is JIT-built: no nvcc/ninja, arch mismatch, ...
            # torch's own fused AdamW kernel: same update rule, no build step.
            log.warning("DeepSpeed FusedAdam unavailable (%s: %s); using torch.optim.AdamW(fused=True)",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return torch.optim.AdamW(groups, fused=True, **kw)
    # foreach=False: the per-tensor loop gives the same bits whatever the grouping (ZeRO stages compare).
    return torch.optim.AdamW(groups, foreach=False, **kw)


def lr_lambda(t: TrainConfig, total_steps: int | None) -> Callable[[int], float]:
    """Multiplier of train.lr at optimizer step ``s`` (0-based): linear warm-up from 0 (as HF's
    ``get_*_schedule_with_warmup``, which AF1 uses), then constant / linear / cosine to min_lr_ratio."""
    warm, kind, floor = t.warmup_steps, t.lr_scheduler, t.min_lr_ratio
    if kind != "constant" and not total_steps:
        raise ValueError(f"train.lr_scheduler={kind!r} needs train.max_steps (or a loader with a length)")

    def f(s: int) -> float:
        if warm and s < warm:
            return s / warm
        if kind == "constant":
            return 1.0
        progress = min(1.0, (s - warm) / max(1, total_steps - warm))
        if kind == "linear":
            return floor + (1.0 - floor) * (1.0 - progress)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def scheduler_factory(t: TrainConfig, total_steps: int | None):
    """A callable DeepSpeed applies to ITS optimizer wrapper (so the schedule drives the real groups)."""
    fn = lr_lambda(t, total_steps)

    def make(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)

    return make


def count_params(params: Iterable[nn.Parameter]) -> int:
    # ZeRO-3 partitioned parameters keep their full size in ds_numel.
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
