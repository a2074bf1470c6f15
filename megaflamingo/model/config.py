"""The model's configuration: what :class:`~megaflamingo.model.flamingo.AudioFlamingo` is built from.

It lives with the model (not in :mod:`megaflamingo.config`) so the model and the AF1 checkpoint code
depend on nothing above them; the root ``Config`` composes it as its ``model`` section.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

from megaflamingo.errors import ConfigError


@dataclass
class AudioTransformerConfig:
    """AF1's 3-layer post-norm transformer over window embeddings (``audio_transformer_kwargs``)."""

    n_head: int = 8
    n_layers: int = 3
    d_inner: int = 2048
    # AF1 hard-codes 0.1 attention dropout; kept as the default for fidelity.
    dropout: float = 0.1
    # Number of sinusoidal position slots; AF1 requires >= max_num_window * max_num_fewshot.
    max_num_media: int = 128
    max_window_per_audio: int = 16


@dataclass
class XattnConfig:
    """Gated cross-attention (xattn-dense) blocks inserted before LM decoder layers."""

    every_n_layers: int = 1
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    # Attention kernel of the blocks. "dense": SDPA with the [B, 1, T, L] AF1 mask (the reference; the
    # only path for unpacked KV-cached generation anyway). The others run the fused segment layout
    # (compacted valid windows, varlen segments; required for packed batches): "auto" = "varlen" on CUDA
    # in half precision when a varlen kernel imports, else "segments" (pure torch); "flex" = FlexAttention.
    backend: Literal["dense", "auto", "segments", "varlen", "flex"] = "dense"


@dataclass
class ModelConfig:
    # HF path or hub name of the causal LM. Ignored for weights when ``lm_config`` is given.
    lm: str = "facebook/opt-iml-max-1.3b"
    # Tokenizer path / hub name; None = same as ``lm``; "tiny" = the run-time BPE of megaflamingo.tokens.
    tokenizer: Optional[str] = None
    # A transformers config dict (must contain ``model_type``) to build a RANDOM-INIT LM:
    # used by tests and the CPU quickstart, never for real training.
    lm_config: Optional[dict] = None
    # The LM's self-attention (transformers' attn_implementation). "auto": flash_attention_2 when the
    # flash-attn package imports on a CUDA machine, else megaflamingo_varlen (torch's own varlen flash
    # kernel for packed rows, SDPA otherwise) on CUDA, else sdpa. See megaflamingo.model.lm_attention.
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "megaflamingo_varlen"] = "sdpa"
    cache_dir: Optional[str] = None
    audio_embed_dim: int = 1024
    max_num_window: int = 16
    max_num_fewshot: int = 8
    audio_transformer: AudioTransformerConfig = field(default_factory=AudioTransformerConfig)
    xattn: XattnConfig = field(default_factory=XattnConfig)
    # Attribute path of the LM's decoder-layer list (e.g. "model.decoder.layers"); None = detected for
    # OPT, Llama, Qwen2, GPT-2 and other common architectures (AF1's ``decoder_layers_attr_name``).
    decoder_layers_path: Optional[str] = None

    @property
    def num_audio_slots(self) -> int:
        return self.max_num_window * self.max_num_fewshot

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, src: str = "<config>") -> "ModelConfig":
        """The inverse of :meth:`to_dict` (a model directory's ``config.json``); unknown keys are an error.
        YAML configs go through the typed loader of :mod:`megaflamingo.config` instead."""
        raw = dict(raw)
        parts = {"audio_transformer": AudioTransformerConfig, "xattn": XattnConfig}
        try:
            nested = {k: t(**(raw.pop(k, None) or {})) for k, t in parts.items()}
            return cls(**raw, **nested)
        except TypeError as e:
            raise ConfigError(f"model: {e} ({src})") from None

    def validate(self, src: str = "<config>", prefix: str = "model") -> None:
        """Every rule a model config must satisfy, checked in one place (the YAML loader, the AF1
        checkpoint builder and direct construction all call it). Raises ConfigError naming the field."""
        def bad(name: str, msg: str) -> None:
            raise ConfigError(f"{prefix}.{name}: {msg} ({src})")

        at, xa = self.audio_transformer, self.xattn
        positive = {
            "audio_embed_dim": self.audio_embed_dim, "max_num_window": self.max_num_window,
            "max_num_fewshot": self.max_num_fewshot, "audio_transformer.n_head": at.n_head,
            "audio_transformer.n_layers": at.n_layers, "audio_transformer.d_inner": at.d_inner,
            "xattn.every_n_layers": xa.every_n_layers, "xattn.heads": xa.heads, "xattn.dim_head": xa.dim_head,
            "xattn.ff_mult": xa.ff_mult,
        }
        for name, value in positive.items():
            if value <= 0:
                bad(name, f"must be > 0, got {value!r}")
        if self.audio_embed_dim % at.n_head:
            bad("audio_transformer.n_head", f"must divide audio_embed_dim={self.audio_embed_dim}, got {at.n_head}")
        if at.max_window_per_audio != self.max_num_window:
            bad("audio_transformer.max_window_per_audio",
                f"must equal {prefix}.max_num_window ({self.max_num_window}), got {at.max_window_per_audio}")
        if at.max_num_media < self.num_audio_slots:
            bad("audio_transformer.max_num_media",
                f"must be >= max_num_window * max_num_fewshot = {self.num_audio_slots}, got {at.max_num_media}")
        if not 0.0 <= at.dropout < 1.0:
            bad("audio_transformer.dropout", f"must be in [0, 1), got {at.dropout}")
        if self.lm_config is not None and "model_type" not in self.lm_config:
            bad("lm_config", "must contain 'model_type' (e.g. opt, llama, qwen2)")
