"""torchrun --nproc_per_node 2 tests/model/zero3_worker.py OUT_JSON

Builds the same tiny AudioFlamingo on every rank, records single-process logits / loss / trainable grads /
greedy generation (and the supervised-positions loss), then wraps it in DeepSpeed ZeRO-3 (gloo, CPU, fp32) and redoes all four with the
parameters partitioned across the 2 ranks. Rank 0 writes the max differences to OUT_JSON.
"""
import json
import sys

import torch

from builders import batch, build  # tests/model is sys.path[0] when run as a script

from megaflamingo.model import apply_freeze_policy


def main():
    out_path = sys.argv[1]
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from megaflamingo.engine.distributed import disable_cpu_shm_comm

    # As the trainer: gloo only. DeepSpeed's CPU shm op is JIT-built under a lock file that a killed
    # build leaves behind, after which every DeepSpeed start waits on it forever.
    disable_cpu_shm_comm()
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    model = build("llama").train()
    apply_freeze_policy(model, "pretrain")
    b = batch()
    out = model(**b)
    out.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    gen_ids = b["input_ids"][:2, :9]
    gen_kw = dict(max_new_tokens=4, eos_token_id=[])
    with torch.no_grad():
        if rank == 1:  # rank 1 stops after one token; rank 0 runs 4 steps: ranks must stay in lock-step
            first = model.generate(gen_ids, None, b["audio_embeds"][:2], b["audio_mask"][:2], max_new_tokens=1)
            gen_kw["eos_token_id"] = first[:, -1].tolist()
        ref_gen = model.generate(gen_ids, None, b["audio_embeds"][:2], b["audio_mask"][:2], **gen_kw)
    ref_logits, ref_loss = out.logits.detach(), out.loss.detach()

    cfg = {
        "train_micro_batch_size_per_gpu": 3,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        # small params (norms, gates, biases) stay whole: far fewer gloo round trips on a busy 2-core box
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 2000},
        "steps_per_print": 10 ** 6,
    }
    engine, *_ = deepspeed.initialize(model=model, config=cfg,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    partitioned = sum(int(p.numel() == 0) for p in engine.module.parameters())
    import time
    t0 = time.time()
    zout = engine(**b)
    engine.backward(zout.loss)
    gdiff = 0.0
    for n, p in engine.module.named_parameters():
        if p.requires_grad:
            g = safe_get_full_grad(p)
            gdiff = max(gdiff, float((g - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp(min=1e-3)))
    with torch.no_grad():  # the supervised-positions loss through the engine: partitioned, tied lm_head
        zsup = engine(**{k: v for k, v in b.items() if k != "labels"}, labels=b["labels"], loss_logits="supervised")
    engine.module.eval()
    with torch.no_grad():
        zgen = engine.module.generate(gen_ids, None, b["audio_embeds"][:2], b["audio_mask"][:2], **gen_kw)
    n = ref_gen.shape[1]
    gen_equal = bool(torch.equal(zgen[:, :n], ref_gen) and (zgen[:, n:] == 1).all())  # 1 = pad
    flags = torch.tensor([float(gen_equal), float(zgen.shape[1])])
    all_flags = [torch.zeros(2) for _ in range(2)]
    torch.distributed.all_gather(all_flags, flags)
    timing = time.time() - t0
    res = {
        "seconds_fwd_bwd_generate": round(timing, 1),
        "logits": float((zout.logits.detach() - ref_logits).abs().max()),
        "loss": abs(float(zout.loss.detach()) - float(ref_loss)),
        "grads": gdiff,
        "supervised_loss": abs(float(zsup.loss) - float(ref_loss)),
        "generate_equal": [bool(f[0]) for f in all_flags],
        "generated_lengths": [int(f[1]) for f in all_flags],
        "partitioned_params": partitioned,
        "world": torch.distributed.get_world_size(),
    }
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(res, f)
    torch.distributed.barrier()


if __name__ == "__main__":
    from megaflamingo.engine.distributed import shutdown

    # As the trainer: tear the process group down before interpreter exit, or a rank that finished
    # cleanly can abort ("terminate called without an active exception") and fail the launch.
    try:
        main()
    finally:
        shutdown()
