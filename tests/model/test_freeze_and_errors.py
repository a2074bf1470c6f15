"""Freeze policies and bad-input errors."""
import pytest
import torch

from tests.model.builders import TOK, WPA, batch, build

from megaflamingo.model import apply_freeze_policy, build_model, policy_from_train_config
from megaflamingo.tokens import SpecialTokens


def _grads(model, b):
    model.zero_grad(set_to_none=True)
    model(**b).loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_pretrain_computes_no_lm_weight_grads():
    model = build("opt")
    rep = apply_freeze_policy(model, "pretrain")
    g = _grads(model, batch())
    for n, grad in g.items():
        new = n.startswith("audio_transformer.") or ".gated_cross_attn_layer." in n
        assert (grad is not None) == new, n
    assert rep.trainable == sum(p.numel() for n, p in model.named_parameters() if g[n] is not None)


def test_sft_and_af1_exact():
    model = build("llama")
    apply_freeze_policy(model, "sft")
    assert all(p.requires_grad for p in model.parameters())
    apply_freeze_policy(model, "sft_af1_exact")
    g = _grads(model, batch())
    for n, grad in g.items():
        assert (grad is None) == (".decoder_layer." in n), n
    assert g["lang_encoder.model.embed_tokens.weight"] is not None and g["lang_encoder.lm_head.weight"] is not None


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_new_token_embedding_rows_only(arch):
    model = build(arch)
    rep = apply_freeze_policy(model, "pretrain", embeddings="new_tokens")
    g = _grads(model, batch())
    embs = ["lang_encoder.model.decoder.embed_tokens.weight"] if arch == "opt" else [
        "lang_encoder.model.embed_tokens.weight", "lang_encoder.lm_head.weight"]
    assert sorted(rep.row_masked) == sorted(embs)
    for n in embs:
        rows = g[n].abs().sum(1).nonzero().flatten().tolist()
        assert rows and set(rows) <= {TOK["media"], TOK["eoc"]}, (n, rows)
    assert g["lang_encoder.model.decoder.layers.0.decoder_layer.fc1.weight" if arch == "opt"
             else "lang_encoder.model.layers.0.decoder_layer.mlp.up_proj.weight"] is None
    # switching policy removes the row mask
    apply_freeze_policy(model, "pretrain", embeddings="full")
    g = _grads(model, batch())
    assert (g[embs[0]].abs().sum(1) > 0).sum() > 2


def test_policy_from_train_config():
    from megaflamingo.config import TrainConfig

    assert policy_from_train_config(TrainConfig(stage="pretrain")) == ("pretrain", "frozen")
    assert policy_from_train_config(TrainConfig(stage="sft", unfreeze_lm=True)) == ("sft", "frozen")
    assert policy_from_train_config(TrainConfig(stage="sft", unfreeze_lm=True, af1_exact=True))[0] == "sft_af1_exact"
    with pytest.raises(ValueError, match="unknown freeze policy"):
        apply_freeze_policy(build("opt"), "everything")


def test_build_model_from_our_config():
    from megaflamingo.config import AudioTransformerConfig, ModelConfig, XattnConfig
    from megaflamingo.testing import tiny_qwen2_config
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(audio_embed_dim=32, max_num_window=WPA, max_num_fewshot=3,
                      audio_transformer=AudioTransformerConfig(n_head=4, n_layers=1, d_inner=16, max_num_media=12,
                                                               max_window_per_audio=WPA),
                      xattn=XattnConfig(every_n_layers=2, heads=2, dim_head=8))
    lm = AutoModelForCausalLM.from_config(tiny_qwen2_config(vocab_size=96, hidden_size=32, num_layers=4))
    model = build_model(cfg, lm, SpecialTokens.of(TOK))
    assert [l.gated_cross_attn_layer is not None for l in model.flamingo_layers] == [False, True, False, True]
    out = model(**batch())
    assert out.logits.shape == (3, 14, 96) and torch.isfinite(out.loss)


@pytest.mark.parametrize("mutate,match", [
    (lambda b: b["input_ids"].__setitem__((1, 0), 5), r"row\(s\) \[1\] contain no <audio>"),
    (lambda b: b["input_ids"].__setitem__((2, slice(0, 4)), TOK["media"]), r"row\(s\) \[2\] have \[7\] <audio>"),
    (lambda b: b.__setitem__("audio_embeds", b["audio_embeds"][:, :10]), "not a multiple of windows per audio"),
    (lambda b: b.__setitem__("audio_embeds", b["audio_embeds"][..., :16]), "last dim 16 != model audio_embed_dim 32"),
    (lambda b: b["audio_embeds"].__setitem__((2, 3, 0), float("nan")), r"NaN/inf in batch row\(s\) \[2\]"),
    (lambda b: b.__setitem__("audio_mask", b["audio_mask"][:, :5]), "audio_mask must be"),
])
def test_bad_inputs_raise_clear_errors(mutate, match):
    model = build("opt")
    b = batch()
    mutate(b)
    with pytest.raises(ValueError, match=match):
        model(**b)


def test_lm_called_directly_without_media_raises():
    model = build("opt")
    with pytest.raises(ValueError, match="without media"):
        model.lang_encoder(input_ids=batch()["input_ids"])
