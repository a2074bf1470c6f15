"""megaflamingo-train's pre-flight reports every data problem of a config at once: each missing
dataset directory and every way a preprocessed split disagrees with the model and encoder
sections (dimension, windows, encoder, sample rate, window and overlap lengths), one line each."""
from __future__ import annotations

import json

import pytest

from megaflamingo.engine.build import PreflightError, preflight
from megaflamingo.testing.tiny_task import make_config, tiny_raw_config
from tests.data.data_fixtures import encoder_meta, make_split

D, W = 8, 4


def _config(root, blend, valid, **encoder):
    raw = tiny_raw_config(embed_dim=D, windows=W)
    raw["encoder"].update(encoder)
    raw["data"] = {"data_root": str(root), "blend": {n: {"weight": 1.0} for n in blend}, "valid": list(valid)}
    return make_config(raw, "cfg.yaml")


def test_every_problem_is_listed_at_once(tmp_path):
    # one good split, one embedded at 44.1 kHz with 3 s windows, two blend dirs and a valid dir missing
    make_split(tmp_path, "Good-AudioCaptioning/train", 2, dim=D, max_windows=W)
    odd = dict(encoder_meta(dim=D), sample_rate=44100)
    make_split(tmp_path, "Odd-AudioCaptioning/train", 2, dim=D, max_windows=W, encoder=odd)
    meta_path = tmp_path / "Odd-AudioCaptioning/train/metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["windows"].update(window_s=3.0, overlap_s=1.0)
    meta_path.write_text(json.dumps(meta))
    cfg = _config(tmp_path, ["Good-AudioCaptioning/train", "Odd-AudioCaptioning/train", "Missing-One/train",
                             "Missing-Two/train"], ["Missing-One/val"], sample_rate=16000)
    with pytest.raises(PreflightError) as err:
        preflight(cfg)
    problems = err.value.problems
    assert problems[0].startswith("data.blend.Odd-AudioCaptioning/train: embedded at 44100 Hz, "
                                  "encoder.sample_rate is 16000")
    assert [p.split(":")[0] for p in problems] == [
        "data.blend.Odd-AudioCaptioning/train"] * 3 + ["data.blend.Missing-One/train", "data.blend.Missing-Two/train",
                                                        "data.valid.Missing-One/val"]
    assert "window_s=3.0, encoder.window_s is 7.0" in problems[1] and "overlap_s=1.0" in problems[2]
    assert all("does not exist" in p for p in problems[3:])
    text = str(err.value)
    assert text.splitlines()[0] == "6 problems (cfg.yaml):" and len(text.splitlines()) == 7

    # dimension and window count (the config keeps its encoder section equal to its model's)
    raw = tiny_raw_config(embed_dim=16, windows=2)
    raw["data"] = {"data_root": str(tmp_path), "blend": {"Good-AudioCaptioning/train": {}}}
    with pytest.raises(PreflightError) as err:
        preflight(make_config(raw, "cfg.yaml"))
    assert err.value.problems == [
        "data.blend.Good-AudioCaptioning/train: embeddings are 8-d (tiny), model.audio_embed_dim is 16",
        "data.blend.Good-AudioCaptioning/train: preprocessed with max_windows=4, model.max_num_window is 2"]
    assert preflight(_config(tmp_path, ["Good-AudioCaptioning/train"], [])) == [
        str(tmp_path / "Good-AudioCaptioning/train")]
    cfg = _config(tmp_path / "nowhere", ["Good-AudioCaptioning/train"], [])
    with pytest.raises(PreflightError, match=r"^data.data_root: directory .*nowhere does not exist \(cfg.yaml\)$"):
        preflight(cfg)


def test_train_dry_run_prints_them_all_and_exits_2(tmp_path, capsys):
    import yaml

    from megaflamingo.cli.train import main

    make_split(tmp_path, "Good-AudioCaptioning/train", 2, dim=D, max_windows=W)
    raw = tiny_raw_config(embed_dim=D, windows=W)
    raw["encoder"]["sample_rate"] = 22050
    raw["data"] = {"data_root": str(tmp_path), "blend": {"Good-AudioCaptioning/train": {}, "Gone-X/train": {}},
                   "valid": ["Gone-X/val"]}
    raw["train"] = {"run_dir": str(tmp_path / "run")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main(["--config", str(tmp_path / "c.yaml"), "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert "accelerator" not in captured.out  # DeepSpeed's start-up warning goes to stderr
    err = captured.err.strip().splitlines()
    err = err[next(i for i, line in enumerate(err) if line.startswith("megaflamingo-train:")):]
    assert err[0] == f"megaflamingo-train: error: 3 problems ({tmp_path / 'c.yaml'}):"
    assert "embedded at 16000 Hz, encoder.sample_rate is 22050" in err[1]
    assert "Gone-X/train" in err[2] and "Gone-X/val" in err[3] and len(err) == 4
