"""Test kit: tiny real tokenizers, tiny random LM configs, synthetic audio, and a hub guard.

Importable by tests, benchmarks and the CPU quickstart. Nothing here downloads anything: the
tokenizer is a byte-level BPE trained at run time on a small built-in corpus.
"""
from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from typing import Literal, Optional

import numpy as np

MEDIA_TOKEN = "<audio>"
EOC_TOKEN = "<|endofchunk|>"
SEP_TOKEN = "<SEP>"

# Words AF1 prompts and the synthetic datasets use, so the tiny BPE has sensible merges.
_CORPUS_WORDS = """
the task is audio captioning event classification question answering dialog scene emotion music
here are similar random examples describe this sound in detail what is the label of the audio
a pitched tone chirp rising falling white noise pink noise click train amplitude modulated tone
speech like bursts silence dog bark rain car engine siren bird song guitar piano violin drums
answer yes or no with one word the output should be a few words short long paragraph caption
user assistant can you tell me more about it which instrument is playing how many sounds happen
low high frequency loud quiet fast slow steady pulsing sweep up down bright dark hiss hum beep
one two three four five six seven eight nine ten classes label labels choose from among
""".split()


def _corpus() -> list[str]:
    rng = np.random.default_rng(0)
    words = np.array(_CORPUS_WORDS)
    lines = [" ".join(rng.choice(words, size=int(rng.integers(4, 14)))) for _ in range(400)]
    return lines + [" ".join(_CORPUS_WORDS)]


