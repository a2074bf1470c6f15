"""Packed batches (several samples per row: megaflamingo.data.packing + AudioFlamingo.forward(layout=))
against the unpacked model path (the padded Collator + AudioFlamingo.forward with SDPA-dense
cross-attention): per-sample logits, per-sample loss sums and counts, the micro-batch loss and the
trainable gradients, for OPT, Llama and Qwen2, with 1-shot and 8-shot samples (AF1 text layout, AF1
labels) mixed in a row."""
import numpy as np
import pytest
import torch

from megaflamingo.compat import af1
from megaflamingo.data.collate import Collator
from megaflamingo.data.packing import PackingConfig, collate_packed, pack_lengths, prepare_sample, unpack_samples
from megaflamingo.model import apply_freeze_policy
from megaflamingo.model.lm_attention import VARLEN_IMPL, register_varlen_attention
from megaflamingo.model.loss import token_losses
from megaflamingo.model.segments import build_layout, unpack_rows

from megaflamingo.testing import tiny_llama_config, tiny_opt_config, tiny_qwen2_config

# Same ids as tests/model/conftest.py (not imported from there: several conftest modules share the name)
VOCAB = 96
TOK = dict(media=90, eoc=91, sep=92, pad=1, bos=2, eos=2)
CONFIGS = {"opt": tiny_opt_config, "llama": tiny_llama_config, "qwen2": tiny_qwen2_config}

D_AUDIO, WPA, SHOTS = 16, 4, 8  # L = 32 slots: 8-shot samples use all of them, 1-shot ones one audio


def build(arch, seed=0):
    torch.manual_seed(seed)
    model = af1.build_model(
        {"cross_attn_every_n_layers": 1,
         "audio_transformer_kwargs": dict(n_head=2, n_layers=1, d_inner=32, max_num_media=WPA * SHOTS,
                                          max_window_per_audio=WPA, dropout=0.0)},
        dict(audio_embed_dim=D_AUDIO, max_num_window=WPA, max_num_fewshot=SHOTS),
        CONFIGS[arch](vocab_size=VOCAB, hidden_size=32, num_layers=2), TOK)
    with torch.no_grad():
        for i, b in enumerate(model.xattn_blocks()):
            b.attn_gate.fill_(1.0 + 0.3 * i)
            b.ff_gate.fill_(0.5)
    return model


def make_samples(n, seed=0, p_fewshot=0.3):
    """AF1-shaped token sequences: bos bos prefix (<audio> prompt <SEP> answer <EOC>)xk eos."""
    rng = np.random.default_rng(seed)
    silence = rng.standard_normal(D_AUDIO).astype(np.float32)
    out = []
    for i in range(n):
        k = int(rng.integers(2, SHOTS + 1)) if rng.random() < p_fewshot else 1
        ids = [TOK["bos"], TOK["bos"]] + list(rng.integers(3, 80, int(rng.integers(0, 4))))
        for _ in range(k):
            ids += [TOK["media"]] + list(rng.integers(3, 80, int(rng.integers(1, 6)))) + [TOK["sep"]]
            ids += list(rng.integers(3, 80, int(rng.integers(1, 5)))) + [TOK["eoc"]]
        ids.append(TOK["eos"])
        windows = [rng.standard_normal((int(rng.integers(1, WPA + 1)), D_AUDIO)).astype(np.float32) for _ in range(k)]
        out.append({"input_ids": np.asarray(ids, dtype=np.int64), "windows": windows, "silence": silence,
                    "dataset": f"ds{i % 3}"})
    return out


def packed_batch(samples, max_tokens_per_row, rows_per_batch=8):
    cfg = PackingConfig(max_tokens_per_row=max_tokens_per_row, rows_per_batch=rows_per_batch, pad_to_multiple_of=8,
                        query_chunk=8)
    prepared = [prepare_sample(s, WPA * SHOTS, WPA, D_AUDIO, key=i) for i, s in enumerate(samples)]
    plan = pack_lengths([p["length"] for p in prepared], cfg)
    assert len(plan) == 1, "the test wants all samples in one micro-batch"
    rows = [[prepared[i] for i in row] for row in plan[0]]
    return collate_packed(rows, TOK, cfg, WPA), [i for row in plan[0] for i in row]


