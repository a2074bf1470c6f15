"""docs/getting-started.md end to end on miniatures: downloaded Clotho + AudioCaps (published
layouts) -> prepare -> embed --config -> train --dry-run -> configs/custom.yaml training on 2
processes -> export / zero-to-fp32 / split -> infer on each, and transformers' from_pretrained.

The commands are the page's; only the sizes differ: the `tiny` encoder and a tiny random LM instead
of ClapCap and OPT-IML (no weights, no hub), and a few steps. The config is configs/custom.yaml with
exactly those model/encoder/budget fields replaced, so its data and stage settings are what is
tested. Where the point is what a script reads on stdout (`--json`: one document) the command runs
as a subprocess; the others call the same main() in-process (one torch import)."""
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
CLOTHO, AUDIOCAPS = "Clotho-v2-AudioCaptioning", "audiocaps-AudioCaptioning"


def sh(*cmd, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def one_json_document(r) -> dict:
    """stdout of a --json command: exactly one JSON document, nothing before or after it."""
    return json.loads(r.stdout)


def cli(module: str, *args) -> None:
    main = __import__(f"megaflamingo.cli.{module}", fromlist=["main"]).main
    rc = main([str(a) for a in args])
    assert rc == 0, (module, args, rc)


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


def prepare_and_embed(tmp_path) -> tuple[Path, Path, Path, Path]:
    """Steps 2 and 3 of the page: manifests from the downloaded layouts, then one embed --config per split."""
    data, manifests, arrow = tmp_path / "datasets", tmp_path / "manifests", tmp_path / "arrow"
    make_clotho_v2(data / "clotho")
    make_audiocaps(data / "audiocaps")
    cli("preprocess", "prepare", "clotho-v2", "--source", data / "clotho", "--out", manifests)
    cli("preprocess", "prepare", "audiocaps", "--source", data / "audiocaps", "--out", manifests,
        "--audio-pattern", "{youtube_id}.*")
    cfg = small_custom_config(tmp_path, arrow, tmp_path / "run")
    for ds, src in ((CLOTHO, "clotho"), (AUDIOCAPS, "audiocaps")):
        for split in ("train", "val", "test"):
            cli("preprocess", "embed", "--config", cfg, "--manifest", manifests / ds / f"{split}.jsonl",
                "--data-root", data / src, "--workers", "0", "--no-progress")
    return data, manifests, arrow, cfg


def test_embed_takes_its_settings_from_the_training_config(tmp_path, capsys):
    """`embed --config` makes data for exactly the config's model (encoder, dimension, windows, sample
    rate; --out under data.data_root), and a flag that contradicts the config is refused."""
    data, manifests = tmp_path / "datasets", tmp_path / "manifests"
    make_clotho_v2(data / "clotho")
    cli("preprocess", "prepare", "clotho-v2", "--source", data / "clotho", "--out", manifests)
    cfg = small_custom_config(tmp_path, tmp_path / "arrow", tmp_path / "run")
    train = manifests / CLOTHO / "train.jsonl"
    cli("preprocess", "embed", "--config", cfg, "--manifest", train, "--data-root", data / "clotho",
        "--workers", "0", "--no-progress")
    meta = json.loads((tmp_path / "arrow" / CLOTHO / "train" / "metadata.json").read_text())
    assert meta["encoder"]["name"] == "tiny" and meta["encoder"]["embed_dim"] == DIM
    assert meta["encoder"]["sample_rate"] == 44100 and meta["windows"]["max_windows"] == WINDOWS
    capsys.readouterr()

    from megaflamingo.cli.preprocess import main
    argv = ["embed", "--config", str(cfg), "--manifest", str(train), "--data-root", str(data / "clotho"),
            "--out", str(tmp_path / "other"), "--workers", "0"]
    assert main(argv + ["--max-windows", "16"]) == 2
    err = capsys.readouterr().err
    assert "--max-windows 16 contradicts encoder.max_windows=4 in" in err and "Traceback" not in err
    clap = yaml.safe_load(cfg.read_text())
    clap["encoder"].update(name="clapcap", random_init=True, embed_dim=1024, max_windows=16, sample_rate=16000)
    clap["model"].update(audio_embed_dim=1024, max_num_window=16)
    clap["model"]["audio_transformer"].update(max_num_media=16, max_window_per_audio=16)
    (tmp_path / "clap.yaml").write_text(yaml.safe_dump(clap, sort_keys=False))
    assert main(["embed", "--config", str(tmp_path / "clap.yaml")] + argv[3:]) == 2
    assert "encoder clapcap works at 44100 Hz, the config's encoder.sample_rate is 16000" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.distributed
def test_clotho_audiocaps_to_trained_model(tmp_path):
    data, manifests, arrow, cfg = prepare_and_embed(tmp_path)
    run_dir = tmp_path / "run"

    # 4. check, then train on 2 processes
    plan = one_json_document(sh(sys.executable, "-m", "megaflamingo.cli.train", "--config", cfg, "--dry-run",
                                "--json"))
    assert plan["datasets"] == [f"{CLOTHO}/train", f"{AUDIOCAPS}/train"] and "memory_estimate" in plan
    sh(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
       "-m", "megaflamingo.cli.train", "--config", cfg, timeout=900)
    assert (run_dir / "checkpoints" / "latest").is_file()

    # 5. the model: export, or consolidate the run dir, or re-shard; infer takes each, and the run dir
    cli("convert", "export", run_dir / "checkpoints", tmp_path / "model", "--no-progress")
    preds = tmp_path / "preds.jsonl"
    cli("infer", "--model", tmp_path / "model", "--manifest", manifests / CLOTHO / "test.jsonl", "--data-root",
        data / "clotho", "--out", preds, "--device", "cpu", "--max-new-tokens", "4", "--no-progress")
    rows = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(rows) == 4 and all(isinstance(r.get("prediction"), str) for r in rows)

    fp32 = tmp_path / "fp32"
    done = one_json_document(sh(sys.executable, "-m", "megaflamingo.cli.convert", "zero-to-fp32", run_dir, fp32,
                                "--json", "--no-progress"))
    assert done["out"] == str(fp32) and (fp32 / "config.json").is_file() and (fp32 / "encoder.json").is_file()
    cli("convert", "split", fp32, tmp_path / "parts", "--max-size", "60KB", "--no-progress")
    clip = str(data / "clotho" / json.loads((manifests / CLOTHO / "test.jsonl").read_text().splitlines()[0])["name"])
    ask = ["--audio", clip, "--prompt", "describe the sound in a sentence.", "--max-new-tokens", "3", "--json"]
    for model in (fp32, tmp_path / "parts"):
        cli("infer", "--model", model, *ask)
    answer = one_json_document(sh(sys.executable, "-m", "megaflamingo.cli.infer", "--model", run_dir, *ask))
    assert isinstance(answer["answer"], str)

    # the exported directory is a Hugging Face model directory
    import torch
    from transformers import AutoModelForCausalLM

    from megaflamingo.checkpoint.model_dir import load_model_dir

    ours = load_model_dir(tmp_path / "parts", with_encoder=False).model
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), hf.state_dict().values()))
