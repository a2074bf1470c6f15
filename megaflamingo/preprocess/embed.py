"""`megaflamingo-preprocess embed`: manifest -> Arrow shards of window embeddings.

Work is cut into fixed chunks of `rows_per_shard` manifest items; chunk c becomes
`shard-{c:05d}.arrow`. `--shard I/N` processes the chunks with c % N == I, so the files do not
depend on N, on the number of decoding workers, or on which process wrote them. Each chunk is
written atomically (temp + rename; its sidecar JSON last), so a killed run resumes by skipping
finished chunks, and a rerun produces the same bytes. `metadata.json` is written (the merge) once
every chunk exists: by the last `embed` process to finish, or by `megaflamingo-preprocess merge`.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megaflamingo.audio.frontend import FrontendConfig, Prepared, init_worker, prepare_star, window_view
from megaflamingo.data import arrow_format as af
from megaflamingo.data.manifests import Manifest, read_manifest

from .shard_state import changed_settings, chunk_status, fingerprint_change_message, resolved_root

RUN_FILE = "_run.json"


class EmbedError(RuntimeError):
    pass


@dataclass
class EmbedOptions:
    manifest: str
    data_root: str
    out: str
    encoder: str = "tiny"
    checkpoint: str | None = None
    random_init: bool = False
    embed_dim: int | None = None          # tiny only
    seed: int = 0                         # tiny weights
    fusion: bool = True                   # laion-clap
    clip_encoder: str = "auto"            # auto | none | mean | laion-clap
    clip_checkpoint: str | None = None
    batch_size: int = 32                  # windows per encoder forward
    workers: int = 2
    shard: tuple[int, int] = (0, 1)
    device: str = "cpu"
    dtype: str = "float16"
    rows_per_shard: int = 1024
    min_file_bytes: int = 16000
    max_bad_fraction: float = 0.05
    dataset: str | None = None
    task: str | None = None
    split: str | None = None
    window_s: float = 7.0
    overlap_s: float = 5.25
    max_windows: int = 16
    progress: bool = True
    allow_outside_root: bool = False      # user opt-in: manifest paths may leave data_root
    sample_rate: int | None = None        # tiny: its rate; other encoders: must equal their own
    expect_embed_dim: int | None = None   # a training config's encoder.embed_dim (fixed-size encoders)


# EmbedOptions field -> (config field it comes from, the flag that sets it)
CONFIG_FIELDS = {
    "encoder": ("encoder.name", "--encoder"), "checkpoint": ("encoder.checkpoint", "--checkpoint"),
    "random_init": ("encoder.random_init", "--random-init"), "embed_dim": ("encoder.embed_dim", "--embed-dim"),
    "window_s": ("encoder.window_s", "--window-s"), "overlap_s": ("encoder.overlap_s", "--overlap-s"),
    "max_windows": ("encoder.max_windows", "--max-windows"),
    "clip_checkpoint": ("encoder.clip_checkpoint", "--clip-checkpoint"), "fusion": ("encoder.clip_fusion", "--no-fusion"),
}


def options_from_config(cfg, given: dict, src: str = "the config") -> dict:
    """EmbedOptions fields from a training config (``megaflamingo.config.Config``), so the data is made
    for exactly the model that config trains: its encoder section.
    ``given``: fields set by explicit flags; one that disagrees with the config is an error naming both
    (a checkpoint the config leaves empty may be given). The config's own rules keep its encoder
    section equal to the model's (embed_dim, max_windows)."""
    e = cfg.encoder
    vals = {"encoder": e.name, "checkpoint": e.checkpoint or None, "random_init": e.random_init,
            "window_s": e.window_s, "overlap_s": e.overlap_s, "max_windows": e.max_windows,
            "clip_checkpoint": e.clip_checkpoint or None, "fusion": e.clip_fusion, "sample_rate": e.sample_rate}
    if e.name == "tiny":
        vals["embed_dim"] = e.embed_dim
    else:
        vals["expect_embed_dim"] = e.embed_dim
    for key, value in given.items():
        if key not in vals or vals[key] is None:
            continue
        if value != vals[key]:
            field, flag = CONFIG_FIELDS[key]
            shown = "" if isinstance(value, bool) else f" {value}"
            raise EmbedError(f"{flag}{shown} contradicts {field}={vals[key]!r} in {src}; drop the flag, or "
                             "change the config (the data must match the model it trains)")
    return {k: v for k, v in vals.items() if v is not None or k not in given}


