"""Data pipeline throughput: 8-shot interleaved samples (T=512) through read + template + tokenise
+ label mask + collate, per CPU core, against the AF1 way (decode + resample + window the audio
files of every shot, every step) on the same machine.

    python bench/bench_data.py [--rows 256] [--samples 512] [--af1-samples 8]

Everything is synthetic (tiny BPE tokenizer, random 1024-d window embeddings, synthetic wavs).
Single-threaded on purpose and timed in CPU time (process_time), so figures are per core and
stay meaningful on a shared machine (DataLoader workers scale them out).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from megaflamingo.config import DataConfig, DatasetEntry, ModelConfig  # noqa: E402
from megaflamingo.data import arrow_format as af  # noqa: E402
from megaflamingo.data.labels import build_labels  # noqa: E402
from megaflamingo.data.loader import build_train_loader  # noqa: E402
from megaflamingo.testing import tiny_tokenizer, token_ids, write_audio  # noqa: E402

D, W, SHOTS, T = 1024, 16, 8, 512
WORDS = ("a dog barks while rain falls on a metal roof and a car passes by with its engine running "
         "loudly in the distance").split()


def make_dataset(root: Path, rows: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(rows):
        n = int(rng.integers(1, W + 1))
        cap = " ".join(rng.choice(WORDS, size=int(rng.integers(12, 24))))
        out.append({"id": str(i), "index": i, "path": f"a/{i}.wav", "start": 0.0, "duration": 10.0,
                    "num_windows": n, "windows": rng.standard_normal((n, D)).astype(np.float16),
                    "clip_embedding": None, "prompt": "generate audio caption", "output": cap,
                    "dialogue": None, "task": "AudioCaptioning", "dataset": "Bench"})
    split = root / "Bench-AudioCaptioning" / "train"
    enc = {"name": "clapcap", "checkpoint": None, "checkpoint_sha256": None, "random_init": True,
           "embed_dim": D, "sample_rate": 44100, "config": {}}
    af.write_dataset(split, out, embed_dim=D, rows_per_shard=128, dataset="Bench", task="AudioCaptioning",
                     split="train", encoder=enc, silence_embedding=np.zeros(D).tolist())
    nb = [[int(x) for x in rng.choice(np.delete(np.arange(rows), i), SHOTS - 1, replace=False)] for i in range(rows)]
    table = pa.table({"index": pa.array(range(rows), pa.int64()), "neighbors": pa.array(nb, pa.list_(pa.int64()))})
    af.atomic_write_table(split / af.KNN_FILE, table)
    af.atomic_write_json(split / af.KNN_SIDECAR, {"train_dir": ".", "k": SHOTS, "seed": 0, "index_type": "flat"})
    return split


def bench_pipeline(root: Path, rows: int, samples: int, batch: int, cache: bool = True) -> tuple[float, float, float]:
    tok = tiny_tokenizer("opt")
    ids = token_ids(tok)
    cfg = DataConfig(data_root=str(root), max_tokens=T, num_workers=0, blend={
        "Bench-AudioCaptioning/interleaved_knn-train": DatasetEntry(weight=samples / rows + 1e-9, prefix_prob=1.0,
                                                                    augmentations={"AC_short": 1.0})})
    model = ModelConfig(audio_embed_dim=D, max_num_window=W, max_num_fewshot=SHOTS)
    loader = build_train_loader(cfg, tok, ids, 0, 1, 0, batch_size=batch, model_cfg=model)
    ds, coll = loader.dataset, loader.collator
    from megaflamingo.data.tokenize import FastEncoder
    enc = ds.builder.encoder = FastEncoder(tok, ds.builder.special, cache_size=100_000 if cache else 0)
    keys = [(0, int(p)) for b in loader.epoch_batches(0) for p in b]
    for k in keys[:batch]:  # warm-up: maps files, builds the private tokenizer copy
        ds[k]
    lens, n = [], 0
    t0 = time.process_time()
    for lo in range(0, len(keys), batch):
        out = coll([ds[k] for k in keys[lo:lo + batch]])
        lens.append(out["input_ids"].shape[1])
        n += out["input_ids"].shape[0]
    dt = time.process_time() - t0
    hit = enc.hits / max(enc.hits + enc.misses, 1)
    return n / dt, float(np.mean(lens)), hit


def bench_af1_audio(root: Path, samples: int, resampler: str) -> float:
    """Per sample: for each of 8 shots, read a 10 s 48 kHz wav, resample to 44.1 kHz, peak-normalise,
    pad to AF1's window grid, int16 round-trip, cut 16 x 7 s windows (padding clips included)."""
    import soundfile as sf

    files = [write_audio(root / "wav" / f"{i}.wav", kind="pink_noise", seconds=10.0, sr=48000, seed=i)
             for i in range(SHOTS)]
    sr, win, hop = 44100, int(7.0 * 44100), int(1.75 * 44100)
    max_len = win + (W - 1) * hop

    def one(path):
        data, osr = sf.read(str(path), dtype="float64")
        if resampler == "soxr":
            import soxr
            data = soxr.resample(data, osr, sr, quality="HQ")
        else:
            import librosa
            data = librosa.resample(data, orig_sr=osr, target_sr=sr)
        data = data / max(abs(data.max()), abs(data.min()))
        n = len(data)
        nwin = 1 if n <= win else (W if n >= max_len else 1 + int(np.ceil((n - win) / hop)))
        full = win + (nwin - 1) * hop
        data = np.pad(data, (0, max(full - n, 0)))
        q = (np.clip(data, -1, 1) * 32767.0).astype(np.int16) / 32767.0
        clips = np.zeros((W, win), np.float32)
        for k in range(nwin):
            clips[k] = q[k * hop:k * hop + win]
        return clips

    one(files[0])
    t0 = time.process_time()
    for _ in range(samples):
        np.concatenate([one(f) for f in files])
    return samples / (time.process_time() - t0)


