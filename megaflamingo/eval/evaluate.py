"""Run benchmarks on a model: one process or many (torchrun / srun / mpirun), resumable.

Per benchmark: every rank builds the same item list, rank 0 opens (or repairs, on ``resume``) the
predictions file and tells the others which ids are done; the remaining items are dealt
round-robin over the ranks, each rank generates its share in batches, and after every batch the
ranks' records are gathered to rank 0, which appends them to the predictions file (whole lines,
fsynced). Every rank runs the same number of batch steps (a rank out of items contributes an empty
batch), so the gathers pair up and a collective-generating engine could join later. Rank 0 scores
the merged file and writes ``results.json`` and ``results.md``.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .predictions import Appender, PredictionsError, predictions_path, prepare, write_json_atomic
from .registry import Benchmark, load_registry


@dataclass
class EvalOptions:
    model: str
    data_root: str
    benchmarks: Any  # "af1" | "a,b" | [names]
    out: str
    limit: Optional[int] = None
    resume: bool = False
    registry_files: Sequence[str] = ()
    batch_size: int = 8
    device: Optional[str] = None
    dtype: Optional[str] = None
    config: Optional[str] = None  # for AF1 checkpoints
    cache_dir: Optional[str] = None
    max_new_tokens: Optional[int] = None  # overrides of the registry's decoding (recorded in settings)
    num_beams: Optional[int] = None
    progress: bool = True
    allow_outside_root: bool = False
    timeout_s: int = 1800


@dataclass
class Comms:
    """The few collectives evaluation needs (no-ops in a world of one)."""

    rank: int = 0
    world_size: int = 1
    group: Any = None  # gloo group for Python objects

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def from_main(self, fn: Callable[[], Any]):
        """``fn()`` on rank 0, its result (or its exception, re-raised) on every rank."""
        box = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except Exception as e:  # noqa: BLE001 - every rank must hear of it
                box[0] = ("error", e)
        if self.world_size > 1:
            import torch.distributed as dist

            try:
                dist.broadcast_object_list(box, src=0, group=self.group)
            except Exception:
                if not self.is_main:
                    raise
                box[0] = ("error", RuntimeError("rank 0's error could not be sent: " + repr(box[0][1])))
        status, val = box[0]
        if status == "error":
            raise val
        return val


def setup_comms(timeout_s: int) -> tuple[Comms, Any]:
    """Process group from the launcher's variables; returns (comms, World)."""
    import torch
    import torch.distributed as dist

    from megaflamingo.engine.distributed import discover_env

    world = discover_env()
    if world.world_size == 1:
        return Comms(), world
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return Comms(dist.get_rank(), dist.get_world_size(), group), world


def _device(opts: EvalOptions, world) -> str:
    import torch

    if opts.device:
        return opts.device
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
        return f"cuda:{world.local_rank}"
    return "cpu"


def evaluate(opts: EvalOptions, log: Callable[[str], None] = print, loaded=None) -> dict:
    """Evaluate ``opts.benchmarks``; returns the results (rank 0; other ranks get ``{}``)."""
    if opts.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {opts.batch_size}")
    if opts.limit is not None and opts.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {opts.limit}")
    registry = load_registry(opts.registry_files)
    benches = registry.select(opts.benchmarks, opts.data_root)
    comms, world = setup_comms(opts.timeout_s)
    out = Path(opts.out)
    if loaded is None:
        from megaflamingo.inference.load import load_model

        loaded = load_model(opts.model, device=_device(opts, world), dtype=opts.dtype, config=opts.config,
                            cache_dir=opts.cache_dir)
    from megaflamingo.inference.prompts import TrainingForm, answer_suffix

    form, suffix = TrainingForm.of(loaded.config), answer_suffix(loaded.config)
    results: dict = {}
    for bench in benches:
        bench = bench.with_decoding(max_new_tokens=opts.max_new_tokens, num_beams=opts.num_beams)
        entry = run_benchmark(bench, loaded, form, suffix, opts, comms, out, log if comms.is_main else (lambda s: None))
        if comms.is_main:
            results[bench.name] = entry
            write_results(out, opts, results, registry_sources=registry.sources)
    return results if comms.is_main else {}