def parse_shard(spec: str | None, env: dict | None = None) -> tuple[int, int]:
    """'I/N' -> (I, N); without it: Slurm array task, then torch.distributed RANK/WORLD_SIZE."""
    env = os.environ if env is None else env
    if spec:
        try:
            i, n = (int(p) for p in spec.split("/"))
        except ValueError:
            raise EmbedError(f"--shard must look like I/N (e.g. 0/4), got {spec!r}") from None
    elif "SLURM_ARRAY_TASK_ID" in env:
        i = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        n = int(env.get("SLURM_ARRAY_TASK_COUNT", 0)) or (
            int(env["SLURM_ARRAY_TASK_MAX"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0)) + 1)
    elif "RANK" in env and "WORLD_SIZE" in env:
        i, n = int(env["RANK"]), int(env["WORLD_SIZE"])
    else:
        i, n = 0, 1
    if not 0 <= i < n:
        raise EmbedError(f"shard index {i} is not in [0, {n})")
    return i, n


def _resolve_meta_names(m: Manifest, o: EmbedOptions) -> tuple[str, str, str]:
    dataset, task, split = o.dataset or m.dataset, o.task or m.task, o.split or m.split
    missing = [k for k, v in (("dataset", dataset), ("task", task), ("split", split)) if not v]
    if missing:
        raise EmbedError(f"{m.source}: does not say its {', '.join(missing)}; pass "
                         + " ".join(f"--{k} NAME" for k in missing))
    return dataset, task, split


def default_out(cfg, manifest: str, data_root: str, dataset: str | None = None, task: str | None = None,
                split: str | None = None) -> str:
    """Where a training config reads this manifest's split: ``data.data_root/<dataset>-<task>/<split>``."""
    if not cfg.data.data_root:
        raise EmbedError("--out not given and the config's data.data_root is not set")
    m = read_manifest(manifest, data_root)
    o = EmbedOptions(manifest=manifest, data_root=data_root, out="", dataset=dataset, task=task, split=split)
    ds, tk, sp = _resolve_meta_names(m, o)
    return str(Path(cfg.data.data_root) / f"{ds}-{tk}" / sp)


def _run_fingerprint(o: EmbedOptions, m: Manifest, names, enc_desc, clip_desc) -> dict:
    return {
        "data_root": resolved_root(o.data_root),
        "manifest_sha256": m.sha256, "num_items": len(m.items),
        "dataset": names[0], "task": names[1], "split": names[2],
        "encoder": enc_desc, "clip_encoder": clip_desc, "dtype": o.dtype,
        "windows": {"window_s": o.window_s, "overlap_s": o.overlap_s, "max_windows": o.max_windows},
        "rows_per_shard": o.rows_per_shard, "min_file_bytes": o.min_file_bytes,
    }


def finished_chunks(writer: af.DatasetWriter, chunks, checksum: bool = True) -> dict[int, tuple[bool, str]]:
    """``{chunk: (finished, why)}`` for chunks with a sidecar (see ``shard_state.chunk_status``)."""
    out = {}
    for c in chunks:
        if writer.sidecar_path(c).is_file():
            out[c] = chunk_status(writer.read_sidecar(c), writer.shard_path(c), checksum)
    return out


def _check_run_file(out: Path, fp: dict, log=print) -> None:
    path = out / RUN_FILE
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if not changed_settings(old, fp):
            return
        # Work worth protecting: a finished chunk that embedded at least one row. Without any (a first
        # run with a wrong --data-root), the old chunks are discarded and the new settings apply.
        writer = af.DatasetWriter(out, None)
        n_chunks = max(1, math.ceil(old.get("num_items", 0) / max(1, old.get("rows_per_shard", 1))))
        status = finished_chunks(writer, range(n_chunks), checksum=False)
        if any(ok and writer.read_sidecar(c).get("num_rows", 0) > 0 for c, (ok, _) in status.items()):
            raise EmbedError(fingerprint_change_message(out, old, fp))
        log(f"[embed] {out}: no rows embedded under the old settings "
            f"({', '.join(changed_settings(old, fp))} changed): starting over with the new ones")
        for c in status:
            writer.sidecar_path(c).unlink(missing_ok=True)  # the marker first, as write_shard does
            writer.shard_path(c).unlink(missing_ok=True)
    af.atomic_write_json(path, fp)


