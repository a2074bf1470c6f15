"""What every console script promises: help text for every flag (no raw Markdown backticks), and
user mistakes answered with one line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import argparse
import importlib

import pytest

CLIS = ("preprocess", "train", "convert", "infer")


def _parsers():
    """(command path, parser) for every command and subcommand of the four console scripts."""
    out = []
    for name in CLIS:
        todo = [(f"megaflamingo-{name}", importlib.import_module(f"megaflamingo.cli.{name}").build_parser())]
        while todo:
            path, parser = todo.pop()
            out.append((path, parser))
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    todo.extend((f"{path} {sub}", p) for sub, p in action.choices.items())
    return out


def test_every_flag_has_help_and_no_text_has_backticks():
    missing, ticks = [], []
    parsers = _parsers()
    assert len(parsers) >= 4 + 5 + 6  # scripts + preprocess and convert subcommands
    for path, parser in parsers:
        for text in (parser.description, parser.epilog):
            if text and "`" in text:
                ticks.append(f"{path}: {text[:60]!r}")
        for a in parser._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) or a.help == argparse.SUPPRESS:
                continue
            name = "/".join(a.option_strings) or a.dest
            if not (a.help or "").strip():
                missing.append(f"{path} {name}")
            elif "`" in a.help:
                ticks.append(f"{path} {name}: {a.help!r}")
    assert not missing, f"flags without --help text: {missing}"
    assert not ticks, f"raw backticks in help: {ticks}"


def _one_line_error(capsys, main, argv, prog):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith(prog)]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def test_user_mistakes_are_one_line_and_exit_2(capsys, tmp_path):
    from megaflamingo.cli.preprocess import main as preprocess

    (tmp_path / "clips").mkdir()
    line = _one_line_error(capsys, preprocess, ["manifest", "--folder", str(tmp_path / "clips"), "--labels",
                                                "/missing.csv", "--out", str(tmp_path / "m.jsonl")],
                           "megaflamingo-preprocess")
    assert line.endswith("labels file /missing.csv does not exist")
    line = _one_line_error(capsys, preprocess, ["prepare", "clotho-v3", "--source", str(tmp_path), "--out",
                                                str(tmp_path / "o")], "megaflamingo-preprocess")
    assert "unknown recipe 'clotho-v3'; did you mean clotho-v2" in line


def test_cuda_device_on_a_cpu_only_torch(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    from megaflamingo.cli.infer import main as infer

    line = _one_line_error(capsys, infer, ["--model", str(tmp_path), "--audio", "a.wav", "--prompt", "p",
                                           "--device", "cuda"], "megaflamingo-infer")
    assert "--device cuda:" in line and "use --device cpu" in line
