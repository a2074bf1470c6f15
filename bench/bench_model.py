"""Model-core benchmark: vectorised media mask + SDPA vs AF1's per-sample loop mask + einsum attention.

Forward+backward wall time (median) of
  1. one gated xattn block (OPT-125M width, 8-shot: L = 128 slots),
  2. a tiny model and an OPT-125M-shape model with an xattn block before every layer,
each with our code path and with the AF1-style path (mask built per layer with Python loops over batch
and media, as AF1's MaskedCrossAttention did, then -finfo.max fill + softmax). CPU by default.

A third part times the training loss with full [B, T, V] logits (``token_losses``) against the
supervised-positions-only path (``AudioFlamingo.supervised_loss``: LM head on the rows whose shifted label
is set), OPT-125M shape (vocab 50272), forward and forward+backward, pretrain freezing.

    python bench/bench_model.py [--batch 2] [--seq 256] [--reps 3] [--device cpu] [--skip-125m]
                                [--loss-seq 512] [--sup-frac 0.15] [--only-loss]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import OPTConfig, AutoModelForCausalLM

from megaflamingo.model import AudioFlamingo
from megaflamingo.model.config import AudioTransformerConfig, ModelConfig
from megaflamingo.tokens import SpecialTokens
from megaflamingo.model import xattn as xattn_mod
from megaflamingo.model.xattn import GatedCrossAttentionBlock, MaskedCrossAttention, media_visibility

_NAIVE = {}  # bench-only: AF1 kept media locations on the layers; we emulate it with this dict


def af1_loop_mask(input_ids, audio_mask, wpa, media_id):
    """AF1's construction: per sample, per media location, slices of a CPU bool tensor."""
    B, T = input_ids.shape
    L = audio_mask.shape[1]
    m = torch.zeros(B, T, L, dtype=torch.bool)
    for b in range(B):
        locs = (input_ids[b] == media_id).nonzero().flatten().tolist()
        for i in range(-1, len(locs)):
            if i == -1:
                start, end = 0, (T if len(locs) == 1 else locs[0])
            elif i == len(locs) - 1:
                start, end = locs[i], T
            else:
                start, end = locs[i], locs[i + 1]
            m[b, start:end, : (max(i, 0) + 1) * wpa] = True
    return (m & audio_mask.cpu()[:, None, :]).to(input_ids.device)


def naive_forward(self, x, ctx, layer_idx=0):
    ids, am, wpa, mid = _NAIVE["ids"], _NAIVE["am"], _NAIVE["wpa"], _NAIVE["mid"]
    B, T, _ = x.shape
    h = self.heads
    q = self.to_q(self.norm(x)).view(B, T, h, -1).transpose(1, 2) * self.dim_head ** -0.5
    k, v = self.kv(ctx.media.to(q.dtype))
    sim = torch.einsum("bhid,bhjd->bhij", q, k)
    mask = af1_loop_mask(ids, am, wpa, mid)  # rebuilt in every layer, as in AF1
    sim = sim.masked_fill(~mask[:, None], -torch.finfo(sim.dtype).max)
    sim = sim - sim.amax(-1, keepdim=True).detach()
    o = torch.einsum("bhij,bhjd->bhid", sim.softmax(-1), v)
    return self.to_out(o.transpose(1, 2).reshape(B, T, -1))


