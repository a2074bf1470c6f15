"""A checkpoint tag's completion marker and integrity record: every file with its size and CRC-32, and
the verifier that names the first file that is missing, extra, cut, changed or unsafe to unpickle.

The trainer's completion marker (``<tag>/megaflamingo.json``, written last) stores :func:`manifest` of the
files every rank wrote; resume and every converter call :func:`verify_marker_record` before reading a byte
of them. The CRC protects against accidents (bit rot, a truncated copy, a torn write on a network
filesystem, a second job writing into the same tag), not against an attacker who can rewrite the marker
too: code execution is prevented by the restricted loader whatever the files contain, and the static
pickle scan here refuses such a file up front, on the rank that owns it, before any rank starts loading.

Why CRC-32 (``zlib.crc32``): it is in the standard library, detects every error burst up to 32 bits and
misses random corruption with probability 2^-32 per file, and releases the GIL, so the files of a tag are
hashed in parallel threads at about 1 GB/s per core; a verification pass costs about one cold read of the
files, which the load that follows gets back from the page cache (``bench/bench_checkpoint_verify.py``).
``algorithm`` is recorded so a faster one can be added later.
"""
from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

from megaflamingo.io import crc32_file

from .integrity import CheckpointError

PathLike = Union[str, os.PathLike]
MARKER = "megaflamingo.json"
ALGORITHM = "crc32"
FORMAT = 1

# Which rank wrote a file of a tag: DeepSpeed names its shards ``..._pp_rank_<R>_...`` (data-parallel rank ==
# global rank without model parallelism), ours ``megaflamingo_rank<R>.pt``; anything else is rank 0's.
_OWNER = re.compile(r"(?:pp_rank_|megaflamingo_rank)(\d+)")


def file_owner(name: str) -> int:
    m = _OWNER.search(Path(name).name)
    return int(m.group(1)) if m else 0


def owned_by(rank: int, world_size: int) -> Callable[[str], bool]:
    """Split a tag's files over the ranks that verify it: each file once, a writer's own files on the
    rank of the same number (the node that wrote them, when the world did not change)."""
    return lambda name: file_owner(name) % max(1, world_size) == rank


class TagVerificationError(CheckpointError):
    """A tag's files disagree with its record. ``path`` is the first offending file, ``problem`` one of
    missing | extra | size | checksum | unreadable | no-manifest | no-marker | unsafe."""

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
    return FileRecord(*crc32_file(path))


def _threads(n_files: int, threads: Optional[int]) -> int:
    return max(1, min(n_files, threads or min(8, os.cpu_count() or 1)))


def tag_files(tag_dir: PathLike, exclude: Iterable[str] = (MARKER,)) -> list[str]:
    """Every regular file under ``tag_dir`` (relative POSIX paths, sorted), less ``exclude`` names."""
    d = Path(tag_dir)
    skip = set(exclude)
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and p.name not in skip)


def record_files(tag_dir: PathLike, files: Optional[Iterable[str]] = None, threads: Optional[int] = None,
                 exclude: Iterable[str] = (MARKER,)) -> dict[str, dict]:
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
    files: int   # files checksummed here
    bytes: int


def verify_tag(tag_dir: PathLike, man: Optional[dict], only: Optional[Callable[[str], bool]] = None,
               threads: Optional[int] = None, exclude: Iterable[str] = (MARKER,)) -> VerifyReport:
    """Check ``tag_dir`` against ``man`` (a :func:`manifest`); raise TagVerificationError naming the first
    bad file. Cheap checks first, for every file (missing, size, then files not in the record), then the
    checksums of the files ``only`` selects (default all; e.g. one rank's share, :func:`owned_by`) in
    parallel; "first" is in sorted path order."""
    d = Path(tag_dir)
    if not man or "files" not in man:
        raise TagVerificationError(f"{d}: no integrity record (written by an older version, or not by us)",
                                   str(d), "no-manifest")
    if man.get("algorithm") != ALGORITHM:
        raise TagVerificationError(f"{d}: integrity record uses {man.get('algorithm')!r}, this version knows "
                                   f"{ALGORITHM!r}", str(d), "no-manifest")
    files: dict = man["files"]
    for n in sorted(files):
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
    extra = sorted(set(tag_files(d, exclude)) - set(files))
    if extra:
        p = d / extra[0]
        raise TagVerificationError(f"{p}: not in the checkpoint's integrity record ({len(extra)} extra "
                                   "file(s); another job or a later save wrote into this tag?)", str(p), "extra")
    mine = sorted(n for n in files if only is None or only(n))

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


