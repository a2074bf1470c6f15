"""The package's ownership rules, measured from its own imports (function-local ones included):

* no import cycle between subpackages (``megaflamingo.<sub>``; leaf modules such as ``tokens`` count
  as their own node);
* the library never imports a console script (``megaflamingo.cli``);
* production subpackages never import the test kit (``megaflamingo.testing``);
* no engine function is longer than ~80 lines (the training loop reads like a loop);
* nothing installable is named ``preprocess`` or ``tools``.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "megaflamingo"
PRODUCTION = ("audio", "checkpoint", "compat", "config", "data", "engine", "eval", "inference", "model",
              "preprocess", "errors", "hub", "io", "tokens", "resources", "<root>")
MAX_ENGINE_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _node(module: str) -> str:
    """``megaflamingo.data.loader`` -> ``data``; ``megaflamingo.tokens`` -> ``tokens``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def _is_module(dotted: str) -> bool:
    rel = Path(*dotted.split(".")[1:])
    return (PKG / rel).with_suffix(".py").is_file() or (PKG / rel / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """Every megaflamingo module ``path`` imports, resolving relative and ``from pkg import module``."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(n, ast.Import):
            out.update(a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = package.split(".")
                base = base[:len(base) - (n.level - 1)]
                target = ".".join(base + ([n.module] if n.module else []))
            else:
                target = n.module or ""
            out.add(target)
            out.update(f"{target}.{a.name}" for a in n.names if _is_module(f"{target}.{a.name}"))
    return {m for m in out if m == "megaflamingo" or m.startswith("megaflamingo.")}


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, set[str]]]:
    """node -> imported node -> the modules that import it (for error messages)."""
    g: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for path in PKG.rglob("*.py"):
        src = _node(_module_name(path))
        for target in _imports(path):
            dst = _node(target)
            if target != "megaflamingo" and dst != src:
                g[src][dst].add(_module_name(path))
    return g


def test_no_import_cycle_between_subpackages(graph):
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, {})):
            if state.get(m) == 1:
                cycle = path[path.index(m):] + [m]
                hops = [f"{a} -> {b} ({', '.join(sorted(graph[a][b]))})" for a, b in zip(cycle, cycle[1:])]
                pytest.fail("import cycle between subpackages:\n  " + "\n  ".join(hops))
            if m not in state:
                visit(m)
        path.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


@pytest.mark.parametrize("forbidden,allowed", [("cli", {"cli"}), ("testing", {"cli", "testing", "quickstart"})])
def test_library_never_imports_cli_or_test_kit(graph, forbidden, allowed):
    offenders = {src: sorted(mods[forbidden]) for src, mods in graph.items()
                 if forbidden in mods and src not in allowed}
    assert not offenders, f"megaflamingo.{forbidden} imported by {offenders}"
    assert all(p in PRODUCTION for p in graph if p not in ("cli", "testing", "quickstart")), sorted(graph)


def test_engine_functions_stay_short():
    long = []
    for path in (PKG / "engine").rglob("*.py"):
        for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = n.end_lineno - n.lineno + 1
                if lines > MAX_ENGINE_FUNCTION_LINES:
                    long.append(f"{path.name}:{n.lineno} {n.name} ({lines} lines)")
    assert not long, long


def test_only_the_library_is_installed():
    from setuptools import find_packages

    spec = Path(__file__).resolve().parents[1] / "setup.py"
    text = spec.read_text(encoding="utf-8")
    assert 'find_packages(include=["megaflamingo", "megaflamingo.*"])' in text
    found = find_packages(str(spec.parent), include=["megaflamingo", "megaflamingo.*"])
    assert found and all(p == "megaflamingo" or p.startswith("megaflamingo.") for p in found)
    assert "megaflamingo.cli" in found and "megaflamingo.testing" in found
