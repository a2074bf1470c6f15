"""Integrity record of a checkpoint tag: every file with its size and CRC-32, and the verifier that names
the first file that is missing, extra, cut or changed.

The completion marker of a tag stores :func:`manifest` of the files every rank wrote; resume and every
converter call :func:`verify_tag` before reading a byte of them. This is protection against accidents
(bit rot, a truncated copy, a torn write on a network filesystem, a second job writing into the same tag),
not against an attacker who can rewrite the marker too: code execution is prevented by the restricted
loader, whatever the files contain.

Why CRC-32 (``zlib.crc32``): it is in the standard library, detects every error burst up to 32 bits and
misses random corruption with probability 2^-32 per file, and releases the GIL, so the files of a tag are
hashed in parallel threads (one rank's files on a multi-core node) at several GB/s; a verification pass
costs about one cold read of the files, which the load that follows gets back from the page cache
(``bench/bench_checkpoint_verify.py``). ``algorithm`` is recorded so a faster one can be added later.
"""
from __future__ import annotations

import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

from .integrity import CheckpointError

PathLike = Union[str, os.PathLike]
ALGORITHM = "crc32"
FORMAT = 1
_CHUNK = 8 << 20

# Which rank wrote a file of a tag: DeepSpeed names its shards ``..._pp_rank_<R>_...`` (data-parallel rank ==
# global rank without model parallelism), ours ``megaflamingo_rank<R>.pt``; anything else is rank 0's.
_OWNER = re.compile(r"(?:pp_rank_|megaflamingo_rank)(\d+)")


def file_owner(name: str) -> int:
    m = _OWNER.search(Path(name).name)
    return int(m.group(1)) if m else 0


class TagVerificationError(CheckpointError):
    """A tag's files disagree with its manifest. ``path`` is the first offending file, ``problem`` one of
    missing | extra | size | checksum | unreadable | no-manifest."""

    def __init__(self, message: str, path: Optional[str] = None, problem: Optional[str] = None):
        super().__init__(message)
        self.path, self.problem = path, problem

    def __reduce__(self):
        return (type(self), (str(self), self.path, self.problem))


@dataclass(frozen=True)
class FileRecord:
    size: int
    crc32: str  # 8 hex digits

    def as_dict(self) -> dict:
        return {"size": self.size, "crc32": self.crc32}


def checksum_file(path: PathLike) -> FileRecord:
    """Size and CRC-32 of one file (read in 8 MB chunks; zlib releases the GIL while it hashes)."""
    crc, size = 0, 0
    buf = bytearray(_CHUNK)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            crc = zlib.crc32(mv[:n], crc)
            size += n
    return FileRecord(size, f"{crc & 0xFFFFFFFF:08x}")


class ChecksumWriter:
    """Binary file wrapper that computes the size and CRC-32 of what is written through it: a rank can
    record its shard while writing it (``torch.save(obj, ChecksumWriter(f))``) instead of re-reading it."""

    def __init__(self, f):
        self.f, self.crc, self.size = f, 0, 0

    def write(self, data) -> int:
        self.crc = zlib.crc32(data, self.crc)
        n = self.f.write(data)
        self.size += len(memoryview(data).cast("B"))
        return n

    def flush(self) -> None:
        self.f.flush()

    def record(self) -> FileRecord:
        return FileRecord(self.size, f"{self.crc & 0xFFFFFFFF:08x}")


def _threads(n_files: int, threads: Optional[int]) -> int:
    return max(1, min(n_files, threads or min(8, os.cpu_count() or 1)))


def tag_files(tag_dir: PathLike, exclude: Iterable[str] = ()) -> list[str]:
    """Every regular file under ``tag_dir`` (relative POSIX paths, sorted), less ``exclude`` names."""
    d = Path(tag_dir)
    skip = set(exclude)
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and p.name not in skip)


def record_files(tag_dir: PathLike, files: Optional[Iterable[str]] = None, threads: Optional[int] = None,
                 exclude: Iterable[str] = ()) -> dict[str, dict]:
    """``{relative path: {"size", "crc32"}}`` for ``files`` (default: all of :func:`tag_files`)."""
    d = Path(tag_dir)
    names = sorted(files) if files is not None else tag_files(d, exclude)
    with ThreadPoolExecutor(_threads(len(names), threads)) as pool:
        recs = list(pool.map(lambda n: checksum_file(d / n), names))
    return {n: r.as_dict() for n, r in zip(names, recs)}


def manifest(records: dict[str, dict]) -> dict:
    """What the completion marker stores under ``"integrity"`` (merge every rank's records first)."""
    return {"format": FORMAT, "algorithm": ALGORITHM, "files": dict(sorted(records.items()))}


@dataclass
class VerifyReport:
    files: int
    bytes: int


def verify_tag(tag_dir: PathLike, man: Optional[dict], only: Optional[Callable[[str], bool]] = None,
               threads: Optional[int] = None, exclude: Iterable[str] = ()) -> VerifyReport:
    """Check ``tag_dir`` against ``man`` (a :func:`manifest`); raise TagVerificationError naming the first bad
    file. Cheap checks come first for all files (missing, size, extra), then checksums in parallel;
    "first" is in sorted path order. ``only`` restricts the check to some files (e.g. one rank's, see
    :func:`file_owner`); extra files are looked for only when ``only`` is None."""
    d = Path(tag_dir)
    if not man or "files" not in man:
        raise TagVerificationError(f"{d}: no integrity record (written by an older version, or not by us)",
                                   str(d), "no-manifest")
    if man.get("algorithm") != ALGORITHM:
        raise TagVerificationError(f"{d}: integrity record uses {man.get('algorithm')!r}, this version knows "
                                   f"{ALGORITHM!r}", str(d), "no-manifest")
    files: dict = man["files"]
    mine = sorted(n for n in files if only is None or only(n))
    for n in mine:
        p = d / n
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            raise TagVerificationError(f"{p}: missing (the checkpoint's integrity record lists it)", str(p),
                                       "missing") from None
        if size != files[n]["size"]:
            kind = "truncated" if size < files[n]["size"] else "larger than recorded"
            raise TagVerificationError(f"{p}: {kind} ({size} bytes on disk, {files[n]['size']} recorded)", str(p),
                                       "size")
    if only is None:
        extra = sorted(set(tag_files(d, exclude)) - set(files))
        if extra:
            p = d / extra[0]
            raise TagVerificationError(f"{p}: not in the checkpoint's integrity record ({len(extra)} extra "
                                       "file(s); another job or a later save wrote into this tag?)", str(p), "extra")

    def check(n: str) -> Optional[TagVerificationError]:
        p = d / n
        try:
            rec = checksum_file(p)
        except OSError as e:
            return TagVerificationError(f"{p}: unreadable ({e})", str(p), "unreadable")
        if rec.crc32 != files[n]["crc32"]:
            return TagVerificationError(f"{p}: checksum mismatch (crc32 {rec.crc32}, recorded {files[n]['crc32']}): "
                                        "the file is corrupted", str(p), "checksum")
        return None

    pool = ThreadPoolExecutor(_threads(len(mine), threads))
    try:
        for err in pool.map(check, mine):  # map keeps the sorted order: the first error is the first file
            if err is not None:
                raise err
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on an error, do not hash the rest
    return VerifyReport(len(mine), sum(int(files[n]["size"]) for n in mine))
