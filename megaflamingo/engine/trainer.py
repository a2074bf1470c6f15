"""The training loop: DeepSpeed engine, loss, NaN guard, metrics, validation, checkpoints, signals.

A *step* is one optimizer update = ``gradient_accumulation_steps`` good micro-batches per rank. A
micro-batch whose loss is NaN/inf on ANY rank (agreed by an all-reduce before backward) is dropped on
every rank: no backward, no engine step, so the optimizer, its moments and the LR schedule never see
it; it is counted and logged, and ``train.max_consecutive_nonfinite`` dropped micro-batches in a row
abort the run.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from megaflamingo.config import Config

from . import stop as stop_request
from .checkpointing import CheckpointManager, config_hash, set_rng_state
from .distributed import World, all_reduce_sum, any_rank
from .ds_config import build_ds_config, offload_optimizer_device, zero_stage
from .flops import device_peak_flops, flop_spec
from .metrics import MetricsLogger, peak_memory_gb
from .optim import build_optimizer, count_params, scheduler_factory

log = logging.getLogger("megaflamingo.train")

IGNORE = -100
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


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal LM loss per sample: (sum of token losses [B], number of scored tokens [B]).

    Same convention as HF's ``ForCausalLMLoss``: position t predicts label t+1; -100 is ignored."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    tok = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                          ignore_index=IGNORE, reduction="none").view(shift_labels.shape)
    valid = shift_labels != IGNORE
    return (tok * valid).sum(dim=1), valid.sum(dim=1)


def _sums(loss_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """[sum of token losses, number of scored tokens] as a float64 device tensor (no host sync)."""
    return torch.stack([loss_sum.sum().double(), count.sum().double()])


def _stop_iteration_safe_len(loader) -> Optional[int]:
    try:
        return len(loader)
    except TypeError:
        return None


class Trainer:
    """Owns the DeepSpeed engine built around ``model`` (frozen parameters already marked)."""

    def __init__(self, cfg: Config, model: torch.nn.Module, train_loader: Iterable,
                 valid_loaders: Optional[dict[str, Iterable]], world: World, device: torch.device,
                 hidden_size: Optional[int] = None, ds_config: Optional[dict] = None,
                 ds_json: Optional[dict] = None):
        self.cfg, self.world, self.device = cfg, world, device
        t = cfg.train
        self.run_dir = Path(t.run_dir)
        self.train_loader = train_loader
        self.valid_loaders = valid_loaders or {}
        self.ds_config = ds_config or build_ds_config(cfg, world.world_size, hidden_size, ds_json=ds_json)
        self.ckpt = CheckpointManager(self.run_dir, world.rank, world.world_size, t.keep_last)
        self.total_steps = t.max_steps or self._steps_from_loader()
        self.cfg_hash = config_hash(cfg.to_dict())

        # Resume decision must precede initialize: a world-size change needs the universal loader.
        self.resume_dir: Optional[Path] = None  # where the checkpoint to resume lives (default: ours)
        self.resume_tag, self.universal = self._pick_resume()
        if self.universal:
            # Converted into OUR checkpoint dir; a resume from another run never writes there.
            self.resume_tag = self.ckpt.universal_tag(self.resume_tag, self.resume_dir, t.convert_timeout_s)
            self.resume_dir = None
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True

        import deepspeed

        self.trainable = count_params(p for p in model.parameters() if p.requires_grad)
        self.frozen = count_params(p for p in model.parameters() if not p.requires_grad)
        optimizer = build_optimizer(model, t, offload_optimizer_device(self.ds_config))
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config,
            lr_scheduler=scheduler_factory(t, self.total_steps),
            model_parameters=None, dist_init_required=False)
        self.flops = flop_spec(self.engine.module)
        self.peak_flops, self.peak_source = device_peak_flops(t.precision, t.peak_tflops)
        self.float_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision, torch.float32)
        self.step = 0
        self.epoch = 0
        self.nonfinite_total = 0

    # ------------------------------------------------------------------ setup helpers
    def _steps_from_loader(self) -> Optional[int]:
        n = _stop_iteration_safe_len(self.train_loader)
        if n is None:
            return None
        return max(1, n // self.cfg.train.gradient_accumulation_steps) * self.cfg.train.num_epochs

    def _pick_resume(self) -> tuple[Optional[str], bool]:
        spec = self.cfg.train.resume
        if spec in ("none", "never", "false", ""):
            return None, False
        if spec == "auto":
            tag = self.ckpt.latest_tag()
            if tag is None:
                return None, False
        else:
            p = Path(spec)
            if p.name.startswith("step-") and (p / "megaflamingo.json").is_file():
                self.resume_dir, tag = p.parent, p.name
            elif (p / "latest").is_file():
                self.resume_dir = p
                tag = CheckpointManager(p.parent, self.world.rank, self.world.world_size, 1).latest_tag() \
                    if p.name == "checkpoints" else (p / "latest").read_text().strip()
            else:
                raise FileNotFoundError(f"train.resume={spec!r}: not a checkpoint dir (no latest / megaflamingo.json)")
        meta = self.ckpt.read_meta(tag, self.resume_dir)
        if meta.get("config_hash") not in (None, self.cfg_hash):
            log.warning("resuming from %s whose config hash %s differs from this run's %s",
                        tag, meta.get("config_hash"), self.cfg_hash)
        return tag, int(meta["world_size"]) != self.world.world_size

    def _resume(self) -> None:
        meta, rank_state = self.ckpt.load(self.engine, self.resume_tag, self.universal, self.resume_dir)
        self.step = int(meta["step"])
        self.epoch = int(meta.get("epoch", 0))
        self.nonfinite_total = int(meta.get("nonfinite_skipped", 0))
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
            log.info("resumed from %s at step %d", (self.resume_dir or self.ckpt.dir) / self.resume_tag, self.step)

    def _save(self) -> None:
        loader_state = self.train_loader.state_dict() if hasattr(self.train_loader, "state_dict") else None
        meta = {"config_hash": self.cfg_hash, "epoch": self.epoch, "zero_stage": zero_stage(self.ds_config),
                "nonfinite_skipped": self.nonfinite_total, "time": time.time()}
        self.ckpt.save(self.engine, self.step, meta, {"loader": loader_state, "epoch": self.epoch})

    # ------------------------------------------------------------------ batches
    def _next_batch(self, it):
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
        out["labels"] = batch["labels"].to(self.device, non_blocking=True)
        return out

    def _forward(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        labels = inputs.pop("labels")
        if self.cfg.train.loss_logits == "supervised":
            # Through the engine's forward (ZeRO-3 hooks); the head runs on the supervised rows only.
            out = self.engine(**inputs, labels=labels, loss_logits="supervised")
            return out.loss, out.loss_sum.detach(), out.count.detach()
        out = self.engine(**inputs)
        logits = out.logits if hasattr(out, "logits") else out
        loss_sum, count = token_losses(logits, labels)
        total = count.sum()
        loss = loss_sum.sum() / total.clamp(min=1)
        return loss, loss_sum.detach(), count.detach()

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

    # ------------------------------------------------------------------ loop
    def train(self) -> TrainResult:
        t = self.cfg.train
        if self.total_steps is None:
            raise ValueError("train.max_steps is required when the training loader has no length")
        # Before the (maybe long) checkpoint load. The CLI installed the same handler at start-up already;
        # a flag set there or here is honoured before the first step.
        old_handlers = stop_request.install()
        if self.resume_tag is not None:
            self._resume()
        result = TrainResult(step=self.step, resumed_from=self.resume_tag,
                             nonfinite_skipped=self.nonfinite_total)
        main = self.world.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLogger(self.run_dir, main, self.total_steps, self.step, t.progress_bar)
        if main:
            metrics.line(self.plan_text())
        step_log = self.run_dir / "train_log.jsonl"
        ga = t.gradient_accumulation_steps
        it = iter(self.train_loader)
        consecutive = 0
        window = defaultdict(float)
        # (dataset names, loss_sum, count) per micro-batch, left on the device until the logging step
        per_ds: list[tuple[list[str], torch.Tensor, torch.Tensor]] = []
        t_window = time.perf_counter()
        self.engine.train()
        try:
            if any_rank(stop_request.requested()):
                # Asked to stop during start-up: nothing has been trained since the checkpoint we resumed
                # from (or since initialisation), so there is nothing new to save; exit 75 at once.
                result.stopped_by_signal = True
                stop_request.clear()
                if main:
                    metrics.line(f"stopped by signal before the first step (step {self.step}); no checkpoint "
                                 "written, nothing new to save")
            while not result.stopped_by_signal and self.step < self.total_steps:
                good = 0
                # Device-side until the step ends: one host sync per micro-batch (the non-finite vote,
                # which must decide before backward) and one per step, not one per statistic.
                step_stats = torch.zeros(2, dtype=torch.float64, device=self.device)
                while good < ga:
                    t0 = time.perf_counter()
                    it, batch = self._next_batch(it)
                    window["data_wait"] += time.perf_counter() - t0
                    inputs = self._to_device(batch)
                    B, T = inputs["input_ids"].shape
                    L = inputs["audio_embeds"].shape[1] if "audio_embeds" in inputs else 0
                    loss, loss_sum, count = self._forward(inputs)
                    bad = any_rank(~torch.isfinite(loss.detach()))
                    if bad:
                        consecutive += 1
                        self.nonfinite_total += 1
                        if main:
                            metrics.line(f"step {self.step + 1}: non-finite loss, micro-batch skipped "
                                         f"({consecutive} in a row, {self.nonfinite_total} total)")
                        if consecutive >= t.max_consecutive_nonfinite:
                            raise NonFiniteLossError(
                                f"{consecutive} non-finite losses in a row at step {self.step + 1} (limit "
                                f"train.max_consecutive_nonfinite={t.max_consecutive_nonfinite}); aborting")
                        continue
                    consecutive = 0
                    self.engine.backward(loss * t.loss_multiplier if t.loss_multiplier != 1.0 else loss)
                    self.engine.step()
                    good += 1
                    step_stats += _sums(loss_sum, count)
                    window["samples"] += B
                    mask = batch.get("attention_mask")  # the host copy: no device sync
                    window["tokens"] += float(mask.sum()) if mask is not None else B * T
                    # With supervised-only logits the LM head ran on the supervised rows only, not B*T
                    # (counted on the host copy of the labels, as the model counts them).
                    head_rows = int((batch["labels"][:, 1:] != IGNORE).sum()) if t.loss_logits == "supervised" else None
                    window["flops"] += self.flops.per_batch(B, T, L, head_rows)
                    if batch.get("dataset"):
                        per_ds.append((list(batch["dataset"]), loss_sum, count))
                self.step += 1
                step_sum, step_count = all_reduce_sum(step_stats).tolist()
                step_loss = step_sum / step_count if step_count > 0 else float("nan")
                result.losses.append(step_loss)
                if main:
                    with open(step_log, "a") as f:
                        f.write(json.dumps({"step": self.step, "loss": step_loss}) + "\n")
                    metrics.progress(self.step, step_loss)
                window["loss_sum"] += step_sum
                window["loss_count"] += step_count
                window["steps"] += 1

                if self.step % t.logging_steps == 0 or self.step == self.total_steps:
                    self._log_window(metrics, window, per_ds, time.perf_counter() - t_window)
                    window.clear()
                    per_ds.clear()
                    t_window = time.perf_counter()
                if self.valid_loaders and (self.step % t.eval_steps == 0 or self.step == self.total_steps):
                    result.valid = self.validate()
                    metrics.scalars({f"valid/loss/{k}": v for k, v in result.valid.items()}, self.step)
                    finite = [v for v in result.valid.values() if math.isfinite(v)]
                    if finite:
                        metrics.scalars({"valid/loss": sum(finite) / len(finite)}, self.step)
                    if main:
                        metrics.line(f"step {self.step}: valid " + " ".join(
                            f"{k}={v:.4f}" for k, v in result.valid.items()))
                    t_window = time.perf_counter()  # validation is not training throughput
                stop = any_rank(stop_request.requested())
                if stop or self.step % t.save_steps == 0 or self.step == self.total_steps:
                    self._save()
                if stop:
                    result.stopped_by_signal = True
                    stop_request.clear()
                    if main:
                        metrics.line(f"stopped by signal at step {self.step}; checkpoint saved")
                    break
        finally:
            stop_request.restore(old_handlers)
            metrics.close()
        result.step = self.step
        result.nonfinite_skipped = self.nonfinite_total
        return result

    def _log_window(self, metrics: MetricsLogger, w: dict, per_ds: list, elapsed: float) -> None:
        ws = self.world.world_size
        totals = all_reduce_sum(torch.tensor([w["samples"], w["tokens"], w["flops"], w["data_wait"]],
                                             dtype=torch.float64))
        samples, tokens, flops, data_wait = totals.tolist()
        import torch.distributed as dist

        mine: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        if per_ds:  # one transfer for the whole window
            names = [n for ns, _, _ in per_ds for n in ns]
            sums = torch.cat([ls.double() for _, ls, _ in per_ds]).tolist()
            counts = torch.cat([c.double() for _, _, c in per_ds]).tolist()
            for name, ls, c in zip(names, sums, counts):
                mine[name][0] += ls
                mine[name][1] += c
        gathered = [dict(mine)]
        if dist.is_initialized() and ws > 1:
            gathered = [None] * ws
            dist.all_gather_object(gathered, {k: list(v) for k, v in mine.items()})
        ds_tot: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for g in gathered:
            for k, (s, c) in g.items():
                ds_tot[k][0] += s
                ds_tot[k][1] += c
        if not self.world.is_main:
            return
        loss = w["loss_sum"] / max(w["loss_count"], 1)
        gn = self.engine.get_global_grad_norm()
        lr = self.scheduler.get_last_lr()[0] if self.scheduler is not None else self.cfg.train.lr
        mfu = flops / max(elapsed, 1e-9) / (self.peak_flops * ws) if self.peak_flops == self.peak_flops else None
        vals = {
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": float(gn) if gn is not None else None,
            "train/tokens_per_s": tokens / max(elapsed, 1e-9),
            "train/samples_per_s": samples / max(elapsed, 1e-9),
            "train/mfu": mfu,
            "train/data_wait_s": data_wait / ws / max(w["steps"], 1),
            "train/step_time_s": elapsed / max(w["steps"], 1),
            "train/peak_mem_gb": peak_memory_gb(),
            "train/nonfinite_skipped": self.nonfinite_total,
            "train/epoch": self.epoch,
        }
        vals.update({f"train/loss/{k}": s / c for k, (s, c) in ds_tot.items() if c > 0})
        metrics.scalars(vals, self.step)
        metrics.flush()
        gn_txt = f"{vals['train/grad_norm']:.3f}" if vals["train/grad_norm"] is not None else "n/a"
        mfu_txt = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
        metrics.line(f"step {self.step}/{self.total_steps} loss {loss:.4f} lr {lr:.2e} gnorm {gn_txt} "
                     f"{vals['train/samples_per_s']:.2f} samples/s {vals['train/tokens_per_s']:.0f} tok/s "
                     f"MFU {mfu_txt} data-wait {vals['train/data_wait_s']:.3f}s "
                     f"mem {vals['train/peak_mem_gb']:.2f} GB")

    def plan_text(self) -> str:
        t, ws = self.cfg.train, self.world.world_size
        return (f"world size {ws} ({self.world.launcher}), ZeRO stage {zero_stage(self.ds_config)}, "
                f"micro-batch {t.micro_batch_size} x accumulation {t.gradient_accumulation_steps} x {ws} ranks = "
                f"global batch {t.micro_batch_size * t.gradient_accumulation_steps * ws}; params trainable "
                f"{self.trainable:,} / frozen {self.frozen:,}; {self.total_steps} steps; precision {t.precision}; "
                f"MFU peak: {self.peak_flops / 1e12:.2f} TFLOP/s/device ({self.peak_source})")
