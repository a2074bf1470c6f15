"""The benchmark registry: which Arrow split, how to prompt it, how to score it, what AF1 reported.

The built-in registry is YAML shipped in the package (``af1_benchmarks.yaml``, AF1's evaluation
suite). Users extend or override it with their own file (``--registry FILE``): an entry with a new
name is added, an entry with an existing name replaces the built-in one whole. Every field is
checked when the file is read; an error names the file, the benchmark and the field.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

BUILTIN = "af1_benchmarks.yaml"
TYPES = ("caption", "classification", "aqa", "multilabel")
MODES = ("zero-shot", "in-distribution", "retrieval-icl")
DECODING_KEYS = {"max_new_tokens", "num_beams", "do_sample", "temperature", "top_k", "top_p",
                 "length_penalty", "seed"}
# Which metrics a task type can compute (megaflamingo.eval.metrics implements them).
METRICS_BY_TYPE = {
    "caption": {"cider", "bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l"},
    "classification": {"accuracy", "macro_f1", "weighted_f1"},
    "aqa": {"accuracy", "accuracy_any"},
    "multilabel": {"samples_f1", "micro_f1", "macro_f1", "map_hard"},
}
_SPLIT = re.compile(r"^[^/\s]+-[^/\s]+/(?:interleaved_knn-)?[A-Za-z0-9_]+$")


class RegistryError(ValueError):
    """A registry file or a benchmark selection is invalid (message names file, benchmark, field)."""


@dataclass(frozen=True)
class PaperNumber:
    metric: str
    value: Optional[float]
    unit: str = ""  # "%" when the paper reports a percentage; our fractions are scaled to match
    table: str = ""
    note: str = ""
    source: str = ""  # where the number was read (a public document a reader can check)


@dataclass(frozen=True)
class Benchmark:
    name: str
    split: str  # "<Dataset>-<Task>/<split>" or "<Dataset>-<Task>/interleaved_knn-<split>"
    type: str
    mode: str
    metrics: tuple[str, ...]
    primary: str
    decoding: Mapping[str, Any] = field(default_factory=dict)
    normalize: tuple[str, ...] = ("af1",)
    prompt: Optional[str] = None  # raw prompt for a task the model never trained on
    options: Any = None  # None | "templates" | [labels]: appended to `prompt` (AF1's option list)
    group_references: bool = False
    subset: Optional[str] = None
    paper: Optional[PaperNumber] = None
    notes: str = ""
    source: str = ""  # the registry file the entry came from

    @property
    def flamingo_task(self) -> str:
        return self.split.split("/")[0]

    @property
    def interleaved(self) -> bool:
        return "/interleaved_knn-" in self.split

    def with_decoding(self, **overrides) -> "Benchmark":
        d = dict(self.decoding)
        d.update({k: v for k, v in overrides.items() if v is not None})
        return replace(self, decoding=d)


@dataclass
class Registry:
    benchmarks: dict[str, Benchmark]
    sources: list[str]

    def __contains__(self, name: str) -> bool:
        return name in self.benchmarks

    def __getitem__(self, name: str) -> Benchmark:
        return self.benchmarks[name]

    def names(self) -> list[str]:
        return list(self.benchmarks)

    def select(self, spec: str | Sequence[str], data_root: str | Path | None = None) -> list[Benchmark]:
        """``"af1"``: every benchmark whose split exists under ``data_root``; otherwise the named ones
        (comma-separated string or list), each of which must exist in the registry (and under the root)."""
        names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
        if not names:
            raise RegistryError("no benchmarks named (give NAME[,NAME...] or 'af1')")
        if names == ["af1"]:
            if data_root is None:
                raise RegistryError("'af1' needs a data root to find which benchmarks are present")
            chosen = [b for b in self.benchmarks.values() if split_present(data_root, b)]
            if not chosen:
                raise RegistryError(f"none of the registry's {len(self.benchmarks)} benchmark splits exist under "
                                    f"{data_root} (e.g. {next(iter(self.benchmarks.values())).split})")
            return chosen
        unknown = [n for n in names if n not in self.benchmarks]
        if unknown:
            raise RegistryError(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(self.names())}")
        chosen = [self.benchmarks[n] for n in dict.fromkeys(names)]
        if data_root is not None:
            missing = [b for b in chosen if not split_present(data_root, b)]
            if missing:
                b = missing[0]
                raise RegistryError(f"benchmark {b.name}: split {b.split} not found under {data_root} "
                                    f"(expected {split_dir(data_root, b)})")
        return chosen


def split_dir(data_root: str | Path, b: Benchmark) -> Path:
    head, tail = b.split.split("/", 1)
    return Path(data_root) / head / tail.replace("interleaved_knn-", "")


def split_present(data_root: str | Path, b: Benchmark) -> bool:
    d = split_dir(data_root, b)
    if not (d / "metadata.json").is_file():
        return False
    return not b.interleaved or (d / "interleaved_knn.arrow").is_file()


# --------------------------------------------------------------------------------- loading


def builtin_text() -> str:
    return resources.files("megaflamingo.eval").joinpath(BUILTIN).read_text(encoding="utf-8")


def load_registry(extra: Sequence[str | Path] = (), builtin: bool = True) -> Registry:
    """The built-in registry, then each file of ``extra`` over it (later files win). A user file's
    entries inherit the built-in ``defaults`` (AF1's decoding) unless the file sets its own."""
    benches: dict[str, Benchmark] = {}
    sources = []
    base = yaml.safe_load(builtin_text())
    inherited = dict(base.get("defaults") or {})
    if builtin:
        benches.update(parse_registry(base, f"<builtin {BUILTIN}>"))
        sources.append(BUILTIN)
    for path in extra:
        p = Path(path)
        if not p.is_file():
            raise RegistryError(f"registry file {p} does not exist")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise RegistryError(f"{p}: not valid YAML ({e})") from None
        benches.update(parse_registry(raw, str(p), inherited))
        sources.append(str(p))
    return Registry(benches, sources)


def parse_registry(raw: Any, where: str, inherited: Optional[Mapping] = None) -> dict[str, Benchmark]:
    if not isinstance(raw, Mapping):
        raise RegistryError(f"{where}: expected a mapping with 'benchmarks'")
    unknown = set(raw) - {"version", "defaults", "benchmarks"}
    if unknown:
        raise RegistryError(f"{where}: unknown top-level key {sorted(unknown)[0]!r}")
    if raw.get("version", 1) != 1:
        raise RegistryError(f"{where}: version {raw.get('version')!r} is not supported (1)")
    own = raw.get("defaults") or {}
    if not isinstance(own, Mapping) or set(own) - {"decoding", "normalize"}:
        raise RegistryError(f"{where}: defaults may hold 'decoding' and 'normalize' only")
    defaults = {**(inherited or {}), **own}
    entries = raw.get("benchmarks")
    if not isinstance(entries, Mapping) or not entries:
        raise RegistryError(f"{where}: 'benchmarks' must be a non-empty mapping of name -> entry")
    return {str(name): _benchmark(str(name), entry, defaults, where) for name, entry in entries.items()}


_FIELDS = {"split", "type", "mode", "metrics", "primary", "decoding", "normalize", "prompt", "options",
           "group_references", "subset", "paper", "notes"}


def _benchmark(name: str, e: Any, defaults: Mapping, where: str) -> Benchmark:
    at = f"{where}: benchmark {name}"
    if not isinstance(e, Mapping):
        raise RegistryError(f"{at}: entry must be a mapping")
    unknown = set(e) - _FIELDS
    if unknown:
        raise RegistryError(f"{at}: unknown field {sorted(unknown)[0]!r} (known: {', '.join(sorted(_FIELDS))})")
    for req in ("split", "type", "mode", "metrics"):
        if req not in e:
            raise RegistryError(f"{at}: missing field {req!r}")
    split = str(e["split"])
    if not _SPLIT.match(split):
        raise RegistryError(f"{at}: split {split!r} is not '<Dataset>-<Task>/<split>' or "
                            "'<Dataset>-<Task>/interleaved_knn-<split>'")
    typ, mode = str(e["type"]), str(e["mode"])
    if typ not in TYPES:
        raise RegistryError(f"{at}: type {typ!r} is not one of {', '.join(TYPES)}")
    if mode not in MODES:
        raise RegistryError(f"{at}: mode {mode!r} is not one of {', '.join(MODES)}")
    if (mode == "retrieval-icl") != ("/interleaved_knn-" in split):
        raise RegistryError(f"{at}: mode retrieval-icl goes with an interleaved_knn-<split> split and only with it")
    metrics = e["metrics"]
    if isinstance(metrics, str) or not isinstance(metrics, Sequence) or not metrics:
        raise RegistryError(f"{at}: metrics must be a non-empty list")
    metrics = tuple(str(m) for m in metrics)
    bad = [m for m in metrics if m not in METRICS_BY_TYPE[typ]]
    if bad:
        raise RegistryError(f"{at}: metric {bad[0]!r} does not apply to type {typ} "
                            f"(choose from {', '.join(sorted(METRICS_BY_TYPE[typ]))})")
    primary = str(e.get("primary", metrics[0]))
    if primary not in metrics:
        raise RegistryError(f"{at}: primary {primary!r} is not among its metrics")
    decoding = dict(copy.deepcopy(defaults.get("decoding") or {}))
    decoding.update(e.get("decoding") or {})
    bad = set(decoding) - DECODING_KEYS
    if bad:
        raise RegistryError(f"{at}: decoding.{sorted(bad)[0]} is not a generation setting "
                            f"({', '.join(sorted(DECODING_KEYS))})")
    from .normalize import NORMALIZERS
    from .subsets import check_subset

    normalize = tuple(e.get("normalize", defaults.get("normalize", ("af1",))))
    bad = [n for n in normalize if n not in NORMALIZERS]
    if bad:
        raise RegistryError(f"{at}: normalizer {bad[0]!r} unknown (known: {', '.join(sorted(NORMALIZERS))})")
    options = e.get("options")
    if options is not None and options != "templates" and not (
            isinstance(options, Sequence) and not isinstance(options, str) and all(isinstance(x, str) for x in options)):
        raise RegistryError(f"{at}: options must be 'templates' or a list of labels")
    if options is not None and not e.get("prompt"):
        raise RegistryError(f"{at}: options need a prompt to append to")
    subset = e.get("subset")
    if subset is not None:
        try:
            check_subset(str(subset))
        except ValueError as err:
            raise RegistryError(f"{at}: {err}") from None
    paper = e.get("paper")
    if paper is not None:
        if not isinstance(paper, Mapping) or "metric" not in paper or "value" not in paper:
            raise RegistryError(f"{at}: paper needs metric and value (null when unknown)")
        unknown = set(paper) - {"metric", "value", "unit", "table", "note", "source"}
        if unknown:
            raise RegistryError(f"{at}: paper.{sorted(unknown)[0]} is not a known field")
        v = paper["value"]
        if v is not None and not isinstance(v, (int, float)):
            raise RegistryError(f"{at}: paper.value must be a number or null")
        paper = PaperNumber(str(paper["metric"]), None if v is None else float(v), str(paper.get("unit", "")),
                            str(paper.get("table", "")), str(paper.get("note", "")), str(paper.get("source", "")))
    return Benchmark(name=name, split=split, type=typ, mode=mode, metrics=metrics, primary=primary,
                     decoding=decoding, normalize=normalize, prompt=e.get("prompt"), options=options,
                     group_references=bool(e.get("group_references", False)),
                     subset=None if subset is None else str(subset), paper=paper, notes=str(e.get("notes", "")),
                     source=where)
