"""The vocabulary contract: AF1's special tokens, the label ignore index, and tokenizer construction.

AF1 adds three tokens to the LM's tokenizer: ``<audio>`` (where an audio clip is attended to),
``<|endofchunk|>`` (closes every answer; generation stops on it) and ``<SEP>`` (the tokenizer's sep
token, which opens every supervised answer). Text layouts, labels, the model and generation all read
the ids from one :class:`SpecialTokens` built from the tokenizer.

``tiny`` / ``tiny-opt`` / ``tiny-llama`` name a byte-level BPE trained at run time on a small
built-in corpus (no download), used by the CPU configs, the quickstart and the tests.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, fields
from typing import Literal, Mapping, Optional, Union

MEDIA_TOKEN = "<audio>"
EOC_TOKEN = "<|endofchunk|>"
SEP_TOKEN = "<SEP>"
# Labels at positions the loss ignores (HF / torch cross-entropy convention).
IGNORE_INDEX = -100
TINY_TOKENIZERS = ("tiny", "tiny-opt", "tiny-llama")


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokens every layer needs. OPT-style tokenizers have ``bos == eos``."""

    media: int
    eoc: int
    sep: int
    pad: int
    bos: int
    eos: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpecialTokens":
        """Read the ids off a tokenizer that has AF1's tokens (see :func:`build_tokenizer`)."""
        ids = {
            "media": tokenizer.convert_tokens_to_ids(MEDIA_TOKEN),
            "eoc": tokenizer.convert_tokens_to_ids(EOC_TOKEN),
            "sep": tokenizer.convert_tokens_to_ids(SEP_TOKEN),
            "pad": tokenizer.pad_token_id,
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
        }
        unk = tokenizer.unk_token_id
        missing = [k for k, v in ids.items() if v is None or (v == unk and k != "pad")]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens for: {', '.join(missing)}")
        return cls(**{k: int(v) for k, v in ids.items()})

    @classmethod
    def of(cls, ids: Union["SpecialTokens", Mapping[str, int]]) -> "SpecialTokens":
        """Accept the plain ``{"media": ..., "eoc": ..., ...}`` dict form too (public APIs take both)."""
        if isinstance(ids, SpecialTokens):
            return ids
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in ids]
        if missing:
            raise ValueError(f"token ids are missing {missing}")
        return cls(**{n: int(ids[n]) for n in names})

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def check_vocab(self, vocab_size: int, what: str = "the LM vocabulary") -> None:
        bad = {k: v for k, v in self.as_dict().items() if not 0 <= v < vocab_size}
        if bad:
            raise ValueError(f"token ids {bad} outside {what} (size {vocab_size}); resize the LM embeddings "
                             "after adding the special tokens")


def build_tokenizer(name: str, cache_dir: Optional[str] = None, path: Optional[str] = None):
    """The tokenizer a run uses, with AF1's special tokens added as AF1 adds them.

    ``name``: a tiny name (see module doc), an HF hub name or a local directory. ``path``: a directory
    holding saved tokenizer files (an exported model dir), which wins over ``name``."""
    if path is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    if name in ("tiny", "tiny-opt"):
        return tiny_tokenizer("opt")
    if name == "tiny-llama":
        return tiny_tokenizer("llama")
    from transformers import AutoTokenizer

    from megaflamingo.hub import hf_cache_dir

    tok = AutoTokenizer.from_pretrained(name, cache_dir=hf_cache_dir(cache_dir))
    # AF1: <SEP> becomes the sep token, <audio> / <|endofchunk|> additional special tokens.
    extra = [t for t in (MEDIA_TOKEN, EOC_TOKEN) if t not in tok.get_vocab()]
    special: dict = {"additional_special_tokens": extra} if extra else {}
    if SEP_TOKEN not in tok.get_vocab():
        special["sep_token"] = SEP_TOKEN
    if tok.pad_token is None:
        special["pad_token"] = "<PAD>"
    if special:
        tok.add_special_tokens(special)
    tok.padding_side = "right"
    return tok


# ------------------------------------------------------------------------------------------ tiny BPE

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
    import numpy as np

    rng = np.random.default_rng(0)
    words = np.array(_CORPUS_WORDS)
    lines = [" ".join(rng.choice(words, size=int(rng.integers(4, 14)))) for _ in range(400)]
    return lines + [" ".join(_CORPUS_WORDS)]


@functools.lru_cache(maxsize=4)
def _tokenizer_json(style: str, vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if style == "opt":
        specials = ["<unk>", "<pad>", "</s>", MEDIA_TOKEN, EOC_TOKEN, SEP_TOKEN]
        bos = "</s>"
    else:  # llama-style: distinct bos/eos
        specials = ["<unk>", "<pad>", "<s>", "</s>", MEDIA_TOKEN, EOC_TOKEN, SEP_TOKEN]
        bos = "<s>"
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Like OPT / Llama: the tokenizer itself prepends bos (AF1 relies on this: its text also
    # starts with bos, so encoded samples begin with two bos tokens).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok.to_str()


def tiny_tokenizer(style: Literal["opt", "llama"] = "opt", vocab_size: int = 512):
    """A real fast tokenizer with AF1's special tokens; OPT style has bos = eos = ``</s>``."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    obj = Tokenizer.from_str(_tokenizer_json(style, vocab_size))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=obj, bos_token="</s>" if style == "opt" else "<s>", eos_token="</s>",
        pad_token="<pad>", unk_token="<unk>", sep_token=SEP_TOKEN,
        additional_special_tokens=[MEDIA_TOKEN, EOC_TOKEN])
    tok.padding_side = "right"
    if len(tok) < 64:  # an offline failure can yield a silently empty tokenizer
        raise RuntimeError(f"tiny tokenizer has only {len(tok)} tokens")
    return tok
