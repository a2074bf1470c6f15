"""Evaluation throughput: batched generation (megaflamingo-eval) vs a one-at-a-time loop.

A random tiny AudioFlamingo (OPT-style LM, xattn before every layer) on the synthetic 8-class test
split embedded with the tiny encoder; the same benchmark run through ``megaflamingo.eval.evaluate``
with ``--batch-size 1`` (one query per ``generate`` call, what AF1's inference loop did) and with
larger batches, greedy and with AF1's 3 beams. An untrained model seldom emits <|endofchunk|>, so
nearly every item generates ``--new-tokens`` tokens in every mode (a batch runs until its longest
answer ends, so batching can only do more token steps, never fewer: the speed-up is not flattered).

    python bench/bench_eval.py [--items 48] [--hidden 256] [--layers 4] [--new-tokens 16]
                               [--batches 1,4,16] [--beams 1,3] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml


def build(tmp: Path, items: int, hidden: int, layers: int, embed_dim: int, device: str):
    from megaflamingo.checkpoint.model_dir import LoadedModel, config_tokenizer, encoder_record_from_dataset
    from megaflamingo.cli.preprocess import main as preprocess_main
    from megaflamingo.config import load_config
    from megaflamingo.model.build import build_from_config
    from megaflamingo.testing import sounds as synthetic
    from megaflamingo.testing import tiny_lm_config_dict
    from megaflamingo.tokens import tiny_tokenizer

    per_class = max(1, items // len(synthetic.LABELS))
    data = tmp / "data"
    synthetic.generate(data, synthetic.SplitSizes(train=0, val=0, test=per_class), max_s=10.0)
    ds = f"{synthetic.DATASET}-{synthetic.TASK}"
    split = tmp / "arrow" / ds / "test"
    rc = preprocess_main(["embed", "--manifest", str(data / "manifests" / ds / "test.jsonl"), "--data-root", str(data),
                          "--out", str(split), "--encoder", "tiny", "--embed-dim", str(embed_dim), "--workers", "0",
                          "--no-progress"])
    assert rc in (0, None)
    lm = tiny_lm_config_dict("opt", vocab_size=len(tiny_tokenizer()), hidden_size=hidden, num_layers=layers)
    cfg = load_config(None, [
        "model.tokenizer=tiny", f"model.lm_config={json.dumps(lm)}", f"model.audio_embed_dim={embed_dim}",
        f"encoder.embed_dim={embed_dim}", "encoder.name=tiny", "model.max_num_fewshot=4", "model.max_num_window=16",
        "model.audio_transformer.n_head=4", "model.audio_transformer.n_layers=1",
        "model.audio_transformer.d_inner=256", "model.audio_transformer.max_num_media=64",
        "model.xattn.heads=4", "model.xattn.dim_head=32", "model.xattn.ff_mult=2"])
    tok = config_tokenizer(cfg)
    torch.manual_seed(0)
    model, tokens = build_from_config(cfg.model, tok, device)
    model.eval()
    loaded = LoadedModel(model=model, tokenizer=tok, tokens=tokens, config=cfg,
                         encoder=encoder_record_from_dataset(split), source="random", kind="export")
    reg = tmp / "bench_registry.yaml"
    reg.write_text(yaml.safe_dump({"benchmarks": {"synth": {
        "split": f"{ds}/test", "type": "classification", "mode": "zero-shot", "metrics": ["accuracy"]}}}))
    return loaded, tmp / "arrow", reg


def run(loaded, arrow, reg, out: Path, batch: int, beams: int, new_tokens: int) -> float:
    from megaflamingo.eval.evaluate import EvalOptions, evaluate

    opts = EvalOptions(model="random", data_root=str(arrow), benchmarks="synth", out=str(out), registry_files=[reg],
                       batch_size=batch, max_new_tokens=new_tokens, num_beams=beams, progress=False)
    t0 = time.perf_counter()
    res = evaluate(opts, log=lambda s: None, loaded=loaded)
    dt = time.perf_counter() - t0
    return res["synth"]["n"] / dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=48)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--beams", default="1,3")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        loaded, arrow, reg = build(tmp, a.items, a.hidden, a.layers, a.embed_dim, a.device)
        print(f"tiny AudioFlamingo: OPT-style LM {a.layers}x{a.hidden}, {a.items} items, {a.new_tokens} new tokens, "
              f"device {a.device}, {a.threads} thread(s)")
        print(f"{'beams':>5} {'batch':>5} {'items/s':>9} {'speed-up':>9}")
        for beams in (int(x) for x in a.beams.split(",")):
            base = None
            for b in (int(x) for x in a.batches.split(",")):
                ips = run(loaded, arrow, reg, tmp / f"out-{beams}-{b}", b, beams, a.new_tokens)
                base = base or ips
                print(f"{beams:5d} {b:5d} {ips:9.2f} {ips / base:8.2f}x")


if __name__ == "__main__":
    main()
