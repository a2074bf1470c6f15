"""AF1 model core: audio transformer, gated cross-attention, LM injection, generation, freeze policies."""
from .audio_transformer import AudioTransformer
from .build import build_model
from .flamingo import AudioFlamingo, SupervisedLoss
from .freeze import FreezeReport, apply_freeze_policy, policy_from_train_config
from .injection import FlamingoDecoderLayer, find_decoder_layers_path, inject_xattn
from .xattn import GatedCrossAttentionBlock, MediaContext, media_visibility

__all__ = [
    "AudioFlamingo", "AudioTransformer", "FlamingoDecoderLayer", "FreezeReport", "GatedCrossAttentionBlock",
    "MediaContext", "SupervisedLoss", "apply_freeze_policy", "build_model", "find_decoder_layers_path", "inject_xattn",
    "media_visibility", "policy_from_train_config",
]
