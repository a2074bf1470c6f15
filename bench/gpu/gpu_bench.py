"""GPU suite: training step of the AF1-1.3B shape (random weights, bf16) under each attention path.

    python bench/gpu/gpu_bench.py --out results.json [--samples 120] [--budget-s 420] [--cpu-smoke]

Variants (pretraining freezing: audio transformer + xattn train, LM frozen; AdamW on the trainable
parameters; LM head on the supervised positions only; same samples, drawn from the pretrain blend as in
bench/bench_packing.py):

  unpacked/sdpa/dense        today's path: dynamic padding, HF sdpa, dense-mask SDPA cross-attention
  unpacked/sdpa/fused        dynamic padding, fused (varlen) cross-attention layout
  unpacked/flash2/dense      HF flash_attention_2 (only if flash-attn imports)
  packed/sdpa/dense          packed rows, 4D block-causal mask, dense cross-attention over the packed slots
  packed/sdpa/fused          packed rows, fused cross-attention
  packed/varlen/fused        packed rows, LM on torch's varlen flash kernel (megaflamingo_varlen), fused xattn
  packed/flash2/fused        packed rows, HF flash_attention_2 with cu_seqlens (only if flash-attn imports)
  packed/varlen/fused+liger  + fused linear cross-entropy (only if liger-kernel imports); checked vs plain
  packed/varlen/fused+zero3  the same step under DeepSpeed ZeRO-3 on one GPU (only if deepspeed imports)

Per variant: median step time, samples/s, non-pad tokens/s, MFU by the project's FLOP count
(megaflamingo/engine/flops.py: FlopSpec.per_batch / per_packed_batch), peak memory.
Also: the per-sample loss of packed vs unpacked (bf16), and one xattn block alone on a packed batch with
each kernel (dense / segments / varlen / flex compiled). Everything that cannot run here is recorded
with the reason, and a failing variant records its error and the suite goes on. ``--cpu-smoke`` runs
the same code on a tiny shape on the CPU in fp32 (the CUDA-only variants are recorded as skipped).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]


def _bench_packing():
    spec = importlib.util.spec_from_file_location("bench_packing", ROOT / "bench" / "bench_packing.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SHAPES = {
    "af1_1.3b": dict(hidden=2048, layers=24, heads=32, ffn=8192, audio_n_head=8, audio_layers=3, audio_inner=2048,
                     xheads=8, xdim=64, rows=6),
    "tiny": dict(hidden=64, layers=2, heads=4, ffn=256, audio_n_head=4, audio_layers=1, audio_inner=64, xheads=2,
                 xdim=16, rows=3),
}


def env_report() -> dict:
    import transformers

    from megaflamingo.model.attention_kernels import varlen_kernel_name
    from megaflamingo.model.packed import liger_available

    rep = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "varlen_kernel": varlen_kernel_name(), "liger": liger_available()}
    for mod in ("flash_attn", "deepspeed", "liger_kernel", "triton"):
        try:
            m = __import__(mod)
            rep[mod] = getattr(m, "__version__", "?")
        except Exception as e:  # noqa: BLE001 - record why
            rep[mod] = f"unavailable ({type(e).__name__}: {str(e)[:80]})"
    return rep


def build_model(shape: dict, device, dtype):
    from transformers import AutoModelForCausalLM, OPTConfig

    from megaflamingo.model import AudioFlamingo, AudioTransformerConfig, ModelConfig, XattnConfig, apply_freeze_policy

    bp = _bench_packing()
    s = shape
    cfg = OPTConfig(vocab_size=50272, hidden_size=s["hidden"], num_hidden_layers=s["layers"], ffn_dim=s["ffn"],
                    num_attention_heads=s["heads"], word_embed_proj_dim=s["hidden"], dropout=0.0,
                    attention_dropout=0.0, max_position_embeddings=2048)
    mcfg = ModelConfig(audio_embed_dim=bp.D, max_num_window=bp.W, max_num_fewshot=bp.SHOTS,
                       audio_transformer=AudioTransformerConfig(n_head=s["audio_n_head"], n_layers=s["audio_layers"],
                                                                d_inner=s["audio_inner"], dropout=0.0),
                       xattn=XattnConfig(heads=s["xheads"], dim_head=s["xdim"]))
    torch.manual_seed(0)
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
        model = AudioFlamingo.from_lm(lm, bp.TOKS, mcfg)
    model.to(dtype)
    with torch.no_grad():
        for b in model.xattn_blocks():
            b.attn_gate.fill_(0.5)
            b.ff_gate.fill_(0.5)
    apply_freeze_policy(model, "pretrain")
    return model.train()


def to_device(batch: dict, device, dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            out[k] = v.to(dtype) if v.is_floating_point() else v
        elif k == "layout":
            out[k] = v.to(device, non_blocking=True)
        else:
            out[k] = v
    return out


def make_batches(samples, rows: int, device, dtype):
    bp = _bench_packing()
    from megaflamingo.data.collate import Collator
    from megaflamingo.data.packing import PackingConfig, collate_packed, pack_lengths, prepare_sample
    from megaflamingo.model.segments import layout_for_padded_batch

    col = Collator(bp.TOKS, bp.SHOTS * bp.W, bp.W, bp.D)
    n = len(samples)
    unpacked = []
    for i in range(0, n, rows):
        b = col(samples[i:i + rows])
        b["layout"] = layout_for_padded_batch(b["input_ids"], b["attention_mask"], b["audio_mask"], bp.TOKS["media"],
                                              bp.W)
        b["keys"] = list(range(i, min(i + rows, n)))
        unpacked.append(to_device(b, device, dtype))
    cfg = PackingConfig(max_tokens_per_row=bp.MAX_TOKENS, rows_per_batch=rows, pad_to_multiple_of=64, query_chunk=0)
    lengths = [len(s["input_ids"]) for s in samples]
    packed = []
    for plan in pack_lengths(lengths, cfg):
        rows_ = [[prepare_sample(samples[i], bp.SHOTS * bp.W, bp.W, bp.D, key=i) for i in r] for r in plan]
        packed.append(to_device(collate_packed(rows_, bp.TOKS, cfg, bp.W), device, dtype))
    return unpacked, packed


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _loss_fn(model, variant: str, engine=None):
    """The trainer's call for a variant: ``forward(..., layout=)`` (packed rows, or the fused layout of a
    padded batch) or the dense unpacked path; through the DeepSpeed engine when there is one."""
    packed, lm, xattn = variant.split("/")[:3]
    xattn, _, extra = xattn.partition("+")
    model.xattn_backend = "dense" if xattn == "dense" else "auto"
    head = "liger" if extra == "liger" else "plain"
    call = engine if engine is not None else model

    def fn(batch):
        layout = None if (packed == "unpacked" and xattn == "dense") else batch["layout"]
        out = call(batch["input_ids"], batch["attention_mask"], batch["audio_embeds"], batch["audio_mask"],
                   labels=batch["labels"], loss_logits="supervised", layout=layout, loss_head=head)
        return out.loss, out.loss_sum, out.count

    return fn


LM_IMPL = {"sdpa": "sdpa", "flash2": "flash_attention_2", "varlen": "megaflamingo_varlen"}


def run_variant(model, opt, variant: str, batches: list, device, flops_fn, peak: float, steps: int, warmup: int,
                engine=None) -> dict:
    from megaflamingo.model.lm_attention import register_varlen_attention

    lm_name = variant.split("/")[1]
    if lm_name == "varlen":
        register_varlen_attention()
    target = engine.module if engine is not None else model
    target.lang_encoder.set_attn_implementation(LM_IMPL[lm_name])
    fn = _loss_fn(target, variant, engine)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, per_sample = [], {}
    seq = (batches * (1 + (warmup + steps) // max(len(batches), 1)))[:warmup + steps]
    samples = tokens = 0
    flops = 0.0
    for i, b in enumerate(seq):
        _sync(device)
        t0 = time.perf_counter()
        if engine is not None:
            loss, ls, cnt = fn(b)
            engine.backward(loss)
            engine.step()
        else:
            loss, ls, cnt = fn(b)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
            n_s = len(b["keys"])
            samples += n_s
            tokens += int(b["attention_mask"].sum())
            flops += flops_fn(b)
        if i < len(batches):
            for k, key in enumerate(b["keys"]):
                per_sample[key] = float(ls[k].detach().float()) / max(int(cnt[k]), 1)
    total = sum(times)
    res = {"median_step_s": statistics.median(times), "steps": len(times), "samples_per_s": samples / total,
           "tokens_per_s": tokens / total, "tflops_per_s": flops / total / 1e12,
           "mfu": (flops / total / peak) if peak == peak else None,
           "peak_mem_gb": (torch.cuda.max_memory_allocated() / 2**30) if device.type == "cuda" else None}
    return res, per_sample


def xattn_block_bench(model, batch, device, reps: int) -> dict:
    """One gated xattn block alone, fwd+bwd, on a packed batch with each kernel."""
    from megaflamingo.model.attention_kernels import segment_cross_attention, varlen_kernel_name

    blk = model.xattn_blocks()[0]
    lay = batch["layout"].xattn
    R, T = batch["input_ids"].shape
    dim = blk.attn.norm.normalized_shape[0]
    dtype = blk.attn.to_q.weight.dtype
    x = torch.randn(R, T, dim, device=device, dtype=dtype, requires_grad=True)
    media = torch.randn(batch["audio_embeds"].shape, device=device, dtype=dtype, requires_grad=True)
    am = batch["audio_mask"].bool()
    out = {}
    ref = None
    for name in ("dense", "segments", "varlen", "flex"):
        if name == "varlen" and not (device.type == "cuda" and varlen_kernel_name()):
            out[name] = {"skipped": "needs CUDA and a varlen kernel"}
            continue
        if name == "flex" and device.type != "cuda":
            out[name] = {"skipped": "FlexAttention has no backward on CPU"}
            continue
        try:
            def step():
                y = segment_cross_attention(blk.attn, x, media, lay, am, name)
                y.float().square().mean().backward()
                return y

            y = step()
            _sync(device)
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                step()
                _sync(device)
                ts.append(time.perf_counter() - t0)
            out[name] = {"median_ms": 1e3 * statistics.median(ts)}
            if ref is None:
                ref = y.detach().float()
            else:
                real = batch["attention_mask"].bool()
                out[name]["max_abs_diff_vs_dense"] = float((y.detach().float() - ref)[real].abs().max())
        except Exception as e:  # noqa: BLE001 - record and go on
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_results.json")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: one pass)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip the remaining variants after this")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shape on the CPU, fp32 (dry run)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    smoke = args.cpu_smoke or not torch.cuda.is_available()
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    shape_name = "tiny" if smoke else "af1_1.3b"
    shape = SHAPES[shape_name]
    res = {"env": env_report(), "shape": shape_name, "device": str(device), "dtype": str(dtype),
           "cpu_smoke": smoke, "variants": {}, "notes": []}
    if smoke and not args.cpu_smoke:
        res["notes"].append("no CUDA device: ran the CPU smoke configuration")
    out_path = Path(args.out)

    def save():
        res["wall_s"] = time.perf_counter() - t_start
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(res, indent=1))

    from megaflamingo.engine.flops import device_peak_flops, flop_spec

    bp = _bench_packing()
    n = args.samples or (8 if smoke else 120)
    samples = bp.draw(bp.mixture("pretrain"), n, seed=0)
    res["samples"] = n
    res["mix"] = "pretrain"
    t0 = time.perf_counter()
    model = build_model(shape, device, dtype)
    res["build_s"] = time.perf_counter() - t0
    unpacked, packed = make_batches(samples, shape["rows"], device, dtype)
    res["micro_batches"] = {"unpacked": len(unpacked), "packed": len(packed)}
    peak, peak_src = device_peak_flops("bf16" if dtype == torch.bfloat16 else "fp32")
    res["peak_flops"], res["peak_source"] = peak, peak_src
    spec = flop_spec(model)

    def flops_fn(b):
        head = int((b["labels"][:, 1:] != -100).sum())
        if b["layout"].is_packed:
            return spec.per_packed_batch(b["layout"], head)
        B, T = b["input_ids"].shape
        return spec.per_batch(B, T, b["audio_embeds"].shape[1], head)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=(device.type == "cuda"))
    env = res["env"]
    has_flash = not str(env.get("flash_attn", "")).startswith("unavailable")
    variants = [("unpacked/sdpa/dense", unpacked, None), ("unpacked/sdpa/fused", unpacked, None),
                ("unpacked/flash2/dense", unpacked, None if has_flash else "flash-attn not importable"),
                ("packed/sdpa/dense", packed, None), ("packed/sdpa/fused", packed, None),
                ("packed/varlen/fused", packed, None),
                ("packed/flash2/fused", packed, None if has_flash else "flash-attn not importable"),
                ("packed/varlen/fused+liger", packed, None if env["liger"] else "liger-kernel or CUDA unavailable")]
    losses = {}
    for name, batches, skip in variants:
        if skip:
            res["variants"][name] = {"skipped": skip}
            continue
        if time.perf_counter() - t_start > args.budget_s:
            res["variants"][name] = {"skipped": f"time budget {args.budget_s:.0f} s spent"}
            continue
        steps = args.steps or len(batches)
        try:
            r, per = run_variant(model, opt, name, batches, device, flops_fn, peak, steps, args.warmup)
            res["variants"][name] = r
            losses[name] = per
        except Exception as e:  # noqa: BLE001 - record and go on
            res["variants"][name] = {"error": f"{type(e).__name__}: {str(e)[:400]}",
                                     "trace": traceback.format_exc()[-1500:]}
        save()
        print(name, json.dumps(res["variants"][name])[:300], flush=True)
    # The optimizer moved the weights between variants: compare losses on a fresh forward instead.
    model.lang_encoder.set_attn_implementation("sdpa")
    with torch.no_grad():
        model.eval()
        eq = {}
        fn_u = _loss_fn(model, "unpacked/sdpa/dense")
        fn_p = _loss_fn(model, "packed/sdpa/fused")
        per_u, per_p = {}, {}
        for b in unpacked:
            _, ls, c = fn_u(b)
            per_u.update({k: float(ls[i].float()) / max(int(c[i]), 1) for i, k in enumerate(b["keys"])})
        for b in packed:
            _, ls, c = fn_p(b)
            per_p.update({k: float(ls[i].float()) / max(int(c[i]), 1) for i, k in enumerate(b["keys"])})
        eq["packed_vs_unpacked_max_abs_loss_diff"] = max(abs(per_p[k] - per_u[k]) for k in per_u)
        eq["mean_loss"] = float(np.mean(list(per_u.values())))
        if env["liger"]:
            b = packed[0]
            plain = _loss_fn(model, "packed/sdpa/fused")(b)[0]
            lig = _loss_fn(model, "packed/sdpa/fused+liger")(b)[0]
            eq["liger_vs_plain_loss_diff"] = float((plain.float() - lig.float()).abs())
        model.train()
    res["equivalence"] = eq
    save()
    try:
        res["xattn_block"] = xattn_block_bench(model, packed[0], device, reps=3 if smoke else 10)
    except Exception as e:  # noqa: BLE001
        res["xattn_block"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    save()
    del opt
    zero = "packed/varlen/fused+zero3"
    if str(env.get("deepspeed", "")).startswith("unavailable"):
        res["variants"][zero] = {"skipped": "deepspeed not importable"}
    elif device.type != "cuda":
        res["variants"][zero] = {"skipped": "ZeRO-3 variant runs on CUDA only (CPU ZeRO-3 is covered by the tests)"}
    elif time.perf_counter() - t_start > args.budget_s:
        res["variants"][zero] = {"skipped": f"time budget {args.budget_s:.0f} s spent"}
    else:
        try:
            res["variants"][zero] = run_zero3(model, packed, device, flops_fn, peak, args)
        except Exception as e:  # noqa: BLE001
            res["variants"][zero] = {"error": f"{type(e).__name__}: {str(e)[:400]}",
                                     "trace": traceback.format_exc()[-1500:]}
    save()
    print(json.dumps({k: v.get("median_step_s", v.get("skipped", v.get("error"))) for k, v in res["variants"].items()},
                     indent=1))
    print(f"wrote {out_path} in {res['wall_s']:.0f} s")


def run_zero3(model, packed, device, flops_fn, peak, args) -> dict:
    import deepspeed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    deepspeed.init_distributed(dist_backend="nccl")
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 100000},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "torch_adam": True}},
           "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
    engine, *_ = deepspeed.initialize(model=model, config=cfg,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    steps = args.steps or len(packed)
    r, _ = run_variant(None, None, "packed/varlen/fused", packed, device, flops_fn, peak, steps, args.warmup,
                       engine=engine)
    r["note"] = "DeepSpeed ZeRO-3, one GPU, bf16, torch AdamW (fp32 master weights)"
    return r


if __name__ == "__main__":
    sys.exit(main())
