"""AF1 checkpoint and config compatibility.

Our module tree already uses AF1's names (``audio_transformer.*``, ``lang_encoder.<layers>.N.decoder_layer.*``,
``lang_encoder.<layers>.N.gated_cross_attn_layer.*``), so the mapping is only about what AF1 had on top:

* AF1's ``Flamingo.state_dict()`` also lists every decoder block and xattn block a second time under the
  aliases ``lang_encoder.old_decoder_blocks.N.*`` and ``lang_encoder.gated_cross_attn_layers.N.*`` (the same
  tensors registered twice). ``export_state_dict`` emits them; ``load_state_dict`` accepts either name
  (or both, then they must be equal).
* ``clap.*`` keys (the audio encoder, run offline in our system) are ignored on load and not exported.
* ``module.`` prefixes (DDP/DeepSpeed) and FSDP wrapper infixes are stripped on load.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

import torch

from megaflamingo.model.config import AudioTransformerConfig, ModelConfig, XattnConfig
from megaflamingo.model.flamingo import AudioFlamingo
from megaflamingo.tokens import SpecialTokens

DECODER_ALIAS = "lang_encoder.old_decoder_blocks."
XATTN_ALIAS = "lang_encoder.gated_cross_attn_layers."
_WRAPPER_INFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def build_model(model_config: Mapping, clap_config: Mapping, lm_config, token_ids: Mapping) -> AudioFlamingo:
    """AF1-YAML-shaped ``model_config`` / ``clap_config`` dicts + a transformers config (random init).
    ``token_ids``: a :class:`~megaflamingo.tokens.SpecialTokens` or the plain dict of the six ids."""
    from transformers import AutoModelForCausalLM

    atk = dict(model_config.get("audio_transformer_kwargs") or {})
    for k in ("n_head", "n_layers", "d_inner", "max_num_media", "max_window_per_audio"):
        if k not in atk:
            raise ValueError(f"model_config.audio_transformer_kwargs.{k} is required (AF1 YAML)")
    for k in ("audio_embed_dim", "max_num_window", "max_num_fewshot"):
        if k not in clap_config:
            raise ValueError(f"clap_config.{k} is required (AF1 YAML)")
    cfg = ModelConfig(
        audio_embed_dim=int(clap_config["audio_embed_dim"]),
        max_num_window=int(clap_config["max_num_window"]),
        max_num_fewshot=int(clap_config["max_num_fewshot"]),
        audio_transformer=AudioTransformerConfig(
            n_head=int(atk["n_head"]), n_layers=int(atk["n_layers"]), d_inner=int(atk["d_inner"]),
            dropout=float(atk.get("dropout", 0.1)), max_num_media=int(atk["max_num_media"]),
            max_window_per_audio=int(atk["max_window_per_audio"])),
        xattn=XattnConfig(every_n_layers=int(model_config.get("cross_attn_every_n_layers", 1))),
        decoder_layers_path=model_config.get("decoder_layers_attr_name"),
    )
    cfg.validate("AF1 YAML")
    tokens = SpecialTokens.of(token_ids)
    tokens.check_vocab(lm_config.vocab_size, "lm_config.vocab_size")
    return AudioFlamingo.from_lm(AutoModelForCausalLM.from_config(lm_config), tokens, cfg)


def layers_prefix(model: AudioFlamingo) -> str:
    """``lang_encoder.<path of the LM's decoder-layer list>.`` in our key names."""
    return f"lang_encoder.{model.decoder_layers_path}."


