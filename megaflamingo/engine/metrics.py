"""Training metrics: TensorBoard scalars under ``<run_dir>/tensorboard/``, a rank-0 progress bar and a
concise log line. Only rank 0 writes; other ranks get a no-op logger.

Tag names and families: :mod:`megaflamingo.engine.tags`.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional, Sequence


log = logging.getLogger("megaflamingo.train")


def tag_safe(name: str) -> str:
    return name.replace(" ", "_")


class MetricsLogger:
    def __init__(self, run_dir: str | Path, enabled: bool, total_steps: Optional[int], start_step: int,
                 progress_bar: bool = True, purge_step: Optional[int] = None):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides what earlier event files logged at steps >= it (a resumed run
        # logs those steps again).
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=purge_step)
        if progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if v is not None:
                self.writer.add_scalar(tag_safe(k), float(v), step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag_safe(tag), text, step)

    def hparams(self, hparams: dict, metric_tags: Sequence[str]) -> None:
        """The run's settings in TensorBoard's HPARAMS tab, with ``metric_tags`` (scalars) beside them.
        Written into this run's own event file: ``SummaryWriter.add_hparams`` would start a sub-run."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        for summary in hparams_summaries(hparams, {t: 0.0 for t in metric_tags}):
            self.writer.file_writer.add_summary(summary)

    def layout(self, layout: dict) -> None:
        """TensorBoard's Custom Scalars tab (several tags in one chart)."""
        if self.writer is not None:
            self.writer.add_custom_scalars(layout)

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
