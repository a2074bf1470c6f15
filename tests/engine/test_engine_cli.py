"""`megaflamingo-train` on configs/tiny_cpu.yaml with the real data pipeline (Arrow splits written by
megaflamingo.testing.tiny_task): clear pre-flight errors, dry run, train + resume auto."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megaflamingo.cli.train import main
from megaflamingo.testing.tiny_task import write_tiny_dataset

REPO = Path(__file__).parents[2]
CFG = str(REPO / "configs" / "tiny_cpu.yaml")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinydata")
    write_tiny_dataset(root, rows={"train": 48, "val": 8})
    return root


@pytest.fixture
def single_env(monkeypatch):
    # main() fills RANK/WORLD_SIZE/... for a world of one; monkeypatch restores them afterwards.
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK",
              "SLURM_PROCID"):
        monkeypatch.setenv(k, "x")
        monkeypatch.delenv(k)


def test_missing_placeholder_is_one_clear_error(single_env, monkeypatch, capsys):
    monkeypatch.delenv("MF_DATA_ROOT", raising=False)
    assert main(["--config", CFG]) == 2
    err = capsys.readouterr().err
    assert "data.data_root" in err and "MF_DATA_ROOT" in err and err.count("\n") == 1


def test_missing_dataset_and_embed_mismatch_fail_before_training(single_env, tmp_path, data_root, capsys):
    assert main(["--config", CFG, "--placeholder", f"MF_DATA_ROOT={tmp_path}"]) == 2
    assert "SynthTiny-EventClassification/train" in capsys.readouterr().err
    assert main(["--config", CFG, "--placeholder", f"MF_DATA_ROOT={data_root}", "model.audio_embed_dim=64",
                 "encoder.embed_dim=64"]) == 2
    assert "model.audio_embed_dim is 64" in capsys.readouterr().err
    # Longer samples than the LM can embed would crash at the first long batch: refused up front.
    assert main(["--config", CFG, "--placeholder", f"MF_DATA_ROOT={data_root}", "data.max_tokens=4096",
                 "data.max_tokens_per_row=4096"]) == 2
    assert "data.max_tokens: 4096 exceeds the LM's 1024 positions" in capsys.readouterr().err


def test_missing_resume_dir_and_corrupt_arrow_shard_fail_at_preflight(single_env, tmp_path, data_root, capsys):
    """Exit 2 with one line naming the cause, before any process group or model exists."""
    import shutil

    run = tmp_path / "run"
    args = ["--config", CFG, "--placeholder", f"MF_DATA_ROOT={data_root}", f"train.run_dir={run}"]
    assert main(args + ["--resume", str(tmp_path / "nope" / "checkpoints")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nope' / 'checkpoints'}" in err and "no such directory" in err and err.count("\n") == 1
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    shard = sorted((root / "SynthTiny-EventClassification" / "train").glob("shard-*.arrow"))[0]
    shard.write_bytes(shard.read_bytes()[:200])
    assert main(["--config", CFG, "--placeholder", f"MF_DATA_ROOT={root}", f"train.run_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert f"{shard}: not a readable Arrow IPC file" in err and err.count("\n") == 1
    assert not run.exists()


def test_validation_text_is_cut_at_the_lms_positions(data_root, monkeypatch):
    """AF1 cut validation text at 5 x data.max_tokens; past the LM's positions that would crash the
    first evaluation, so the cap is the smaller of the two."""
    from megaflamingo.config import load_config
    from megaflamingo.engine import build

    seen = []
    real = build.build_valid_loaders
    monkeypatch.setattr(build, "build_valid_loaders", lambda *a, **kw: seen.append(kw["max_tokens"]) or real(*a, **kw))
    monkeypatch.setenv("MF_DATA_ROOT", str(data_root))
    monkeypatch.setenv("MF_RUN_DIR", str(data_root / "run"))
    for max_tokens, want in ((64, 320), (512, 1024)):
        cfg = load_config(CFG, [f"data.max_tokens={max_tokens}", f"data.max_tokens_per_row={max_tokens}"])
        tok, ids = build.build_run_tokenizer(cfg)
        _, valid = build.build_loaders(cfg, tok, ids, 0, 1)
        assert valid and seen[-1] == want


def test_ds_json_contradiction_fails_before_training(single_env, data_root, capsys):
    rc = main(["--config", CFG, "--placeholder", f"MF_DATA_ROOT={data_root}",
               "deepspeed.overrides={gradient_clipping: 2.0}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "gradient_clipping" in err and "train.grad_clip" in err


@pytest.mark.slow
def test_train_resume_auto_and_dry_run(tmp_path, data_root):
    env = dict(os.environ, MF_DATA_ROOT=str(data_root), MF_RUN_DIR=str(tmp_path / "run"), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    base = [sys.executable, "-m", "megaflamingo.cli.train", "--config", CFG, "train.save_steps=3",
            "train.logging_steps=2", "train.eval_steps=3", "train.eval_max_batches=1"]
    dry = subprocess.run(base + ["--dry-run"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    plan, _ = json.JSONDecoder().raw_decode(dry.stdout[dry.stdout.index("{"):])
    assert plan["world_size"] == 1 and plan["global_batch"] == 4 and plan["trainable_params"] > 0
    assert plan["frozen_params"] > plan["trainable_params"]
    assert "per CPU" in dry.stdout  # DeepSpeed's memory estimate
    assert not (tmp_path / "run" / "checkpoints").exists()

    r1 = subprocess.run(base + ["train.max_steps=3"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-00000003"
    r2 = subprocess.run(base + ["train.max_steps=5"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "resumed from" in r2.stderr
    steps = [json.loads(l)["step"] for l in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    assert "valid SynthTiny-EventClassification/val=" in r1.stdout + r1.stderr
    assert (tmp_path / "run" / "tensorboard").is_dir() and (tmp_path / "run" / "config.json").is_file()


def test_stop_signal_during_startup_is_recorded_and_exits_75(single_env, data_root, monkeypatch):
    """A SIGTERM that lands while the run is still being built must not kill the process: the CLI
    installs the stop handler first, the flag survives until the trainer reads it, the exit code is 75."""
    import signal

    import megaflamingo.engine.run as run_mod
    from megaflamingo.engine import stop
    from megaflamingo.engine.trainer import TrainResult

    seen = {}

    def fake_run(cfg, world, dry_run=False, plan_json=False):  # stands in for model build + Trainer.train()
        assert signal.getsignal(signal.SIGTERM) is stop._handler  # else the kill below would end pytest
        os.kill(os.getpid(), signal.SIGTERM)
        seen["requested"] = stop.requested()
        stop.clear()
        return TrainResult(step=0, stopped_by_signal=seen["requested"])

    monkeypatch.setattr(run_mod, "run", fake_run)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["--config", CFG, "--placeholder", f"MF_DATA_ROOT={data_root}"]) == 75
    assert seen == {"requested": True}
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored when main returns