def export_state_dict(model: AudioFlamingo) -> dict[str, torch.Tensor]:
    """Exactly the keys of AF1's ``Flamingo.state_dict()`` minus ``clap.*`` (aliases included, same tensors).

    Under ZeRO-3 gather the parameters first (e.g. export from a consolidated fp32 state dict)."""
    sd = model.state_dict()
    prefix = layers_prefix(model)
    pat = re.compile(re.escape(prefix) + r"(\d+)\.(decoder_layer|gated_cross_attn_layer)\.(.+)$")
    dec_alias, xattn_alias = {}, {}
    for k, v in sd.items():
        m = pat.match(k)
        if m:
            i, kind, rest = m.groups()
            (dec_alias if kind == "decoder_layer" else xattn_alias)[
                (DECODER_ALIAS if kind == "decoder_layer" else XATTN_ALIAS) + f"{i}.{rest}"] = v
    out = dict(sd)
    out.update(dec_alias)  # AF1 registered old_decoder_blocks, then gated_cross_attn_layers, after the LM
    out.update(xattn_alias)
    return out


def canonical_key(k: str, prefix: str) -> str:
    """Our name of an AF1 / DeepSpeed / FSDP key: ``module.`` prefixes and wrapper infixes stripped, the
    ``old_decoder_blocks`` / ``gated_cross_attn_layers`` aliases mapped onto the layers under ``prefix``
    (:func:`layers_prefix`)."""
    while k.startswith("module."):
        k = k[len("module."):]
    for infix in _WRAPPER_INFIXES:
        k = k.replace(infix, "")
    if k.startswith(DECODER_ALIAS):
        i, rest = k[len(DECODER_ALIAS):].split(".", 1)
        return f"{prefix}{i}.decoder_layer.{rest}"
    if k.startswith(XATTN_ALIAS):
        i, rest = k[len(XATTN_ALIAS):].split(".", 1)
        return f"{prefix}{i}.gated_cross_attn_layer.{rest}"
    return k


def canonical_state_dict(model: AudioFlamingo, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` (ours, AF1's, ``module.``-prefixed, with aliases) under our key names; ``clap.*`` (the audio
    encoder, run offline here) dropped. Duplicates (an alias and its original) collapse to one entry."""
    prefix = layers_prefix(model)
    return {canonical_key(k, prefix): v for k, v in sd.items() if not k.split("module.")[-1].startswith("clap.")}


def _names(keys, n: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_state_dict(model: AudioFlamingo, sd: Mapping[str, torch.Tensor], strict: bool = True) -> dict:
    """Load an AF1 ``model_state_dict`` (with or without the duplicate aliases, ``module.``-prefixed, with
    ``clap.*`` keys). Raises ValueError naming missing / unexpected / mismatching keys.

    ``strict=False`` allows missing keys (e.g. AF1's trainable-only checkpoints); they are returned."""
    prefix = layers_prefix(model)
    expected = model.state_dict()
    merged: dict[str, torch.Tensor] = {}
    ignored_clap, aliases = [], 0
    for k, v in sd.items():
        bare = k
        while bare.startswith("module."):
            bare = bare[len("module."):]
        if bare.startswith("clap."):
            ignored_clap.append(k)
            continue
        ck = canonical_key(k, prefix)
        if ck != bare:
            aliases += 1
        if ck in merged:
            if merged[ck].shape != v.shape or not torch.equal(merged[ck], v.to(merged[ck].dtype)):
                raise ValueError(f"AF1 state dict: duplicate entries for {ck} (e.g. {k}) hold different tensors")
            continue
        merged[ck] = v
    unexpected = set(merged) - set(expected)
    if unexpected:
        raise ValueError(f"AF1 state dict has {len(unexpected)} unexpected key(s): {_names(unexpected)}")
    missing = set(expected) - set(merged)
    if missing and strict:
        raise ValueError(f"AF1 state dict is missing {len(missing)} key(s): {_names(missing)}")
    bad = [k for k, v in merged.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise ValueError("AF1 state dict shape mismatch: " + "; ".join(
            f"{k}: checkpoint {tuple(merged[k].shape)} vs model {tuple(expected[k].shape)}" for k in bad[:12]))
    model.load_state_dict(merged, strict=False)
    return {"loaded": len(merged), "missing": sorted(missing), "ignored_clap_keys": len(ignored_clap),
            "aliases_merged": aliases}
