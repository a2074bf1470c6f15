"""What a dataset recipe is, and the context it writes manifests through.

A recipe reads one dataset in the layout its publisher ships and emits rows
`(task, split, audio name, prompt, output[, audio_start, duration])`. The `Context` resolves audio
names under the source folder (`AudioIndex`), streams rows into
`OUT/<Dataset>-<Task>/<split>.jsonl` (temp file, renamed when the recipe finishes, so a failed
run leaves no half manifest behind), and keeps the accounting the user needs: rows written,
files listed in the metadata but absent on disk, metadata rows skipped and why.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from megaflamingo.data.manifests import ManifestError, split_flamingo_task
from megaflamingo.io import atomic_path
from megaflamingo.preprocess.audio_index import AudioIndex, Found

FIRST_NAMES = 10  # how many missing / skipped examples a report keeps


class RecipeError(ManifestError):
    """Bad recipe name or option, or a source folder without the dataset's metadata."""


@dataclass(frozen=True)
class Option:
    name: str
    default: Any
    help: str
    type: type = str
    choices: tuple = ()

    def parse(self, recipe: str, value: Any) -> Any:
        if value is None:
            return None
        if self.type is bool and isinstance(value, str):
            low = value.strip().lower()
            if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise RecipeError(f"{recipe}: option {self.name} takes true/false, got {value!r}")
            value = low in ("1", "true", "yes", "on")
        elif self.type in (int, float) and isinstance(value, str):
            try:
                value = self.type(value)
            except ValueError:
                raise RecipeError(f"{recipe}: option {self.name} takes a {self.type.__name__}, "
                                  f"got {value!r}") from None
        elif not isinstance(value, self.type) and not (self.type is float and isinstance(value, int)):
            raise RecipeError(f"{recipe}: option {self.name} takes a {self.type.__name__}, got "
                              f"{type(value).__name__} {value!r}")
        if self.choices and value not in self.choices:
            raise RecipeError(f"{recipe}: option {self.name} must be one of "
                              f"{', '.join(map(str, self.choices))}, got {value!r}")
        return value


@dataclass(frozen=True)
class TaskSpec:
    name: str                    # AF1's '<Dataset>-<Task>', exactly as in configs/*.yaml
    splits: tuple[str, ...]      # the splits this recipe can write (some depend on options)
    prompt: str                  # AF1's prompt; '{question}' is filled per row for QA tasks


@dataclass(frozen=True)
class Recipe:
    name: str
    title: str
    homepage: str
    layout: str                  # the source layout it expects, in one or two lines
    tasks: tuple[TaskSpec, ...]
    build: Callable[..., None]
    options: tuple[Option, ...] = ()

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    def parse_options(self, given: dict[str, Any]) -> dict[str, Any]:
        known = {o.name: o for o in self.options}
        unknown = sorted(set(given) - set(known))
        if unknown:
            have = ", ".join(sorted(known)) or "none"
            raise RecipeError(f"{self.name}: unknown option {', '.join(unknown)} (options: {have})")
        out = {}
        for name, opt in known.items():
            out[name] = opt.parse(self.name, given[name]) if name in given else opt.default
        return out

    def describe(self) -> dict:
        return {"name": self.name, "title": self.title, "homepage": self.homepage,
                "layout": self.layout,
                "tasks": [{"name": t.name, "splits": list(t.splits), "prompt": t.prompt}
                          for t in self.tasks],
                "options": [{"name": o.name, "default": o.default, "help": o.help,
                             **({"choices": list(o.choices)} if o.choices else {})}
                            for o in self.options]}


@dataclass
class _Split:
    task: str
    split: str
    final: Path
    fh: Any = None                                    # opened at the first row (atomic_path)
    rows: int = 0
    files: set = field(default_factory=set)
    missing: dict = field(default_factory=dict)       # listed name -> reason
    missing_rows: int = 0
    skipped: dict = field(default_factory=dict)       # reason -> [count, first examples]


