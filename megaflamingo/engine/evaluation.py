"""Task metrics during training: generation on ``train.eval_benchmarks`` every ``train.eval_steps``.

The benchmarks come from the evaluation registry (``megaflamingo.eval``; ``train.eval_registry`` adds
files), each cut to its first ``train.eval_max_items`` items and rendered in the run's own trained
form, once, before training starts (an unknown name or a missing split is a pre-flight error). At
each evaluation every rank generates its share (items r, r+W, ...) with the model being trained and
rank 0 scores them with the registry's metrics. Under ZeRO-3 every forward is collective, so every
rank calls generate equally often (``megaflamingo.eval.evaluate.generate_records``, collective) and
items the model would refuse are dropped up front, identically on every rank.

Decoding is the registry's (AF1's settings) unless ``train.eval_max_new_tokens`` /
``train.eval_num_beams`` override it, and METEOR is left out (see below): these numbers show a trend
during training; the comparison with the paper is ``megaflamingo-eval`` on the finished model.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from megaflamingo.config import Config
from megaflamingo.errors import ConfigError

log = logging.getLogger("megaflamingo.train")

SAMPLES_SHOWN = 4  # predictions per benchmark in the TensorBoard text summary


@dataclass
class Suite:
    bench: object  # megaflamingo.eval.registry.Benchmark, decoding overrides applied
    items: list
    info: dict


@dataclass
class TaskEvalResult:
    """Rank 0's view (other ranks get empty dicts): benchmark -> metric -> value, and per benchmark a
    markdown table of the first predictions beside their references."""

    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


class TaskEval:
    def __init__(self, suites: list[Suite], loaded, batch_size: int):
        self.suites, self.loaded, self.batch_size = suites, loaded, batch_size
        self.checked = False
        self.comms = None  # made at the first evaluation (on NCCL a gloo group of its own: once, not per call)

    @classmethod
    def from_config(cls, cfg: Config, tokenizer, tokens) -> Optional["TaskEval"]:
        """None when ``train.eval_benchmarks`` is empty; errors name the config field."""
        t = cfg.train
        if not t.eval_benchmarks:
            return None
        from megaflamingo.checkpoint.model_dir import LoadedModel, encoder_record_from_dataset, training_encoder_record
        from megaflamingo.eval.items import build_items
        from megaflamingo.eval.registry import RegistryError, load_registry, split_dir
        from megaflamingo.inference.prompts import TrainingForm

        try:
            benches = load_registry(t.eval_registry).select(list(t.eval_benchmarks), cfg.data.data_root)
        except (RegistryError, OSError) as e:
            raise ConfigError(f"train.eval_benchmarks / train.eval_registry: {e}") from None
        # The encoder record (its silence embedding pads the audio slots): the training data's, else
        # the first benchmark split's (its windows are what the model gets).
        record = training_encoder_record(cfg) or encoder_record_from_dataset(split_dir(cfg.data.data_root, benches[0]))
        form, suites = TrainingForm.of(cfg), []
        for b in benches:
            b = b.with_decoding(max_new_tokens=t.eval_max_new_tokens, num_beams=t.eval_num_beams)
            if "meteor" in b.metrics and b.primary != "meteor" and len(b.metrics) > 1:
                # Its jar loads a 60 MB paraphrase table on every call (tens of seconds per evaluation);
                # megaflamingo-eval on the finished model reports it.
                b = dataclasses.replace(b, metrics=tuple(m for m in b.metrics if m != "meteor"))
            items, info = build_items(b, cfg.data.data_root, tokenizer, form, limit=t.eval_max_items)
            if not items:
                raise ConfigError(f"train.eval_benchmarks: {b.name} ({b.split}) has no items")
            suites.append(Suite(b, items, info))
        loaded = LoadedModel(model=None, tokenizer=tokenizer, tokens=tokens, config=cfg, encoder=record,
                             source=t.run_dir, kind="training")
        return cls(suites, loaded, t.eval_batch_size or t.micro_batch_size)

    def describe(self) -> str:
        return "task eval: " + ", ".join(f"{s.bench.name} ({len(s.items)} items, {s.info['rendering']})"
                                         for s in self.suites)

    @torch.no_grad()
    def run(self, model: torch.nn.Module) -> TaskEvalResult:
        """Generate and score every suite with ``model`` (the engine's module); call on every rank.
        Leaves the model in eval mode: the caller puts it back to training."""
        from megaflamingo.eval.evaluate import Comms, generate_records, result_entry
        from megaflamingo.inference.runner import GenerationSettings, Runner

        t0 = time.perf_counter()
        if self.comms is None:
            self.comms = Comms.current()
        comms = self.comms
        self.loaded.model = model
        out = TaskEvalResult()
        for suite in self.suites:
            runner = Runner(self.loaded, GenerationSettings(**dict(suite.bench.decoding)))
            if not self.checked:
                suite.items = self._acceptable(runner, suite)
            records = generate_records(runner, suite.items, comms, self.batch_size, collective=True)
            if comms.is_main:
                by_id = {r["id"]: r for r in records}
                ordered = [by_id[it.id] for it in suite.items]
                out.metrics[suite.bench.name] = result_entry(suite.bench, ordered, suite.info)["metrics"]
                out.samples[suite.bench.name] = samples_markdown(ordered[:SAMPLES_SHOWN])
        self.checked = True
        self.loaded.model = None
        out.seconds = time.perf_counter() - t0
        return out

    @staticmethod
    def _acceptable(runner, suite: Suite) -> list:
        """The items the model takes (prompt within its context, audio within its slots): the same
        on every rank, so the collective generate calls stay paired."""
        from megaflamingo.inference.runner import Query

        keep = []
        for it in suite.items:
            try:
                runner.build_batch([Query(it.text, it.audios, id=it.id)])
                keep.append(it)
            except ValueError as e:
                log.warning("task eval %s: item %s left out: %s", suite.bench.name, it.id, e)
        if not keep:
            raise ValueError(f"task eval {suite.bench.name}: the model takes none of its items")
        return keep


def samples_markdown(records: list[dict]) -> str:
    """A markdown table: what the model was asked, what it answered, the references."""
    def cell(x) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ⏎ ").strip() or "(empty)"

    rows = ["| prompt | prediction | references |", "|---|---|---|"]
    rows += [f"| {cell(r.get('prompt', ''))} | {cell(r.get('prediction', r.get('error', '')))} | "
             f"{cell(' / '.join(r.get('references', [])))} |" for r in records]
    return "\n".join(rows)