def timeit(fn, reps):
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def make_inputs(B, T, L, D, wpa, media_id, vocab, device, shots):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab - 10, (B, T), generator=g)
    step = max(T // shots, 2)
    ids[:, 1::step] = media_id  # one <audio> per few-shot example
    emb = torch.randn(B, L, D, generator=g)
    am = torch.rand(B, L, generator=g) > 0.2
    return ids.to(device), emb.to(device), am.to(device)


def bench_block(args, dev):
    B, T, d, D, wpa, shots = args.batch, args.seq, 768, 1024, 16, 8
    L = wpa * shots
    blk = GatedCrossAttentionBlock(d, D).to(dev)
    with torch.no_grad():
        blk.attn_gate.fill_(0.5)
    ids, emb, am = make_inputs(B, T, L, D, wpa, 5, 100, dev, shots)
    x = torch.randn(B, T, d, device=dev, requires_grad=True)
    media = emb.requires_grad_(True)
    _NAIVE.update(ids=ids, am=am, wpa=wpa, mid=5)

    def ours():
        mask, has_any = media_visibility(torch.cumsum((ids == 5).long(), 1), am, wpa)
        ctx = xattn_mod.MediaContext(media=media, mask=mask, has_any=has_any)
        blk(x, ctx).sum().backward()

    t_ours = timeit(ours, args.reps)
    orig = MaskedCrossAttention.forward
    MaskedCrossAttention.forward = naive_forward
    try:
        t_naive = timeit(ours, args.reps)
    finally:
        MaskedCrossAttention.forward = orig
    print(f"xattn block  B={B} T={T} d={d} L={L}: ours {t_ours * 1e3:8.1f} ms   AF1-style {t_naive * 1e3:8.1f} ms"
          f"   speed-up x{t_naive / t_ours:.2f}")


def _tokens(cfg) -> SpecialTokens:
    # <audio> and <|endofchunk|> at the end of the vocabulary, the LM's own pad/bos/eos.
    return SpecialTokens(media=cfg.vocab_size - 2, eoc=cfg.vocab_size - 1, sep=cfg.vocab_size - 3, pad=1, bos=2, eos=2)


def _model_config(D: int, wpa: int, shots: int, d_inner: int = 2048) -> ModelConfig:
    """AF1's audio transformer / xattn shape (dropout off for stable timings)."""
    return ModelConfig(audio_embed_dim=D, max_num_window=wpa, max_num_fewshot=shots,
                       audio_transformer=AudioTransformerConfig(d_inner=d_inner, dropout=0.0, max_num_media=wpa * shots,
                                                                max_window_per_audio=wpa))


def bench_model(name, cfg, args, dev):
    B, T, D, wpa, shots = args.batch, args.seq, 1024 if name != "tiny" else 64, 16, 8
    media_id = cfg.vocab_size - 2
    lm = AutoModelForCausalLM.from_config(cfg)
    model = AudioFlamingo.from_lm(lm, _tokens(cfg), _model_config(D, wpa, shots, d_inner=2048 if name != "tiny" else 128)
                          ).to(dev).train()
    for b in model.xattn_blocks():
        with torch.no_grad():
            b.attn_gate.fill_(0.5)
    model.lang_encoder.requires_grad_(False)
    for b in model.xattn_blocks():
        b.requires_grad_(True)
    ids, emb, am = make_inputs(B, T, wpa * shots, D, wpa, media_id, cfg.vocab_size, dev, shots)
    _NAIVE.update(ids=ids, am=am, wpa=wpa, mid=media_id)

    def step():
        model(ids, torch.ones_like(ids), emb, am, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    t_ours = timeit(step, args.reps)
    orig = MaskedCrossAttention.forward
    MaskedCrossAttention.forward = naive_forward
    try:
        t_naive = timeit(step, args.reps)
    finally:
        MaskedCrossAttention.forward = orig
    print(f"{name:<10s} B={B} T={T} L={wpa * shots} fwd+bwd: ours {t_ours * 1e3:8.1f} ms   AF1-style "
          f"{t_naive * 1e3:8.1f} ms   speed-up x{t_naive / t_ours:.2f}")


def bench_loss_logits(args, dev):
    from megaflamingo.model.loss import token_losses

    B, T, D, wpa, shots = args.batch, args.loss_seq, 1024, 16, 8
    cfg = OPTConfig(vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                    word_embed_proj_dim=768, dropout=0.0, attention_dropout=0.0)
    media_id = cfg.vocab_size - 2
    lm = AutoModelForCausalLM.from_config(cfg)
    model = AudioFlamingo.from_lm(lm, _tokens(cfg), _model_config(D, wpa, shots)).to(dev).train()
    model.lang_encoder.requires_grad_(False)  # pretrain: LM (and its head) frozen, xattn trainable
    for b in model.xattn_blocks():
        b.requires_grad_(True)
    ids, emb, am = make_inputs(B, T, wpa * shots, D, wpa, media_id, cfg.vocab_size, dev, shots)
    # Supervision like an AQA/caption batch: the answer span at the end of each row (~sup_frac of T).
    labels = torch.full_like(ids, -100)
    n_sup = max(1, int(args.sup_frac * T))
    labels[:, T - n_sup:] = ids[:, T - n_sup:]
    att = torch.ones_like(ids)

    def full_loss():
        s, c = token_losses(model(ids, att, emb, am).logits, labels)
        return s.sum() / c.sum().clamp(min=1)

    def sup_loss():
        return model.supervised_loss(ids, att, emb, am, labels).loss

    with torch.no_grad():
        a, b = full_loss(), sup_loss()
    rel = abs(float(a) - float(b)) / abs(float(a))
    res = {}
    for name, fn in (("full", full_loss), ("supervised", sup_loss)):
        res[name, "fwd"] = timeit(lambda: fn(), args.reps)

        def fb():
            fn().backward()
            model.zero_grad(set_to_none=True)

        res[name, "fwd+bwd"] = timeit(fb, args.reps)
    print(f"loss logits opt-125m B={B} T={T} V={cfg.vocab_size} supervised {n_sup}/{T} per row "
          f"(loss rel. diff {rel:.1e}):")
    for kind in ("fwd", "fwd+bwd"):
        f, s_ = res["full", kind], res["supervised", kind]
        print(f"  {kind:<8s} full {f * 1e3:8.1f} ms   supervised-only {s_ * 1e3:8.1f} ms   "
              f"saved {100 * (1 - s_ / f):5.1f}%   speed-up x{f / s_:.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-125m", action="store_true")
    ap.add_argument("--loss-seq", type=int, default=512, help="T of the loss-logits benchmark")
    ap.add_argument("--sup-frac", type=float, default=0.15, help="supervised fraction of each row")
    ap.add_argument("--only-loss", action="store_true", help="run only the loss-logits benchmark")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    print(f"torch {torch.__version__}, device {dev}, threads {torch.get_num_threads()}")
    if args.only_loss:
        bench_loss_logits(args, dev)
        return
    bench_block(args, dev)
    tiny = OPTConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
                     word_embed_proj_dim=64, dropout=0.0, attention_dropout=0.0)
    bench_model("tiny", tiny, args, dev)
    if not args.skip_125m:
        opt125 = OPTConfig(vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072,
                           num_attention_heads=12, word_embed_proj_dim=768, dropout=0.0, attention_dropout=0.0)
        bench_model("opt-125m", opt125, args, dev)
        bench_loss_logits(args, dev)


if __name__ == "__main__":
    main()
