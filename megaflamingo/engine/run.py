"""Assemble a run from a validated Config: process group, tokenizer, model, loaders, Trainer."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megaflamingo.config import Config

from .build import (build_flamingo, build_loaders, build_lm, build_tokenizer, lm_hidden_size,
                    load_init_weights)
from .distributed import World, device_for, init_distributed
from .ds_config import build_ds_config, zero_stage
from .optim import count_params
from .trainer import Trainer, TrainResult

log = logging.getLogger("megaflamingo.train")


def seed_everything(seed: int, rank: int) -> None:
    # Different dropout streams per rank, reproducible per (seed, rank).
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def memory_estimate(model: torch.nn.Module, ds_config: dict, world_size: int) -> str:
    """DeepSpeed's own estimate of per-GPU model-state memory for this ZeRO stage (1 node)."""
    try:
        stage = zero_stage(ds_config)
        if stage == 3:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

            total = count_params(model.parameters())
            largest = max(count_params(m.parameters(recurse=False)) for m in model.modules())
            import io
            from contextlib import redirect_stdout

            buf = io.StringIO()
            with redirect_stdout(buf):
                estimate_zero3_model_states_mem_needs_all_cold(total, largest, num_gpus_per_node=world_size,
                                                               num_nodes=1)
            return buf.getvalue().strip()
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold
        import io
        from contextlib import redirect_stdout

        buf = io.StringIO()
        with redirect_stdout(buf):
            estimate_zero2_model_states_mem_needs_all_cold(count_params(model.parameters()),
                                                           num_gpus_per_node=world_size, num_nodes=1)
        return buf.getvalue().strip()
    except Exception as e:  # the estimate is advisory
        return f"(memory estimate unavailable: {e})"


def will_resume(cfg: Config) -> bool:
    """True when the Trainer will restore a checkpoint (then ``init_from`` is not applied)."""
    spec = cfg.train.resume
    if spec in ("none", "never", "false", ""):
        return False
    if spec == "auto":
        ckpt = Path(cfg.train.run_dir) / "checkpoints"
        return (ckpt / "latest").is_file() or any(ckpt.glob("step-*/megaflamingo.json"))
    return True


def write_encoder_record(cfg: Config) -> Optional[Path]:
    """``<run_dir>/encoder.json``: which audio encoder (and window layout, clip encoder) made the
    training embeddings, so an exported model dir can embed new audio the same way without the
    training data. All datasets of a blend agree (the data pipeline refuses a mixed blend)."""
    from megaflamingo.data.arrow_format import read_metadata
    from megaflamingo.data.reader import parse_blend_name
    from megaflamingo.inference.load import write_encoder_record as write_record

    root = cfg.data.data_root
    for name in list(cfg.data.blend) + list(cfg.data.valid):
        d = Path(root or ".") / parse_blend_name(name).split_dir
        if (d / "metadata.json").is_file():
            meta = read_metadata(d)
            rec = {k: meta.get(k) for k in ("encoder", "windows", "silence_embedding", "clip_encoder",
                                            "clip_embed_dim")}
            rec["dataset"] = name
            Path(cfg.train.run_dir).mkdir(parents=True, exist_ok=True)
            return write_record(cfg.train.run_dir, rec)
    log.warning("no training dataset metadata found under %s: encoder.json not written", root)
    return None


def run(cfg: Config, world: World, dry_run: bool = False) -> Optional[TrainResult]:
    device = device_for(world)
    init_distributed(world, cfg.train.dist_timeout_s)
    seed_everything(cfg.train.seed, world.rank)
    tok, ids = build_tokenizer(cfg)
    ds_config = build_ds_config(cfg, world.world_size, hidden_size=lm_hidden_size(cfg))
    lm = build_lm(cfg, len(tok), ds_config)
    model = build_flamingo(cfg, lm, ids, ds_config)
    if cfg.train.init_from and not will_resume(cfg):
        info = load_init_weights(model, cfg.train.init_from, world.rank)
        log.info("initialised from %s: %d tensors (%d not in the checkpoint)", cfg.train.init_from,
                 info["loaded"], len(info["missing"]))
    train_loader, valid_loaders = build_loaders(cfg, tok, ids, world.rank, world.world_size)
    if dry_run:
        first = next(iter(train_loader))  # tokenisation, templates and collation work on real rows
        if world.is_main:
            t = cfg.train
            trainable = count_params(p for p in model.parameters() if p.requires_grad)
            frozen = count_params(p for p in model.parameters() if not p.requires_grad)
            print(json.dumps({
                "world_size": world.world_size, "launcher": world.launcher, "zero_stage": zero_stage(ds_config),
                "micro_batch": t.micro_batch_size, "gradient_accumulation": t.gradient_accumulation_steps,
                "global_batch": t.micro_batch_size * t.gradient_accumulation_steps * world.world_size,
                "trainable_params": trainable, "frozen_params": frozen, "precision": t.precision,
                "datasets": list(cfg.data.blend), "valid": list(cfg.data.valid),
                "batches_per_epoch_per_rank": len(train_loader),
                "first_batch_shapes": {k: list(v.shape) for k, v in first.items() if hasattr(v, "shape")},
            }, indent=2))
            print(memory_estimate(model, ds_config, world.world_size))
        return None
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()  # non-reentrant (AudioFlamingo always is)
    trainer = Trainer(cfg, model, train_loader, valid_loaders, world, device, ds_config=ds_config)
    if world.is_main:
        Path(cfg.train.run_dir).mkdir(parents=True, exist_ok=True)
        write_encoder_record(cfg)
        (Path(cfg.train.run_dir) / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
    return trainer.train()
