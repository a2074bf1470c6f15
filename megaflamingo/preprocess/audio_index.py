"""Finding a dataset's audio files under its source folder.

Metadata names a file (`development/foo bar, 2.wav`, `{youtube_id}.wav`, an id without
extension); where it really sits depends on how the user downloaded and extracted the archives
(`clotho_audio_files/development/`, `audio/valid/`, one folder per zip part). Resolution is
therefore: the expected relative path first, then a unique match of the file name (or of the
stem, when the metadata gives no extension) anywhere under the source folder, preferring
candidates inside a folder with an expected name. Anything else (not there, or ambiguous) is
reported by the caller, never guessed.

Paths stay relative to the source folder, '/'-separated, and never leave it lexically (symlinked
dataset folders inside it are followed, like `embed --data-root` does).
"""
from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

from megaflamingo.data.manifests import AUDIO_EXTENSIONS

# GTZAN's original release is Sun .au; the rest of AF1's sets ship wav/flac/mp3.
INDEX_EXTENSIONS = tuple(AUDIO_EXTENSIONS) + (".au", ".snd")


@dataclass(frozen=True)
class Found:
    rel: str | None        # relative path under the source folder, or None
    reason: str = ""       # "" when found; "missing" | "ambiguous" | "outside_source" otherwise
    candidates: tuple[str, ...] = ()


def clean_relative(name: str) -> str | None:
    """A metadata path as a clean relative posix path, or None if it is absolute or climbs
    out with '..'."""
    n = str(name).replace("\\", "/").strip()
    if not n or n.startswith("/") or (len(n) > 1 and n[1] == ":"):
        return None
    n = posixpath.normpath(n)
    if n == ".." or n.startswith("../"):
        return None
    return n


class AudioIndex:
    """Lazy index of the audio files under `root` (built on the first name lookup only, so a
    dataset whose files all sit where the metadata says is never walked)."""

    def __init__(self, root: str | os.PathLike, extensions: tuple[str, ...] = INDEX_EXTENSIONS):
        self.root = Path(root)
        self.extensions = tuple(e.lower() for e in extensions)
        self._by_name: dict[str, list[str]] | None = None
        self._by_stem: dict[str, list[str]] | None = None
        self._all: set[str] | None = None

    # ------------------------------------------------------------------ building
    def _build(self) -> None:
        by_name: dict[str, list[str]] = {}
        by_stem: dict[str, list[str]] = {}
        seen_dirs: set[tuple[int, int]] = set()
        everything: set[str] = set()
        root = str(self.root)
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            try:
                st = os.stat(dirpath)
            except OSError:
                dirnames[:] = []
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen_dirs:  # a symlink loop or a folder linked twice
                dirnames[:] = []
                continue
            seen_dirs.add(key)
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, root)
            rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/")
            for fn in sorted(filenames):
                stem, ext = os.path.splitext(fn)
                if ext.lower() not in self.extensions:
                    continue
                rel = f"{rel_dir}/{fn}" if rel_dir else fn
                everything.add(rel)
                by_name.setdefault(fn, []).append(rel)
                by_stem.setdefault(stem, []).append(rel)
        self._by_name, self._by_stem, self._all = by_name, by_stem, everything

    def all_files(self) -> set[str]:
        if self._all is None:
            self._build()
        return set(self._all)

    # ------------------------------------------------------------------ lookups
    def is_file(self, rel: str) -> bool:
        return os.path.isfile(os.path.join(self.root, rel))

    @staticmethod
    def _pick(cands: list[str], prefer: tuple[str, ...]) -> Found:
        if not cands:
            return Found(None, "missing")
        if len(cands) == 1:
            return Found(cands[0])
        if prefer:
            low = tuple(p.lower() for p in prefer)
            hits = [c for c in cands
                    if any(part.lower() == p or part.lower().startswith(p)
                           for part in c.split("/")[:-1] for p in low)]
            if len(hits) == 1:
                return Found(hits[0])
        return Found(None, "ambiguous", tuple(cands[:5]))

    def resolve(self, name: str, prefer: tuple[str, ...] = (), expected_dir: str | None = None) -> Found:
        """`name` as the metadata gives it (a relative path or a bare file name). Tried in
        order: `expected_dir/name`, `name`, a unique file with that name anywhere (among
        several: the unique one under a folder named like one of `prefer`)."""
        rel = clean_relative(name)
        if rel is None:
            return Found(None, "outside_source")
        direct = [posixpath.join(expected_dir, rel) if expected_dir else None, rel]
        for cand in direct:
            if cand and self.is_file(cand):
                return Found(cand)
        if self._by_name is None:
            self._build()
        return self._pick(self._by_name.get(posixpath.basename(rel), []), prefer)

    def resolve_stem(self, stem: str, prefer: tuple[str, ...] = ()) -> Found:
        """A file whose name is `stem` + any audio extension (metadata that names ids only)."""
        if clean_relative(stem) is None or "/" in stem:
            return Found(None, "outside_source")
        if self._by_stem is None:
            self._build()
        return self._pick(self._by_stem.get(stem, []), prefer)

    def resolve_pattern(self, pattern: str, fields: dict, prefer: tuple[str, ...] = ()) -> Found:
        """`pattern.format(**fields)`; a pattern ending in `.*` (or with no extension) matches
        any audio extension by stem."""
        name = pattern.format_map(fields)
        base = posixpath.basename(name)
        ext = posixpath.splitext(base)[1].lower()
        if ext not in self.extensions:  # '.*', no extension, or a dot inside an id ('x_30.0')
            stem = base[:-2] if base.endswith(".*") else base
            directory = posixpath.dirname(name)
            if directory:
                for e in self.extensions:
                    cand = clean_relative(posixpath.join(directory, stem + e))
                    if cand and self.is_file(cand):
                        return Found(cand)
            return self.resolve_stem(stem, prefer)
        return self.resolve(name, prefer)
