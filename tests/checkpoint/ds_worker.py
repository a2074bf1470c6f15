"""Launched by torchrun (2 processes, gloo, CPU): trains a tiny model under DeepSpeed ZeRO for a few steps,
saves a checkpoint, and (rank 0) writes the live parameters gathered at save time as the reference.

Usage: torchrun --nproc_per_node 2 tests/checkpoint/ds_worker.py OUT_DIR RUNS
RUNS: comma-separated ZeRO stages with an optional dtype, e.g. "3,2,3:bf16", each written to
OUT_DIR/zero<stage>[-<dtype>]/ (ckpt/, reference.pt).
The model has a tied embedding (embed.weight is head.weight), a frozen parameter and a buffer.
"""
import json
import os
import sys

import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, vocab=37, d=24):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.frozen_proj = nn.Linear(d, d)  # frozen: stays at init, must still be in the consolidated dict
        self.body = nn.Sequential(nn.Linear(d, 3 * d + 1), nn.GELU(), nn.Linear(3 * d + 1, d))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("scale", torch.tensor([0.5, 2.0]))
        for p in self.frozen_proj.parameters():
            p.requires_grad_(False)

    def forward(self, ids):
        h = self.embed(ids) * self.scale[1]
        h = h + self.body(self.frozen_proj(h))
        return self.head(self.norm(h))


def main():
    import deepspeed

    from megaflamingo.engine.distributed import disable_cpu_shm_comm

    # As the trainer: gloo only. DeepSpeed's CPU shm op is JIT-built under a lock file that a killed
    # build leaves behind, after which every DeepSpeed start waits on it forever.
    disable_cpu_shm_comm()
    deepspeed.init_distributed(dist_backend="gloo")
    for item in sys.argv[2].split(","):
        stage, _, dtype = item.partition(":")
        name = f"zero{stage}" + (f"-{dtype}" if dtype else "")
        run(os.path.join(sys.argv[1], name), int(stage), dtype or "fp32")


def run(out, stage, dtype):
    import deepspeed

    rank = torch.distributed.get_rank()
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    model = Tiny()
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 1000,
    }
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=cfg)
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):
        ids = torch.randint(0, 37, (2, 5), generator=g)
        logits = engine(ids)
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, 37), ids.reshape(-1))
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(os.path.join(out, "ckpt"), tag="step3")
    # Gather the live parameters (the fp32 master copy for trainable ones) exactly as they are now.
    ref = {}
    if stage == 3:
        params = list(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            for name, p in params:
                ref[name] = p.detach().clone().float()
    else:
        for name, p in engine.module.named_parameters():
            ref[name] = p.detach().clone().float()
    if rank == 0:
        ref["scale"] = engine.module.scale.detach().clone()
        torch.save(ref, os.path.join(out, "reference.pt"))
        with open(os.path.join(out, "meta.json"), "w") as f:
            json.dump({"tied": {"head.weight": "embed.weight"}, "frozen": ["frozen_proj.weight", "frozen_proj.bias"],
                       "stage": stage, "dtype": dtype}, f)
    torch.distributed.barrier()


if __name__ == "__main__":
    from megaflamingo.engine.distributed import shutdown

    # As the trainer: tear the process group down before interpreter exit, or a rank that finished
    # cleanly can abort ("terminate called without an active exception") and fail the launch.
    try:
        main()
    finally:
        shutdown()
