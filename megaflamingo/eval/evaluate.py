"""Run benchmarks on a model: one process or many (torchrun / srun / mpirun), resumable.

Per benchmark: every rank builds the same item list, rank 0 opens (or repairs, on ``resume``) the
predictions file and tells the others which ids are done; the remaining items are dealt
round-robin over the ranks, each rank generates its share in batches, and after every batch the
ranks' records are gathered to rank 0, which appends them to the predictions file (whole lines,
fsynced). Every rank runs the same number of batch steps (a rank out of items contributes an empty
batch), so the gathers pair up; training's ZeRO-3 model, whose every forward is collective, runs
the same loop (:func:`generate_records`, ``collective=True``). Rank 0 scores the merged file and
writes ``results.json`` and ``results.md``.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from megaflamingo.io import atomic_write_json

from .predictions import Appender, PredictionsError, load_done, predictions_path, prepare
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


@dataclass
class Comms:
    """The few collectives evaluation needs (no-ops in a world of one)."""

    rank: int = 0
    world_size: int = 1
    group: Any = None  # gloo group for Python objects

    @classmethod
    def current(cls) -> "Comms":
        """The running process group (the launcher's, or training's), or a world of one without one.
        Python objects travel over gloo: a gloo group of its own when the default group is NCCL
        (created here, so every rank must call this)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return cls()
        group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        return cls(dist.get_rank(), dist.get_world_size(), group)

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


def _device(opts: EvalOptions, local_rank: int) -> str:
    import torch

    if opts.device:
        return opts.device
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return f"cuda:{local_rank}"
    return "cpu"


def evaluate(opts: EvalOptions, log: Callable[[str], None] = print, loaded=None, local_rank: int = 0) -> dict:
    """Evaluate ``opts.benchmarks``; returns the results (rank 0; other ranks get ``{}``). Under a
    launcher the caller has started the process group (``megaflamingo.cli.eval``); ``local_rank``
    picks this rank's GPU."""
    if opts.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {opts.batch_size}")
    if opts.limit is not None and opts.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {opts.limit}")
    registry = load_registry(opts.registry_files)
    benches = registry.select(opts.benchmarks, opts.data_root)
    comms = Comms.current()
    out = Path(opts.out)
    if loaded is None:
        from megaflamingo.inference.load import load_model

        loaded = load_model(opts.model, device=_device(opts, local_rank), dtype=opts.dtype, config=opts.config,
                            cache_dir=opts.cache_dir)
    from megaflamingo.inference.prompts import TrainingForm

    form = TrainingForm.of(loaded.config)
    results: dict = {}
    for bench in benches:
        bench = bench.with_decoding(max_new_tokens=opts.max_new_tokens, num_beams=opts.num_beams)
        entry = run_benchmark(bench, loaded, form, opts, comms, out, log if comms.is_main else (lambda s: None))
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


def run_benchmark(bench: Benchmark, loaded, form, opts: EvalOptions, comms: Comms, out: Path,
                  log: Callable[[str], None]) -> dict:
    from megaflamingo.inference.runner import GenerationSettings, Runner

    from .items import build_items

    items, info = build_items(bench, opts.data_root, loaded.tokenizer, form, opts.limit, opts.allow_outside_root)
    if not items:
        raise ValueError(f"benchmark {bench.name}: {bench.split} yields no items"
                         + (f" (subset {bench.subset} matched none)" if bench.subset else ""))
    decoding = dict(bench.decoding)
    runner = Runner(loaded, GenerationSettings(**decoding))
    compat = {"model": str(Path(opts.model).resolve()), "split": bench.split, "benchmark": _fingerprint(bench),
              "decoding": decoding, "rendering": info["rendering"]}
    done = comms.from_main(lambda: prepare(out, bench.name, compat, opts.resume))
    todo = [it for it in items if it.id not in done]
    B = int(opts.batch_size)
    bar = None
    if comms.is_main and opts.progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(items), initial=len(items) - len(todo), unit="item", desc=bench.name,
                   dynamic_ncols=True, smoothing=0.1)
    log(f"[{bench.name}] {bench.split}: {len(items)} items ({len(items) - len(todo)} done), "
        f"{info['rendering']}, decoding {decoding}, {comms.world_size} rank(s) x batch {B}")
    t0 = time.perf_counter()
    appender = Appender(predictions_path(out, bench.name)) if comms.is_main else None

    def sink(records: list[dict]) -> None:
        appender.write(records)
        if bar is not None:
            bar.update(len(records))

    try:
        generate_records(runner, todo, comms, B, sink=sink)
    finally:
        if appender is not None:
            appender.close()
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    if not comms.is_main:
        return {}
    recs = load_done(predictions_path(out, bench.name))
    missing = [it.id for it in items if it.id not in recs]
    if missing:
        raise PredictionsError(f"{bench.name}: {len(missing)} items have no prediction after the run (e.g. {missing[:3]})")
    if todo:
        log(f"[{bench.name}] {len(todo)} items in {elapsed:.1f}s ({len(todo) / max(elapsed, 1e-9):.2f} items/s)")
    entry = result_entry(bench, [recs[it.id] for it in items], info)
    entry["settings"] = dict(compat, limit=opts.limit, batch_size=B, world_size=comms.world_size, **entry["settings"])
    log(f"[{bench.name}] " + " ".join(f"{k}={_fmt(v)}" for k, v in entry["metrics"].items()))
    return entry