class Context:
    """What a recipe's `build(ctx, **options)` writes through."""

    def __init__(self, recipe: Recipe, source: Path, out: Path, options: dict):
        self.recipe, self.source, self.out, self.options = recipe, Path(source), Path(out), options
        self.index = AudioIndex(self.source)
        self.notes: list[str] = []
        self._splits: dict[tuple[str, str], _Split] = {}
        # every manifest is written to a temp file and renamed when the whole recipe succeeded
        self._files = contextlib.ExitStack()
        self._started = time.time()

    # ------------------------------------------------------------------ metadata files
    def find(self, *candidates: str, what: str | None = None, required: bool = True,
             max_depth: int = 3) -> Path | None:
        """The first of `candidates` (paths relative to the source folder) that exists; failing
        that, the same relative path under a subfolder up to `max_depth` levels down (archives
        often extract into a folder of their own). The whole relative path must match, so
        `nsynth-valid/examples.json` never finds `nsynth-test/examples.json`. Not found: a
        `RecipeError` naming what was looked for, or None when not `required`."""
        for c in candidates:
            p = self.source / c
            if p.is_file():
                return p
        root_depth = len(self.source.parts)
        for dirpath, dirnames, _ in os.walk(self.source, followlinks=True):
            depth = len(Path(dirpath).parts) - root_depth
            if depth >= max_depth:
                dirnames[:] = []
            dirnames.sort()
            for c in candidates:
                p = Path(dirpath) / c
                if p.is_file():
                    return p
        if required:
            raise RecipeError(f"{self.recipe.name}: {what or 'metadata'} not found under "
                              f"{self.source} (looked for {', '.join(candidates)})")
        return None

    def each_metadata(self, wanted: Iterable[tuple[Any, tuple[str, ...], str]], none_found: str,
                      max_depth: int = 3) -> Iterator[tuple[Any, Path]]:
        """For each ``(key, candidate paths, what it is)``: ``(key, the first candidate found)`` (see
        :meth:`find`). One not found is noted in the report (what it would have written is not);
        when none is found at all, a ``RecipeError`` naming ``none_found``."""
        found = False
        for key, candidates, what in wanted:
            path = self.find(*candidates, required=False, max_depth=max_depth)
            if path is None:
                self.note(f"{what} not found; not written")
                continue
            found = True
            yield key, path
        if not found:
            raise RecipeError(f"{self.recipe.name}: no {none_found} under {self.source}")

    def rel(self, path: Path) -> str:
        return os.path.relpath(path, self.source).replace(os.sep, "/")

    # ------------------------------------------------------------------ audio files
    def audio(self, task: str, split: str, name: str, prefer: tuple[str, ...] = (),
              expected_dir: str | None = None, found: Found | None = None) -> str | None:
        """Resolve `name` (as the metadata lists it) to a path relative to the source folder;
        a file that is not there (or not unambiguously) is recorded as missing for
        (task, split) and None is returned."""
        f = found if found is not None else self.index.resolve(name, prefer, expected_dir)
        if f.rel is None:
            s = self._split(task, split)
            s.missing.setdefault(str(name), f.reason)
            s.missing_rows += 1
        return f.rel

    # ------------------------------------------------------------------ rows
    def _split(self, task: str, split: str) -> _Split:
        key = (task, split)
        s = self._splits.get(key)
        if s is None:
            self.recipe.task(task)  # a recipe may only write the tasks it declares
            s = self._splits[key] = _Split(task, split, self.out / task / f"{split}.jsonl")
        return s

    def _file(self, s: _Split):
        if s.fh is None:
            tmp = self._files.enter_context(atomic_path(s.final))
            s.fh = self._files.enter_context(open(tmp, "w", encoding="utf-8"))
        return s.fh

    def add(self, task: str, split: str, name: str, output: str, prompt: str | None = None,
            audio_start: float | None = None, duration: float | None = None) -> None:
        s = self._split(task, split)
        output = " ".join(str(output).split())  # AF1 replaced newlines in captions by spaces
        if not output:
            self.skip(task, split, "empty_output", name)
            return
        dataset, task_name = split_flamingo_task(task)
        rec: dict[str, Any] = {"name": name,
                               "prompt": prompt if prompt is not None else self.recipe.task(task).prompt,
                               "output": output}
        if audio_start:
            rec["audio_start"] = float(audio_start)
        if duration is not None:
            rec["duration"] = float(duration)
        rec.update(dataset=dataset, task=task_name, split=split)
        self._file(s).write(json.dumps(rec, ensure_ascii=False) + "\n")
        s.rows += 1
        s.files.add(name)

    def skip(self, task: str, split: str, reason: str, detail: str = "") -> None:
        s = self._split(task, split)
        entry = s.skipped.setdefault(reason, [0, []])
        entry[0] += 1
        if len(entry[1]) < FIRST_NAMES and detail:
            entry[1].append(str(detail))

    def note(self, msg: str) -> None:
        self.notes.append(msg)

    # ------------------------------------------------------------------ finishing
    def abort(self) -> None:
        """Drop every temp file; no manifest is touched."""
        self._files.__exit__(*sys.exc_info())

    def finish(self) -> dict:
        """Publish every non-empty manifest (fsync + rename) and return the report."""
        self._files.close()
        manifests = []
        for (task, split), s in sorted(self._splits.items()):
            manifests.append({
                "task": task, "split": split, "rows": s.rows, "files": len(s.files),
                "manifest": str(s.final) if s.rows else None,
                "missing_audio": {"files": len(s.missing), "rows": s.missing_rows,
                                  "first": list(s.missing)[:FIRST_NAMES],
                                  "reasons": _count(s.missing.values())},
                "skipped": {k: {"count": v[0], "first": v[1]} for k, v in s.skipped.items()}})
        return {"recipe": self.recipe.name, "source": str(self.source), "out": str(self.out),
                "options": self.options, "manifests": manifests, "notes": self.notes,
                "total_rows": sum(m["rows"] for m in manifests),
                "seconds": round(time.time() - self._started, 2)}


def _count(values) -> dict:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


# ---------------------------------------------------------------------------------------------
# helpers shared by recipes


def label_text(label: str, underscores: bool = True) -> str:
    """A published class label in AF1's text form: underscores become spaces (AF1's label lists
    read 'air conditioner', 'dog bark'), surrounding whitespace goes."""
    s = str(label).strip()
    if underscores:
        s = s.replace("_", " ")
    return " ".join(s.split())


def fold_split(fold: int, holdout: int | None, val_fold: int | None, default: str) -> str | None:
    """Split of a row in a fold-based dataset: with no held-out fold, every row goes to
    `default` (AF1 evaluated these sets zero-shot); otherwise the held-out fold is `test`, the
    optional `val_fold` is `val`, the rest `train`."""
    if holdout is None:
        return default
    if fold == holdout:
        return "test"
    if val_fold is not None and fold == val_fold:
        return "val"
    return "train"


def split_option(default: str = "test") -> Option:
    return Option("split", default, "split name for the whole dataset (it has no official split; "
                  "AF1 used it for zero-shot evaluation)", str, ("train", "val", "test"))
