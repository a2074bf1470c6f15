"""Launched by torchrun (2 processes, gloo, CPU) from test_safe_load_engine.py; not a test module.

For each ZeRO stage: train 3 steps, save tag ``s3``, train 2 more (the reference losses). Then, each time
in a fresh engine: resume ``s3`` through ``safe_load.load_checkpoint`` and train the same 2 steps; resume
copies of ``s3`` with a malicious pickle planted in every optimizer shard / every model-states file;
(ZeRO-3) convert ``s3`` to a universal checkpoint with our wrapper, resume it, and resume a copy with a
malicious ``fp32.pt``; (ZeRO-2) as a control, DeepSpeed's own unrestricted load of a planted shard.
Rank R writes OUT/result.rank<R>.json.

Usage: torchrun --nproc_per_node 2 restricted_resume_worker.py OUT_DIR STAGES (e.g. "2,3")
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from ds_worker import Tiny


class Evil:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path) -> None:
    from megaflamingo.checkpoint.safe_load import restricted_load

    sd = restricted_load(path)
    if isinstance(sd, dict):
        sd["planted"] = Evil(marker)
    else:  # universal fp32.pt / exp_avg.pt files hold a bare tensor
        sd = {"payload": sd, "planted": Evil(marker)}
    torch.save(sd, path)


def make_engine(stage: int, universal: bool = False):
    import deepspeed

    torch.manual_seed(0)
    model = Tiny()
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
           "zero_optimization": {"stage": stage}, "steps_per_print": 1000}
    if universal:
        cfg["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=cfg)
    return engine


def train(engine, steps):
    rank = torch.distributed.get_rank()
    losses = []
    for s in steps:
        g = torch.Generator().manual_seed(1000 * rank + s)
        ids = torch.randint(0, 37, (2, 5), generator=g)
        loss = nn.functional.cross_entropy(engine(ids).float().reshape(-1, 37), ids.reshape(-1))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def try_resume(stage, ckpt, tag, universal=False, steps=(3, 4)):
    """Resume in a fresh engine; returns {"losses"} or {"error", "type", "refused"} plus the files read."""
    from megaflamingo.checkpoint import safe_load

    read = []
    real = safe_load.restricted_load

    def spy(path, *a, **kw):
        read.append(os.path.basename(str(path)))
        return real(path, *a, **kw)

    safe_load.restricted_load = spy
    engine = make_engine(stage, universal)
    try:
        path, _ = safe_load.load_checkpoint(engine, ckpt, tag, load_module_strict=True,
                                            load_optimizer_states=True, load_lr_scheduler_states=True)
        assert path is not None
        out = {"losses": train(engine, steps)}
    except Exception as e:  # noqa: BLE001 - reported to the test
        out = {"error": str(e), "type": type(e).__name__, "refused": getattr(e, "refused", None)}
    finally:
        safe_load.restricted_load = real
    out["read"] = sorted(set(read))
    out["engine"] = type(engine.checkpoint_engine).__name__
    torch.distributed.barrier()
    return out


def run(out: Path, stage: int) -> dict:
    rank = torch.distributed.get_rank()
    d = out / f"zero{stage}"
    ckpt = d / "ckpt"
    marker = d / "MARKER"
    engine = make_engine(stage)
    train(engine, range(3))
    engine.save_checkpoint(str(ckpt), tag="s3")
    res = {"ref": train(engine, (3, 4))}
    del engine
    torch.distributed.barrier()
    res["clean"] = try_resume(stage, ckpt, "s3")

    if rank == 0:
        for kind, pattern in (("optim", "*optim_states.pt"), ("model", "*model_states.pt")):
            shutil.copytree(ckpt / "s3", ckpt / f"evil_{kind}")
            for f in sorted((ckpt / f"evil_{kind}").glob(pattern)):
                plant(f, marker)
    torch.distributed.barrier()
    res["evil_optim"] = try_resume(stage, ckpt, "evil_optim")
    res["evil_model"] = try_resume(stage, ckpt, "evil_model")

    if stage == 3:  # DeepSpeed converts ZeRO-3 without client-supplied universal_checkpoint_info
        uni = ckpt / "s3-universal"
        if rank == 0:
            cmd = [sys.executable, "-m", "megaflamingo.checkpoint.to_universal", "--input_folder", str(ckpt / "s3"),
                   "--output_folder", str(uni), "--num_extract_workers", "1", "--num_merge_workers", "1"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            res["convert_rc"] = r.returncode
            shutil.copytree(uni, ckpt / "evil-universal")
            victim = sorted((ckpt / "evil-universal" / "zero").glob("*/fp32.pt"))[0]
            plant(victim, marker)
            res["victim"] = victim.parent.name
        torch.distributed.barrier()
        res["universal"] = try_resume(stage, ckpt, "s3-universal", universal=True)
        res["evil_universal"] = try_resume(stage, ckpt, "evil-universal", universal=True)
    res["marker_exists"] = marker.exists()
    if stage == 2:
        # Control: DeepSpeed's own load of the same planted shard runs the payload (so the test can fail).
        control = d / "CONTROL"
        if rank == 0:
            shutil.copytree(ckpt / "s3", ckpt / "control")
            for f in sorted((ckpt / "control").glob("*optim_states.pt")):
                plant(f, control)
        torch.distributed.barrier()
        engine = make_engine(stage)
        try:
            engine.load_checkpoint(str(ckpt), tag="control")
        except Exception:  # noqa: BLE001 - only whether the payload ran matters
            pass
        torch.distributed.barrier()
        res["control_marker_exists"] = control.exists()
    return res


def main():
    import deepspeed

    from megaflamingo.engine.distributed import disable_cpu_shm_comm

    disable_cpu_shm_comm()
    deepspeed.init_distributed(dist_backend="gloo")
    out = Path(sys.argv[1])
    results = {f"zero{s}": run(out, int(s)) for s in sys.argv[2].split(",")}
    (out / f"result.rank{torch.distributed.get_rank()}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    from megaflamingo.engine.distributed import shutdown

    try:
        main()
    finally:
        shutdown()
