"""Build a small *trained* model for the inference tests, fast and in-process.

Synthetic clips -> `megaflamingo-preprocess embed` (tiny encoder) -> a few hundred AdamW steps of a
tiny AudioFlamingo on the train split (plain PyTorch loop, same sample text and labels as the data
pipeline) -> an exported model directory (config.json + model.safetensors + encoder.json).
The DeepSpeed path is exercised by the quickstart test; here we need a model that knows the answers.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from megaflamingo.testing import sounds as synthetic
from megaflamingo.config import load_config

DS = f"{synthetic.DATASET}-{synthetic.TASK}"


def model_config_overrides(embed_dim: int, fewshot: int) -> list[str]:
    from megaflamingo.testing import tiny_lm_config_dict, tiny_tokenizer

    lm = tiny_lm_config_dict("opt", vocab_size=len(tiny_tokenizer()), hidden_size=64, num_layers=2)
    return [
        "model.tokenizer=tiny", f"model.lm_config={json.dumps(lm)}",
        f"model.audio_embed_dim={embed_dim}", f"encoder.embed_dim={embed_dim}", "encoder.name=tiny",
        f"model.max_num_fewshot={fewshot}", "model.max_num_window=16",
        "model.audio_transformer.n_head=4", "model.audio_transformer.n_layers=1",
        "model.audio_transformer.d_inner=256", f"model.audio_transformer.max_num_media={16 * fewshot}",
        "model.xattn.heads=4", "model.xattn.dim_head=32", "model.xattn.ff_mult=2",
    ]


def embed_splits(data: Path, arrow: Path, splits=("train", "test"), embed_dim: int = 64) -> None:
    from megaflamingo.cli.preprocess import main as preprocess_main

    for split in splits:
        rc = preprocess_main(["embed", "--manifest", str(data / "manifests" / DS / f"{split}.jsonl"),
                              "--data-root", str(data), "--out", str(arrow / DS / split), "--encoder", "tiny",
                              "--embed-dim", str(embed_dim), "--workers", "0", "--no-progress"])
        assert rc in (0, None), f"preprocess embed {split} failed"


def train_and_export(arrow: Path, out: Path, embed_dim: int = 64, fewshot: int = 4, steps: int = 160,
                     batch: int = 16, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    # Two cores shared by several test processes: one intra-op thread avoids oversubscription.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(arrow, out, embed_dim, fewshot, steps, batch, seed)
    finally:
        torch.set_num_threads(threads)


def _train(arrow, out, embed_dim, fewshot, steps, batch, seed):
    from megaflamingo.data.labels import build_labels
    from megaflamingo.inference.batch import items_from_split
    from megaflamingo.checkpoint.model_dir import config_tokenizer, encoder_record_from_dataset
    from megaflamingo.inference.prompts import single_prompt
    from megaflamingo.model import apply_freeze_policy, build_from_config

    # The config records what the loop below trains on (prompts as given, no task prefix), so
    # inference prompts the model in that form.
    blend = {f"{DS}/train": {"prefix_prob": 0.0, "augmentations": {"do_nothing": 1.0}}}
    cfg = load_config(None, model_config_overrides(embed_dim, fewshot) + [f"data.blend={json.dumps(blend)}"])
    tok = config_tokenizer(cfg)
    model, ids = build_from_config(cfg.model, tok)
    apply_freeze_policy(model, "pretrain")
    items, record, _ = items_from_split(arrow / DS / "train")
    silence = np.asarray(record["silence_embedding"], dtype=np.float32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    L, W = 16 * fewshot, 16
    model.train()
    for _ in range(steps):
        pick = [items[j] for j in rng.choice(len(items), min(batch, len(items)), replace=False)]
        texts = [single_prompt(tok, it.prompt, "") + f"{it.output.lower()}<|endofchunk|>{tok.eos_token}" for it in pick]
        enc = tok(texts, padding=True, return_tensors="pt")
        emb = np.broadcast_to(silence, (len(pick), L, embed_dim)).copy()
        mask = np.zeros((len(pick), L), dtype=bool)
        for b, it in enumerate(pick):
            emb[b, :len(it.windows)] = it.windows
            mask[b, :len(it.windows)] = True
        res = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    audio_embeds=torch.from_numpy(emb), audio_mask=torch.from_numpy(mask),
                    labels=build_labels(enc["input_ids"], ids))
        res.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return save_export(model, cfg, out, encoder_record_from_dataset(arrow / DS / "train"))


def save_export(model, cfg, out: Path, encoder_record: dict) -> Path:
    from safetensors.torch import save_file

    from megaflamingo.checkpoint.model_dir import write_encoder_record

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    # Tied weights (OPT's lm_head = embed_tokens) are stored once, as safetensors requires.
    seen, uniq = set(), {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), tuple(v.shape))
        if key not in seen:
            seen.add(key)
            uniq[k] = v.detach().contiguous().clone()
    save_file(uniq, str(out / "model.safetensors"))
    write_encoder_record(out, encoder_record)
    return out


def infer_json(capsys, *argv) -> dict:
    """``megaflamingo-infer ARGV --json`` in-process: the JSON it prints (its last stdout line)."""
    from megaflamingo.cli.infer import main

    capsys.readouterr()
    rc = main([str(a) for a in argv] + ["--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    return json.loads(out.out.strip().splitlines()[-1])


def infer_dialogue(model: Path, wav: Path, turns: list[str], tmp_path: Path, max_new_tokens: int = 8) -> list[str]:
    """``megaflamingo-infer --chat --dialogue``: its answers to ``turns`` about ``wav`` (the model's
    own answers as history)."""
    from megaflamingo.cli.infer import main

    talk, answers = tmp_path / "talk.json", tmp_path / "answers.json"
    talk.write_text(json.dumps({"audio": str(wav), "dialogue": [{"user": u} for u in turns]}))
    assert main(["--model", str(model), "--chat", "--dialogue", str(talk), "--out", str(answers),
                 "--max-new-tokens", str(max_new_tokens)]) == 0
    return [r["prediction"] for r in json.loads(answers.read_text())["dialogue"]]
