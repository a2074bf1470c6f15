"""Manifest readers: AF1 JSON manifests (plain and chat), JSON lists and JSONL.

Every reader returns a `Manifest` whose items carry the audio path *relative to the data root*;
whether that path stays inside the root is checked when the file is opened
(`megaflamingo.audio.decode.resolve_in_root`), so an escaping path becomes a reported bad file,
not a crash. Structural problems (missing fields, wrong types) raise `ManifestError` naming the
file, the item and the field.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".m4a", ".aac", ".aiff", ".aif", ".wma")


class ManifestError(ValueError):
    pass


@dataclass
class ManifestItem:
    index: int                      # position in the manifest (row order of the output)
    path: str                       # relative to the data root, '/'-separated
    start: float = 0.0              # AF1's audio_start, seconds
    prompt: str | None = None
    output: str | None = None
    dialogue: list[dict] | None = None
    id: str | None = None


@dataclass
class Manifest:
    source: str
    sha256: str
    dataset: str | None
    task: str | None
    split: str | None
    items: list[ManifestItem] = field(default_factory=list)


def split_flamingo_task(flamingo_task: str) -> tuple[str, str]:
    """AF1's '<dataset>-<Task>' -> (dataset, Task); the task is the last '-' component."""
    if "-" not in flamingo_task:
        return flamingo_task, flamingo_task
    dataset, task = flamingo_task.rsplit("-", 1)
    return dataset, task


def _err(src, where, msg) -> ManifestError:
    return ManifestError(f"{src}: {where}: {msg}")


def _opt_str(src, where, obj, key) -> str | None:
    v = obj.get(key)
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return str(v)
    raise _err(src, where, f"field {key!r} must be a string, got {type(v).__name__}")


def _dialogue(src, where, v) -> list[dict] | None:
    if v is None:
        return None
    if not isinstance(v, list) or not v:
        raise _err(src, where, "field 'dialogue' must be a non-empty list of {user, assistant}")
    out = []
    for r, turn in enumerate(v):
        if not isinstance(turn, dict) or not isinstance(turn.get("user"), str) \
                or not isinstance(turn.get("assistant"), str):
            raise _err(src, f"{where}, dialogue round {r}", "needs string fields 'user' and 'assistant'")
        out.append({"user": turn["user"], "assistant": turn["assistant"]})
    return out


def _start(src, where, obj) -> float:
    v = obj.get("audio_start", obj.get("start", 0.0))
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise _err(src, where, f"field 'audio_start' must be a number, got {v!r}") from None
    return v  # negative / NaN starts become per-file bad entries at decode time


def _item(src, where, index, obj, prefix: str) -> ManifestItem:
    if not isinstance(obj, dict):
        raise _err(src, where, f"must be an object, got {type(obj).__name__}")
    name = obj.get("path", obj.get("name"))
    if not isinstance(name, str) or not name:
        raise _err(src, where, "needs a non-empty string field 'path' (or AF1's 'name')")
    if isinstance(obj.get("name"), list):
        raise _err(src, where, "is an interleaved (few-shot) item; embed the base split and run "
                               "`megaflamingo-preprocess knn` instead")
    if os.path.isabs(name) or not prefix:
        rel = name
    else:
        rel = posixpath.join(prefix, name.replace(os.sep, "/"))
    item = ManifestItem(index=index, path=rel, start=_start(src, where, obj),
                        prompt=_opt_str(src, where, obj, "prompt"),
                        output=_opt_str(src, where, obj, "output"),
                        dialogue=_dialogue(src, where, obj.get("dialogue")),
                        id=_opt_str(src, where, obj, "id"))
    if item.dialogue is None and item.output is None:
        raise _err(src, where, "needs 'output' (with 'prompt') or 'dialogue'")
    return item


