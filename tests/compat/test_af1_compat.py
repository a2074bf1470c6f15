"""AF1 checkpoint key layout: export has exactly AF1's keys; load accepts all its variants."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.model.builders import build, batch

# AF1 names, written out from the original modules (helpers.py / flamingo_lm.py), not from our code.
AT_LAYER = ["slf_attn.w_qs.weight", "slf_attn.w_ks.weight", "slf_attn.w_vs.weight", "slf_attn.fc.weight",
            "slf_attn.layer_norm.weight", "slf_attn.layer_norm.bias", "pos_ffn.w_1.weight", "pos_ffn.w_1.bias",
            "pos_ffn.w_2.weight", "pos_ffn.w_2.bias", "pos_ffn.layer_norm.weight", "pos_ffn.layer_norm.bias"]
XATTN = ["attn_gate", "ff_gate", "attn.norm.weight", "attn.norm.bias", "attn.to_q.weight", "attn.to_kv.weight",
         "attn.to_out.weight", "ff.0.weight", "ff.0.bias", "ff.1.weight", "ff.3.weight"]


def af1_expected_keys(model, n_at_layers=2):
    keys = {"audio_transformer.position_enc.pos_table", "audio_transformer.layer_norm.weight",
            "audio_transformer.layer_norm.bias"}
    keys |= {f"audio_transformer.layer_stack.{i}.{k}" for i in range(n_at_layers) for k in AT_LAYER}
    bare = AutoModelForCausalLM.from_config(model.lang_encoder.config)
    path = "model.decoder.layers." if hasattr(bare.model, "decoder") else "model.layers."
    for k in bare.state_dict():
        if k.startswith(path):
            i, rest = k[len(path):].split(".", 1)
            keys.add(f"lang_encoder.{path}{i}.decoder_layer.{rest}")
            keys.add(f"lang_encoder.old_decoder_blocks.{i}.{rest}")
        else:
            keys.add(f"lang_encoder.{k}")
    n = model.lang_encoder.config.num_hidden_layers
    every = model.xattn_every_n_layers
    for i in range(n):
        if (i + 1) % every == 0:
            keys |= {f"lang_encoder.{path}{i}.gated_cross_attn_layer.{k}" for k in XATTN}
            keys |= {f"lang_encoder.gated_cross_attn_layers.{i}.{k}" for k in XATTN}
    return keys


@pytest.mark.parametrize("arch,every_n,layers", [("opt", 1, 2), ("llama", 2, 4)])
def test_export_has_exactly_af1_keys(arch, every_n, layers):
    from megaflamingo.compat import af1

    model = build(arch, every_n=every_n, num_layers=layers)
    sd = af1.export_state_dict(model)
    assert set(sd) == af1_expected_keys(model)
    # aliases hold the same tensors as the canonical keys
    path = model.decoder_layers_path
    for k, v in sd.items():
        if k.startswith("lang_encoder.old_decoder_blocks."):
            i, rest = k.split(".", 3)[2:]
            assert v is sd[f"lang_encoder.{path}.{i}.decoder_layer.{rest}"]


def _logits(model):
    with torch.no_grad():
        return model(**batch()).logits


def test_load_roundtrip_and_variants():
    from megaflamingo.compat import af1

    src = build("opt", seed=0)
    sd = {k: v.clone() for k, v in af1.export_state_dict(src).items()}
    want = _logits(src)

    variants = {
        "full": dict(sd),
        "module_prefixed_with_clap": {**{f"module.{k}": v for k, v in sd.items()},
                                      "module.clap.ms_clap.clapcap.weight": torch.zeros(3)},
        "aliases_only": {k: v for k, v in sd.items()
                         if ".decoder_layer." not in k and ".gated_cross_attn_layer." not in k},
        "deduplicated": {k: v for k, v in sd.items() if "old_decoder_blocks" not in k
                         and "gated_cross_attn_layers" not in k},
    }
    for name, v in variants.items():
        dst = build("opt", seed=123)
        assert not torch.allclose(_logits(dst), want)
        rep = af1.load_state_dict(dst, v)
        assert torch.equal(_logits(dst), want), name
        if name == "module_prefixed_with_clap":
            assert rep["ignored_clap_keys"] == 1


def test_load_errors_name_keys():
    from megaflamingo.compat import af1

    model = build("opt")
    sd = dict(af1.export_state_dict(model))
    missing = {k: v for k, v in sd.items() if "audio_transformer.layer_norm.bias" not in k}
    with pytest.raises(ValueError, match="missing 1 key.*audio_transformer.layer_norm.bias"):
        af1.load_state_dict(model, missing)
    assert af1.load_state_dict(model, missing, strict=False)["missing"] == ["audio_transformer.layer_norm.bias"]
    with pytest.raises(ValueError, match="unexpected.*lang_encoder.bogus"):
        af1.load_state_dict(model, {**sd, "lang_encoder.bogus": torch.zeros(1)})
    bad = dict(sd)
    bad["lang_encoder.gated_cross_attn_layers.0.attn_gate"] = torch.tensor([9.0])
    with pytest.raises(ValueError, match="duplicate entries.*attn_gate"):
        af1.load_state_dict(model, bad)
    bad = dict(sd)
    bad["audio_transformer.layer_norm.bias"] = torch.zeros(5)
    with pytest.raises(ValueError, match="shape mismatch.*layer_norm.bias"):
        af1.load_state_dict(model, bad)


def test_build_model_validates_af1_config():
    from megaflamingo.compat import af1
    from megaflamingo.testing import tiny_opt_config

    tok = dict(media=90, eoc=91, sep=92, pad=1, bos=2, eos=2)
    atk = dict(n_head=4, n_layers=1, d_inner=16, max_num_media=8, max_window_per_audio=4)
    clap = dict(audio_embed_dim=16, max_num_window=4, max_num_fewshot=2)
    cfg = tiny_opt_config(vocab_size=96, hidden_size=32)
    with pytest.raises(ValueError, match="max_window_per_audio"):
        af1.build_model({"audio_transformer_kwargs": {**atk, "max_window_per_audio": 8}}, clap, cfg, tok)
    with pytest.raises(ValueError, match="vocab_size"):
        af1.build_model({"audio_transformer_kwargs": atk}, clap, cfg, {**tok, "media": 500})
    with pytest.raises(ValueError, match="max_num_media"):
        af1.build_model({"audio_transformer_kwargs": {**atk, "max_num_media": 4}}, clap, cfg, tok)
