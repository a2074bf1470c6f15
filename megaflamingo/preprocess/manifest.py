"""`megaflamingo-preprocess manifest`: a folder of audio + a captions/labels table -> JSONL.

For data no recipe covers. The table is CSV/TSV, JSON (a list of objects, or {file: caption |
[captions]}), JSONL or YAML. Which column holds what is guessed from common names unless given:

* the audio file: `file_column` (default: the first of file, path, name, filename, audio,
  file_name, fname present), or `file_pattern`, a format string over the row's columns such as
  `{youtube_id}.wav` (`.*` or no extension: any audio extension);
* the text: `text_columns`, names or globs (`caption_*`); every non-empty matched cell becomes
  its own row, in column order (Clotho's caption_1..caption_5 -> five rows per file). Default:
  the first non-empty of output, caption, label, labels, text, answer;
* the split: `split` labels every row; with `split_column` as well, only rows whose column
  equals `split` are kept; `split_column` alone needs `{split}` in `out` and writes one
  manifest per split value.

A file is found at the relative path given (under the folder), else by a unique file name
anywhere under the folder. Rows whose audio is absent are counted and listed, not fatal; a
missing column is an error that lists the columns the table has.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import posixpath
import string
from pathlib import Path

from megaflamingo.data.manifests import ManifestError
from megaflamingo.io import atomic_path, atomic_write_text
from megaflamingo.preprocess.audio_index import AudioIndex, clean_relative
from megaflamingo.preprocess.tables import read_records

FILE_KEYS = ("file", "path", "name", "filename", "audio", "file_name", "fname")
TEXT_KEYS = ("output", "caption", "label", "labels", "text", "answer")
DEFAULT_PROMPT = "describe the sound in a sentence."


def _columns_msg(columns: list[str]) -> str:
    return f"columns found: {', '.join(columns) if columns else 'none'}"


def _match_text_columns(patterns: list[str], columns: list[str], src) -> list[str]:
    chosen: list[str] = []
    for pat in patterns:
        hits = [c for c in columns if fnmatch.fnmatchcase(c, pat)]
        if not hits:
            raise ManifestError(f"{src}: --text-column {pat!r} matches no column ({_columns_msg(columns)})")
        chosen.extend(c for c in hits if c not in chosen)
    return chosen


def _text(value) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return "" if value is None else str(value)


def build_manifest(folder: str | os.PathLike, labels: str | os.PathLike, out: str | os.PathLike,
                   prompt: str = DEFAULT_PROMPT, data_root: str | None = None,
                   dataset: str | None = None, task: str | None = None, split: str | None = None,
                   file_column: str | None = None, text_columns: list[str] | None = None,
                   file_pattern: str | None = None, split_column: str | None = None,
                   start_column: str = "audio_start") -> dict:
    """Write the JSONL manifest(s); returns a summary: `written` (rows), `labels_without_audio`
    (names listed whose file is absent), `audio_without_labels` (files under `folder` no row
    used) and, per output file, `manifests` {path: rows}."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"{folder} is not a directory")
    root = Path(data_root) if data_root else folder
    labels = Path(labels)
    if not labels.is_file():
        raise ManifestError(f"labels file {labels} does not exist")
    rows, columns = read_records(labels)
    if file_pattern and file_column:
        raise ManifestError("pass --file-column or --file-pattern, not both")

    # which column is which
    if file_pattern:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(file_pattern) if f]
        except ValueError as e:
            raise ManifestError(f"--file-pattern {file_pattern!r}: {e}") from None
        unknown = [f for f in fields if f not in columns]
        if unknown or not fields:
            raise ManifestError(f"{labels}: --file-pattern {file_pattern!r} uses "
                                f"{', '.join('{' + f + '}' for f in unknown) or 'no column'} "
                                f"({_columns_msg(columns)})")
    elif file_column:
        if file_column not in columns:
            raise ManifestError(f"{labels}: no file column {file_column!r} ({_columns_msg(columns)})")
    else:
        file_column = next((k for k in FILE_KEYS if k in columns), None)
        if file_column is None:
            raise ManifestError(f"{labels}: no file column ({'/'.join(FILE_KEYS)}); pass "
                                f"--file-column NAME or --file-pattern '{{col}}.wav' ({_columns_msg(columns)})")
    text_cols = _match_text_columns(text_columns, columns, labels) if text_columns else None
    if text_cols is None and not any(k in columns for k in TEXT_KEYS):
        hint = " (several caption columns: pass --text-column 'caption_*')" \
            if sum(c.lower().startswith("caption") for c in columns) > 1 else ""
        raise ManifestError(f"{labels}: no text column ({'/'.join(TEXT_KEYS)}); pass "
                            f"--text-column NAME{hint} ({_columns_msg(columns)})")
    if split_column and split_column not in columns:
        raise ManifestError(f"{labels}: no split column {split_column!r} ({_columns_msg(columns)})")
    per_split_out = split_column is not None and split is None
    if per_split_out and "{split}" not in str(out):
        raise ManifestError("--split-column without --split writes one manifest per split: put "
                            "{split} in --out (e.g. manifests/{split}.jsonl)")

    index = AudioIndex(folder)
    counts: dict[str, int] = {}
    missing: list[str] = []
    used: set[str] = set()
    prefix = os.path.relpath(folder.resolve(), root.resolve()).replace(os.sep, "/")
    # each output is a temp file until every row was read; any error leaves no file behind
    with contextlib.ExitStack() as files:
        writers: dict[str, object] = {}
        for r, row in enumerate(rows):
            row_split = split
            if split_column:
                value = _text(row.get(split_column)).strip()
                if split is not None and value != split:
                    continue
                row_split = value or None
                if row_split is None:
                    continue
            if file_pattern:
                found = index.resolve_pattern(file_pattern, {k: _text(v).strip() for k, v in row.items()})
                listed = file_pattern.format_map({k: _text(v).strip() for k, v in row.items()})
            else:
                listed = _text(row.get(file_column)).strip()
                if not listed:
                    raise ManifestError(f"{labels}: row {r + 1}: empty {file_column!r}")
                found = index.resolve(listed)
            if found.rel is None:
                missing.append(listed)
                continue
            if text_cols is not None:
                texts = [_text(row.get(c)).strip() for c in text_cols]
            else:
                key = next((k for k in TEXT_KEYS if _text(row.get(k)).strip()), None)
                texts = [_text(row[key]).strip()] if key else []
            texts = [t for t in texts if t]
            if not texts:
                continue
            rel = found.rel if prefix in (".", "") else posixpath.join(prefix, found.rel)
            rec_base = {"path": clean_relative(rel) or rel, "prompt": _text(row.get("prompt")).strip() or prompt}
            start = row.get(start_column)
            if start not in (None, ""):
                try:
                    rec_base["audio_start"] = float(start)
                except (TypeError, ValueError):
                    raise ManifestError(f"{labels}: row {r + 1}: {start_column!r} is not a number: "
                                        f"{start!r}") from None
            target = str(out).replace("{split}", row_split) if per_split_out else str(out)
            fh = writers.get(target)
            if fh is None:
                tmp = files.enter_context(atomic_path(target))
                fh = writers[target] = files.enter_context(open(tmp, "w", encoding="utf-8"))
                counts[target] = 0
            for t in texts:
                rec = dict(rec_base, output=" ".join(t.split()))
                for k, v in (("dataset", dataset), ("task", task), ("split", row_split)):
                    if v:
                        rec[k] = v
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                counts[target] += 1
            used.add(found.rel)
    if not counts and not per_split_out:  # the file exists even when no row had its audio
        atomic_write_text(out, "")
        counts[str(out)] = 0
    return {"written": sum(counts.values()), "labels_without_audio": missing,
            "audio_without_labels": sorted(index.all_files() - used), "manifests": counts}
