"""Sequence packing vs padding on a realistic AF1 length mix (CPU, OPT-125M shape).

    python bench/bench_packing.py [--json] [--quick] [--mix sft_8shot|pretrain] [--samples N] [--threads 2]

The mix: every entry of the stage config's blend (configs/pretrain.yaml, configs/sft_8shot.yaml) is drawn
with probability proportional to ``N * weight`` (AF1's virtual epochs take ``N * weight * global_weight``
items of a dataset of N rows), with N from ``DATASET_ROWS`` (approximate public sizes, in rows; an
assumption, stated here) and text lengths per task from ``TASK_TOKENS`` (OPT-BPE tokens of prompt and
answer, uniform in the given ranges; assumptions from the datasets' typical captions / questions /
label lists). Samples use AF1's layout: ``bos bos [prefix] (<audio> prompt <SEP> answer <EOC>) x k eos``
(``interleaved_knn`` entries: ``Here are similar examples.`` + 8 shots), cut at 512 tokens, 1-16 valid
windows per audio.

Strategies (same samples, same order, micro-batches of ``B`` rows, fwd+bwd with AF1 pretraining freezing,
LM head on the supervised positions only; no optimizer step, which is per micro-batch and the same for
all):
  padded_512  AF1: every row padded to 512 tokens
  dynamic     today's collator: rows padded to the longest of the micro-batch
  grouped     today's length grouping (collate.length_grouped_batches) then dynamic padding
  packed      data.packing: rows of 512 tokens, B rows per micro-batch, fused cross-attention
Per strategy: samples/s, non-pad tokens/s (wall clock and per CPU-second of the process: the ratios use
CPU time, which a shared host distorts less), padding fraction, and the executed GFLOP per sample (a count of
the matmuls and attention the kernels execute, masked and padded work included: independent of host load,
see ExecutedFlops); ``max_abs_loss_diff`` is the largest difference of a sample's mean token loss between
the packed and the dynamic-padding runs.
The samples are those of the first full packed micro-batches of a longer draw (steady state: a finite
list would end in a half-empty flush micro-batch that an epoch does not have), in arrival order for the
other strategies. ``--quick`` (under 3 minutes on 2 cores) times only dynamic and packed on the samples
of one full packed micro-batch; padded_512 and grouped then appear in the algorithmic section only. That
section gives the padding fraction of each strategy on 20000 (quick: 2000) drawn samples of both mixes
(no model: the packing algorithm alone).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
MIXES = {"pretrain": ROOT / "configs" / "pretrain.yaml", "sft_8shot": ROOT / "configs" / "sft_8shot.yaml"}
TOKS = dict(media=50265, eoc=50266, sep=50267, pad=1, bos=2, eos=2)
MAX_TOKENS, W, SHOTS, D = 512, 16, 8, 1024

# Approximate rows per dataset (thousands). Assumptions from the datasets' public sizes; unknown -> 20k.
DATASET_ROWS = {
    "OpenAQA": 1900, "BBCSoundEffects": 31, "CLAP_freesound": 414, "SoundDescs": 32, "WavCaps-AudioSet_SL": 108,
    "WavCaps-BBC_Sound_Effects": 31, "WavCaps-FreeSound": 262, "WavCaps-SoundBible": 1.2,
    "AudioSetFullwoAudioMusicCaps": 1900, "WavText5K": 4.5, "MSP-PODCAST-Publish-1.9": 45, "MELD": 10,
    "Music-AVQA": 30, "MU-LLAMA": 70, "LP-MusicCaps-MSD": 500, "NSynth": 290, "mtg-jamendo": 55,
    "Clotho-AQA": 6, "Clotho-v2": 19, "Epidemic_sound": 75, "MACS": 18, "FSD50k": 41, "CochlScene": 60,
    "NonSpeech7k": 6, "chime-home": 4.5, "SONYC-UST": 13, "emov-db": 7, "jl-corpus": 2.4, "tess": 2.8,
    "OMGEmotion": 2, "LP-MusicCaps-MC": 5.5, "LP-MusicCaps-MTT": 22, "MusicCaps": 5.5, "FMA": 100,
    "musdbhq": 10, "AudioSet": 1900, "Clotho": 19, "AudioCaps": 49, "CREMA-D": 7, "ravdess": 1.4,
    "IEMOCAP": 10, "GTZAN": 1, "Medley-solos-DB": 21,
}
# Task -> (prompt tokens, answer tokens, windows per audio) ranges [lo, hi] (assumptions).
TASK_TOKENS = {
    "AQA": ((8, 25), (2, 60), (1, 16)), "AVQA_All": ((18, 35), (1, 3), (3, 6)), "AQA_All": ((18, 35), (1, 3), (3, 6)),
    "AudioCaptioning": ((6, 12), (8, 30), (1, 16)), "AudioDescription": ((6, 12), (6, 40), (1, 16)),
    "EventClassification": ((8, 40), (1, 15), (2, 4)), "SceneClassification": ((25, 45), (1, 4), (2, 4)),
    "EmotionClassification": ((15, 30), (1, 3), (1, 3)), "SentimentClassification": ((12, 20), (1, 2), (1, 3)),
    "Tagging": ((8, 14), (5, 25), (1, 16)), "MusicTagging": ((8, 14), (5, 25), (5, 16)),
    "MIR": ((12, 22), (6, 16), (1, 1)), "GenreClassification": ((12, 30), (1, 4), (5, 16)),
    "InstrClassification": ((12, 30), (1, 4), (5, 16)),
}
MUSIC_CAPTIONS = ("LP-MusicCaps", "MusicCaps", "MU-LLAMA")  # long answers (40-110 tokens)


def _rows(name: str) -> float:
    for key in sorted(DATASET_ROWS, key=len, reverse=True):
        if name.startswith(key):
            return DATASET_ROWS[key]
    return 20.0


def mixture(mix: str) -> list[dict]:
    cfg = yaml.safe_load(MIXES[mix].read_text())
    out = []
    for name, entry in cfg["data"]["blend"].items():
        ds, split = name.split("/")
        task = ds.rsplit("-", 1)[-1]
        prompt, answer, wins = TASK_TOKENS.get(task, ((8, 20), (2, 20), (1, 16)))
        if ds.startswith(MUSIC_CAPTIONS):
            answer = (40, 110)
        out.append({"name": name, "p": _rows(ds) * float(entry.get("weight", 1.0)), "prompt": prompt,
                    "answer": answer, "windows": wins, "prefix_prob": float(entry.get("prefix_prob", 0.0)),
                    "shots": SHOTS if "interleaved" in split else 1})
    total = sum(e["p"] for e in out)
    for e in out:
        e["p"] /= total
    return out


def draw(mix: list[dict], n: int, seed: int, with_audio: bool = True, dim: int = D) -> list[dict]:
    rng = np.random.default_rng(seed)
    probs = np.array([e["p"] for e in mix])
    silence = rng.standard_normal(dim).astype(np.float32) * 0.1
    out = []
    for k in rng.choice(len(mix), n, p=probs):
        e = mix[int(k)]
        word = lambda m: list(rng.integers(100, 50000, m))  # noqa: E731
        ids = [TOKS["bos"], TOKS["bos"]]
        ids += word(12) if e["shots"] > 1 else (word(7) if rng.random() < e["prefix_prob"] else [])
        windows = []
        for _ in range(e["shots"]):
            ids += [TOKS["media"]] + word(int(rng.integers(*e["prompt"]) + 1)) + [TOKS["sep"]]
            ids += word(int(rng.integers(*e["answer"]) + 1)) + [TOKS["eoc"]]
            nw = int(rng.integers(e["windows"][0], e["windows"][1] + 1))
            windows.append(rng.standard_normal((nw, dim)).astype(np.float32) if with_audio else np.zeros((nw, 0)))
        ids.append(TOKS["eos"])
        out.append({"input_ids": np.asarray(ids[:MAX_TOKENS], dtype=np.int64), "windows": windows,
                    "silence": silence, "dataset": e["name"]})
    return out


# ------------------------------------------------------------------------------------------ strategies


def plans(lengths: np.ndarray, B: int, seed: int):
    """Index groups per strategy: list of micro-batches, each a list of rows (a row = sample indices)."""
    from megaflamingo.data.packing import pack_lengths
    from megaflamingo.data.sampling import length_grouped_batches

    n = len(lengths)
    chunks = [list(range(i, min(i + B, n))) for i in range(0, n, B)]
    g = torch.Generator().manual_seed(seed)
    grouped = [list(map(int, b)) for b in length_grouped_batches(np.arange(n), lengths, B, g)]
    cfg = packing_config(B)
    return {
        "padded_512": [[[i] for i in b] for b in chunks],
        "dynamic": [[[i] for i in b] for b in chunks],
        "grouped": [[[i] for i in b] for b in grouped],
        "packed": pack_lengths(lengths.tolist(), cfg),
    }


def packing_config(B: int):
    from megaflamingo.data.packing import PackingConfig

    return PackingConfig(max_tokens_per_row=MAX_TOKENS, rows_per_batch=B, max_delay=4,
                         pad_to_multiple_of=8, query_chunk=64)


def steady_state_samples(pool: list[dict], n: int, B: int) -> list[dict]:
    """The samples of the first packed micro-batches that hold >= n samples, in arrival order.

    A finite sample list ends with a half-empty packed micro-batch (the look-ahead buffer flushed), which
    an epoch of thousands of micro-batches does not have; benchmarking every strategy on the samples of
    full micro-batches measures packing in its steady state, on the same samples for all strategies."""
    from megaflamingo.data.packing import pack_lengths

    chosen: list[int] = []
    for b in pack_lengths([len(s["input_ids"]) for s in pool], packing_config(B)):
        chosen.extend(i for row in b for i in row)
        if len(chosen) >= n:
            break
    return [pool[i] for i in sorted(chosen)]


def positions(plan, lengths, strategy) -> int:
    if strategy == "padded_512":
        return sum(len(b) * MAX_TOKENS for b in plan)
    tot = 0
    for b in plan:
        longest = max(sum(int(lengths[i]) for i in row) for row in b)
        T = -(-longest // 8) * 8 if strategy == "packed" else longest
        tot += len(b) * T
    return tot


def algorithmic(n: int, B: dict) -> dict:
    out = {}
    for mix in MIXES:
        lengths = np.array([len(s["input_ids"]) for s in draw(mixture(mix), n, 1, with_audio=False)])
        pl = plans(lengths, B[mix], 0)
        real = int(lengths.sum())
        out[mix] = {"samples": n, "mean_tokens": round(float(lengths.mean()), 1),
                    "p90_tokens": int(np.percentile(lengths, 90)), "micro_batch_rows": B[mix]}
        for s, p in pl.items():
            pos = positions(p, lengths, s)
            out[mix][s] = {"padding_fraction": round(1 - real / pos, 4), "micro_batches": len(p),
                           "samples_per_micro_batch": round(n / len(p), 2)}
        cap = len(pl["packed"]) * B[mix] * MAX_TOKENS
        out[mix]["packed"]["fill_rate"] = round(real / cap, 4)
    return out


# ------------------------------------------------------------------------------------------ model


def build_model():
    from transformers import AutoModelForCausalLM, OPTConfig

    from megaflamingo.model import AudioFlamingo, AudioTransformerConfig, ModelConfig, apply_freeze_policy

    cfg = OPTConfig(vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                    word_embed_proj_dim=768, dropout=0.0, attention_dropout=0.0, max_position_embeddings=2048)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model = AudioFlamingo.from_lm(lm, TOKS, ModelConfig(audio_embed_dim=D, max_num_window=W, max_num_fewshot=SHOTS,
                                                         audio_transformer=AudioTransformerConfig(dropout=0.0)))
    with torch.no_grad():
        for b in model.xattn_blocks():  # open the gates so the audio path takes part in the loss
            b.attn_gate.fill_(0.5)
            b.ff_gate.fill_(0.5)
    apply_freeze_policy(model, "pretrain")
    return model.train()


def _timed(step):
    t0, c0 = time.perf_counter(), time.process_time()
    out = step()
    return out, (time.perf_counter() - t0, time.process_time() - c0)


class ExecutedFlops:
    """Arithmetic the kernels execute for one fwd+bwd step (matmuls and attention; masked-out work
    included, padding included): a measure of the work that host load cannot blur. Frozen matrices cost
    4|W| per row, trainable ones 6|W| (engine/flops.py's convention); attention 3 x 4 n_q n_k d."""

    def __init__(self, model):
        lin = lambda m: sum(x.weight.numel() for x in m.modules() if isinstance(x, torch.nn.Linear))  # noqa: E731
        blocks = model.xattn_blocks()
        a = blocks[0].attn
        self.lm = sum(lin(layer.decoder_layer) for layer in model.flamingo_layers)
        self.xq = len(blocks) * (a.to_q.weight.numel() + a.to_out.weight.numel())
        self.xff = len(blocks) * lin(blocks[0].ff)
        self.kv = len(blocks) * a.to_kv.weight.numel()
        self.x_inner, self.blocks = a.heads * a.dim_head, len(blocks)
        self.at = lin(model.audio_transformer)
        self.at_width = model.audio_transformer.d_model
        self.at_layers = len(model.audio_transformer.layer_stack)
        cfg = model.lang_encoder.config
        self.d, self.layers = cfg.hidden_size, cfg.num_hidden_layers
        self.head = model.lang_encoder.get_output_embeddings().weight.numel()

    def __call__(self, R, T, S, L, n_real, head_rows, kv_rows=None, xattn_pairs=None) -> float:
        N = R * T
        f = 4 * self.lm * N + 12 * self.d * self.layers * R * T * T  # frozen LM + its attention (all T^2)
        if kv_rows is None:  # dense cross-attention: every position, every slot
            f += 6 * (self.xq + self.xff) * N + 6 * self.kv * S * L + 12 * self.x_inner * self.blocks * N * L
        else:  # fused: q/out on real tokens, to_kv on valid slots, attention over padded segments
            f += 6 * self.xq * n_real + 6 * self.xff * N + 6 * self.kv * kv_rows
            f += 12 * self.x_inner * self.blocks * xattn_pairs
        f += 6 * self.at * S * L + 12 * self.at_width * self.at_layers * S * L * L
        return f + 4 * self.head * head_rows


def run_unpacked(model, samples, plan, pad_to: int | None):
    from megaflamingo.data.collate import Collator

    ef = ExecutedFlops(model)
    col = Collator(TOKS, SHOTS * W, W, D)
    model.xattn_backend = "dense"  # today's unpacked path: SDPA with the [B, 1, T, L] mask
    times, per_sample, real, pos = [], {}, 0, 0
    for b in plan:
        idx = [row[0] for row in b]
        batch = col([samples[i] for i in idx])
        assert batch["num_skipped"] == 0
        ids, att, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        if pad_to is not None and ids.shape[1] < pad_to:
            extra = pad_to - ids.shape[1]
            ids = torch.nn.functional.pad(ids, (0, extra), value=TOKS["pad"])
            att = torch.nn.functional.pad(att, (0, extra))
            labels = torch.nn.functional.pad(labels, (0, extra), value=-100)
        def step():
            o = model.supervised_loss(ids, att, batch["audio_embeds"], batch["audio_mask"], labels)
            o.loss.backward()
            model.zero_grad(set_to_none=True)
            return o

        out, t = _timed(step)
        B, T = ids.shape
        times.append(t + (ef(B, T, B, SHOTS * W, int(att.sum()), int(out.count.sum())),))
        for k, i in enumerate(idx):
            per_sample[i] = float(out.loss_sum[k].detach()) / max(int(out.count[k]), 1)
        real += int(att.sum())
        pos += ids.numel()
    return times, per_sample, real, pos


def run_packed(model, samples, plan, B):
    from megaflamingo.data.packing import collate_packed, prepare_sample

    cfg = packing_config(B)
    ef = ExecutedFlops(model)
    model.xattn_backend = "segments"  # the fused layout's CPU kernel (what backend "auto" picks on a CPU)
    times, per_sample, real, pos = [], {}, 0, 0
    for b in plan:
        rows = [[prepare_sample(samples[i], SHOTS * W, W, D, key=i) for i in row] for row in b]
        batch = collate_packed(rows, TOKS, cfg, W)
        def step():
            o = model(batch["input_ids"], None, batch["audio_embeds"], batch["audio_mask"], labels=batch["labels"],
                      loss_logits="supervised", layout=batch["layout"])
            o.loss.backward()
            model.zero_grad(set_to_none=True)
            return o

        out, t = _timed(step)
        lay, (R, T) = batch["layout"], batch["input_ids"].shape
        xa = lay.xattn
        pairs = xa.num_segments * xa.max_q * xa.max_k  # the pure-torch kernel's padded segments
        kv_rows = xa.kv_slots.numel() + (lay.num_samples if xa.has_uniform else 0)
        times.append(t + (ef(R, T, lay.num_samples, SHOTS * W, batch["num_tokens"], int(out.count.sum()),
                             kv_rows, pairs),))
        for k, i in enumerate(batch["keys"]):
            per_sample[i] = float(out.loss_sum[k].detach()) / max(int(out.count[k]), 1)
        real += batch["num_tokens"]
        pos += batch["input_ids"].numel()
    return times, per_sample, real, pos


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print only the JSON object")
    ap.add_argument("--quick", action="store_true", help="one packed micro-batch of samples, dynamic vs packed (< 3 min)")
    ap.add_argument("--mix", default="sft_8shot", choices=sorted(MIXES))
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="rows per micro-batch (default: the stage config's)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    micro = {m: int(yaml.safe_load(p.read_text())["train"]["micro_batch_size"]) for m, p in MIXES.items()}
    B = args.batch or micro[args.mix]
    n = args.samples or (1 if args.quick else 64)  # quick: the samples of the first full packed micro-batch
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print

    algo = algorithmic(2000 if args.quick else 20000, micro)
    samples = steady_state_samples(draw(mixture(args.mix), 4 * n, args.seed), n, B)
    n = len(samples)
    lengths = np.array([len(s["input_ids"]) for s in samples])
    pl = plans(lengths, B, args.seed)
    log(f"mix {args.mix}: {n} samples, mean {lengths.mean():.0f} tokens (min {lengths.min()}, max {lengths.max()}), "
        f"micro-batch {B} rows; torch {torch.__version__}, {torch.get_num_threads()} threads")
    t_build = time.perf_counter()
    model = build_model()
    log(f"model built in {time.perf_counter() - t_build:.1f} s")
    run_unpacked(model, samples, [pl["dynamic"][0][:1]], None)  # warm-up (allocator, first-call costs)

    results, losses = {}, {}
    for strategy in (("dynamic", "packed") if args.quick else ("padded_512", "dynamic", "grouped", "packed")):
        plan = pl[strategy]
        if strategy == "packed":
            times, per, real, pos = run_packed(model, samples, plan, B)
        else:
            times, per, real, pos = run_unpacked(model, samples, plan, MAX_TOKENS if strategy == "padded_512" else None)
        done = sum(sum(len(r) for r in b) for b in plan)
        sec, cpu, flops = (sum(t[k] for t in times) for k in range(3))
        results[strategy] = {"samples_per_s": done / sec, "tokens_per_s": real / sec, "padding_fraction": 1 - real / pos,
                             "samples_per_cpu_s": done / cpu, "tokens_per_cpu_s": real / cpu,
                             "executed_gflop_per_sample": flops / done / 1e9, "achieved_gflop_per_s": flops / sec / 1e9,
                             "micro_batches": len(plan), "samples": done, "seconds": sec, "cpu_seconds": cpu,
                             "median_step_s": statistics.median(t[0] for t in times)}
        losses[strategy] = per
        log(f"{strategy:11s} {done / sec:7.3f} samples/s {real / sec:8.1f} tokens/s  ({done / cpu:7.3f} samples and "
            f"{real / cpu:7.1f} tokens per CPU-s)  padding {100 * (1 - real / pos):5.1f}%  "
            f"{flops / done / 1e9:7.1f} GFLOP/sample  {len(plan)} micro-batches, {sec:6.1f} s wall, {cpu:6.1f} s CPU")
    def ratio(other):
        if other not in results:
            return None
        return results["packed"]["samples_per_cpu_s"] / results[other]["samples_per_cpu_s"]

    diff = max(abs(losses["packed"][i] - losses["dynamic"][i]) for i in losses["packed"])
    diff_g = (max(abs(losses["grouped"][i] - losses["dynamic"][i]) for i in losses["grouped"])
              if "grouped" in losses else None)
    fill = algo[args.mix]["packed"]["fill_rate"]
    summary = {
        "mix": args.mix, "samples": n, "micro_batch_rows": B, "threads": torch.get_num_threads(), "quick": args.quick,
        "model": "OPT-125M shape + 12 xattn (every layer) + AF1 audio transformer, L=128 slots, pretrain freezing",
        "unpacked_samples_per_s": results["dynamic"]["samples_per_s"],
        "packed_samples_per_s": results["packed"]["samples_per_s"],
        "packed_vs_dynamic": ratio("dynamic"), "packed_vs_grouped": ratio("grouped"),
        "packed_vs_padded_512": ratio("padded_512"),
        "packed_vs_dynamic_wall": results["packed"]["samples_per_s"] / results["dynamic"]["samples_per_s"],
        "ratio_basis": "samples per CPU-second of this process (a shared host distorts wall time)",
        "flop_ratio_dynamic_over_packed": (results["dynamic"]["executed_gflop_per_sample"]
                                           / results["packed"]["executed_gflop_per_sample"]),
        "max_abs_loss_diff": diff, "max_abs_loss_diff_grouped": diff_g, "strategies": results,
        "algorithmic": algo, "fill_rate_algorithmic": fill,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        fmt = lambda r: "n/a" if r is None else f"x{r:.2f}"  # noqa: E731
        log(f"packed / dynamic {fmt(summary['packed_vs_dynamic'])}, / grouped {fmt(summary['packed_vs_grouped'])}, "
            f"/ padded-512 {fmt(summary['packed_vs_padded_512'])}; max |per-sample loss diff| {diff:.2e}")
        print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
