"""Human-readable tables: our numbers beside AF1's paper (results.md), and two runs side by side."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional


def _scaled(value: Optional[float], unit: str) -> Optional[float]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return 100.0 * value if unit == "%" else value


def _cell(v: Optional[float], unit: str = "") -> str:
    if v is None:
        return "—"
    return f"{v:.1f}{unit}" if unit == "%" else f"{v:.3f}"


def results_markdown(doc: dict) -> str:
    lines = [f"# Evaluation of `{doc.get('model', '?')}`", "",
             "AF1 column: the number the Audio Flamingo paper (arXiv 2402.01831) reports, from the table named; "
             "— where the registry holds none. A metric marked * is not the paper's metric (not comparable).", "",
             "| benchmark | mode | metric | ours | AF1 paper | paper table | n |",
             "|---|---|---|---|---|---|---|"]
    for name, e in doc.get("benchmarks", {}).items():
        paper = e.get("paper") or {}
        unit = paper.get("unit", "")
        metric = paper.get("metric") or e.get("primary")
        ours = e["metrics"].get(metric)
        shown = metric
        if ours is None and metric not in e["metrics"]:
            shown = f"{e.get('primary')}*"
            ours = e["metrics"].get(e.get("primary"))
        lines.append(f"| {name} | {e['settings'].get('mode', '')} | {shown} | {_cell(_scaled(ours, unit), unit)} | "
                     f"{_cell(paper.get('value'), unit)} | {paper.get('table', '')} | {e.get('n', '')} |")
    cited = [(n, e["paper"]) for n, e in doc.get("benchmarks", {}).items()
             if (e.get("paper") or {}).get("value") is not None and (e["paper"].get("source") or e["paper"].get("note"))]
    if cited:
        lines += ["", "Where the AF1 numbers come from:", ""]
        lines += [f"* {n}: " + "; ".join(x for x in (p.get("source"), p.get("note")) if x) for n, p in cited]
    lines += ["", "All metrics:", ""]
    for name, e in doc.get("benchmarks", {}).items():
        vals = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in e["metrics"].items())
        s = e["settings"]
        lines.append(f"* **{name}** ({s.get('split')}, {s.get('rendering')}, decoding {s.get('decoding')}): {vals}")
    return "\n".join(lines) + "\n"


def load_results(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no results.json")
    doc = json.loads(p.read_text(encoding="utf-8"))
    if "benchmarks" not in doc:
        raise ValueError(f"{p}: not a megaflamingo-eval results.json (no 'benchmarks')")
    return doc


def compare(a: dict, b: dict, label_a: str = "A", label_b: str = "B") -> str:
    """Every metric of every benchmark in either run: A, B and B - A."""
    rows = [("benchmark", "metric", label_a, label_b, "B-A")]
    names = list(dict.fromkeys(list(a["benchmarks"]) + list(b["benchmarks"])))
    for n in names:
        ea, eb = a["benchmarks"].get(n, {}), b["benchmarks"].get(n, {})
        ma, mb = ea.get("metrics", {}), eb.get("metrics", {})
        for m in dict.fromkeys(list(ma) + list(mb)):
            va, vb = ma.get(m), mb.get(m)
            fa = f"{va:.4f}" if isinstance(va, (int, float)) else "—"
            fb = f"{vb:.4f}" if isinstance(vb, (int, float)) else "—"
            d = f"{vb - va:+.4f}" if isinstance(va, (int, float)) and isinstance(vb, (int, float)) else ""
            rows.append((n, m, fa, fb, d))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows) + "\n"
