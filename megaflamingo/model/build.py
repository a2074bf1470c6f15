"""Build an AudioFlamingo from our ModelConfig around an already-built HF causal LM."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .flamingo import AudioFlamingo


def build_model(model_cfg, lm: nn.Module, token_ids: dict, decoder_layers_path: Optional[str] = None) -> AudioFlamingo:
    """``model_cfg``: megaflamingo.config.ModelConfig (or any object with the same fields).

    The LM may have been built under ``deepspeed.zero.Init``; the new modules are created in the LM's
    parameter dtype on its device (DeepSpeed partitions them at ``initialize``)."""
    at, xa = model_cfg.audio_transformer, model_cfg.xattn
    wpa = getattr(at, "max_window_per_audio", model_cfg.max_num_window)
    if wpa != model_cfg.max_num_window:
        raise ValueError(
            f"model.audio_transformer.max_window_per_audio={wpa} must equal model.max_num_window="
            f"{model_cfg.max_num_window}"
        )
    vocab = lm.get_input_embeddings().num_embeddings
    for k in ("media", "eoc"):
        if k not in token_ids:
            raise ValueError(f"token_ids is missing {k!r}")
        if not 0 <= int(token_ids[k]) < vocab:
            raise ValueError(f"token_ids[{k!r}]={token_ids[k]} outside the LM vocabulary (size {vocab}); "
                             "resize the LM embeddings after adding the special tokens")
    model = AudioFlamingo(
        lm, token_ids,
        audio_embed_dim=model_cfg.audio_embed_dim,
        windows_per_audio=model_cfg.max_num_window,
        max_num_fewshot=model_cfg.max_num_fewshot,
        audio_n_head=at.n_head, audio_n_layers=at.n_layers, audio_d_inner=at.d_inner,
        audio_n_position=getattr(at, "max_num_media", model_cfg.max_num_window * model_cfg.max_num_fewshot),
        audio_attn_dropout=getattr(at, "dropout", 0.1),
        xattn_every_n_layers=xa.every_n_layers, xattn_heads=xa.heads, xattn_dim_head=xa.dim_head,
        xattn_ff_mult=xa.ff_mult,
        decoder_layers_path=decoder_layers_path or getattr(model_cfg, "decoder_layers_path", None),
    )
    dtype = next(lm.parameters()).dtype
    if dtype != torch.float32 and dtype.is_floating_point:
        model.audio_transformer.to(dtype)
        for b in model.xattn_blocks():
            b.to(dtype)
    return model
