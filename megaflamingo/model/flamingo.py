"""AudioFlamingo: audio transformer + an HF causal LM with injected gated cross-attention blocks.

The model consumes *precomputed* window embeddings ``audio_embeds [B, L, D]`` (L = max_num_fewshot *
windows_per_audio slots; audio k owns slots [W*k, W*k + W)) and a window-validity mask ``audio_mask [B, L]``.
Submodule names follow AF1 (``audio_transformer``, ``lang_encoder``) so its checkpoints map directly.

It is a ``transformers.PreTrainedModel`` (config: :class:`~megaflamingo.model.hf_config.AudioFlamingoConfig`,
``model_type`` "megaflamingo", registered with ``AutoConfig`` / ``AutoModelForCausalLM`` when
``megaflamingo`` is imported), so ``from_pretrained(dir)``, ``save_pretrained(dir, max_shard_size=...)`` and
``push_to_hub`` work on it. Training builds it around an already-built LM with :meth:`AudioFlamingo.from_lm`.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from megaflamingo.tokens import SpecialTokens

from .audio_transformer import AudioTransformer
from .config import ModelConfig
from .hf_config import MODEL_TYPE, AudioFlamingoConfig
from .injection import MEDIA_KWARG, FlamingoDecoderLayer, flamingo_layers, inject_xattn
from .lm_attention import resolve_attn_implementation
from .loss import LOSS_LOGITS, SupervisedLoss, supervised_positions, supervised_token_loss
from .xattn import MediaContext, media_visibility


class AudioFlamingo(PreTrainedModel):
    """``config``: the LM's config, our model section and the special-token ids
    (:class:`AudioFlamingoConfig`). ``lang_encoder``: an HF causal LM already sized to the tokenizer
    (pretrained, or partitioned under ZeRO-3); without one the LM is built from ``config.text_config``
    (random weights, as ``from_pretrained`` does before loading the checkpoint)."""

    config_class = AudioFlamingoConfig
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["FlamingoDecoderLayer"]
    # Attention is the LM's: whatever it supports, this model does.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: AudioFlamingoConfig, lang_encoder: Optional[nn.Module] = None,
                 check_inputs: bool = True):
        super().__init__(config)
        cfg = config.model_config()
        cfg.validate(prefix="model")
        if lang_encoder is None:
            if config.text_config is None:
                raise ValueError("AudioFlamingoConfig has no text_config: the LM cannot be built")
            # "auto" (the configs' default) is ours: transformers takes only a concrete implementation.
            attn = config.text_config._attn_implementation or resolve_attn_implementation(cfg.attn_implementation)
            lang_encoder = AutoModelForCausalLM.from_config(config.text_config, attn_implementation=attn)
        else:
            config.text_config = lang_encoder.config  # one object: a later resize updates both
        self.tokens = config.special_tokens()
        vocab = lang_encoder.get_input_embeddings().num_embeddings
        self.tokens.check_vocab(vocab)
        self.media_token_id = self.tokens.media
        self.eoc_token_id = self.tokens.eoc
        self.audio_embed_dim = cfg.audio_embed_dim
        self.windows_per_audio = cfg.max_num_window
        self.max_num_fewshot = cfg.max_num_fewshot
        self.check_inputs = check_inputs
        at, xa = cfg.audio_transformer, cfg.xattn
        self.audio_transformer = AudioTransformer(cfg.audio_embed_dim, at.n_head, at.n_layers, at.d_inner,
                                                  at.max_num_media, at.dropout)
        self.lang_encoder = lang_encoder
        self.decoder_layers_path = inject_xattn(lang_encoder, cfg.audio_embed_dim, xa.every_n_layers, xa.heads,
                                                xa.dim_head, xa.ff_mult, cfg.decoder_layers_path)
        self.xattn_every_n_layers = xa.every_n_layers
        # "dense" = the [B, 1, T, L] mask path below; the others = the fused segment layout
        # (megaflamingo.model.packed), also for unpacked batches (whose layout is then built per call)
        self.xattn_backend = xa.backend
        self._ckpt_audio = False
        ref = next(lang_encoder.parameters())
        if ref.device.type != "meta":
            self.audio_transformer.to(device=ref.device)
        self.post_init()

    @classmethod
    def from_lm(cls, lang_encoder: nn.Module, tokens: SpecialTokens | Mapping[str, int], cfg: ModelConfig,
                check_inputs: bool = True) -> "AudioFlamingo":
        """The model around an already-built LM (what training, export and the AF1 import do)."""
        config = AudioFlamingoConfig(text_config=lang_encoder.config, flamingo=cfg, token_ids=SpecialTokens.of(tokens))
        return cls(config, lang_encoder=lang_encoder, check_inputs=check_inputs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, strict: a weight of the model missing from the directory, or
        one the model does not have, is an error (never a silently random tensor). A directory exported
        with trainable weights only holds no LM: load it with
        ``megaflamingo.checkpoint.model_dir.load_model_dir``, which takes the frozen LM from ``model.lm``."""
        config = kwargs.get("config")
        if not isinstance(config, PretrainedConfig):
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **_hub_kwargs(kwargs))
        if getattr(config, "weights", "full") == "trainable":
            raise ValueError(f"{pretrained_model_name_or_path}: holds only the trained modules (a trainable-only "
                             "export); load it with megaflamingo.checkpoint.model_dir.load_model_dir, or export "
                             "the full weights")
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                              **kwargs)
        bad = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys")
               and v}
        if bad:
            raise ValueError(f"{pretrained_model_name_or_path}: the weights do not match the model: "
                             + "; ".join(f"{k.replace('_', ' ')} ({len(v)}): {', '.join(map(str, v[:5]))}"
                                         for k, v in bad.items()))
        return (model, info) if want_info else model

    def init_weights(self):
        """Only tie. Every part is initialised where it is built: the LM by its own ``post_init`` (or its
        checkpoint), the audio transformer and the xattn blocks by AF1's init (zero gates). HF's generic
        pass would give the xattn blocks, which sit inside the LM's module tree, the LM's init scheme.
        Keys missing at ``from_pretrained`` time still go through ``initialize_weights`` as usual."""
        self.tie_weights(recompute_mapping=False)

    def get_input_embeddings(self) -> nn.Module:
        return self.lang_encoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.lang_encoder.set_input_embeddings(value)

    def get_output_embeddings(self) -> Optional[nn.Module]:
        return self.lang_encoder.get_output_embeddings()

    # ------------------------------------------------------------------ structure helpers
    @property
    def flamingo_layers(self) -> list[FlamingoDecoderLayer]:
        return flamingo_layers(self.lang_encoder, self.decoder_layers_path)

    @property
    def num_audio_slots(self) -> int:
        return self.windows_per_audio * self.max_num_fewshot

    def xattn_blocks(self) -> list[nn.Module]:
        return [l.gated_cross_attn_layer for l in self.flamingo_layers if l.gated_cross_attn_layer is not None]

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None) -> None:
        """Checkpoint each (xattn + decoder layer) pair and the audio transformer.

        Non-reentrant checkpointing: the MediaContext rides in kwargs and its tensors get gradients.
        (``lang_encoder.gradient_checkpointing_enable()`` also works but recomputes the inner layers twice.)"""
        for layer in self.flamingo_layers:
            layer.gradient_checkpointing = True  # the layer always checkpoints non-reentrantly
            if hasattr(layer.decoder_layer, "gradient_checkpointing"):
                layer.decoder_layer.gradient_checkpointing = False
        self._ckpt_audio = True

    def gradient_checkpointing_disable(self) -> None:
        for layer in self.flamingo_layers:
            layer.gradient_checkpointing = False
            if hasattr(layer.decoder_layer, "gradient_checkpointing"):
                layer.decoder_layer.gradient_checkpointing = False
        self._ckpt_audio = False

    # ------------------------------------------------------------------ inputs
    def _param_dtype(self) -> torch.dtype:
        return self.audio_transformer.layer_norm.weight.dtype

    def validate_inputs(self, input_ids: torch.Tensor, audio_embeds: torch.Tensor,
                        audio_mask: Optional[torch.Tensor], media_count: Optional[torch.Tensor] = None
                        ) -> torch.Tensor:
        """Shape/content checks with errors that name the field and the batch row. Returns bool audio_mask."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        B = input_ids.shape[0]
        if audio_embeds is None:
            raise ValueError("audio_embeds is required ([B, L, D] precomputed window embeddings)")
        if audio_embeds.ndim != 3:
            raise ValueError(f"audio_embeds must be [B, L, D], got shape {tuple(audio_embeds.shape)}")
        Ba, L, D = audio_embeds.shape
        if Ba != B:
            raise ValueError(f"audio_embeds batch {Ba} != input_ids batch {B}")
        if D != self.audio_embed_dim:
            raise ValueError(f"audio_embeds last dim {D} != model audio_embed_dim {self.audio_embed_dim}")
        if L % self.windows_per_audio:
            raise ValueError(
                f"audio_embeds has L={L} window slots, not a multiple of windows per audio "
                f"(max_num_window={self.windows_per_audio})"
            )
        if L > self.audio_transformer.n_position:
            raise ValueError(f"audio_embeds has L={L} slots > audio transformer positions "
                             f"{self.audio_transformer.n_position}")
        if audio_mask is None:
            audio_mask = torch.ones(B, L, dtype=torch.bool, device=audio_embeds.device)
        if audio_mask.ndim != 2 or audio_mask.shape[1] != L or audio_mask.shape[0] not in (1, B):
            raise ValueError(f"audio_mask must be [B, L]=[{B}, {L}], got {tuple(audio_mask.shape)}")
        audio_mask = audio_mask.bool().expand(B, L)
        if self.check_inputs:
            bad = ~torch.isfinite(audio_embeds).flatten(1).all(dim=1)
            if bad.any():
                raise ValueError(f"audio_embeds contain NaN/inf in batch row(s) {bad.nonzero().flatten().tolist()}")
            if media_count is not None:
                n = media_count[:, -1]
                none = n == 0
                if none.any():
                    raise ValueError(
                        f"batch row(s) {none.nonzero().flatten().tolist()} contain no <audio> token "
                        f"(id {self.media_token_id}); every sample needs at least one audio"
                    )
                over = n > L // self.windows_per_audio
                if over.any():
                    rows = over.nonzero().flatten().tolist()
                    raise ValueError(
                        f"batch row(s) {rows} have {n[over].tolist()} <audio> tokens but audio_embeds holds only "
                        f"{L // self.windows_per_audio} audios (L={L}, {self.windows_per_audio} windows each)"
                    )
        return audio_mask

    def encode_audio(self, audio_embeds: torch.Tensor) -> torch.Tensor:
        x = audio_embeds.to(self._param_dtype())
        if self._ckpt_audio and self.training and torch.is_grad_enabled():
            return checkpoint(self.audio_transformer, x, use_reentrant=False)
        return self.audio_transformer(x)

    def media_context(self, input_ids: torch.Tensor, media: torch.Tensor, audio_mask: torch.Tensor,
                      count_before: Optional[torch.Tensor] = None, kv_memo: Optional[dict] = None) -> MediaContext:
        """Build the per-call context. ``count_before`` [B]: <audio> tokens already in the KV cache."""
        count = torch.cumsum((input_ids == self.media_token_id).long(), dim=1)
        if count_before is not None:
            count = count + count_before[:, None]
        mask, has_any = media_visibility(count, audio_mask, self.windows_per_audio)
        return MediaContext(media=media, mask=mask, has_any=has_any, kv_memo=kv_memo)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        audio_embeds: Optional[torch.Tensor] = None,
        audio_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        loss_logits: str = "full",
        layout=None,
        loss_weighting: str = "token",
        loss_head: str = "plain",
        **lm_kwargs,
    ):
        """HF-style output (``.logits``, ``.loss``). Extra kwargs (position_ids, past_key_values, use_cache,
        logits_to_keep ...) go to the LM.

        ``loss_logits="supervised"`` (needs ``labels``) returns a :class:`SupervisedLoss` instead, computing
        logits only where the shifted label is not -100 (see :meth:`supervised_loss`). It is a forward
        argument, not only a method, so that a DeepSpeed engine wrapping this module can run it through its
        own ``forward`` (ZeRO-3 gathers parameters in module hooks that fire from ``__call__``).

        ``layout`` (a :class:`~megaflamingo.model.segments.PackedLayout`, from the packing collator): rows
        hold several samples, ``audio_embeds`` [S, L, D] one set of slots per sample; ``attention_mask`` is
        then ignored (the layout says which positions are real). Without a layout, a model whose
        ``xattn.backend`` is not ``dense`` (or ``loss_head="liger"``) runs the same fused path with the
        layout of the padded batch. With labels that path returns (loss, loss_sum, count[, logits]), the
        loss weighted by ``loss_weighting`` (``token`` | ``sample``, see ``model.loss.weighted_loss``)."""
        if loss_logits not in LOSS_LOGITS:
            raise ValueError(f"loss_logits must be one of {LOSS_LOGITS}, got {loss_logits!r}")
        fused = self.xattn_backend != "dense" or loss_head != "plain"
        if layout is not None or (fused and "past_key_values" not in lm_kwargs):
            return self._segment_forward(input_ids, attention_mask, audio_embeds, audio_mask, labels, loss_logits,
                                         layout, loss_weighting, loss_head, lm_kwargs)
        count = torch.cumsum((input_ids == self.media_token_id).long(), dim=1)
        audio_mask = self.validate_inputs(input_ids, audio_embeds, audio_mask, count)
        if loss_logits == "supervised":
            if labels is None:
                raise ValueError("loss_logits='supervised' needs labels")
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
            if "logits_to_keep" in lm_kwargs:
                raise ValueError("loss_logits='supervised' chooses logits_to_keep itself; do not pass it")
        media = self.encode_audio(audio_embeds)
        mask, has_any = media_visibility(count, audio_mask, self.windows_per_audio)
        ctx = MediaContext(media=media, mask=mask, has_any=has_any)
        if loss_logits == "supervised":
            return self._supervised_loss(input_ids, attention_mask, labels, ctx, lm_kwargs, loss_weighting)
        return self.lang_encoder(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels, **{MEDIA_KWARG: ctx}, **lm_kwargs
        )

    def supervised_loss(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                        audio_embeds: torch.Tensor, audio_mask: Optional[torch.Tensor],
                        labels: torch.Tensor) -> SupervisedLoss:
        """Loss without the full [B, T, V] logits: the LM head runs only on the rows whose shifted label
        is not -100 (typically 10-20% of a training batch). Same values and gradients as
        ``model.loss.token_losses(model(...).logits, labels)``. Goes through ``__call__`` (hooks fire)."""
        return self(input_ids, attention_mask, audio_embeds, audio_mask, labels=labels, loss_logits="supervised")

    def _segment_forward(self, input_ids, attention_mask, audio_embeds, audio_mask, labels, loss_logits, layout,
                         loss_weighting, loss_head, lm_kwargs):
        from .packed import segment_forward
        from .segments import layout_for_padded_batch

        if lm_kwargs:
            raise ValueError(f"the packed / fused-xattn forward takes no extra LM arguments, got {sorted(lm_kwargs)}")
        if layout is None:  # an ordinary padded batch, one sample per row (one host sync for the sizes)
            audio_mask = self.validate_inputs(input_ids, audio_embeds, audio_mask)
            layout = layout_for_padded_batch(input_ids, attention_mask, audio_mask, self.media_token_id,
                                             self.windows_per_audio)
        if loss_logits == "supervised" and labels is None:
            raise ValueError("loss_logits='supervised' needs labels")
        out = segment_forward(self, input_ids, audio_embeds, audio_mask, layout, labels, backend=self.xattn_backend,
                              loss_logits=loss_logits, weighting=loss_weighting, loss_head=loss_head)
        if labels is None:  # HF-style output, as the dense path
            from transformers.modeling_outputs import CausalLMOutput

            return CausalLMOutput(logits=out)
        return out

    def _supervised_loss(self, input_ids, attention_mask, labels, ctx: MediaContext, lm_kwargs,
                         weighting: str = "token") -> SupervisedLoss:
        # HF >= 5 slices the final hidden states with a boolean [B, T] ``logits_to_keep`` *inside* the LM's
        # own forward, right before its head: whatever the model does there (OPT's project_out lives in the
        # decoder; tied lm_head; any logit scaling) stays exactly the LM's code, and under ZeRO-3 the head
        # is gathered by its usual hooks. Output rows come in row-major (b, t) order, like ``valid[valid]``.
        valid, keep = supervised_positions(labels)
        out = self.lang_encoder(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep,
                                **{MEDIA_KWARG: ctx}, **lm_kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        targets = labels[:, 1:][valid]
        if logits.ndim != 2 or logits.shape[0] != targets.shape[0]:
            raise ValueError(
                f"{type(self.lang_encoder).__name__} ignored a boolean logits_to_keep (got logits of shape "
                f"{tuple(logits.shape)} for {targets.shape[0]} supervised positions); use the full-logits "
                "loss (train.loss_logits=full) for this LM")
        return supervised_token_loss(logits, targets, valid, weighting)

    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 audio_embeds: Optional[torch.Tensor] = None, audio_mask: Optional[torch.Tensor] = None, **kwargs):
        """Greedy / sampling / beam search with KV + media cache; see ``megaflamingo.model.generation``."""
        from .generation import generate

        return generate(self, input_ids, attention_mask, audio_embeds, audio_mask, **kwargs)


def _hub_kwargs(kwargs: dict) -> dict:
    names = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
    return {k: kwargs[k] for k in names if k in kwargs}


# `import megaflamingo` imports this module, so the auto classes know "megaflamingo" from then on.
AutoConfig.register(MODEL_TYPE, AudioFlamingoConfig, exist_ok=True)
AutoModelForCausalLM.register(AudioFlamingoConfig, AudioFlamingo, exist_ok=True)
