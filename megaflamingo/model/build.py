"""Build the LM and AudioFlamingo from a config: the one construction path of training, export,
inference and the AF1 import (so every caller gets the same vocabulary size and module tree)."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from megaflamingo.hub import hf_cache_dir
from megaflamingo.tokens import SpecialTokens

from .config import ModelConfig
from .flamingo import AudioFlamingo
from .lm_attention import resolve_attn_implementation


def is_zero3(ds_config: Optional[dict]) -> bool:
    return bool(ds_config) and int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3


def build_lm(model_cfg: ModelConfig, vocab_size: int, ds_config: Optional[dict] = None,
             zero_init: bool = True) -> nn.Module:
    """The HF causal LM (``model_cfg.lm_config``: random init; else ``from_pretrained(model_cfg.lm)``),
    with exactly ``vocab_size`` embedding rows. Under ZeRO-3 with ``zero_init`` it is partitioned while it
    is built (zero.Init through transformers' DeepSpeed integration), so a 7B LM never exists whole."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_ds = None
    if is_zero3(ds_config) and zero_init:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)  # must stay referenced while the LM is built
    kw = dict(attn_implementation=resolve_attn_implementation(model_cfg.attn_implementation))
    if model_cfg.lm_config is not None:
        conf = dict(model_cfg.lm_config)
        lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(conf.pop("model_type"), **conf), **kw)
    else:
        lm = AutoModelForCausalLM.from_pretrained(model_cfg.lm, cache_dir=hf_cache_dir(model_cfg.cache_dir),
                                                  dtype=torch.float32, **kw)
    # Exactly len(tokenizer) rows, as AF1 (resize_token_embeddings(len(text_tokenizer))): OPT ships
    # 50272 rows, AF1's tokenizer has 50268 tokens, so AF1 checkpoints hold 50268-row embeddings.
    if lm.get_input_embeddings().num_embeddings != vocab_size:
        lm.resize_token_embeddings(vocab_size)
    del hf_ds
    return lm


def build_model(model_cfg: ModelConfig, lm: nn.Module, tokens: SpecialTokens, ds_config: Optional[dict] = None,
                zero_init: bool = True) -> AudioFlamingo:
    """AudioFlamingo around an already-built LM. The new modules are created in the LM's parameter
    dtype; under ZeRO-3 with ``zero_init`` they are partitioned at creation too (the xattn blocks of a
    1.3B LM are ~0.9B parameters)."""
    ctx = contextlib.nullcontext()
    if is_zero3(ds_config) and zero_init:
        import deepspeed

        # dtype follows the config (passing dtype= explicitly picks bf16 on CPU in DeepSpeed 0.19).
        ctx = deepspeed.zero.Init(config_dict_or_path=ds_config)
    with ctx:
        model = AudioFlamingo.from_lm(lm, tokens, model_cfg)
    dtype = next(lm.parameters()).dtype
    if dtype != torch.float32 and dtype.is_floating_point:
        model.audio_transformer.to(dtype)
        for b in model.xattn_blocks():
            b.to(dtype)
    return model


def build_from_config(model_cfg: ModelConfig, tokenizer, device: str = "cpu") -> tuple[AudioFlamingo, SpecialTokens]:
    """AudioFlamingo for a tokenizer, built exactly as training builds it (unpartitioned)."""
    tokens = SpecialTokens.from_tokenizer(tokenizer)
    lm = build_lm(model_cfg, len(tokenizer))
    return build_model(model_cfg, lm, tokens).to(device), tokens


def lm_config_value(model_cfg: ModelConfig, *names: str) -> Optional[int]:
    """An integer field of the LM's config (``lm_config`` or the LM's config file; no weights loaded),
    the first of ``names`` present; None when it cannot be read."""
    if model_cfg.lm_config is not None:
        get = model_cfg.lm_config.get
    else:
        try:
            from transformers import AutoConfig

            conf = AutoConfig.from_pretrained(model_cfg.lm, cache_dir=hf_cache_dir(model_cfg.cache_dir))
        except Exception:  # hub name offline, or a path that is not there: the caller decides
            return None

        def get(k):
            return getattr(conf, k, None)
    for k in names:
        if get(k):
            return int(get(k))
    return None


def lm_hidden_size(model_cfg: ModelConfig) -> Optional[int]:
    """The LM width; sizes DeepSpeed's "auto" buckets."""
    return lm_config_value(model_cfg, "hidden_size", "d_model")


def lm_max_positions(model_cfg: ModelConfig) -> Optional[int]:
    """How many positions the LM can embed (OPT: 2048); None when unknown or unbounded (rotary)."""
    return lm_config_value(model_cfg, "max_position_embeddings", "n_positions")
