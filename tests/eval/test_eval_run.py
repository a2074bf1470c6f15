"""`megaflamingo-eval` end to end on a tiny trained model: one process, resume after a kill, compare."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megaflamingo.cli.eval import main

from .conftest import read_jsonl

REPO = Path(__file__).resolve().parents[2]


def _args(k, out, *extra, benchmarks="synth-cls,synth-cls-icl,synth-cap"):
    return ["--model", str(k["model"]), "--data-root", str(k["arrow"]), "--benchmarks", benchmarks,
            "--out", str(out), "--registry", str(k["registry"]), "--batch-size", "4", "--no-progress", *extra]


def test_one_process_run_scores_every_kind(evalkit, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(evalkit, out)) == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())["benchmarks"]
    assert set(res) == {"synth-cls", "synth-cls-icl", "synth-cap"}
    cls = res["synth-cls"]
    assert cls["n"] == 16 and cls["metrics"]["accuracy"] >= 0.85  # 8 classes x 2 test clips; chance 1/8
    assert 0 <= cls["metrics"]["macro_f1"] <= 1
    assert res["synth-cls-icl"]["n"] == 16 and res["synth-cls-icl"]["settings"]["decoding"]["num_beams"] == 2
    # Captions: one item per clip, all captions of that clip its references.
    cap = res["synth-cap"]
    recs = read_jsonl(out / "synth-cap.predictions.jsonl")
    assert cap["n"] == len(recs) == 16 and all(len(r["references"]) == 5 for r in recs)
    assert cap["settings"]["rendering"].startswith("zero-shot") and "cider" in cap["metrics"]
    # Each record is the question asked and its answer; the ICL prompt carried 2 examples + the query.
    icl = read_jsonl(out / "synth-cls-icl.predictions.jsonl")
    assert len({r["id"] for r in icl}) == 16
    md = (out / "results.md").read_text()
    assert "| synth-cls | in-distribution | accuracy |" in md and "50.0%" in md


def test_resume_after_kill_gives_the_same_results(evalkit, tmp_path):
    """Kill a run mid-benchmark (SIGKILL, after some batches are on disk), tear its last line, resume:
    results.json equals an uninterrupted run's."""
    full = tmp_path / "full"
    assert main(_args(evalkit, full, benchmarks="synth-cls")) == 0
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "megaflamingo.cli.eval",
                             *_args(evalkit, out, "--batch-size", "2", benchmarks="synth-cls")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(REPO))
    pred = out / "synth-cls.predictions.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if pred.is_file() and len(pred.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lines = pred.read_text().splitlines()
    assert 4 <= len(lines) < 16, f"kill landed outside the benchmark ({len(lines)} lines)"
    with open(pred, "a") as f:  # what a kill inside write() leaves
        f.write('{"id": "test/tor')
    assert main(_args(evalkit, out, "--batch-size", "2", "--resume", benchmarks="synth-cls")) == 0
    got = read_jsonl(pred)
    assert [json.loads(x)["id"] for x in lines] == [r["id"] for r in got[:len(lines)]]  # kept, not redone
    assert len(got) == 16 and len({r["id"] for r in got}) == 16
    a = json.loads((full / "results.json").read_text())["benchmarks"]["synth-cls"]
    b = json.loads((out / "results.json").read_text())["benchmarks"]["synth-cls"]
    assert a["metrics"] == b["metrics"] and a["n"] == b["n"]
    # A finished run resumed again has nothing to do and rewrites the same results.
    before = (out / "results.json").read_bytes()
    assert main(_args(evalkit, out, "--batch-size", "2", "--resume", benchmarks="synth-cls")) == 0
    assert (out / "results.json").read_bytes() == before


def test_existing_predictions_need_resume_and_same_settings(evalkit, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(evalkit, out, "--limit", "3", benchmarks="synth-cls")) == 0
    capsys.readouterr()
    assert main(_args(evalkit, out, benchmarks="synth-cls")) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(_args(evalkit, out, "--resume", "--max-new-tokens", "5", benchmarks="synth-cls")) == 2
    assert "decoding" in capsys.readouterr().err
    # A larger --limit continues the same evaluation.
    assert main(_args(evalkit, out, "--resume", "--limit", "6", benchmarks="synth-cls")) == 0
    assert len(read_jsonl(out / "synth-cls.predictions.jsonl")) == 6


def test_compare_prints_both_runs(evalkit, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_args(evalkit, a, "--limit", "4", benchmarks="synth-cls")) == 0
    assert main(_args(evalkit, b, "--limit", "8", benchmarks="synth-cls")) == 0
    capsys.readouterr()
    assert main(["--compare", str(a / "results.json"), str(b / "results.json")]) == 0
    text = capsys.readouterr().out
    acc = [l for l in text.splitlines() if l.startswith("synth-cls") and " accuracy " in f" {l} "]
    assert len(acc) == 1
    ra = json.loads((a / "results.json").read_text())["benchmarks"]["synth-cls"]["metrics"]["accuracy"]
    rb = json.loads((b / "results.json").read_text())["benchmarks"]["synth-cls"]["metrics"]["accuracy"]
    assert f"{ra:.4f}" in acc[0] and f"{rb:.4f}" in acc[0] and f"{rb - ra:+.4f}" in acc[0]


def test_bad_selection_gives_clear_errors(evalkit, tmp_path, capsys):
    assert main(_args(evalkit, tmp_path / "x", benchmarks="nope")) == 2
    assert "unknown benchmark" in capsys.readouterr().err
    # 'af1' with only synthetic data present: nothing of AF1's suite is under the root.
    assert main(["--model", str(evalkit["model"]), "--data-root", str(evalkit["arrow"]), "--benchmarks", "af1",
                 "--out", str(tmp_path / "y")]) == 2
    assert "none of the registry" in capsys.readouterr().err
    assert main(["--compare", str(tmp_path / "missing.json"), str(tmp_path / "m2.json")]) == 2
