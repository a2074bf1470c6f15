"""Supervised-positions-only loss (lm_head on the rows whose shifted label is set) equals the full-logits
loss: mean, per-sample sums / counts and trainable gradients, for OPT (also word_embed_proj_dim != hidden,
i.e. with project_in/project_out), Llama and Qwen2; rows without any supervised token included."""
import pytest
import torch

from megaflamingo.compat import af1
from megaflamingo.model.loss import token_losses
from megaflamingo.model import SupervisedLoss, apply_freeze_policy
from megaflamingo.testing import tiny_opt_config

from tests.model.builders import CONFIGS, D_AUDIO, SHOTS, TOK, VOCAB, WPA, batch, build


def _opt_proj_model():
    torch.manual_seed(0)
    model = af1.build_model(
        {"cross_attn_every_n_layers": 1,
         "audio_transformer_kwargs": dict(n_head=4, n_layers=1, d_inner=48, max_num_media=WPA * SHOTS,
                                          max_window_per_audio=WPA, dropout=0.0)},
        dict(audio_embed_dim=D_AUDIO, max_num_window=WPA, max_num_fewshot=SHOTS),
        tiny_opt_config(vocab_size=VOCAB, hidden_size=32, num_layers=2, word_embed_proj_dim=16), TOK)
    for i, b in enumerate(model.xattn_blocks()):
        with torch.no_grad():
            b.attn_gate.fill_(1.0 + 0.3 * i)
            b.ff_gate.fill_(0.5)
    assert model.lang_encoder.model.decoder.project_out is not None  # the case this model exists for
    return model


def _labels(b):
    """Sparse supervision like a real batch: row 0 a short answer, row 1 none at all, row 2 two spans (4 scored)."""
    lab = torch.full_like(b["input_ids"], -100)
    lab[0, 9:12] = b["input_ids"][0, 9:12]
    lab[2, 3:5] = b["input_ids"][2, 3:5]
    lab[2, -2:] = b["input_ids"][2, -2:]
    return lab


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("arch", ["opt", "opt-proj", "llama", "qwen2"])
def test_supervised_loss_equals_full_logits(arch):
    model = _opt_proj_model() if arch == "opt-proj" else build(arch)
    model.train()
    apply_freeze_policy(model, "sft")  # LM blocks trainable too: gradients through the whole body
    b = batch()
    labels = _labels(b)
    inputs = {k: v for k, v in b.items() if k != "labels"}

    out = model(**inputs)
    full_sum, full_count = token_losses(out.logits, labels)
    full_loss = full_sum.sum() / full_count.sum()
    full_loss.backward()
    g_full = _grads(model)
    model.zero_grad(set_to_none=True)

    sup = model.supervised_loss(**inputs, labels=labels)
    assert isinstance(sup, SupervisedLoss)
    sup.loss.backward()
    g_sup = _grads(model)

    assert sup.count.tolist() == full_count.tolist() == [3, 0, 4]
    assert sup.loss_sum[1] == 0
    torch.testing.assert_close(sup.loss_sum, full_sum, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sup.loss, full_loss, rtol=1e-6, atol=0)
    assert g_full.keys() == g_sup.keys() and len(g_full) > 10
    top = max(float(g.abs().max()) for g in g_full.values())
    for n in g_full:  # atol: tensors whose true gradient is 0 (e.g. k_proj.bias) hold only rounding noise
        torch.testing.assert_close(g_sup[n], g_full[n], rtol=1e-5, atol=1e-6 * top, msg=n)


def test_supervised_loss_no_supervised_token_and_errors():
    model = build("opt").train()
    b = batch()
    inputs = {k: v for k, v in b.items() if k != "labels"}
    none = torch.full_like(b["input_ids"], -100)
    none[:, 0] = 5  # a label on position 0 is never predicted (nothing precedes it)
    sup = model.supervised_loss(**inputs, labels=none)
    assert float(sup.loss.detach()) == 0.0 and sup.count.sum() == 0 and sup.loss.requires_grad
    sup.loss.backward()  # a graph exists (all-zero gradients), like the full path's
    with pytest.raises(ValueError, match="labels shape"):
        model.supervised_loss(**inputs, labels=none[:, :-1])
    with pytest.raises(ValueError, match="loss_logits must be one of"):
        model(**inputs, labels=none, loss_logits="sparse")
    with pytest.raises(ValueError, match="needs labels"):
        model(**inputs, loss_logits="supervised")
