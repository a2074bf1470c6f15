"""Assemble a run from a validated Config: process group, tokenizer, model, loaders, Trainer."""
from __future__ import annotations

import io
import json
import logging
import random
from contextlib import redirect_stdout
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megaflamingo.config import Config

from megaflamingo.checkpoint.model_dir import training_encoder_record, write_encoder_record
from megaflamingo.io import atomic_write_text

from .build import build_loaders, build_run_model, build_run_tokenizer, lm_hidden_size, load_init_weights
from .checkpointing import resolve_resume, verify_on_all_ranks
from .distributed import World, device_for, init_distributed
from .evaluation import TaskEval
from .ds_config import build_ds_config, zero_stage
from .optim import count_params
from .run_lock import take_run_lock
from .trainer import Trainer, TrainResult

log = logging.getLogger("megaflamingo.train")


def seed_everything(seed: int, rank: int) -> None:
    # Different dropout streams per rank, reproducible per (seed, rank).
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def memory_estimate(model: torch.nn.Module, ds_config: dict, world_size: int) -> str:
    """DeepSpeed's own estimate of per-GPU model-state memory for this ZeRO stage (1 node)."""
    buf = io.StringIO()
    try:
        with redirect_stdout(buf):
            if zero_stage(ds_config) == 3:
                from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

                largest = max(count_params(m.parameters(recurse=False)) for m in model.modules())
                estimate_zero3_model_states_mem_needs_all_cold(count_params(model.parameters()), largest,
                                                               num_gpus_per_node=world_size, num_nodes=1)
            else:
                from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

                estimate_zero2_model_states_mem_needs_all_cold(count_params(model.parameters()),
                                                               num_gpus_per_node=world_size, num_nodes=1)
    except Exception as e:  # the estimate is advisory
        return f"(memory estimate unavailable: {e})"
    return buf.getvalue().strip()


def record_encoder(cfg: Config) -> Optional[Path]:
    """``<run_dir>/encoder.json``: which audio encoder (and window layout, clip encoder) made the
    training embeddings, so an exported model dir can embed new audio the same way without the
    training data."""
    rec = training_encoder_record(cfg)
    if rec is None:
        log.warning("no training dataset metadata found under %s: encoder.json not written", cfg.data.data_root)
        return None
    Path(cfg.train.run_dir).mkdir(parents=True, exist_ok=True)
    return write_encoder_record(cfg.train.run_dir, rec)


def print_plan(cfg: Config, world: World, model: torch.nn.Module, ds_config: dict, train_loader, first: dict,
               task_eval: Optional[TaskEval] = None, as_json: bool = False) -> None:
    """What ``--dry-run`` prints: the run's shape as JSON, then DeepSpeed's memory estimate (``as_json``:
    one JSON document, the estimate under ``memory_estimate``)."""
    t = cfg.train
    plan = {
        "world_size": world.world_size, "launcher": world.launcher, "zero_stage": zero_stage(ds_config),
        "micro_batch": t.micro_batch_size, "gradient_accumulation": t.gradient_accumulation_steps,
        "global_batch": t.micro_batch_size * t.gradient_accumulation_steps * world.world_size,
        "trainable_params": count_params(p for p in model.parameters() if p.requires_grad),
        "frozen_params": count_params(p for p in model.parameters() if not p.requires_grad),
        "precision": t.precision, "datasets": list(cfg.data.blend), "valid": list(cfg.data.valid),
        "batches_per_epoch_per_rank": len(train_loader),
        "first_batch_shapes": {k: list(v.shape) for k, v in first.items() if hasattr(v, "shape")},
        "config_notes": list(cfg.notes),
        "eval_benchmarks": {s.bench.name: len(s.items) for s in task_eval.suites} if task_eval else {},
    }
    estimate = memory_estimate(model, ds_config, world.world_size)
    if as_json:
        print(json.dumps(dict(plan, memory_estimate=estimate), indent=2))
    else:
        print(json.dumps(plan, indent=2))
        print(estimate)


def run(cfg: Config, world: World, dry_run: bool = False, plan_json: bool = False) -> Optional[TrainResult]:
    """The run on this rank. One job per run dir: global rank 0 takes ``<run_dir>/.lock`` (a second job
    on the same dir exits with RunLockedError naming the holder); a dry run writes nothing and locks
    nothing."""
    device = device_for(world)
    init_distributed(world, cfg.train.dist_timeout_s)
    lock = None
    if not dry_run:
        lock, warning = take_run_lock(cfg.train.run_dir, world.rank)
        if warning:
            log.warning("%s", warning)
    try:
        return _run(cfg, world, device, dry_run, plan_json)
    finally:
        if lock is not None:
            lock.release()


def _run(cfg: Config, world: World, device: torch.device, dry_run: bool,
         plan_json: bool = False) -> Optional[TrainResult]:
    # Verified before anything is built (every rank checks its share); the trainer asks again and
    # gets the same, remembered verdict.
    resume = resolve_resume(cfg.train.resume, cfg.train.run_dir, verify=verify_on_all_ranks)
    seed_everything(cfg.train.seed, world.rank)
    tok, ids = build_run_tokenizer(cfg)
    ds_config = build_ds_config(cfg, world.world_size, hidden_size=lm_hidden_size(cfg))
    model = build_run_model(cfg, tok, ids, ds_config)
    if cfg.train.init_from and resume is None:
        info = load_init_weights(model, cfg.train.init_from, world.rank)
        log.info("initialised from %s: %d tensors (%d not in the checkpoint)", cfg.train.init_from,
                 info["loaded"], len(info["missing"]))
    train_loader, valid_loaders = build_loaders(cfg, tok, ids, world.rank, world.world_size)
    task_eval = TaskEval.from_config(cfg, tok, ids)  # benchmarks checked and rendered before any step
    if dry_run:
        # Tokenisation, templates and collation work on real rows.
        first = next(iter(train_loader))
        if world.is_main:
            print_plan(cfg, world, model, ds_config, train_loader, first, task_eval, plan_json)
        return None
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()  # non-reentrant (AudioFlamingo always is)
    trainer = Trainer(cfg, model, train_loader, valid_loaders, world, device, ds_config=ds_config, task_eval=task_eval)
    if world.is_main:
        record_encoder(cfg)
        atomic_write_text(Path(cfg.train.run_dir) / "config.json", json.dumps(cfg.to_dict(), indent=2, default=str))
    return trainer.train()
