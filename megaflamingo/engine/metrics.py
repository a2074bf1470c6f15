"""Training metrics: TensorBoard scalars under ``<run_dir>/tensorboard/``, a rank-0 progress bar and a
concise log line. Only rank 0 writes; other ranks get a no-op logger.

Tag names (tests read them back): ``train/loss``, ``train/loss/<dataset>``, ``train/lr``,
``train/grad_norm``, ``train/tokens_per_s``, ``train/samples_per_s``, ``train/fill_rate``, ``train/mfu``,
``train/data_wait_s``, ``train/step_time_s``, ``train/peak_mem_gb``, ``train/nonfinite_skipped``,
``valid/loss``, ``valid/loss/<dataset>``.
"""
from __future__ import annotations

import logging
import resource
import sys
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("megaflamingo.train")


def peak_memory_gb() -> float:
    """Peak GPU memory allocated by torch, or the process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    # ru_maxrss is KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def tag_safe(name: str) -> str:
    return name.replace(" ", "_")


class MetricsLogger:
    def __init__(self, run_dir: str | Path, enabled: bool, total_steps: Optional[int], start_step: int,
                 progress_bar: bool = True):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if v is not None:
                self.writer.add_scalar(tag_safe(k), float(v), step)

    def progress(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}")

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
