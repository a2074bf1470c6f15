"""The training loop: DeepSpeed engine, loss, NaN guard, metrics, validation, checkpoints, signals.

A *step* is one optimizer update = ``gradient_accumulation_steps`` good micro-batches per rank
(:meth:`Trainer.train_step`); what follows a step (log, validate, save, stop) is
:meth:`Trainer.after_step`. A micro-batch whose loss is NaN/inf on ANY rank (agreed by an all-reduce
before backward) is dropped on every rank: no backward, no engine step, so the optimizer, its moments
and the LR schedule never see it; it is counted and logged, and ``train.max_consecutive_nonfinite``
dropped micro-batches in a row abort the run.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

from megaflamingo.config import Config
from megaflamingo.model.loss import token_losses, weighted_sums

from . import stop as stop_request
from . import tags
from .batch_counts import batch_counts
from .checkpointing import (CheckpointManager, ResumePoint, config_hash, resolve_resume, set_rng_state,
                            verify_on_all_ranks)
from .data_health import DataHealth
from .distributed import World, all_gather_objects, all_reduce_sum, any_rank
from .ds_config import build_ds_config, offload_optimizer_device, zero_stage
from .flops import device_peak_flops, flop_spec
from .log_truncate import tensorboard_purge_step, truncate_jsonl
from .metrics import MetricsLogger
from .optim import build_optimizer, count_params, scheduler_factory

log = logging.getLogger("megaflamingo.train")

MODEL_KEYS = ("input_ids", "attention_mask", "audio_embeds", "audio_mask")
EXIT_SIGNAL = 75  # stopped on SIGUSR1/SIGTERM after saving a checkpoint: requeue me (EX_TEMPFAIL)


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # global mean loss of each step run here
    nonfinite_skipped: int = 0
    stopped_by_signal: bool = False
    resumed_from: Optional[str] = None
    valid: dict[str, float] = field(default_factory=dict)
    eval: dict[str, dict[str, float]] = field(default_factory=dict)  # last task eval: benchmark -> metric -> value


@dataclass
class StepStats:
    """What optimizer steps did on this rank; ``loss_sum``/``count`` are already summed over ranks.
    One step's, or (in a :class:`Window`) those of the steps between two log lines."""

    loss_sum: float = 0.0
    count: float = 0.0
    samples: float = 0.0
    tokens: float = 0.0
    positions: float = 0.0  # every position computed, padding included (tokens / positions = fill rate)
    flops: float = 0.0
    data_wait_s: float = 0.0
    # (dataset names, per-sample loss sums, per-sample counts) per micro-batch, left on the device
    # until the logging step (one transfer per window, not per micro-batch).
    per_dataset: list[tuple[list[str], torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count if self.count > 0 else float("nan")

    def add(self, other: "StepStats") -> None:
        for f in ("loss_sum", "count", "samples", "tokens", "positions", "flops", "data_wait_s"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.per_dataset.extend(other.per_dataset)


@dataclass
class Window:
    """Steps accumulated between two log lines."""

    steps: int = 0
    total: StepStats = field(default_factory=StepStats)
    started: float = field(default_factory=time.perf_counter)

    def add(self, s: StepStats) -> None:
        self.steps += 1
        self.total.add(s)


def _sums(loss_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """[sum of token losses, number of scored tokens] as a float64 device tensor (no host sync)."""
    return torch.stack([loss_sum.sum().double(), count.sum().double()])


def _len_or_none(loader) -> Optional[int]:
    """``len(loader)``, or None for a loader without a length (an endless stream)."""
    try:
        return len(loader)
    except TypeError:
        return None


class Trainer:
    """Owns the DeepSpeed engine built around ``model`` (frozen parameters already marked)."""

    def __init__(self, cfg: Config, model: torch.nn.Module, train_loader: Iterable,
                 valid_loaders: Optional[dict[str, Iterable]], world: World, device: torch.device,
                 hidden_size: Optional[int] = None, ds_config: Optional[dict] = None,
                 ds_json: Optional[dict] = None, task_eval=None):
        self.cfg, self.world, self.device = cfg, world, device
        self.task_eval = task_eval  # engine.evaluation.TaskEval or None
        t = cfg.train
        self.run_dir = Path(t.run_dir)
        self.train_loader = train_loader
        self.valid_loaders = valid_loaders or {}
        self.ds_config = ds_config or build_ds_config(cfg, world.world_size, hidden_size, ds_json=ds_json)
        self.ckpt = CheckpointManager(self.run_dir, world.rank, world.world_size, t.keep_last)
        self.total_steps = t.max_steps or self._steps_from_loader()
        self.cfg_hash = config_hash(cfg.to_dict())
        # Decided before initialize: a world-size change needs DeepSpeed's universal loader.
        self.resume, self.universal = self._plan_resume()

        import deepspeed

        self.trainable = count_params(p for p in model.parameters() if p.requires_grad)
        self.frozen = count_params(p for p in model.parameters() if not p.requires_grad)
        optimizer = build_optimizer(model, t, offload_optimizer_device(self.ds_config))
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config,
            lr_scheduler=scheduler_factory(t, self.total_steps),
            model_parameters=None, dist_init_required=False)
        self.flops = flop_spec(self.engine.module)
        self.gates = tags.gated_blocks(self.engine.module)
        self.peak_flops, self.peak_source = device_peak_flops(t.precision, t.peak_tflops)
        self.float_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision, torch.float32)
        self.step = 0
        self.epoch = 0
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self.health = DataHealth(t)

    # ------------------------------------------------------------------ setup helpers
    def _steps_from_loader(self) -> Optional[int]:
        n = _len_or_none(self.train_loader)
        if n is None:
            return None
        return max(1, n // self.cfg.train.gradient_accumulation_steps) * self.cfg.train.num_epochs

    def _plan_resume(self) -> tuple[Optional[ResumePoint], bool]:
        point = resolve_resume(self.cfg.train.resume, self.run_dir, verify=verify_on_all_ranks)
        if point is None:
            return None, False
        meta = point.meta()
        if meta.get("config_hash") not in (None, self.cfg_hash):
            log.warning("resuming from %s whose config hash %s differs from this run's %s",
                        point.path, meta.get("config_hash"), self.cfg_hash)
        universal = int(meta["world_size"]) != self.world.world_size
        if universal:
            # Converted into OUR checkpoint dir; a resume from another run never writes there.
            tag = self.ckpt.universal_tag(point.tag, point.dir, self.cfg.train.convert_timeout_s)
            point = ResumePoint(self.ckpt.dir, tag, point.skipped, point.note)
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        return point, universal

    def _resume(self) -> None:
        meta, rank_state = self.ckpt.load(self.engine, self.resume.tag, self.universal, self.resume.dir)
        self.step = int(meta["step"])
        self.epoch = int(meta.get("epoch", 0))
        self.nonfinite_total = int(meta.get("nonfinite_skipped", 0))
        self.health.load_state_dict(meta.get("data_health"))
        if rank_state is not None:
            if rank_state.get("loader") is not None and hasattr(self.train_loader, "load_state_dict"):
                self.train_loader.load_state_dict(rank_state["loader"])
            set_rng_state(rank_state["rng"])
        else:
            log.warning("world size changed (%s -> %s): weights and optimizer restored through the universal "
                        "checkpoint; the data order restarts from the seed at epoch %d",
                        meta["world_size"], self.world.world_size, self.epoch)
            if self.epoch > 0 and hasattr(self.train_loader, "set_epoch"):
                self.train_loader.set_epoch(self.epoch)
        if self.world.is_main:
            log.info("resumed from %s at step %d", self.resume.path, self.step)

    def _save(self) -> None:
        loader_state = self.train_loader.state_dict() if hasattr(self.train_loader, "state_dict") else None
        meta = {"config_hash": self.cfg_hash, "epoch": self.epoch, "zero_stage": zero_stage(self.ds_config),
                "nonfinite_skipped": self.nonfinite_total, "data_health": self.health.state_dict(),
                "time": time.time()}
        self.ckpt.save(self.engine, self.step, meta, {"loader": loader_state, "epoch": self.epoch})

    # ------------------------------------------------------------------ batches
    def _next_batch(self, it: Iterator) -> tuple[Iterator, dict]:
        try:
            return it, next(it)
        except StopIteration:
            self.epoch += 1
            if hasattr(self.train_loader, "set_epoch"):
                self.train_loader.set_epoch(self.epoch)
            it = iter(self.train_loader)
            try:
                return it, next(it)
            except StopIteration:
                raise RuntimeError("the training loader yields no batches (empty dataset for this rank?)") from None

    def _to_device(self, batch: dict) -> dict:
        out = {}
        for k in MODEL_KEYS:
            v = batch.get(k)
            if v is None:
                continue
            v = v.to(self.device, non_blocking=True)
            if v.is_floating_point():
                v = v.to(self.float_dtype)
            out[k] = v
        if batch.get("layout") is not None:  # packed rows: the segment layout (index tensors, not cast)
            out["layout"] = batch["layout"].to(self.device, non_blocking=True)
        out["labels"] = batch["labels"].to(self.device, non_blocking=True)
        return out

    def _forward(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        labels = inputs.pop("labels")
        t = self.cfg.train
        if t.loss_logits == "supervised" or "layout" in inputs:
            # Through the engine's forward (ZeRO-3 hooks); per-sample sums come back (a packed row holds
            # several samples); with "supervised" the head runs on the supervised rows only.
            out = self.engine(**inputs, labels=labels, loss_logits=t.loss_logits, loss_weighting=t.loss_weighting,
                              loss_head=t.loss_head)
            return out.loss, out.loss_sum.detach(), out.count.detach()
        out = self.engine(**inputs)
        logits = out.logits if hasattr(out, "logits") else out
        loss_sum, count = token_losses(logits, labels)
        return weighted_sums(loss_sum, count, t.loss_weighting), loss_sum.detach(), count.detach()

    def _skip_nonfinite(self, metrics: MetricsLogger) -> None:
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        limit = self.cfg.train.max_consecutive_nonfinite
        if self.world.is_main:
            metrics.line(f"step {self.step + 1}: non-finite loss, micro-batch skipped "
                         f"({self.nonfinite_in_a_row} in a row, {self.nonfinite_total} total)")
        if self.nonfinite_in_a_row >= limit:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} non-finite losses in a row at step {self.step + 1} (limit "
                f"train.max_consecutive_nonfinite={limit}); aborting")
        over = self.health.micro_batch(finite=False)
        if over is not None:
            raise NonFiniteLossError(f"step {self.step + 1}: {over}")

    # ------------------------------------------------------------------ one step
    def train_step(self, it: Iterator, metrics: MetricsLogger) -> tuple[Iterator, StepStats]:
        """One optimizer update: ``gradient_accumulation_steps`` good micro-batches. Device-side until
        the step ends: one host sync per micro-batch (the non-finite vote, which must decide before
        backward) and one per step, not one per statistic."""
        t = self.cfg.train
        stats = StepStats()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        good = 0
        while good < t.gradient_accumulation_steps:
            t0 = time.perf_counter()
            it, batch = self._next_batch(it)
            stats.data_wait_s += time.perf_counter() - t0
            inputs = self._to_device(batch)
            loss, loss_sum, count = self._forward(inputs)
            if any_rank(~torch.isfinite(loss.detach())):
                self._skip_nonfinite(metrics)
                continue
            self.nonfinite_in_a_row = 0
            self.health.micro_batch(finite=True)
            self.engine.backward(loss * t.loss_multiplier if t.loss_multiplier != 1.0 else loss)
            self.engine.step()
            good += 1
            sums += _sums(loss_sum, count)
            c = batch_counts(batch, self.flops, t.loss_logits == "supervised")  # the host copy: no device sync
            stats.samples += c.samples
            stats.tokens += c.tokens
            stats.positions += c.positions
            stats.flops += c.flops
            if batch.get("dataset"):
                stats.per_dataset.append((list(batch["dataset"]), loss_sum, count))
        stats.loss_sum, stats.count = all_reduce_sum(sums).tolist()
        return it, stats

    # ------------------------------------------------------------------ after a step
    def after_step(self, stats: StepStats, window: Window, result: TrainResult, metrics: MetricsLogger) -> Window:
        """Record the step; log, validate and save when due; honour a stop request. Returns the
        window to accumulate the next steps into."""
        t, main = self.cfg.train, self.world.is_main
        result.losses.append(stats.loss)
        if main:
            with open(self.run_dir / "train_log.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, "loss": stats.loss}) + "\n")
            metrics.progress(self.step, stats.loss)
        window.add(stats)
        last = self.step == self.total_steps
        # The first step this process runs is logged too, so the start of a run (warm-up) is visible.
        if self.step % t.logging_steps == 0 or last or len(result.losses) == 1:
            metrics.scalars({tags.BAD_ROWS: self.health.check_rows(self.train_loader)}, self.step)
            self._log_window(metrics, window, time.perf_counter() - window.started)
            window = Window()
        if (self.valid_loaders or self.task_eval is not None) and (self.step % t.eval_steps == 0 or last):
            t0 = time.perf_counter()
            if self.valid_loaders:
                result.valid = self.validate()
                self._log_validation(metrics, result.valid, time.perf_counter() - t0)
            if self.task_eval is not None:
                result.eval = self._task_eval(metrics)
            window.started += time.perf_counter() - t0  # evaluation is not training throughput
        stop = any_rank(stop_request.requested())
        if stop or self.step % t.save_steps == 0 or last:
            self._save()
        if stop:
            result.stopped_by_signal = True
            stop_request.clear()
            if main:
                metrics.line(f"stopped by signal at step {self.step}; checkpoint saved")
        return window

    # ------------------------------------------------------------------ loop
    def train(self) -> TrainResult:
        if self.total_steps is None:
            raise ValueError("train.max_steps is required when the training loader has no length")
        # Before the (maybe long) checkpoint load. The CLI installed the same handler at start-up already;
        # a flag set there or here is honoured before the first step.
        old_handlers = stop_request.install()
        metrics = None
        try:
            if self.resume is not None:
                self._resume()
            result = TrainResult(step=self.step, resumed_from=self.resume.tag if self.resume else None,
                                 nonfinite_skipped=self.nonfinite_total)
            if self.world.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                # What a dead run logged past the step we continue from is superseded.
                truncate_jsonl(self.run_dir / "train_log.jsonl", self.step)
            metrics = MetricsLogger(self.run_dir, self.world.is_main, self.total_steps, self.step,
                                    self.cfg.train.progress_bar, purge_step=tensorboard_purge_step(self.step))
            metrics.line(self.plan_text())
            if self.resume is not None and self.resume.skipped:
                metrics.text(tags.RESUME_TEXT, "\n\n".join(self.resume.skipped + (
                    f"resumed from {self.resume.path}",)), self.step)
            self._describe_run(metrics)
            if any_rank(stop_request.requested()):
                # Asked to stop during start-up: nothing has been trained since the checkpoint we resumed
                # from (or since initialisation), so there is nothing new to save; exit 75 at once.
                result.stopped_by_signal = True
                stop_request.clear()
                metrics.line(f"stopped by signal before the first step (step {self.step}); no checkpoint "
                             "written, nothing new to save")
            it, window = iter(self.train_loader), Window()
            self.engine.train()
            while not result.stopped_by_signal and self.step < self.total_steps:
                it, stats = self.train_step(it, metrics)
                self.step += 1
                window = self.after_step(stats, window, result, metrics)
        finally:
            stop_request.restore(old_handlers)
            if metrics is not None:
                metrics.close()
        result.step = self.step
        result.nonfinite_skipped = self.nonfinite_total
        return result

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.engine.eval()
        results = {}
        cap = self.cfg.train.eval_max_batches
        for name, loader in self.valid_loaders.items():
            it = iter(loader)
            stats = torch.zeros(2, dtype=torch.float64, device=self.device)
            n = 0
            while cap is None or n < cap:
                batch = next(it, None)
                # ZeRO-3 forwards are collective: every rank runs the same number of them.
                if any_rank(batch is None):
                    break
                _, loss_sum, count = self._forward(self._to_device(batch))
                stats += _sums(loss_sum, count)
                n += 1
            total, scored = all_reduce_sum(stats).tolist()
            results[name] = total / scored if scored > 0 else float("nan")
        self.engine.train()
        return results

    def _log_validation(self, metrics: MetricsLogger, valid: dict[str, float], seconds: float) -> None:
        metrics.scalars({tags.loss_tag("valid", k): v for k, v in valid.items()}, self.step)
        finite = [v for v in valid.values() if math.isfinite(v)]
        if finite:
            metrics.scalars({tags.LOSS_VALID: sum(finite) / len(finite)}, self.step)
        metrics.scalars({tags.VALID_S: seconds}, self.step)
        metrics.line(f"step {self.step}: valid " + " ".join(f"{k}={v:.4f}" for k, v in valid.items()))

    def _task_eval(self, metrics: MetricsLogger) -> dict[str, dict[str, float]]:
        """Generation-based task metrics (every rank generates; rank 0 scores and logs)."""
        res = self.task_eval.run(self.engine.module)
        self.engine.train()
        if self.world.is_main:
            for bench, vals in res.metrics.items():
                metrics.scalars({tags.eval_tag(bench, m): v for m, v in vals.items() if isinstance(v, (int, float))},
                                self.step)
                metrics.text(tags.eval_tag(bench, "samples"), res.samples[bench], self.step)
            metrics.scalars({tags.EVAL_S: res.seconds}, self.step)
            with open(self.run_dir / "eval_log.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, **res.metrics}, default=str) + "\n")
            metrics.line(f"step {self.step}: eval " + " ".join(
                f"{b}/{m}={v:.4f}" for b, vals in res.metrics.items() for m, v in vals.items()
                if isinstance(v, float)) + f" ({res.seconds:.1f}s)")
        return res.metrics

    # ------------------------------------------------------------------ logging
    def _describe_run(self, metrics: MetricsLogger) -> None:
        """Once per start: the resolved config (HPARAMS tab and a text card) and the chart layout."""
        config = self.cfg.to_dict()
        watched = [tags.LOSS_TRAIN, tags.LOSS_VALID]
        if self.task_eval is not None:
            watched += [tags.eval_tag(s.bench.name, s.bench.primary) for s in self.task_eval.suites]
            metrics.line(self.task_eval.describe())
        metrics.hparams(tags.flat_hparams(config), watched)
        metrics.text("config", "```json\n" + json.dumps(config, indent=2, default=str) + "\n```", self.step)
        metrics.layout(tags.LAYOUT)

    def _dataset_losses(self, per_dataset: list) -> dict[str, float]:
        """Mean token loss per dataset over the window, summed over ranks (one transfer per rank)."""
        mine: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        if per_dataset:
            names = [n for ns, _, _ in per_dataset for n in ns]
            sums = torch.cat([ls.double() for _, ls, _ in per_dataset]).tolist()
            counts = torch.cat([c.double() for _, _, c in per_dataset]).tolist()
            for name, ls, c in zip(names, sums, counts):
                mine[name][0] += ls
                mine[name][1] += c
        total: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for part in all_gather_objects({k: list(v) for k, v in mine.items()}):
            for k, (s, c) in part.items():
                total[k][0] += s
                total[k][1] += c
        return {k: s / c for k, (s, c) in total.items() if c > 0}

    def _log_window(self, metrics: MetricsLogger, w: Window, elapsed: float) -> None:
        ws, t = self.world.world_size, w.total
        samples, tokens, positions, flops, data_wait = all_reduce_sum(
            torch.tensor([t.samples, t.tokens, t.positions, t.flops, t.data_wait_s], dtype=torch.float64)).tolist()
        per_ds = self._dataset_losses(t.per_dataset)
        gates = tags.gate_values(self.gates)  # a collective only if a user's JSON partitions the gates
        if not self.world.is_main:
            return
        elapsed = max(elapsed, 1e-9)
        gn = self.engine.get_global_grad_norm()
        lr = self.scheduler.get_last_lr()[0] if self.scheduler is not None else self.cfg.train.lr
        mfu = 100 * flops / elapsed / (self.peak_flops * ws) if not math.isnan(self.peak_flops) else None
        vals = {
            tags.LOSS_TRAIN: t.loss_sum / max(t.count, 1),
            tags.LR: lr,
            tags.GRAD_NORM: float(gn) if gn is not None else None,
            tags.TOKENS_PER_S: tokens / elapsed,
            tags.SAMPLES_PER_S: samples / elapsed,
            tags.FILL_RATE: tokens / positions if positions else None,
            tags.MFU_PCT: mfu,
            tags.DATA_WAIT_S: data_wait / ws / max(w.steps, 1),
            tags.STEP_S: elapsed / max(w.steps, 1),
            tags.NONFINITE: self.nonfinite_total,
            tags.EPOCH: self.epoch,
            **tags.memory_values(),
            **gates,
        }
        vals.update({tags.loss_tag("train", k): v for k, v in per_ds.items()})
        metrics.scalars(vals, self.step)
        metrics.flush()
        gn_txt = f"{vals[tags.GRAD_NORM]:.3f}" if vals[tags.GRAD_NORM] is not None else "n/a"
        mfu_txt = f"{mfu:.1f}%" if mfu is not None else "n/a"
        mem = next(v for k, v in vals.items() if k.startswith("memory/"))  # allocated (GPU) or RSS (CPU)
        metrics.line(f"step {self.step}/{self.total_steps} loss {vals[tags.LOSS_TRAIN]:.4f} lr {lr:.2e} gnorm {gn_txt} "
                     f"{vals[tags.SAMPLES_PER_S]:.2f} samples/s {vals[tags.TOKENS_PER_S]:.0f} tok/s "
                     f"MFU {mfu_txt} data-wait {vals[tags.DATA_WAIT_S]:.3f}s mem {mem:.2f} GB")

    def plan_text(self) -> str:
        t, ws = self.cfg.train, self.world.world_size
        notes = "".join(f"\nconfig note: {n}" for n in self.cfg.notes)
        return (f"world size {ws} ({self.world.launcher}), ZeRO stage {zero_stage(self.ds_config)}, "
                f"micro-batch {t.micro_batch_size} x accumulation {t.gradient_accumulation_steps} x {ws} ranks = "
                f"global batch {t.micro_batch_size * t.gradient_accumulation_steps * ws}; params trainable "
                f"{self.trainable:,} / frozen {self.frozen:,}; {self.total_steps} steps; precision {t.precision}; "
                f"MFU peak: {self.peak_flops / 1e12:.2f} TFLOP/s/device ({self.peak_source})" + notes)