def unpacked_batch(samples):
    return Collator(TOK, WPA * SHOTS, WPA, D_AUDIO)(samples)


def packed_forward(model, pb, backend="segments", **kw):
    """The trainer's call on a packed batch: forward(..., layout=) with the per-sample loss."""
    model.xattn_backend = backend
    return model(pb["input_ids"], pb["attention_mask"], pb["audio_embeds"], pb["audio_mask"], labels=pb["labels"],
                 loss_logits=kw.pop("loss_logits", "supervised"), layout=pb["layout"], **kw)


def packed_logits(model, pb, backend="segments"):
    model.xattn_backend = backend
    return model(pb["input_ids"], pb.get("attention_mask"), pb["audio_embeds"], pb["audio_mask"],
                 layout=pb["layout"]).logits


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("arch,attn,policy", [
    ("opt", "sdpa", "pretrain"), ("opt", "eager", "sft"), ("opt", VARLEN_IMPL, "pretrain"),
    ("llama", "sdpa", "sft"), ("llama", VARLEN_IMPL, "pretrain"), ("qwen2", "sdpa", "pretrain")])
def test_packed_equals_unpacked(arch, attn, policy):
    model = build(arch).train()
    apply_freeze_policy(model, policy)
    if attn == VARLEN_IMPL:
        register_varlen_attention()
    model.lang_encoder.set_attn_implementation(attn)
    samples = make_samples(12, seed={"opt": 0, "llama": 1, "qwen2": 2}[arch])
    pb, order = packed_batch(samples, max_tokens_per_row=128, rows_per_batch=8)
    assert pb["num_samples"] == 12 and pb["input_ids"].shape[0] < 12, "rows must hold several samples"
    shots = [len(samples[i]["windows"]) for i in order]
    rows_of = pb["layout"].sample_row.tolist()
    assert any(len({shots[j] for j in range(12) if rows_of[j] == r} & {1}) and
               any(shots[j] > 1 for j in range(12) if rows_of[j] == r) for r in set(rows_of)), \
        "some row must mix 1-shot and few-shot samples"

    # unpacked reference: the padded batch in packing order, today's forward (dense xattn) + token_losses
    ub = unpacked_batch([samples[i] for i in order])
    inputs = {k: ub[k] for k in ("input_ids", "attention_mask", "audio_embeds", "audio_mask")}
    out = model(**inputs)
    ref_sum, ref_count = token_losses(out.logits, ub["labels"])
    ref_loss = ref_sum.sum() / ref_count.sum()
    ref_loss.backward()
    g_ref = _grads(model)
    model.zero_grad(set_to_none=True)

    # the packed batch's samples are the unpacked ones (ids, AF1 labels, audio slots)
    for k, s in enumerate(unpack_samples(pb)):
        n = s["length"]
        assert torch.equal(s["input_ids"], ub["input_ids"][k, :n]) and int(ub["attention_mask"][k].sum()) == n
        assert torch.equal(s["labels"], ub["labels"][k, :n])
        assert torch.equal(s["audio"], ub["audio_embeds"][k]) and torch.equal(s["audio_mask"], ub["audio_mask"][k])

    res = packed_forward(model, pb, "segments")
    res.loss.backward()
    g_pk = _grads(model)
    assert res.count.tolist() == ref_count.tolist() and int(res.count.sum()) > 12
    torch.testing.assert_close(res.loss_sum, ref_sum.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.loss.detach(), ref_loss.detach(), atol=1e-6, rtol=1e-6)
    assert g_ref.keys() == g_pk.keys() and any("audio_transformer" in n for n in g_ref)
    if policy == "sft":
        assert any(".decoder_layer." in n for n in g_ref)
    top = max(float(g.abs().max()) for g in g_ref.values())
    for n in g_ref:
        torch.testing.assert_close(g_pk[n], g_ref[n], atol=1e-5 * top, rtol=1e-4, msg=n)

    with torch.no_grad():
        logits = packed_logits(model, pb, "dense")
        for k, piece in enumerate(unpack_rows(logits, pb["layout"])):
            n = piece.shape[0]
            assert (piece - out.logits[k, :n]).abs().max() <= 1e-5, f"sample {k}"