def result_entry(bench: Benchmark, records: Sequence[dict], info: dict) -> dict:
    """A benchmark's scores over its prediction records, with what produced them (results.json entry)."""
    from .metrics import library_versions, score

    metrics = score(bench, records)
    n, n_failed = metrics.pop("n"), metrics.pop("n_failed")
    extra = {k: metrics.pop(k) for k in ("tokenizer", "unavailable") if k in metrics}
    settings = dict(mode=bench.mode, type=bench.type, normalize=list(bench.normalize), subset=bench.subset,
                    group_references=bench.group_references, flamingo_task=info["flamingo_task"],
                    options_listed=info["options_listed"], libraries=library_versions(), **extra)
    return {"metrics": metrics, "primary": bench.primary, "n": n, "n_failed": n_failed, "settings": settings,
            "paper": None if bench.paper is None else asdict(bench.paper)}


def generate_records(runner, items: Sequence, comms: Comms, batch_size: int, *, collective: bool = False,
                     sink: Optional[Callable[[list[dict]], None]] = None) -> list[dict]:
    """Answer ``items`` (the same list on every rank) split over the ranks: rank r takes items r, r+W,
    r+2W, ... in batches of ``batch_size``; after each batch the ranks' records are gathered and rank 0
    hands them to ``sink``. Every rank runs the same number of batch steps, so the gathers pair up.

    ``collective``: the model's forward is itself collective (ZeRO-3 gathers parameters in every
    forward, and ``generate`` keeps the ranks stepping together), so every rank must call generate
    equally often: a rank out of items answers a stand-in (the first item) and drops it, and an item
    the model refuses is an error instead of a retry item by item. Returns every record on rank 0
    (gather order), ``[]`` on the others."""
    mine = list(items[comms.rank::comms.world_size])
    steps = math.ceil(len(items) / comms.world_size / batch_size) if items else 0
    out: list[dict] = []
    for s in range(steps):
        chunk = mine[s * batch_size:(s + 1) * batch_size]
        if collective:
            records = answer_batch(runner, chunk or list(items[:1]), strict=True)[:len(chunk)]
        else:
            records = answer_batch(runner, chunk) if chunk else []
        flat = [r for part in comms.gather(records) for r in part]
        if comms.is_main:
            out.extend(flat)
            if sink is not None:
                sink(flat)
    return out


def answer_batch(runner, chunk, strict: bool = False) -> list[dict]:
    """Records for a batch. An item the model cannot take (prompt over its context, bad windows)
    becomes an error record instead of stopping the run (the batch is retried item by item), unless
    ``strict``."""
    from megaflamingo.inference.runner import Query

    queries = [Query(it.text, it.audios, id=it.id) for it in chunk]
    try:
        answers = runner.answer(queries)
        return [_record(it, a) for it, a in zip(chunk, answers)]
    except ValueError:
        if strict:
            raise
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
    atomic_write_json(path, _finite(doc))
    (out / "results.md").write_text(results_markdown(doc), encoding="utf-8")
    return doc


def _finite(x):
    """JSON has no NaN: a metric that is undefined (no items of a class) is written as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x
