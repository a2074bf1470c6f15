"""The Hugging Face config of :class:`~megaflamingo.model.flamingo.AudioFlamingo` (``model_type``
``megaflamingo``): what ``from_pretrained`` builds the model from and ``save_pretrained`` writes as
``config.json``.

* ``text_config``: the LM's own config, with ``vocab_size`` = the rows of the resized embedding
  (len(tokenizer)), so the LM can be built without its original checkpoint;
* ``flamingo``: the model section of our config (:class:`~megaflamingo.model.config.ModelConfig`);
* ``token_ids``: the six special-token ids (:class:`~megaflamingo.tokens.SpecialTokens`).

Any other key (a model directory stores the run's other config sections under ``megaflamingo``, and
``weights``) is kept as an attribute and written back unchanged.
"""
from __future__ import annotations

from typing import Mapping, Optional

from transformers import AutoConfig, PretrainedConfig

from megaflamingo.tokens import SpecialTokens

from .config import ModelConfig

MODEL_TYPE = "megaflamingo"


class AudioFlamingoConfig(PretrainedConfig):
    model_type = MODEL_TYPE
    # the LM config is a sub-config: attn_implementation set on this config reaches it
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, text_config: Optional[PretrainedConfig | Mapping] = None,
                 flamingo: Optional[ModelConfig | Mapping] = None,
                 token_ids: Optional[SpecialTokens | Mapping[str, int]] = None, **kwargs):
        if isinstance(text_config, Mapping):
            conf = dict(text_config)
            if "model_type" not in conf:
                raise ValueError("text_config needs a 'model_type' (the LM's architecture, e.g. opt)")
            text_config = AutoConfig.for_model(conf.pop("model_type"), **conf)
        if isinstance(flamingo, ModelConfig):
            flamingo = flamingo.to_dict()
        self.flamingo = dict(flamingo) if flamingo is not None else None
        self.token_ids = SpecialTokens.of(token_ids).as_dict() if token_ids is not None else None
        attn = kwargs.get("attn_implementation")
        super().__init__(**kwargs)
        # Attached after the base __init__, which sets attn_implementation (None unless given) on every
        # sub-config: an LM built with sdpa must keep it.
        self.text_config = text_config
        if attn is not None:
            self._attn_implementation = attn

    def model_config(self) -> ModelConfig:
        if self.flamingo is None:
            raise ValueError(f"{type(self).__name__}: no 'flamingo' section (the model's settings)")
        return ModelConfig.from_dict(self.flamingo, "config.json")

    def special_tokens(self) -> SpecialTokens:
        if self.token_ids is None:
            raise ValueError(f"{type(self).__name__}: no 'token_ids' (media, eoc, sep, pad, bos, eos)")
        return SpecialTokens.of(self.token_ids)
