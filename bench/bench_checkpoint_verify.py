"""What recording and verifying a checkpoint tag's files costs, per checksum, vs file size.

    python bench/bench_checkpoint_verify.py [--sizes 64MB,256MB,1GB] [--dir /tmp] [--repeats 2]

For each size a file of random float32 data (a shard's bytes are effectively random) is written with
``torch.save`` and fsynced, then for every available checksum:

* ``hash_mem_gbps``: hashing bytes already in memory (the CPU cost alone); ``hash_mem_gbps_<N>_threads``
  the same split over one thread per core (several files of a tag at once);
* ``save_hash_on_write_gbps``: ``torch.save`` through a file object that hashes what it writes, vs
  ``save_plain_gbps`` (``torch.save`` to a path + fsync) -- hashing while the rank writes its shard;
* ``save_rehash_warm_gbps``: re-reading the just-written file from the page cache and hashing it
  (what a rank would do right after its fsync, before the completion marker);
* ``verify_cold_gbps``: reading the file after its pages were dropped (``posix_fadvise(DONTNEED)``) and
  hashing it -- what resume pays on a fresh node; ``disk_read_gbps`` is the same read without hashing;
* ``shipped``: the trainer's own record (warm) and resume-time verification (cold, CRC-32 + pickle scan).

Candidates: zlib.crc32, hashlib.sha256, hashlib.blake2b (stdlib); xxhash.xxh3_64 and google_crc32c when
installed. Prints one JSON object. The file is deleted at the end. Numbers are noisy on a shared machine;
run twice.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

CHUNK = 8 << 20


def _parse_size(s: str) -> int:
    from megaflamingo.checkpoint.integrity import parse_size

    return parse_size(s)


class _Crc32:
    name = "crc32"

    def __init__(self):
        self.v = 0

    def update(self, b):
        self.v = zlib.crc32(b, self.v)


def candidates() -> dict:
    out = {"crc32 (zlib)": _Crc32, "sha256 (hashlib)": hashlib.sha256,
           "blake2b (hashlib)": hashlib.blake2b}
    try:
        import xxhash

        out["xxh3_64 (xxhash)"] = xxhash.xxh3_64
        out["xxh64 (xxhash)"] = xxhash.xxh64
    except ImportError:
        pass
    try:
        import google_crc32c

        class _Crc32c:
            def __init__(self):
                self.h = google_crc32c.Checksum()

            def update(self, b):
                # the C extension takes only `bytes`: the figure includes one copy per chunk
                self.h.update(b if isinstance(b, bytes) else bytes(b))

        out[f"crc32c (google-crc32c, {google_crc32c.implementation})"] = _Crc32c
    except ImportError:
        pass
    return out


class HashingFile:
    """A write-only file object that hashes everything written through it (for torch.save)."""

    def __init__(self, f, h):
        self.f, self.h = f, h

    def write(self, b):
        self.h.update(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()

    def tell(self):
        return self.f.tell()

    def seek(self, *a):
        return self.f.seek(*a)


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read_hash(path: Path, h) -> float:
    buf = bytearray(CHUNK)
    mv = memoryview(buf)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            if h is not None:
                h.update(mv[:n])
    return time.perf_counter() - t


def _best(fn, repeats):
    return min(fn() for _ in range(repeats))


def bench(size: int, d: Path, repeats: int) -> dict:
    data = {"w": torch.randn(size // 4, generator=torch.Generator().manual_seed(0))}
    raw = memoryview(data["w"].numpy()).cast("B")
    tag = d / f"bench_verify_{os.getpid()}"  # a one-file "tag"
    tag.mkdir()
    path = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"

    def save_plain():
        t = time.perf_counter()
        torch.save(data, path)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        return time.perf_counter() - t

    res = {"size_bytes": size}
    try:
        res["save_plain_gbps"] = size / _best(save_plain, repeats) / 1e9
        nbytes = path.stat().st_size
        res["disk_read_gbps"] = nbytes / _best(lambda: (_drop_cache(path), _read_hash(path, None))[1], repeats) / 1e9
        per = {}
        for name, make in candidates().items():
            r = {}
            r["hash_mem_gbps"] = size / _best(lambda: _time_hash(make(), raw), repeats) / 1e9
            threads = os.cpu_count() or 1
            r[f"hash_mem_gbps_{threads}_threads"] = size / _best(lambda: _time_hash_threads(make, raw, threads),
                                                                 repeats) / 1e9

            def save_hash_on_write():
                t = time.perf_counter()
                with open(path, "wb") as f:
                    torch.save(data, HashingFile(f, make()))
                    f.flush()
                    os.fsync(f.fileno())
                return time.perf_counter() - t

            r["save_hash_on_write_gbps"] = size / _best(save_hash_on_write, repeats) / 1e9
            r["save_rehash_warm_gbps"] = nbytes / _best(lambda: _read_hash(path, make()), repeats) / 1e9
            r["verify_cold_gbps"] = nbytes / _best(lambda: (_drop_cache(path), _read_hash(path, make()))[1],
                                                   repeats) / 1e9
            per[name] = {k: round(v, 3) for k, v in r.items()}
        res["checksums"] = per
        res["shipped"] = {k: round(v, 3) for k, v in _shipped(path, nbytes, repeats).items()}
    finally:
        path.unlink(missing_ok=True)
        tag.rmdir()
    res["save_plain_gbps"] = round(res["save_plain_gbps"], 3)
    res["disk_read_gbps"] = round(res["disk_read_gbps"], 3)
    return res


def _shipped(path: Path, nbytes: int, repeats: int) -> dict:
    """The trainer's own code on the file as a one-file tag: the record a rank writes after its fsync
    (page cache warm), the resume-time check from a cold cache (``verify_marker_record``: sizes, CRC-32
    and the pickle scan), and the pickle scan alone."""
    from megaflamingo.checkpoint.tag_manifest import manifest, record_files, scan_pickles, verify_marker_record

    tag = path.parent

    def record():
        t = time.perf_counter()
        record_files(tag)
        return time.perf_counter() - t

    meta = {"step": 1, "integrity": manifest(record_files(tag))}

    def verify_cold():
        _drop_cache(path)
        t = time.perf_counter()
        verify_marker_record(tag, meta)
        return time.perf_counter() - t

    def scan():
        t = time.perf_counter()
        scan_pickles(tag)
        return time.perf_counter() - t

    return {"record_warm_gbps": nbytes / _best(record, repeats) / 1e9,
            "verify_cold_gbps": nbytes / _best(verify_cold, repeats) / 1e9,
            "pickle_scan_s": _best(scan, repeats)}


def _time_hash(h, raw) -> float:
    t = time.perf_counter()
    for off in range(0, len(raw), CHUNK):
        h.update(raw[off:off + CHUNK])
    return time.perf_counter() - t


def _time_hash_threads(make, raw, threads: int) -> float:
    """Several files of a tag hashed at once (one per thread): does the hash release the GIL?"""
    from concurrent.futures import ThreadPoolExecutor

    part = -(-len(raw) // threads)
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: _time_hash(make(), raw[i * part:(i + 1) * part]), range(threads)))
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="64MB,256MB,1GB")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the test file is written (then deleted)")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's import chatter: stdout is the JSON only
        from megaflamingo.checkpoint.safe_load import allowed_globals

        allowed_globals()
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "load_avg": os.getloadavg()[0]},
           "dir": a.dir, "results": [bench(_parse_size(s), Path(a.dir), a.repeats) for s in a.sizes.split(",")]}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
