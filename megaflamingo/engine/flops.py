"""FLOP counting for MFU (model FLOPs utilisation).

Convention (PaLM appendix B, adapted to a partly frozen model); a multiply-add is 2 FLOPs:

* every weight matrix W (an ``nn.Linear``) costs 2·|W| per row it is applied to in the forward pass;
  the backward pass costs another 2·|W| for the input gradient and 2·|W| for the weight gradient, the
  latter only when W is trainable. So a **frozen** matrix costs **4·|W|** per row and a **trainable**
  one **6·|W|** (a frozen LM still back-propagates to the xattn blocks that sit before every layer);
* rows are text positions for the LM and the xattn blocks (padded length T: the hardware computes
  them), and audio window slots (L = max_fewshot × 16) for the audio transformer and the xattn
  ``to_kv`` projections, which act on the audio;
* attention scores and the weighted sum cost 2·2·n·d per query row for n keys (full, not causal-
  halved), three times that for forward + backward: 12·T·d per text token per LM layer,
  12·L·inner per text token per xattn block, 12·L·d per audio slot per audio-transformer layer;
* embedding look-ups are free; the LM head is a matrix like any other (tied or not), counted on the rows
  it runs on: all B·T positions with full logits, the supervised ones only with
  ``train.loss_logits: supervised``;
* packed batches (:meth:`FlopSpec.per_packed_batch`: R rows of T positions holding S samples): weight
  matrices on all R·T positions (padding included, as above) and on the S·L audio slots; LM attention
  per sample, Σ n² over the sequence segments (what a varlen kernel computes; a block-masked dense kernel
  computes R·T² but the extra work is masked out, so it is not model FLOPs); xattn attention over L slots
  per position, as unpacked.

The denominator is the device peak: ``train.peak_tflops`` if given, a table for known GPUs (dense
bf16, /2 for fp32 = TF32), else on CPU a measured fp32/bf16 matmul peak (``measure_cpu_peak``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

# Dense bf16 peak FLOP/s of common GPUs (no sparsity).
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                 "L40S": 362e12, "A10G": 70e12, "V100": 125e12, "B200": 2250e12, "GH200": 989e12}


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


@dataclass
class FlopSpec:
    text_linear: float = 0.0  # FLOPs per text position from weight matrices (already x4 / x6), LM head excluded
    head_linear: float = 0.0  # FLOPs per row the LM head runs on (x4 / x6)
    audio_linear: float = 0.0  # FLOPs per audio slot from weight matrices
    lm_layers: int = 0
    lm_width: int = 0
    xattn_blocks: int = 0
    xattn_inner: int = 0
    audio_layers: int = 0
    audio_width: int = 0

    def per_batch(self, batch_size: int, seq_len: int, audio_slots: int, head_rows: Optional[int] = None) -> float:
        """``head_rows``: rows the LM head ran on (default every position, B·T)."""
        per_text = self.text_linear + 12.0 * seq_len * self.lm_width * self.lm_layers
        per_text += 12.0 * audio_slots * self.xattn_inner * self.xattn_blocks
        per_slot = self.audio_linear + 12.0 * audio_slots * self.audio_width * self.audio_layers
        rows = batch_size * seq_len if head_rows is None else head_rows
        return batch_size * (seq_len * per_text + audio_slots * per_slot) + rows * self.head_linear


    def per_packed_batch(self, layout, head_rows: Optional[int] = None) -> float:
        """``layout``: the batch's :class:`~megaflamingo.model.segments.PackedLayout` (host or device:
        only its sizes and segment lengths are read)."""
        R, T, S = layout.rows, layout.seq_len, layout.num_samples
        L = layout.xattn.num_slots
        lens = (layout.seq_cu[1:] - layout.seq_cu[:-1]).double()
        attn_lm = 12.0 * self.lm_width * self.lm_layers * float((lens * lens).sum())
        per_text = self.text_linear + 12.0 * L * self.xattn_inner * self.xattn_blocks
        per_slot = self.audio_linear + 12.0 * L * self.audio_width * self.audio_layers
        rows = R * T if head_rows is None else head_rows
        return R * T * per_text + attn_lm + S * L * per_slot + rows * self.head_linear


def flop_spec(model: nn.Module) -> FlopSpec:
    """Inspect ``model`` (an AudioFlamingo, or any module: then only weight matrices count)."""
    spec = FlopSpec()
    lm = getattr(model, "lang_encoder", None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        w = mod.weight
        cost = (6.0 if w.requires_grad else 4.0) * _numel(w)
        if head is not None and mod is head:
            spec.head_linear += cost
            continue
        on_audio = name.startswith("audio_transformer") or name.endswith("to_kv")
        if on_audio:
            spec.audio_linear += cost
        else:
            spec.text_linear += cost
    cfg = getattr(lm, "config", None)
    if cfg is not None:
        spec.lm_layers = int(getattr(cfg, "num_hidden_layers", 0))
        spec.lm_width = int(getattr(cfg, "hidden_size", 0))
    if hasattr(model, "xattn_blocks"):
        blocks = model.xattn_blocks()
        spec.xattn_blocks = len(blocks)
        if blocks:
            a = blocks[0].attn
            spec.xattn_inner = int(a.heads * a.dim_head)
    at = getattr(model, "audio_transformer", None)
    if at is not None:
        layers = [m for m in at.modules() if type(m).__name__ == "SelfAttention"]
        spec.audio_layers = len(layers)
        if layers:
            spec.audio_width = int(layers[0].n_head * layers[0].d_head)
    return spec


_CPU_PEAK: dict = {}


def measure_cpu_peak(dtype: torch.dtype = torch.float32, n: int = 1024, reps: int = 5) -> float:
    """Best-of matmul throughput on this CPU with the current thread count (FLOP/s)."""
    key = (dtype, torch.get_num_threads())
    if key not in _CPU_PEAK:
        a = torch.randn(n, n, dtype=dtype)
        b = torch.randn(n, n, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        _CPU_PEAK[key] = 2.0 * n**3 / best
    return _CPU_PEAK[key]


def device_peak_flops(precision: str, override_tflops: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, how it was obtained)."""
    if override_tflops:
        return override_tflops * 1e12, "train.peak_tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return (peak if precision in ("bf16", "fp16") else peak / 2), f"table ({name})"
        return float("nan"), f"unknown GPU {name} (set train.peak_tflops)"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return measure_cpu_peak(dtype), f"measured CPU matmul peak ({dtype}, {torch.get_num_threads()} threads)"