@pytest.mark.parametrize("arch", ["opt", "qwen2"])
def test_fused_xattn_on_padded_batch_matches_dense(arch):
    """The fused layout is also the unpacked path: a model whose xattn backend is not dense runs padded
    batches through it (layout built per call): same logits and per-row losses as the dense path."""
    model = build(arch).eval()
    samples = make_samples(5, seed=7, p_fewshot=0.5)
    ub = unpacked_batch(samples)
    args = (ub["input_ids"], ub["attention_mask"], ub["audio_embeds"], ub["audio_mask"])
    with torch.no_grad():
        ref = model(*args).logits
        ref_sup = model(*args, labels=ub["labels"], loss_logits="supervised")
        model.xattn_backend = "segments"
        got = model(*args).logits
        got_sup = model(*args, labels=ub["labels"], loss_logits="supervised")
    real = ub["attention_mask"].bool()
    assert (got[real] - ref[real]).abs().max() <= 1e-5
    torch.testing.assert_close(got_sup.loss_sum, ref_sup.loss_sum, atol=1e-5, rtol=1e-5)
    assert torch.equal(got_sup.count, ref_sup.count)


def test_sample_weighting_and_errors():
    model = build("opt").train()
    samples = make_samples(6, seed=3)
    pb, _ = packed_batch(samples, max_tokens_per_row=128, rows_per_batch=4)
    res_t = packed_forward(model, pb)
    res_s = packed_forward(model, pb, loss_weighting="sample")
    per = res_t.loss_sum / res_t.count
    torch.testing.assert_close(res_s.loss.detach(), per.mean(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(res_t.loss.detach(), res_t.loss_sum.sum() / res_t.count.sum(), atol=1e-6, rtol=1e-6)
    bad = dict(pb, labels=pb["labels"].clone())
    s1 = int(pb["layout"].sample_start[1])
    r1 = int(pb["layout"].sample_row[1])
    bad["labels"][r1, s1] = 5  # a label predicted from the previous sample
    with pytest.raises(ValueError, match="previous position belongs to another sample"):
        packed_forward(model, bad)
    with pytest.raises(ValueError, match="holds 5 samples"):
        packed_forward(model, dict(pb, audio_embeds=pb["audio_embeds"][:5], audio_mask=pb["audio_mask"][:5]))
    noaudio = dict(pb, input_ids=pb["input_ids"].masked_fill(pb["input_ids"] == TOK["media"], 5))
    noaudio["layout"] = build_layout(noaudio["input_ids"], pb["sample_index"], pb["audio_mask"], TOK["media"], WPA)
    with pytest.raises(ValueError, match="contain no <audio> token"):
        packed_forward(model, noaudio)


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_two_process_packed_equals_one_process(tmp_path):
    """2-process ZeRO-3 (gloo, CPU) on a packed batch = the single-process packed loss, sums and gradients."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("deepspeed")
    here = Path(__file__).parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "res.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(here.parents[1]), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(here / "zero3_packed_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world"] == 2 and res["partitioned_params"] > 0
    assert res["loss"] <= 1e-6 and res["loss_sum"] <= 1e-5 and res["count_equal"] and res["grads"] <= 1e-4, res


def test_sliding_window_lm_refused():
    """A sliding-window LM would silently lose its window under the packing mask: refused by name."""
    model = build("qwen2")
    model.lang_encoder.config.layer_types = ["sliding_attention", "full_attention"]
    pb, _ = packed_batch(make_samples(4, seed=2), max_tokens_per_row=128, rows_per_batch=2)
    with pytest.raises(ValueError, match="non-full attention layers"):
        packed_forward(model, pb)