def _af1_prefix(src, contents: dict, data_root: str | None) -> str:
    """Path of the split folder relative to the data root (AF1: dataset_path under data_root,
    then split_path)."""
    ds = contents.get("dataset_path")
    if not isinstance(ds, str):
        raise _err(src, "top level", "field 'dataset_path' must be a string")
    if os.path.isabs(ds):
        if data_root is None:
            raise _err(src, "dataset_path", "is absolute; pass --data-root")
        root = os.path.normpath(os.path.abspath(data_root))
        ds_n = os.path.normpath(ds)
        if ds_n != root and not ds_n.startswith(root + os.sep):
            raise _err(src, "dataset_path", f"{ds!r} is not under the data root {root!r}")
        ds = os.path.relpath(ds_n, root)
    ds = "" if ds in (".", "") else ds.replace(os.sep, "/")
    sp = contents.get("split_path")
    if sp is not None and not isinstance(sp, str):
        raise _err(src, "split_path", "must be a string or null")
    parts = [p for p in (ds, sp) if p not in (None, "", ".", "./")]
    return posixpath.normpath(posixpath.join(*parts)) if parts else ""


def read_manifest(path: str | os.PathLike, data_root: str | os.PathLike | None = None) -> Manifest:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    raw = path.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    src = str(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(f"{src}: not UTF-8 text ({e})") from None
    root = None if data_root is None else str(data_root)
    if path.suffix.lower() == ".jsonl":
        return _from_records(src, sha, _jsonl(src, text), "line", 1, root)
    try:
        contents = json.loads(text)
    except json.JSONDecodeError as e:
        try:  # JSONL saved as .json
            return _from_records(src, sha, _jsonl(src, text), "line", 1, root)
        except ManifestError:
            raise ManifestError(f"{src}: invalid JSON ({e})") from None
    if isinstance(contents, list):
        return _from_records(src, sha, contents, "item", 0, root)
    if not isinstance(contents, dict) or "data" not in contents:
        if isinstance(contents, dict) and "interleaved_data" in contents:
            raise ManifestError(f"{src}: an AF1 interleaved manifest; embed the base split and run "
                                f"`megaflamingo-preprocess knn` instead")
        raise ManifestError(f"{src}: expected an AF1 manifest (with 'data'), a JSON list or JSONL")
    data = contents["data"]
    if not isinstance(data, dict):
        raise _err(src, "data", "must be an object {\"0\": {...}, ...}")
    try:
        keys = sorted(data, key=int)
    except ValueError:
        raise _err(src, "data", "keys must be integers \"0\", \"1\", ...") from None
    if [int(k) for k in keys] != list(range(len(keys))):
        raise _err(src, "data", "keys must be exactly 0..N-1")
    total = contents.get("total_num")
    if total is not None and int(total) != len(keys):
        raise _err(src, "total_num", f"says {total}, 'data' has {len(keys)} items")
    prefix = _af1_prefix(src, contents, None if data_root is None else str(data_root))
    ft = contents.get("flamingo_task")
    dataset, task = split_flamingo_task(ft) if isinstance(ft, str) else (None, None)
    items = [_item(src, f"data[{k}]", i, data[k], prefix) for i, k in enumerate(keys)]
    split = contents.get("split") if isinstance(contents.get("split"), str) else None
    return Manifest(src, sha, dataset, task, split, items)


def _jsonl(src, text: str) -> list:
    objs = []
    for ln, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                objs.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise _err(src, f"line {ln}", f"invalid JSON ({e.msg})") from None
    return objs


def _from_records(src, sha, objs: list, unit: str, first: int, data_root: str | None) -> Manifest:
    meta: dict[str, set] = {"dataset": set(), "task": set(), "split": set()}
    items = []
    for i, obj in enumerate(objs):
        where = f"{unit} {i + first}"
        item = _item(src, where, i, obj, "")
        if os.path.isabs(item.path) and data_root is not None:
            root = os.path.normpath(os.path.abspath(data_root))
            if os.path.normpath(item.path).startswith(root + os.sep):
                item.path = os.path.relpath(os.path.normpath(item.path), root).replace(os.sep, "/")
        items.append(item)
        for k in meta:
            if isinstance(obj.get(k), str):
                meta[k].add(obj[k])
    one = {}
    for k, vals in meta.items():
        if len(vals) > 1:
            raise ManifestError(f"{src}: items disagree on {k!r} ({sorted(vals)}); one manifest per "
                                f"dataset/task/split")
        one[k] = next(iter(vals)) if vals else None
    return Manifest(src, sha, one["dataset"], one["task"], one["split"], items)
