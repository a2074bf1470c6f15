"""docs/getting-started.md end to end on miniatures: downloaded Clotho + AudioCaps (published
layouts) -> prepare -> embed -> configs/custom.yaml training on 2 processes -> export -> infer.

The commands are the page's, run as subprocesses the way a user types them; only the sizes differ:
the `tiny` encoder and a tiny random LM instead of ClapCap and OPT-IML (no weights, no hub), and a
few steps. The config is configs/custom.yaml with exactly those model/encoder/budget fields
replaced, so its data and stage settings are what is tested."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tests.preprocess.dataset_miniatures import make_audiocaps, make_clotho_v2

REPO = Path(__file__).resolve().parents[2]
DIM, WINDOWS = 32, 4


def sh(*cmd, env=None, timeout=600):
    full = dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    full.update(env or {})
    r = subprocess.run([str(c) for c in cmd], cwd=REPO, env=full, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def preprocess(*args):
    """`megaflamingo-preprocess ARGS`, in-process (the same main() the console script runs;
    saves a torch import per call)."""
    from megaflamingo.cli.preprocess import main
    rc = main([str(a) for a in args])
    assert rc == 0, (args, rc)


def small_custom_config(tmp_path, arrow: Path, run_dir: Path) -> Path:
    raw = yaml.safe_load((REPO / "configs" / "custom.yaml").read_text())
    tiny = yaml.safe_load((REPO / "configs" / "tiny_cpu.yaml").read_text())
    raw["model"] = dict(tiny["model"], audio_embed_dim=DIM, max_num_window=WINDOWS, max_num_fewshot=1,
                        audio_transformer={"n_head": 2, "n_layers": 1, "d_inner": 64,
                                           "max_num_media": WINDOWS, "max_window_per_audio": WINDOWS},
                        xattn={"every_n_layers": 1, "heads": 2, "dim_head": 16, "ff_mult": 2})
    raw["model"]["lm_config"] = dict(tiny["model"]["lm_config"], max_position_embeddings=1024)
    raw["encoder"] = {"name": "tiny", "random_init": True, "embed_dim": DIM, "sample_rate": 44100,
                      "window_s": 7.0, "overlap_s": 5.25, "max_windows": WINDOWS}
    raw["data"].update(data_root=str(arrow), global_weight=1.0, num_workers=0)
    raw["train"].update(run_dir=str(run_dir), micro_batch_size=2, gradient_accumulation_steps=1,
                        precision="fp32", max_steps=4, warmup_steps=1, eval_steps=4, save_steps=4,
                        eval_max_batches=1, logging_steps=1, dist_timeout_s=180, progress_bar=False)
    path = tmp_path / "custom_small.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.slow
@pytest.mark.distributed
def test_clotho_audiocaps_to_trained_model(tmp_path):
    data, manifests, arrow = tmp_path / "datasets", tmp_path / "manifests", tmp_path / "arrow"
    make_clotho_v2(data / "clotho")
    make_audiocaps(data / "audiocaps")

    # 1. manifests from the downloaded layouts
    preprocess("prepare", "clotho-v2", "--source", data / "clotho", "--out", manifests)
    preprocess("prepare", "audiocaps", "--source", data / "audiocaps", "--out", manifests,
               "--audio-pattern", "{youtube_id}.*")
    # 2. window embeddings, one Arrow split per manifest
    for ds, src in (("Clotho-v2-AudioCaptioning", "clotho"), ("audiocaps-AudioCaptioning", "audiocaps")):
        for split in ("train", "val", "test"):
            preprocess("embed", "--manifest", manifests / ds / f"{split}.jsonl", "--data-root", data / src,
                       "--out", arrow / ds / split, "--encoder", "tiny", "--embed-dim", DIM,
                       "--max-windows", WINDOWS, "--workers", "0", "--no-progress")
            assert (arrow / ds / split / "metadata.json").is_file()
    # 3. configs/custom.yaml (tiny model) on 2 processes
    run_dir = tmp_path / "run"
    cfg = small_custom_config(tmp_path, arrow, run_dir)
    dry = sh(sys.executable, "-m", "megaflamingo.engine.cli", "--config", cfg, "--dry-run")
    plan, _ = json.JSONDecoder().raw_decode(dry.stdout[dry.stdout.index("{"):])  # + a memory table
    assert plan["datasets"] == ["Clotho-v2-AudioCaptioning/train", "audiocaps-AudioCaptioning/train"]
    sh(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
       "--nproc_per_node", "2", "-m", "megaflamingo.engine.cli", "--config", cfg, timeout=900)
    assert (run_dir / "checkpoints" / "latest").is_file()
    # 4. export and answer the evaluation clips
    sh(sys.executable, "-m", "tools.convert", "export", run_dir / "checkpoints", tmp_path / "model")
    preds = tmp_path / "preds.jsonl"
    sh(sys.executable, "-m", "megaflamingo.inference.cli", "--model", tmp_path / "model", "--manifest",
       manifests / "Clotho-v2-AudioCaptioning" / "test.jsonl", "--data-root", data / "clotho",
       "--out", preds, "--device", "cpu", "--max-new-tokens", "4", "--no-progress")
    rows = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(rows) == 4 and all(isinstance(r.get("output", r.get("prediction")), str) for r in rows)


@pytest.mark.xfail(strict=False, reason="embed --config (settings from the training config) is not there yet")
def test_embed_takes_its_settings_from_the_training_config(tmp_path):
    """The page's shorter form: `embed --config configs/custom.yaml` takes encoder, dims, windows and
    sample rate from the config, so dataset and model cannot disagree."""
    data, manifests = tmp_path / "datasets", tmp_path / "manifests"
    make_clotho_v2(data / "clotho")
    preprocess("prepare", "clotho-v2", "--source", data / "clotho", "--out", manifests)
    cfg = small_custom_config(tmp_path, tmp_path / "arrow", tmp_path / "run")
    out = tmp_path / "arrow" / "Clotho-v2-AudioCaptioning" / "train"
    preprocess("embed", "--config", cfg, "--manifest", manifests / "Clotho-v2-AudioCaptioning" / "train.jsonl",
               "--data-root", data / "clotho", "--out", out, "--workers", "0", "--min-file-bytes", "0")
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["encoder"]["embed_dim"] == DIM and meta["windows"]["max_windows"] == WINDOWS
