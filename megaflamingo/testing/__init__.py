"""Test kit: tiny real tokenizers, tiny random LM configs, synthetic audio, two synthetic datasets,
and a hub guard. For tests, benchmarks and the CPU quickstart; nothing in the library imports it.

* :mod:`.lms`: tiny OPT / Llama / Qwen2 configs (random init).
* :mod:`.audio`: seeded synthetic clips in wav / flac / ogg / mp3.
* :mod:`.sounds`: SynthSounds, a labelled audio dataset (audio files + manifests) the quickstart trains on.
* :mod:`.tiny_task`: SynthTiny, a learnable task given directly as window embeddings (Arrow splits or
  ready batches), for engine tests.
* :mod:`.hub`: :func:`no_hub`, which makes any network access fail.

The tiny tokenizer itself lives in :mod:`megaflamingo.tokens` (CPU configs name it ``tiny``).
"""
from megaflamingo.tokens import EOC_TOKEN, MEDIA_TOKEN, SEP_TOKEN, SpecialTokens, tiny_tokenizer

from .audio import AUDIO_KINDS, synth_audio, write_audio
from .hub import HubAccessError, no_hub
from .lms import tiny_llama_config, tiny_lm_config_dict, tiny_opt_config, tiny_qwen2_config


def token_ids(tokenizer) -> SpecialTokens:
    """The special-token ids of a tokenizer (shorthand for ``SpecialTokens.from_tokenizer``)."""
    return SpecialTokens.from_tokenizer(tokenizer)


__all__ = [
    "AUDIO_KINDS", "EOC_TOKEN", "HubAccessError", "MEDIA_TOKEN", "SEP_TOKEN", "SpecialTokens", "no_hub",
    "synth_audio", "tiny_llama_config", "tiny_lm_config_dict", "tiny_opt_config", "tiny_qwen2_config",
    "tiny_tokenizer", "token_ids", "write_audio",
]
