"""What the trainer shows in TensorBoard, by family (one TensorBoard card per family, units in the names).

    loss/train, loss/train/<dataset>, loss/valid, loss/valid/<dataset>
    perf/mfu_pct, perf/tokens_per_s, perf/samples_per_s, perf/fill_rate (real tokens / positions computed)
    time/step_s, time/data_wait_s, time/valid_s, time/eval_s
    memory/peak_alloc_gb, memory/peak_reserved_gb (GPU) | memory/peak_rss_gb (CPU)
    optim/lr, optim/grad_norm, optim/nonfinite_skipped, optim/epoch
    data/bad_rows                      rows skipped for NaN/inf audio embeddings (whole job, all ranks)
    eval/<benchmark>/<metric>          generation-based task metrics (``train.eval_benchmarks``)
    eval/<benchmark>/samples           (text) a few predictions beside their references
    xattn/attn_gate/layer_NN, xattn/ff_gate/layer_NN   tanh of each cross-attention block's gates
    config                             (text) the resolved config, also under HPARAMS
    checkpoint/resume                  (text) the tags a resume passed over (damaged, incomplete) and why

The gates are the Flamingo-specific health signal: they start at 0 (the LM untouched) and open as
the model learns to use the audio; a gate stuck at 0 means that layer ignores the audio.
"""
from __future__ import annotations

import contextlib
import json
from typing import Any

import torch

LOSS_TRAIN, LOSS_VALID = "loss/train", "loss/valid"
MFU_PCT = "perf/mfu_pct"
TOKENS_PER_S, SAMPLES_PER_S = "perf/tokens_per_s", "perf/samples_per_s"
FILL_RATE = "perf/fill_rate"
STEP_S, DATA_WAIT_S, VALID_S, EVAL_S = "time/step_s", "time/data_wait_s", "time/valid_s", "time/eval_s"
LR, GRAD_NORM, NONFINITE, EPOCH = "optim/lr", "optim/grad_norm", "optim/nonfinite_skipped", "optim/epoch"
BAD_ROWS, RESUME_TEXT = "data/bad_rows", "checkpoint/resume"
GATES = ("attn_gate", "ff_gate")

# TensorBoard's Custom Scalars tab: train and valid loss in one chart, every layer's gate in one chart.
LAYOUT = {
    "loss": {"train and valid": ["Multiline", [r"^loss/train$", r"^loss/valid$"]]},
    "xattn": {f"{g} (tanh) per layer": ["Multiline", [rf"^xattn/{g}/layer_\d+$"]] for g in GATES},
}


def loss_tag(split: str, dataset: str | None = None) -> str:
    return f"loss/{split}" + (f"/{dataset}" if dataset else "")


def eval_tag(benchmark: str, metric: str) -> str:
    return f"eval/{benchmark}/{metric}"


def gate_tag(gate: str, layer: int) -> str:
    return f"xattn/{gate}/layer_{layer:02d}"


def memory_values() -> dict[str, float]:
    """Peak memory since start: torch's allocated and reserved bytes on GPU, the process's RSS on CPU."""
    if torch.cuda.is_available():
        return {"memory/peak_alloc_gb": torch.cuda.max_memory_allocated() / 2**30,
                "memory/peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30}
    import resource

    return {"memory/peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux


def gated_blocks(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(LM layer index, gated cross-attention block) of every layer that has one, in layer order."""
    from megaflamingo.model.injection import FlamingoDecoderLayer

    return [(m.layer_idx, m.gated_cross_attn_layer) for m in model.modules()
            if isinstance(m, FlamingoDecoderLayer) and m.gated_cross_attn_layer is not None]


def gate_values(blocks: list[tuple[int, torch.nn.Module]]) -> dict[str, float]:
    """``{xattn/<gate>/layer_NN: tanh(gate)}`` with one device-to-host copy. Under ZeRO-3 a one-element
    gate stays whole on every rank (it is far below the persistence threshold); should a user's
    DeepSpeed JSON partition it anyway, it is gathered, which is a collective: call on every rank."""
    params = [getattr(b, g) for _, b in blocks for g in GATES]
    if not params:
        return {}
    gather = contextlib.nullcontext()
    if any(p.numel() == 0 for p in params):  # partitioned: ZeRO-3 left an empty placeholder here
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with gather:
        vals = torch.stack([p.detach().float().reshape(-1)[0] for p in params]).tanh().cpu().tolist()
    tags = [gate_tag(g, i) for i, _ in blocks for g in GATES]
    return dict(zip(tags, vals))


def flat_hparams(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as TensorBoard hparams: ``a.b.c`` keys; numbers, strings and booleans as
    they are, None as "null", lists as JSON text."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat_hparams(v, key + "."))
        elif isinstance(v, (int, float, str)):  # bool is an int
            out[key] = v
        elif v is None:
            out[key] = "null"
        else:
            out[key] = json.dumps(v, sort_keys=True, default=str)
    return out
