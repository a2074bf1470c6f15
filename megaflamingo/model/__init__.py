"""AF1 model core: config, LM construction, audio transformer, gated cross-attention, LM injection,
losses, generation, freeze policies.

Exports resolve on first use. ``import megaflamingo`` imports :mod:`.flamingo` itself, to register the
model with transformers' auto classes.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "AudioFlamingo": ".flamingo",
    "AudioFlamingoConfig": ".hf_config",
    "AudioTransformer": ".audio_transformer",
    "AudioTransformerConfig": ".config",
    "FlamingoDecoderLayer": ".injection",
    "FreezeReport": ".freeze",
    "GatedCrossAttentionBlock": ".xattn",
    "MediaContext": ".xattn",
    "ModelConfig": ".config",
    "SupervisedLoss": ".loss",
    "XattnConfig": ".config",
    "apply_freeze_policy": ".freeze",
    "build_from_config": ".build",
    "build_lm": ".build",
    "build_model": ".build",
    "find_decoder_layers_path": ".injection",
    "inject_xattn": ".injection",
    "media_visibility": ".xattn",
    "policy_from_train_config": ".freeze",
    "token_losses": ".loss",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'megaflamingo.model' has no attribute {name!r}")