def _fingerprint(bench: Benchmark) -> str:
    d = asdict(bench)
    d.pop("source", None)
    d.pop("notes", None)
    d.pop("paper", None)
    d.pop("decoding", None)  # compared on its own, so a mismatch names it
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_benchmark(bench: Benchmark, loaded, form, suffix: str, opts: EvalOptions, comms: Comms, out: Path,
                  log: Callable[[str], None]) -> dict:
    from megaflamingo.inference.runner import GenerationSettings, Query, Runner

    from .items import build_items
    from .metrics import library_versions, score

    items, info = build_items(bench, opts.data_root, loaded.tokenizer, form, suffix, opts.limit,
                              opts.allow_outside_root)
    if not items:
        raise ValueError(f"benchmark {bench.name}: {bench.split} yields no items"
                         + (f" (subset {bench.subset} matched none)" if bench.subset else ""))
    decoding = dict(bench.decoding)
    runner = Runner(loaded, GenerationSettings(**decoding))
    compat = {"model": str(Path(opts.model).resolve()), "split": bench.split, "benchmark": _fingerprint(bench),
              "decoding": decoding, "rendering": info["rendering"]}
    done = comms.from_main(lambda: prepare(out, bench.name, compat, opts.resume))
    done_ids = set(done)
    todo = [it for it in items if it.id not in done_ids]
    mine = todo[comms.rank::comms.world_size]
    B = int(opts.batch_size)
    steps = math.ceil(len(todo) / comms.world_size / B) if todo else 0
    bar = None
    if comms.is_main and opts.progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(items), initial=len(items) - len(todo), unit="item", desc=bench.name,
                   dynamic_ncols=True, smoothing=0.1)
    log(f"[{bench.name}] {bench.split}: {len(items)} items ({len(done_ids & {i.id for i in items})} done), "
        f"{info['rendering']}, decoding {decoding}, {comms.world_size} rank(s) x batch {B}")
    t0 = time.perf_counter()
    appender = Appender(predictions_path(out, bench.name)) if comms.is_main else None
    try:
        for s in range(steps):
            chunk = mine[s * B:(s + 1) * B]
            records = _answer(runner, Query, chunk) if chunk else []
            gathered = comms.gather(records)
            if appender is not None:
                flat = [r for part in gathered for r in part]
                appender.write(flat)
                if bar is not None:
                    bar.update(len(flat))
    finally:
        if appender is not None:
            appender.close()
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    if not comms.is_main:
        return {}
    from .predictions import load_done

    recs = load_done(predictions_path(out, bench.name))
    ordered = [recs[it.id] for it in items if it.id in recs]
    if len(ordered) != len(items):
        missing = [it.id for it in items if it.id not in recs]
        raise PredictionsError(f"{bench.name}: {len(missing)} items have no prediction after the run (e.g. {missing[:3]})")
    metrics = score(bench, ordered)
    n, n_failed = metrics.pop("n"), metrics.pop("n_failed")
    extra = {k: metrics.pop(k) for k in ("tokenizer", "unavailable") if k in metrics}
    if todo:
        log(f"[{bench.name}] {len(todo)} items in {elapsed:.1f}s ({len(todo) / max(elapsed, 1e-9):.2f} items/s)")
    settings = dict(compat, limit=opts.limit, batch_size=B, world_size=comms.world_size, mode=bench.mode,
                    type=bench.type, normalize=list(bench.normalize), subset=bench.subset,
                    group_references=bench.group_references, flamingo_task=info["flamingo_task"],
                    options_listed=info["options_listed"], libraries=library_versions(), **extra)
    entry = {"metrics": metrics, "primary": bench.primary, "n": n, "n_failed": n_failed, "settings": settings,
             "paper": None if bench.paper is None else asdict(bench.paper)}
    log(f"[{bench.name}] " + " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))
    return entry


def _answer(runner, Query, chunk) -> list[dict]:
    """Records for a batch; an item the model cannot take (prompt over its context, bad windows)
    becomes an error record instead of stopping the run (the batch is retried item by item)."""
    queries = [Query(it.text, it.audios, id=it.id) for it in chunk]
    try:
        answers = runner.answer(queries)
        return [_record(it, a) for it, a in zip(chunk, answers)]
    except ValueError:
        out = []
        for it, q in zip(chunk, queries):
            try:
                out.append(_record(it, runner.answer([q])[0]))
            except ValueError as e:
                out.append({"id": it.id, "path": it.path, "references": it.references, "error": str(e)})
        return out


def _record(it, answer: str) -> dict:
    return {"id": it.id, "path": it.path, "prompt": it.prompt, "prediction": answer, "references": it.references}


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


# ------------------------------------------------------------------------------ reports


def write_results(out: Path, opts: EvalOptions, fresh: dict, registry_sources=()) -> dict:
    """Merge ``fresh`` into ``out/results.json`` (entries of other benchmarks stay) and rewrite
    ``results.md``. Contents are deterministic (no clocks), so a resumed run reproduces them."""
    from .report import results_markdown

    path = out / "results.json"
    old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    benches = dict(old.get("benchmarks", {}))
    benches.update(fresh)
    doc = {"model": str(Path(opts.model).resolve()), "data_root": str(Path(opts.data_root).resolve()),
           "registry": list(registry_sources), "benchmarks": benches}
    write_json_atomic(path, doc)
    (out / "results.md").write_text(results_markdown(doc), encoding="utf-8")
    return doc