@functools.lru_cache(maxsize=4)
def _tokenizer_json(style: str, vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if style == "opt":
        specials = ["<unk>", "<pad>", "</s>", MEDIA_TOKEN, EOC_TOKEN, SEP_TOKEN]
        bos, eos = "</s>", "</s>"
    else:  # llama-style: distinct bos/eos
        specials = ["<unk>", "<pad>", "<s>", "</s>", MEDIA_TOKEN, EOC_TOKEN, SEP_TOKEN]
        bos, eos = "<s>", "</s>"
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Like OPT / Llama: the tokenizer itself prepends bos (AF1 relies on this: its text also
    # starts with bos, so encoded samples begin with two bos tokens).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return tok.to_str()


def tiny_tokenizer(style: Literal["opt", "llama"] = "opt", vocab_size: int = 512):
    """A real fast tokenizer with AF1's special tokens; OPT style has bos = eos = ``</s>``."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    obj = Tokenizer.from_str(_tokenizer_json(style, vocab_size))
    bos = "</s>" if style == "opt" else "<s>"
    tok = PreTrainedTokenizerFast(
        tokenizer_object=obj,
        bos_token=bos,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        sep_token=SEP_TOKEN,
        additional_special_tokens=[MEDIA_TOKEN, EOC_TOKEN],
    )
    tok.padding_side = "right"
    if len(tok) < 64:  # an offline failure can yield a silently empty tokenizer
        raise RuntimeError(f"tiny tokenizer has only {len(tok)} tokens")
    return tok


def token_ids(tokenizer) -> dict[str, int]:
    """The token-id dict used across the code base: media, eoc, sep, pad, bos, eos."""
    ids = {
        "media": tokenizer.convert_tokens_to_ids(MEDIA_TOKEN),
        "eoc": tokenizer.convert_tokens_to_ids(EOC_TOKEN),
        "sep": tokenizer.convert_tokens_to_ids(SEP_TOKEN),
        "pad": tokenizer.pad_token_id,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
    }
    unk = tokenizer.unk_token_id
    missing = [k for k, v in ids.items() if v is None or (v == unk and k not in ("pad",))]
    if missing:
        raise ValueError(f"tokenizer lacks special tokens for: {', '.join(missing)}")
    return ids


# ------------------------------------------------------------------------------------------
# Tiny random LM configs
# ------------------------------------------------------------------------------------------


def tiny_opt_config(vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2, **kw):
    from transformers import OPTConfig

    args = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        ffn_dim=hidden_size * 4,
        num_attention_heads=4,
        max_position_embeddings=1024,
        word_embed_proj_dim=hidden_size,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        layerdrop=0.0,
    )
    args.update(kw)
    return OPTConfig(**args)


def _tiny_rope_lm_args(vocab_size: int, hidden_size: int, num_layers: int) -> dict:
    """Shape shared by the Llama-family tiny configs (RoPE, grouped-query attention)."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )


def tiny_llama_config(vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2, **kw):
    from transformers import LlamaConfig

    args = _tiny_rope_lm_args(vocab_size, hidden_size, num_layers)
    args.update(pad_token_id=1, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    args.update(kw)
    return LlamaConfig(**args)


def tiny_qwen2_config(vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2, **kw):
    from transformers import Qwen2Config

    args = _tiny_rope_lm_args(vocab_size, hidden_size, num_layers)
    args.update(tie_word_embeddings=True)
    args.update(kw)
    return Qwen2Config(**args)


def tiny_lm_config_dict(model_type: str = "opt", vocab_size: int = 512, **kw) -> dict:
    """A ``model.lm_config`` dict for YAML configs (random-init LM)."""
    build = {"opt": tiny_opt_config, "llama": tiny_llama_config, "qwen2": tiny_qwen2_config}[model_type]
    return build(vocab_size=vocab_size, **kw).to_dict()


# ------------------------------------------------------------------------------------------
# Synthetic audio
# ------------------------------------------------------------------------------------------

AUDIO_KINDS = (
    "tone", "chirp_up", "chirp_down", "white_noise", "pink_noise", "clicks", "am_tone",
    "speech_like", "silence",
)


def synth_audio(kind: str, seconds: float, sr: int, seed: int = 0, freq: Optional[float] = None) -> np.ndarray:
    """A float32 mono signal in [-1, 1] of one of ``AUDIO_KINDS``; seeded, so reproducible."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n, dtype=np.float64) / sr
    nyq = sr / 2
    f0 = freq if freq is not None else float(rng.uniform(200, min(2000, 0.4 * nyq)))
    if kind == "tone":
        x = np.sin(2 * np.pi * f0 * t)
    elif kind in ("chirp_up", "chirp_down"):
        lo, hi = 150.0, min(4000.0, 0.45 * nyq)
        a, b = (lo, hi) if kind == "chirp_up" else (hi, lo)
        dur = max(seconds, 1e-9)
        # Linear sweep: phase is the integral of the instantaneous frequency.
        x = np.sin(2 * np.pi * (a * t + (b - a) * t**2 / (2 * dur)))
    elif kind == "white_noise":
        x = rng.standard_normal(n) * 0.3
    elif kind == "pink_noise":
        spec = np.fft.rfft(rng.standard_normal(max(n, 1)))
        f = np.fft.rfftfreq(max(n, 1), 1 / sr)
        spec[1:] /= np.sqrt(f[1:])
        spec[0] = 0
        x = np.fft.irfft(spec, max(n, 1))[:n]
        x = x / (np.abs(x).max() + 1e-9) * 0.8
    elif kind == "clicks":
        x = np.zeros(n)
        period = max(int(sr / float(rng.uniform(4, 12))), 1)
        x[::period] = 1.0
        width = max(int(0.002 * sr), 1)
        x = np.convolve(x, np.hanning(width * 2 + 1), mode="same")
    elif kind == "am_tone":
        fm = float(rng.uniform(3, 8))
        x = (0.5 + 0.5 * np.sin(2 * np.pi * fm * t)) * np.sin(2 * np.pi * f0 * t)
    elif kind == "speech_like":
        # Harmonic bursts with a wandering pitch: syllable-like energy envelope.
        pitch = 120 + 30 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))
        phase = 2 * np.pi * np.cumsum(pitch) / sr
        x = sum(np.sin(k * phase) / k for k in range(1, 8))
        env = (np.sin(2 * np.pi * 3.5 * t + rng.uniform(0, 6)) > 0.1).astype(np.float64)
        x = x * np.convolve(env, np.hanning(int(0.02 * sr) + 1) / (0.01 * sr + 1), mode="same")
    elif kind == "silence":
        x = np.zeros(n)
    else:
        raise ValueError(f"unknown audio kind {kind!r}; choose from {', '.join(AUDIO_KINDS)}")
    peak = np.abs(x).max() if n else 0.0
    if peak > 0:
        x = x / peak * 0.8
    return x.astype(np.float32)


def write_audio(
    path, kind: str = "tone", seconds: float = 2.0, sr: int = 44100, channels: int = 1,
    fmt: Optional[str] = None, seed: int = 0, freq: Optional[float] = None,
) -> Path:
    """Write a synthetic clip; the format follows ``fmt`` or the file extension (wav/flac/ogg/mp3)."""
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = synth_audio(kind, seconds, sr, seed=seed, freq=freq)
    if channels > 1:
        # Other channels differ (scaled, delayed) so "take the first channel" is observable.
        x = np.stack([np.roll(x, 37 * c) * (1.0 - 0.2 * c) for c in range(channels)], axis=1)
    fmt = (fmt or path.suffix.lstrip(".")).upper()
    subtype = {"WAV": "PCM_16", "FLAC": "PCM_16", "OGG": "VORBIS", "MP3": "MPEG_LAYER_III"}.get(fmt)
    if subtype is None:
        raise ValueError(f"unsupported synthetic audio format {fmt!r}")
    sf.write(str(path), x, sr, format=fmt, subtype=subtype)
    return path


# ------------------------------------------------------------------------------------------
# Hub guard
# ------------------------------------------------------------------------------------------


class HubAccessError(RuntimeError):
    pass


_ALLOWED_HOSTS = ("127.", "localhost", "::1", "0.0.0.0")


def no_hub() -> None:
    """Make any attempt to reach the network (the model hub included) fail loudly.

    Sets the HF offline switches (inherited by subprocesses) and refuses socket connections to
    anything but loopback in this process (gloo / DeepSpeed rendezvous stay on loopback).
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    if getattr(socket.socket.connect, "_megaflamingo_guard", False):
        return
    original = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else str(address)
        if self.family in (socket.AF_INET, socket.AF_INET6) and not str(host).startswith(_ALLOWED_HOSTS):
            raise HubAccessError(f"test tried to reach the network ({address!r}); tests must not download")
        return original(self, address)

    guarded._megaflamingo_guard = True
    socket.socket.connect = guarded
