"""Training throughput of the engine (DeepSpeed, 1 process) on synthetic batches, random init.

    python bench/bench_train.py [--shapes tiny,opt125m] [--steps 3] [--batch 2] [--precision fp32]

Shapes: ``tiny`` (the test model) and ``opt125m`` (OPT-125M LM: 12 layers, d=768, vocab 50272, with 12
xattn blocks and AF1's audio transformer at d=1024), 8-shot x 16 windows (L=128 slots), T=512.
Prints samples/s, tokens/s, achieved TFLOP/s and MFU (FLOPs as documented in
megaflamingo/engine/flops.py; peak = measured matmul peak on CPU) and the attention kernels the
profiler saw in one forward pass. The ``1.3b`` shape is listed for GPU runs (``--shapes af1_1.3b``).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

SHAPES = {
    "tiny": dict(hidden=64, layers=2, heads=4, ffn=256, vocab=512, audio_dim=32, windows=4, fewshot=1, T=64,
                 xheads=2, xdim=16, at=dict(n_head=2, n_layers=1, d_inner=64)),
    "opt125m": dict(hidden=768, layers=12, heads=12, ffn=3072, vocab=50272, audio_dim=1024, windows=16, fewshot=8,
                    T=512, xheads=8, xdim=64, at=dict(n_head=8, n_layers=3, d_inner=2048)),
    "af1_1.3b": dict(hidden=2048, layers=24, heads=32, ffn=8192, vocab=50272, audio_dim=1024, windows=16, fewshot=8,
                     T=512, xheads=8, xdim=64, at=dict(n_head=8, n_layers=3, d_inner=2048)),
}


def raw_config(shape: dict, batch: int, precision: str, run_dir: str, ds: str) -> dict:
    s = shape
    slots = s["windows"] * s["fewshot"]
    return {
        "model": {
            "lm": "bench", "tokenizer": "tiny",
            "lm_config": {"model_type": "opt", "vocab_size": s["vocab"], "hidden_size": s["hidden"],
                          "num_hidden_layers": s["layers"], "ffn_dim": s["ffn"], "num_attention_heads": s["heads"],
                          "word_embed_proj_dim": s["hidden"], "max_position_embeddings": 2048, "pad_token_id": 1,
                          "bos_token_id": 2, "eos_token_id": 2, "dropout": 0.0, "attention_dropout": 0.0},
            "audio_embed_dim": s["audio_dim"], "max_num_window": s["windows"], "max_num_fewshot": s["fewshot"],
            "audio_transformer": dict(s["at"], max_num_media=slots, max_window_per_audio=s["windows"]),
            "xattn": {"every_n_layers": 1, "heads": s["xheads"], "dim_head": s["xdim"], "ff_mult": 4},
        },
        "encoder": {"name": "tiny", "embed_dim": s["audio_dim"], "max_windows": s["windows"]},
        "train": {"run_dir": run_dir, "micro_batch_size": batch, "gradient_accumulation_steps": 1, "lr": 1e-4,
                  "warmup_steps": 0, "precision": precision, "max_steps": 1, "logging_steps": 1000,
                  "save_steps": 10**6, "eval_steps": 10**6, "progress_bar": False, "resume": "none"},
        "deepspeed": {"config": ds},
    }


def attention_kernels(trainer, batch) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    inputs = trainer._to_device(batch)
    inputs.pop("labels")
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.engine(**inputs)
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if "attention" in n.lower() or "softmax" in n.lower() or n == "aten::bmm")


def bench(name: str, args) -> None:
    from megaflamingo.engine.build import build_run_tokenizer
    from megaflamingo.model.build import build_lm, build_model
    from megaflamingo.model.freeze import apply_freeze_policy, policy_from_train_config
    from megaflamingo.engine.distributed import device_for, discover_env, init_distributed
    from megaflamingo.engine.ds_config import build_ds_config
    from megaflamingo.testing.tiny_task import SyntheticBatches, make_config
    from megaflamingo.engine.trainer import Trainer

    shape = SHAPES[name]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_config(raw_config(shape, args.batch, args.precision, tmp, args.ds), f"<bench {name}>")
        world = discover_env()
        device = device_for(world)
        init_distributed(world, 600)
        tok, ids = build_run_tokenizer(cfg)
        ds = build_ds_config(cfg, world.world_size, hidden_size=shape["hidden"])
        torch.manual_seed(0)
        # The LM at the shape's full vocabulary (the head's cost), not the tiny tokenizer's size.
        model = build_model(cfg.model, build_lm(cfg.model, max(len(tok), shape["vocab"]), ds), ids, ds)
        apply_freeze_policy(model, *policy_from_train_config(cfg.train))
        loader = SyntheticBatches(ids, len(tok), micro_batch=args.batch, seq_len=shape["T"],
                                  num_fewshot=shape["fewshot"], windows_per_audio=shape["windows"],
                                  embed_dim=shape["audio_dim"], num_batches=10**6)
        # Fill T with text: the synthetic prompts are short, so pad the attention mask to full length
        # would not add compute (the model runs all T positions either way).
        trainer = Trainer(cfg, model, loader, {}, world, device, ds_config=ds)
        trainer.train()  # step 1: warm-up (allocations, first gathers)
        trainer.total_steps = 1 + args.steps
        t0 = time.perf_counter()
        trainer.train()
        dt = time.perf_counter() - t0
        B, T, L = args.batch, shape["T"], shape["windows"] * shape["fewshot"]
        flops = trainer.flops.per_batch(B, T, L) * args.steps
        kernels = attention_kernels(trainer, loader.make(0, 0))
        print(f"{name:9s} B={B} T={T} L={L} {args.precision}: {args.steps * B / dt:7.3f} samples/s "
              f"{args.steps * B * T / dt:9.1f} tokens/s (positions) {flops / dt / 1e12:7.4f} TFLOP/s "
              f"MFU {100 * flops / dt / trainer.peak_flops:5.1f}% of {trainer.peak_flops / 1e12:.3f} TFLOP/s "
              f"({trainer.peak_source}); {dt / args.steps:.2f} s/step; trainable {trainer.trainable / 1e6:.1f} M "
              f"frozen {trainer.frozen / 1e6:.1f} M")
        print(f"          attention/softmax ops: {', '.join(kernels)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="tiny,opt125m")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--ds", default="ds_configs/zero3.json")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")
    for name in args.shapes.split(","):
        bench(name, args)


if __name__ == "__main__":
    main()