def _decode_iter(jobs, workers: int):
    """Prepared items in job order. With workers, at most 4 per worker are in flight, so a slow
    encoder does not let decoded audio pile up in memory."""
    if workers <= 0:
        yield from map(prepare_star, jobs)
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=init_worker) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.apply_async(prepare_star, (job,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def run_embed(o: EmbedOptions, log=print) -> dict:
    from megaflamingo.audio.encoders import build_encoder

    t0 = time.time()
    out = Path(o.out)
    m = read_manifest(o.manifest, o.data_root)
    names = _resolve_meta_names(m, o)
    if o.dtype not in ("float16", "float32"):
        raise EmbedError(f"--dtype must be float16 or float32, got {o.dtype!r}")
    if o.rows_per_shard < 1 or o.batch_size < 1:
        raise EmbedError("--rows-per-shard and --batch-size must be >= 1")
    enc = build_encoder(o.encoder, o.checkpoint, o.random_init, o.device, o.embed_dim, o.seed,
                        o.fusion, window_s=o.window_s, sample_rate=o.sample_rate)
    if o.sample_rate is not None and enc.sample_rate != o.sample_rate:
        raise EmbedError(f"encoder {o.encoder} works at {enc.sample_rate} Hz, the config's encoder.sample_rate "
                         f"is {o.sample_rate}")
    if o.expect_embed_dim is not None and enc.embed_dim != o.expect_embed_dim:
        raise EmbedError(f"encoder {o.encoder} makes {enc.embed_dim}-d embeddings, the config's "
                         f"encoder.embed_dim is {o.expect_embed_dim}")
    clip_mode = o.clip_encoder
    if clip_mode == "auto":
        clip_mode = "laion-clap" if o.encoder == "laion-clap" else ("mean" if o.encoder == "tiny" else "none")
    clip_enc = None
    if clip_mode == "laion-clap":
        # AF1's kNN embedding: LAION-CLAP on the first 10 s (not on the windows)
        ckpt = o.clip_checkpoint or (o.checkpoint if o.encoder == "laion-clap" else None)
        clip_enc = build_encoder("laion-clap", ckpt, o.random_init and ckpt is None, o.device, None,
                                 o.seed, o.fusion, window_s=10.0)
        clip_desc = dict(clip_enc.describe(), config=dict(clip_enc.describe()["config"], pooling="clip"))
        clip_dim = clip_enc.embed_dim
    elif clip_mode == "mean":
        d = enc.describe()
        clip_desc = dict(d, config=dict(d["config"], pooling="mean_of_windows"))
        clip_dim = enc.embed_dim
    elif clip_mode == "none":
        clip_desc, clip_dim = None, None
    else:
        raise EmbedError(f"--clip-encoder must be auto, none, mean or laion-clap, got {clip_mode!r}")

    fcfg = FrontendConfig(os.path.abspath(o.data_root), enc.sample_rate, o.window_s, o.overlap_s,
                          o.max_windows, o.min_file_bytes,
                          clip_enc.sample_rate if clip_enc is not None else None,
                          clip_enc.info.window_s if clip_enc is not None else 10.0,
                          allow_outside_root=o.allow_outside_root)
    out.mkdir(parents=True, exist_ok=True)
    fp = _run_fingerprint(o, m, names, enc.describe(), clip_desc)
    _check_run_file(out, fp, log)

    schema = af.arrow_schema(enc.embed_dim, o.dtype, clip_dim)
    writer = af.DatasetWriter(out, schema)
    n_chunks = max(1, math.ceil(len(m.items) / o.rows_per_shard))
    shard_i, shard_n = o.shard
    mine = [c for c in range(n_chunks) if c % shard_n == shard_i]
    for c in mine:  # temp files of a killed run of these chunks
        for tmp in out.glob(f".{af.SHARD_PATTERN.format(c)}*.tmp"):
            tmp.unlink(missing_ok=True)
        for tmp in out.glob(f".{af.SHARD_PATTERN.format(c)[:-6]}.json*.tmp"):
            tmp.unlink(missing_ok=True)
    status = finished_chunks(writer, mine)
    for c, (ok, why) in sorted(status.items()):
        if not ok:
            log(f"[embed] redoing chunk {c}: {why}")
    todo = [c for c in mine if not status.get(c, (False, ""))[0]]
    silence = enc.silence_embedding()
    n_todo_items = sum(len(m.items[c * o.rows_per_shard:(c + 1) * o.rows_per_shard]) for c in todo)
    log(f"[embed] {names[0]}-{names[1]}/{names[2]}: {len(m.items)} items, {n_chunks} chunks; "
        f"shard {shard_i}/{shard_n}: {len(mine)} chunks, {len(mine) - len(todo)} already done")

    bar = None
    if o.progress and n_todo_items:
        from tqdm import tqdm
        bar = tqdm(total=n_todo_items, unit="file", file=sys.stderr, dynamic_ncols=True)
    stats = Counter()
    hours = 0.0
    jobs = [(it.index, it.path, it.start, fcfg)
            for c in todo for it in m.items[c * o.rows_per_shard:(c + 1) * o.rows_per_shard]]
    results = _decode_iter(jobs, o.workers)
    try:
        for c in todo:
            items = m.items[c * o.rows_per_shard:(c + 1) * o.rows_per_shard]
            prepared: list[Prepared] = []
            chunk_enc = _ChunkEncoder(enc, clip_enc, clip_mode, fcfg, o.batch_size)
            for _ in items:
                p = next(results)
                if p.ok:
                    chunk_enc.add(p)
                    p.audio = p.clip_audio = None  # encoded: drop the audio now
                prepared.append(p)
                stats["ok" if p.ok else p.reason] += 1
                hours += p.duration / 3600
                if not p.ok and stats[p.reason] <= 3:
                    log(f"[embed] skipped {m.items[p.index].path!r}: {p.reason} {p.detail}")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(audio_h=f"{hours:.2f}",
                                    h_per_s=f"{hours / max(time.time() - t0, 1e-9):.4f}",
                                    bad=sum(v for k, v in stats.items() if k != "ok"), refresh=False)
            per_row, clips = chunk_enc.finish()
            _write_chunk(c, items, prepared, per_row, clips, writer, names, o, silence)
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()
        if bar is not None:
            bar.close()

    summary = {"processed_items": sum(stats.values()), "rows_written": stats["ok"],
               "bad_by_reason": {k: v for k, v in sorted(stats.items()) if k != "ok"},
               "job_audio_hours": round(hours, 6), "seconds": round(time.time() - t0, 2),
               "merged": False}
    done = finished_chunks(writer, range(n_chunks), checksum=False)
    if all(done.get(c, (False, ""))[0] for c in range(n_chunks)):
        meta = finalize(out)
        summary.update(merged=True, num_rows=meta["num_rows"], audio_hours=meta["audio_hours"],
                       dataset_bad_files=len(meta["bad_files"]))
    return summary


class _ChunkEncoder:
    """Encodes one chunk's windows as decoded items stream in, so memory holds at most one batch
    of audio (plus the decode look-ahead), never a whole chunk. Batches are cut from the chunk's
    window sequence in manifest order every `batch_size` windows, exactly as if the chunk's
    windows were concatenated first: the output does not depend on decode timing."""

    def __init__(self, enc, clip_enc, clip_mode: str, fcfg: FrontendConfig, batch_size: int):
        self.enc, self.clip_enc, self.clip_mode, self.fcfg = enc, clip_enc, clip_mode, fcfg
        self.bs, self.clip_bs = batch_size, max(1, batch_size // 4)
        self.win_queue: list = []    # (row, window view)
        self.clip_queue: list = []   # (row, clip audio)
        self.windows: list[list] = []  # per row: embedding rows, in order
        self.clips: list = []

    def add(self, p: Prepared) -> None:
        row = len(self.windows)
        self.windows.append([])
        self.clips.append(None)
        self.win_queue.extend((row, w) for w in window_view(p.audio, p.num_windows, self.fcfg))
        if self.clip_mode == "laion-clap":
            self.clip_queue.append((row, p.clip_audio))
        self._flush(final=False)

    def _flush(self, final: bool) -> None:
        while len(self.win_queue) >= self.bs or (final and self.win_queue):
            batch, self.win_queue = self.win_queue[:self.bs], self.win_queue[self.bs:]
            for (row, _), e in zip(batch, self.enc.encode(np.stack([w for _, w in batch]))):
                self.windows[row].append(e)
        while len(self.clip_queue) >= self.clip_bs or (final and self.clip_queue):
            batch, self.clip_queue = self.clip_queue[:self.clip_bs], self.clip_queue[self.clip_bs:]
            for (row, _), e in zip(batch, self.clip_enc.encode(np.stack([a for _, a in batch]))):
                self.clips[row] = e

    def finish(self) -> tuple[list[np.ndarray], list]:
        self._flush(final=True)
        per_row = [np.stack(w) for w in self.windows]
        if self.clip_mode == "mean":
            self.clips = [e.mean(0) for e in per_row]
        return per_row, self.clips


def _write_chunk(c, items, prepared, per_row, clips, writer, names, o, silence):
    ok = [(it, p) for it, p in zip(items, prepared) if p.ok]
    rows = []
    dataset, task, split = names
    for (it, p), e, cl in zip(ok, per_row, clips):
        rows.append({
            "id": it.id or f"{dataset}-{task}/{split}/{it.index}", "index": it.index,
            "path": it.path, "start": float(it.start), "duration": float(p.duration),
            "num_windows": int(p.num_windows), "windows": e, "clip_embedding": cl,
            "prompt": it.prompt, "output": it.output, "dialogue": it.dialogue,
            "task": f"{dataset}-{task}", "dataset": dataset,
        })
    bad = [{"index": it.index, "path": it.path, "reason": p.reason, "detail": p.detail}
           for it, p in zip(items, prepared) if not p.ok]
    extra = {"chunk": c, "first_index": items[0].index if items else c * o.rows_per_shard,
             "num_items": len(items), "bad_files": bad,
             "audio_hours": float(sum(p.duration for _, p in ok) / 3600.0),
             "silence_embedding": [float(x) for x in silence]}
    writer.write_shard(c, rows, extra)


def finalize(out: str | os.PathLike) -> dict:
    """The merge: check every chunk is finished and write metadata.json."""
    out = Path(out)
    run_path = out / RUN_FILE
    if not run_path.is_file():
        raise EmbedError(f"{out}: no {RUN_FILE}; not an embed output directory")
    fp = json.loads(run_path.read_text(encoding="utf-8"))
    n_chunks = max(1, math.ceil(fp["num_items"] / fp["rows_per_shard"]))
    writer = af.DatasetWriter(out, af.arrow_schema(fp["encoder"]["embed_dim"], fp["dtype"],
                                                   None if fp["clip_encoder"] is None
                                                   else fp["clip_encoder"]["embed_dim"]))
    status = finished_chunks(writer, range(n_chunks), checksum=False)
    missing = [c for c in range(n_chunks) if not status.get(c, (False, ""))[0]]
    if missing:
        why = "; ".join(status[c][1] for c in missing[:3] if c in status)
        raise EmbedError(f"{out}: {len(missing)} of {n_chunks} chunks are not finished "
                         f"(e.g. {missing[:10]}{': ' + why if why else ''}); run the remaining `embed --shard` "
                         "jobs first")
    first = writer.read_sidecar(0)
    return writer.finalize(
        range(n_chunks), dataset=fp["dataset"], task=fp["task"], split=fp["split"],
        encoder=fp["encoder"], window_s=fp["windows"]["window_s"],
        overlap_s=fp["windows"]["overlap_s"], max_windows=fp["windows"]["max_windows"],
        dtype=fp["dtype"], silence_embedding=first["silence_embedding"],
        clip_encoder=fp["clip_encoder"],
        clip_embed_dim=None if fp["clip_encoder"] is None else fp["clip_encoder"]["embed_dim"],
        manifest_sha256=fp["manifest_sha256"], num_manifest_items=fp["num_items"],
        rows_per_shard=fp["rows_per_shard"], min_file_bytes=fp["min_file_bytes"])
