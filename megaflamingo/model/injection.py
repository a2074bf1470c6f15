"""Insert gated cross-attention blocks into any HF causal decoder LM.

Design choice: each decoder layer in the LM's layer list is replaced by a ``FlamingoDecoderLayer`` that owns
``gated_cross_attn_layer`` (or None) and the original ``decoder_layer`` (AF1's attribute names, so the
LM's state dict already has AF1's ``...layers.N.decoder_layer.*`` keys). The HF LM still runs its own
forward: embeddings, causal/padding masks, position ids / RoPE, its attention implementation (sdpa,
flash_attention_2, eager) and its KV cache. The media reach the layers as a keyword argument
(``flamingo_media=MediaContext``): HF 5.x forwards unknown ``**kwargs`` from ``XForCausalLM.forward``
through the base model to every decoder layer. Nothing is stashed on modules between calls (AF1's
``condition_audio_x`` did), so activation checkpointing recomputes with the same inputs, ZeRO-3 sees
ordinary parameters and two concurrent forwards cannot see each other's audio.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

try:  # transformers >= 4.48
    from transformers.modeling_layers import GradientCheckpointingLayer as _CkptBase
except Exception:  # pragma: no cover - older transformers
    _CkptBase = nn.Module

from .xattn import GatedCrossAttentionBlock, MediaContext

MEDIA_KWARG = "flamingo_media"

# Attribute paths of the decoder-layer ModuleList, tried in order (then a generic search).
KNOWN_LAYER_PATHS = (
    "model.decoder.layers",  # OPT
    "model.layers",  # Llama, Qwen2, Mistral, Gemma, Phi3 ...
    "transformer.h",  # GPT-2, GPT-J, Falcon
    "gpt_neox.layers",  # Pythia
    "transformer.blocks",  # MPT
)


def _get_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set_path(obj, path: str, value) -> None:
    head, _, last = path.rpartition(".")
    setattr(_get_path(obj, head) if head else obj, last, value)


def find_decoder_layers_path(lm: nn.Module, path: Optional[str] = None) -> str:
    """Return the attribute path of the decoder-layer ModuleList (given, known, or the unique list of
    ``config.num_hidden_layers`` entries)."""
    if path:
        layers = _get_path(lm, path)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"decoder_layers_path={path!r} is not an nn.ModuleList in {type(lm).__name__}")
        return path
    for p in KNOWN_LAYER_PATHS:
        try:
            if isinstance(_get_path(lm, p), nn.ModuleList):
                return p
        except AttributeError:
            continue
    n = getattr(getattr(lm, "config", None), "num_hidden_layers", None)
    cands = [name for name, m in lm.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(cands) == 1:
        return cands[0]
    raise ValueError(
        f"cannot find the decoder-layer list of {type(lm).__name__} (candidates: {cands}); "
        "pass decoder_layers_path explicitly"
    )


class FlamingoDecoderLayer(_CkptBase):
    """xattn block (maybe None) followed by the LM's own decoder layer.

    Subclasses HF's GradientCheckpointingLayer so that, when enabled, the xattn block and the decoder
    layer are recomputed together (the inner layer's own flag is switched off by
    ``AudioFlamingo.gradient_checkpointing_enable`` to avoid checkpointing twice).
    """

    def __init__(self, gated_cross_attn_layer: Optional[GatedCrossAttentionBlock], decoder_layer: nn.Module,
                 layer_idx: int):
        super().__init__()
        self.gated_cross_attn_layer = gated_cross_attn_layer
        self.decoder_layer = decoder_layer
        self.layer_idx = layer_idx
        # Some HF models read per-layer attributes from the layer objects.
        for attr in ("attention_type", "layer_type", "is_sliding"):
            if hasattr(decoder_layer, attr) and not isinstance(getattr(decoder_layer, attr), nn.Module):
                setattr(self, attr, getattr(decoder_layer, attr))

    # The media ride in kwargs (a closure for the checkpoint function): reentrant checkpointing would
    # silently drop their gradients, so whatever function HF's gradient_checkpointing_enable() installs,
    # this layer always checkpoints non-reentrantly.
    @property
    def _gradient_checkpointing_func(self):
        return partial(checkpoint, use_reentrant=False)

    @_gradient_checkpointing_func.setter
    def _gradient_checkpointing_func(self, fn) -> None:
        pass

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        ctx: Optional[MediaContext] = kwargs.pop(MEDIA_KWARG, None)
        if self.gated_cross_attn_layer is not None:
            if ctx is None:
                raise ValueError(
                    "cross-attention layer called without media: call the AudioFlamingo model, not its "
                    "lang_encoder directly"
                )
            hidden_states = self.gated_cross_attn_layer(hidden_states, ctx, self.layer_idx)
        return self.decoder_layer(hidden_states, *args, **kwargs)


def inject_xattn(lm: nn.Module, dim_audio: int, every_n_layers: int = 1, heads: int = 8, dim_head: int = 64,
                 ff_mult: int = 4, decoder_layers_path: Optional[str] = None) -> str:
    """Wrap the LM's decoder layers in place; AF1 puts a block before layer i when (i + 1) % N == 0."""
    path = find_decoder_layers_path(lm, decoder_layers_path)
    layers = _get_path(lm, path)
    if any(isinstance(l, FlamingoDecoderLayer) for l in layers):
        raise ValueError("LM already has cross-attention layers injected")
    if every_n_layers < 1:
        raise ValueError(f"xattn.every_n_layers must be >= 1, got {every_n_layers}")
    cfg = lm.config
    dim = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model")
    ref = next(lm.parameters())
    wrapped = []
    for i, layer in enumerate(layers):
        block = None
        if (i + 1) % every_n_layers == 0:
            block = GatedCrossAttentionBlock(dim, dim_audio, dim_head=dim_head, heads=heads, ff_mult=ff_mult)
            if ref.device.type != "meta":
                block.to(device=ref.device)
        wrapped.append(FlamingoDecoderLayer(block, layer, i))
    _set_path(lm, path, nn.ModuleList(wrapped))
    return path


def flamingo_layers(lm: nn.Module, path: str) -> list[FlamingoDecoderLayer]:
    return list(_get_path(lm, path))
