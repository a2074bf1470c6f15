"""LAION-CLAP re-ranking cost at the real sizes: what AF1's "sample 10, keep the best" adds per answer.

Random weights of the real shapes (no downloads): the text tower of LAION-CLAP (RoBERTa-base: 12
layers, d 768, vocab 50265, projection 768 -> 512 -> 512) on N texts of 77 tokens, and the audio tower
(HTSAT-tiny, fusion, as in 630k-audioset-fusion-best.pt) on one 10 s clip through the clip-embedding
front end preprocessing uses. Reported: median seconds per text batch and per clip, per thread count.
(Sampling the N answers themselves is the LM's cost: one batch of N rows, see bench_model.py.)

LAION's HTSAT imports torchvision.ops; where torchvision cannot be imported, the one name it imports
(FrozenBatchNorm2d, which inference never uses) is stubbed.

    python bench/bench_rerank.py --samples 10 --threads 1 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, kernels)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=10, help="answers to score (AF1: 10)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=77, help="tokens per text (77 = LAION's cap; answers are shorter)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    from megaflamingo.testing.clap import install_torchvision_stub

    install_torchvision_stub()  # only where torchvision cannot be imported

    from transformers import ClapTextConfig, ClapTextModelWithProjection

    from megaflamingo.inference.embed import ClipEmbedder
    from megaflamingo.inference.rerank import LAION_TEXT_LENGTH
    from megaflamingo.testing import write_audio

    torch.manual_seed(0)
    text = ClapTextModelWithProjection(ClapTextConfig(layer_norm_eps=1e-5)).to(a.device).eval()  # roberta-base
    ids = torch.randint(3, 50265, (a.samples, min(a.tokens, LAION_TEXT_LENGTH)), device=a.device)
    ids[:, 0], ids[:, -1] = 0, 2
    mask = torch.ones_like(ids)
    record = {"name": "laion-clap", "random_init": True, "config": {"fusion": True, "clip_seconds": 10.0}}
    clip = ClipEmbedder(record, {}, a.device)
    results = {"samples": a.samples, "tokens": int(ids.shape[1]), "device": a.device, "text_params_M": round(
        sum(p.numel() for p in text.parameters()) / 1e6, 1), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        wav = write_audio(Path(tmp) / "clip.wav", "chirp_up", 12.0, 44100)
        for n in a.threads:
            torch.set_num_threads(n)
            with torch.inference_mode():
                t_text = _median_time(lambda: text(input_ids=ids, attention_mask=mask), a.repeats)
            t_audio = _median_time(lambda: clip.embed(wav), a.repeats)
            results["runs"].append({"threads": n, "text_s": round(t_text, 3), "audio_s": round(t_audio, 3),
                                    "total_s": round(t_text + t_audio, 3)})
            print(f"threads={n}: {a.samples} texts {t_text:.3f} s, one clip {t_audio:.3f} s", flush=True)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
