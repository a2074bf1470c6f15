"""Reading dataset metadata as published: CSV/TSV tables, JSON, JSONL and YAML.

Publishers' files are messier than test fixtures: a UTF-8 byte-order mark before the first
header, CRLF line ends, quoted fields holding commas or newlines, stray spaces around header
names, a tab-separated file named `.csv`, the odd Windows-1252 byte. Every reader here copes with
those and turns anything it cannot read into a `TableError` naming the file and line, never a raw
traceback.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from megaflamingo.data.manifests import ManifestError


class TableError(ManifestError):
    """A metadata file is missing, unreadable or lacks a column (the message lists what exists)."""


@dataclass
class Table:
    path: Path
    columns: list[str]
    rows: list[dict[str, str]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)   # 1-based line where each row starts
    encoding: str = "utf-8"

    def require(self, *names: str) -> None:
        """Raise a `TableError` naming the missing columns and listing those found."""
        missing = [n for n in names if n not in self.columns]
        if missing:
            raise TableError(f"{self.path}: no column {', '.join(repr(m) for m in missing)} "
                             f"(columns found: {', '.join(self.columns) or 'none'})")

    def where(self, i: int) -> str:
        return f"{self.path}:{self.lines[i]}" if i < len(self.lines) else str(self.path)


def decode_text(path: Path) -> tuple[str, str]:
    """File text and the encoding that worked. UTF-8 (BOM stripped) first; some published
    metadata (Clotho's metadata CSVs, for one) holds Windows-1252 bytes, so that is tried next;
    Latin-1 decodes anything, as the last resort."""
    path = Path(path)
    if not path.is_file():
        raise TableError(f"{path}: no such file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TableError(f"{path}: cannot read ({e.strerror or e})") from None
    for enc in ("utf-8-sig", "cp1252", "latin-1"):
        try:
            return raw.decode(enc), enc
        except UnicodeDecodeError:
            continue
    raise TableError(f"{path}: not a text file")  # unreachable: latin-1 decodes every byte


def _delimiter(path: Path, first_line: str, delimiter: str | None) -> str:
    if delimiter:
        return delimiter
    if path.suffix.lower() == ".tsv":
        return "\t"
    # A tab-separated table named .csv (TAU's meta.csv, for one): tabs in the header, no commas.
    if "\t" in first_line and "," not in first_line:
        return "\t"
    return ","


def read_table(path: str | Path, delimiter: str | None = None) -> Table:
    """A CSV/TSV file as a list of {column: value} rows (values are strings, stripped of
    surrounding whitespace only in header names). A data line with more fields than the header is
    an error naming the line (an unquoted comma in a caption, typically); fewer fields read as
    empty values; blank lines are skipped."""
    path = Path(path)
    text, enc = decode_text(path)
    first = text.split("\n", 1)[0]
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(path, first, delimiter))
    try:
        header = next(reader)
    except StopIteration:
        raise TableError(f"{path}: empty file (no header line)") from None
    except csv.Error as e:
        raise TableError(f"{path}:1: unreadable header ({e})") from None
    columns = [h.strip().lstrip("\ufeff") for h in header]
    dup = sorted({c for c in columns if columns.count(c) > 1 and c})
    if dup:
        raise TableError(f"{path}: duplicate column name(s) {', '.join(dup)}")
    table = Table(path, columns, encoding=enc)
    line = reader.line_num + 1
    try:
        for fields in reader:
            start, line = line, reader.line_num + 1
            if not fields or all(not f.strip() for f in fields):
                continue
            if len(fields) > len(columns):
                raise TableError(f"{path}:{start}: {len(fields)} fields but the header has "
                                 f"{len(columns)} ({', '.join(columns)}); a field holding the "
                                 f"delimiter must be quoted")
            fields = fields + [""] * (len(columns) - len(fields))
            table.rows.append(dict(zip(columns, fields)))
            table.lines.append(start)
    except csv.Error as e:
        raise TableError(f"{path}:{line}: {e}") from None
    return table


def read_json(path: str | Path):
    path = Path(path)
    text, _ = decode_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TableError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None


def read_jsonl(path: str | Path) -> list:
    path = Path(path)
    text, _ = decode_text(path)
    out = []
    for ln, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise TableError(f"{path}:{ln}: invalid JSON ({e.msg})") from None
    return out


def read_yaml(path: str | Path):
    import yaml

    path = Path(path)
    text, _ = decode_text(path)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise TableError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None


def read_records(path: str | Path) -> tuple[list[dict], list[str]]:
    """Any supported metadata file as (records, columns in first-seen order): CSV/TSV rows; a
    JSON list of objects; JSONL; or a JSON object {file: text | [texts]}, read as
    {"file": key, "output": text} records (one per text)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".txt"):
        t = read_table(path)
        return t.rows, t.columns
    if suffix == ".jsonl":
        objs = read_jsonl(path)
    elif suffix in (".yaml", ".yml"):
        objs = read_yaml(path)
    else:
        objs = read_json(path)
    if isinstance(objs, dict):
        objs = [{"file": k, "output": cap} for k, v in objs.items()
                for cap in (v if isinstance(v, list) else [v])]
    if not isinstance(objs, list) or not all(isinstance(o, dict) for o in objs):
        raise TableError(f"{path}: expected CSV/TSV, a JSON/JSONL list of objects, or a JSON "
                         f"object {{file: caption}}")
    columns: list[str] = []
    seen = set()
    for o in objs:
        for k in o:
            if k not in seen:
                seen.add(k)
                columns.append(k)
    return objs, columns
