"""torchrun --nproc_per_node 2 tests/model/zero3_packed_worker.py OUT_JSON

Every rank builds the same tiny AudioFlamingo and the same packed batch (1-shot and 8-shot samples mixed
in rows), records the single-process packed loss, per-sample sums and trainable gradients, then wraps the
model in a DeepSpeed ZeRO-3 engine (gloo, CPU, fp32) and redoes them through the engine's forward
(``layout=``, as the trainer calls it) with the parameters partitioned across the 2 ranks. Rank 0 writes
the max differences to OUT_JSON.
"""
import json
import sys

import torch

from test_packing_equivalence import build, make_samples, packed_batch, packed_forward  # tests/model is sys.path[0]

from megaflamingo.model import apply_freeze_policy


def main():
    out_path = sys.argv[1]
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from megaflamingo.engine.distributed import disable_cpu_shm_comm

    disable_cpu_shm_comm()
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    model = build("llama").train()
    apply_freeze_policy(model, "pretrain")
    pb, _ = packed_batch(make_samples(10, seed=11), max_tokens_per_row=128, rows_per_batch=4)
    ref = packed_forward(model, pb, "segments")
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 2000},
           "steps_per_print": 10 ** 6}
    engine, *_ = deepspeed.initialize(model=model, config=cfg,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    partitioned = sum(int(p.numel() == 0) for p in engine.module.parameters())
    out = engine(pb["input_ids"], pb["attention_mask"], pb["audio_embeds"], pb["audio_mask"], labels=pb["labels"],
                 loss_logits="supervised", layout=pb["layout"])
    engine.backward(out.loss)
    gdiff = 0.0
    for n, p in engine.module.named_parameters():
        if p.requires_grad:
            g = safe_get_full_grad(p)
            gdiff = max(gdiff, float((g - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp(min=1e-3)))
    res = {"loss": abs(float(out.loss.detach()) - float(ref.loss.detach())),
           "loss_sum": float((out.loss_sum - ref.loss_sum).abs().max()),
           "count_equal": bool(torch.equal(out.count, ref.count)), "grads": gdiff,
           "partitioned_params": partitioned, "world": torch.distributed.get_world_size()}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(res, f)
    torch.distributed.barrier()


if __name__ == "__main__":
    from megaflamingo.engine.distributed import shutdown

    try:
        main()
    finally:
        shutdown()