# ------------------------------------------------------------------------------------------ the marker


def read_marker(tag_dir: PathLike) -> dict:
    """The completion marker of ``tag_dir``; TagVerificationError when it is absent or unreadable."""
    d = Path(tag_dir)
    try:
        meta = json.loads((d / MARKER).read_text())
    except FileNotFoundError:
        raise TagVerificationError(f"{d}: no completion marker {MARKER} (an interrupted save, or the marker "
                                   "was deleted)", str(d / MARKER), "no-marker") from None
    except (OSError, ValueError) as e:
        raise TagVerificationError(f"{d / MARKER}: unreadable completion marker ({e})", str(d / MARKER),
                                   "no-marker") from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise TagVerificationError(f"{d / MARKER}: not a completion marker (no 'step')", str(d / MARKER), "no-marker")
    return meta


def scan_pickles(tag_dir: PathLike, only: Optional[Callable[[str], bool]] = None) -> int:
    """Statically scan the torch files of ``tag_dir`` (``only`` selects a share) for globals the restricted
    loader would refuse; raise TagVerificationError (problem ``unsafe``) naming the first. Nothing is
    unpickled. Run before a multi-rank load so every rank refuses together instead of one rank failing
    inside DeepSpeed's load while the others wait for it in a collective."""
    from .safe_load import unsafe_globals

    d = Path(tag_dir)
    names = [n for n in tag_files(d) if n.endswith((".pt", ".pth", ".bin")) and (only is None or only(n))]
    for n in names:
        try:
            bad = unsafe_globals(d / n)
        except Exception as e:  # noqa: BLE001 - an unreadable archive is reported, never loaded
            raise TagVerificationError(f"{d / n}: cannot read the torch checkpoint (truncated or corrupted?): "
                                       f"{str(e).splitlines()[0] if str(e) else type(e).__name__}", str(d / n),
                                       "unreadable") from None
        if bad:
            raise TagVerificationError(f"{d / n}: refused to load: it needs {bad[0]}, which is not a tensor, a "
                                       "container or one of DeepSpeed's allow-listed data classes (unpickling it "
                                       "could run code)", str(d / n), "unsafe")
    return len(names)


def verify_marker_record(tag_dir: PathLike, meta: dict, only: Optional[Callable[[str], bool]] = None,
                         sizes_only: bool = False) -> Optional[str]:
    """Verify a trainer tag against its marker's record (``sizes_only``: presence and sizes, no checksums,
    no scan: the cheap pre-flight). Returns a note for a tag written before records existed (still
    usable, unverified), else None; raises TagVerificationError."""
    record = meta.get("integrity")
    note = None
    if record is None:
        note = f"{Path(tag_dir).name} has no integrity record (written by an older version): its files are not verified"
    else:
        verify_tag(tag_dir, record, only=(lambda n: False) if sizes_only else only)
    if not sizes_only:
        scan_pickles(tag_dir, only)
    return note


def verify_saved_tag(tag_dir: PathLike) -> Optional[str]:
    """A converter's check of a DeepSpeed tag dir before reading it: a trainer tag (with our marker) must
    verify completely (TagVerificationError naming the file); a tag without marker or without record
    cannot be verified, which is returned as a warning (the converters log it)."""
    d = Path(tag_dir)
    if not (d / MARKER).is_file():
        return (f"{d}: no completion marker {MARKER}: not written by megaflamingo-train, or an interrupted save; "
                "its files cannot be verified")
    return verify_marker_record(d, read_marker(d))