def bench_labels(batch: int = 6) -> tuple[float, float]:
    tok = tiny_tokenizer("opt")
    ids = token_ids(tok)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(10, 400, (batch, T), generator=g)
    for tok_id, p in ((ids.sep, 0.02), (ids.eoc, 0.02), (ids.media, 0.02)):
        x[torch.rand(batch, T, generator=g) < p] = tok_id
    t0 = time.process_time()
    for _ in range(50):
        build_labels(x, ids)
    vec = (time.process_time() - t0) / 50
    # AF1's loop (timing reference only)
    labels = x.clone()
    t0 = time.process_time()
    for i in range(batch):
        should = True
        for j in range(T):
            v = labels[i][j]
            masked = -100 if (should and v != ids.eos) else v
            if v == ids.sep:
                should = False
            elif v == ids.eoc:
                should = True
            labels[i][j] = masked
    loop = time.process_time() - t0
    return vec, loop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--batch", type=int, default=6)
    ap.add_argument("--af1-samples", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_dataset(root, args.rows)
        cold, mean_t, _ = bench_pipeline(root, args.rows, args.samples, args.batch, cache=False)
        rate, _, hit = bench_pipeline(root, args.rows, args.samples, args.batch, cache=True)
        print(f"8-shot samples, D={D}, mean T={mean_t:.0f} (max_tokens={T}), {args.samples} samples from {args.rows} train rows, "
              "read + template + tokenise + labels + collate:")
        print(f"ours, no token cache               : {cold:8.1f} samples/s/core")
        print(f"ours, memoised shot tokenisation   : {rate:8.1f} samples/s/core (cache hit rate {hit:.0%} "
              "incl. the cold start)")
        for rs in ("soxr", "librosa"):
            af1 = bench_af1_audio(root, args.af1_samples, rs)
            print(f"AF1 audio path ({rs:7s})           : {af1:8.2f} samples/s/core -> ours is "
                  f"{cold / af1:,.0f}x / {rate / af1:,.0f}x faster (AF1 also ran ClapCap on 128 windows "
                  "per sample at every step; not counted here)")
    vec, loop = bench_labels(args.batch)
    print(f"labels {args.batch}x{T}: vectorised {vec * 1e3:.3f} ms, AF1 loop {loop * 1e3:.1f} ms "
          f"({loop / vec:,.0f}x)")


if __name__ == "__main__":
    main()
