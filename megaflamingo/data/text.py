"""Sample text: AF1's layouts, templated from an item.

Text layouts (AF1):
  single      ``{bos}{prefix}<audio>{prompt}{sep}{output}<|endofchunk|>{eos}``
  few-shot    ``{bos}Here are {similar|random} examples. {prefix}`` + per shot
              ``<audio>{prompt}{sep}{output}<|endofchunk|>`` + ``{eos}``
  chat        ``{bos}The task is dialog. <audio>`` + per round
              ``user: {u} \\nassistant: {sep}{a}<|endofchunk|>{eos}\\n``
The tokenizer adds its own bos in front (so OPT samples start with two ``</s>``). Validation text is
stripped and lower-cased piecewise as AF1 did. Inference prompts (``megaflamingo.inference.prompts``)
are built from the same layout functions, cut after the last ``<SEP>``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

from megaflamingo.tokens import EOC_TOKEN as EOC
from megaflamingo.tokens import MEDIA_TOKEN as MEDIA
from megaflamingo.tokens import SpecialTokens

from .reader import DataError
from .sources import Item
from .templates import TemplateRegistry

CHAT_TASK = "The task is dialog. "


@dataclass(frozen=True)
class SpecialText:
    bos: str
    eos: str
    sep: str

    @classmethod
    def from_tokenizer(cls, tokenizer, tokens: Optional[SpecialTokens] = None) -> "SpecialText":
        tokens = tokens or SpecialTokens.from_tokenizer(tokenizer)
        conv = tokenizer.convert_ids_to_tokens
        return cls(bos=conv(tokens.bos), eos=conv(tokens.eos), sep=conv(tokens.sep))


def _validation_case(x: str) -> str:
    """AF1's validation text: stripped and lower-cased (piece by piece, never the whole sample)."""
    return x.strip().lower()


def valid_task_key(flamingo_task: str) -> str:
    """AF1's task string for a validation set that borrows its settings from the training blend."""
    task = f"{flamingo_task}/val"
    for a, b in (("/val", "/train"), ("/test", "/train"), ("-val", "-train"), ("-test", "-train")):
        task = task.replace(a, b)
    return task


@dataclass
class SampleText:
    """A sample string cut where the tokenizer cuts anyway (at special tokens): ``intro`` (starts the
    text), ``blocks`` (each ``<audio>...<|endofchunk|>``), ``tail`` (the closing eos)."""

    intro: str
    blocks: list[str] = field(default_factory=list)
    tail: str = ""

    @property
    def text(self) -> str:
        return self.intro + "".join(self.blocks) + self.tail


# The layouts, written once: training builds whole samples from them; inference builds the same text
# with an empty final answer and cuts it right after that answer's <SEP> (see prompt_text).


def answer_block(sp: SpecialText, prompt: str, output: str) -> str:
    """One audio and its question/answer: ``<audio>{prompt}<SEP>{output}<|endofchunk|>``."""
    return f"{MEDIA}{prompt}{sp.sep}{output}{EOC}"


def single_intro(sp: SpecialText, prefix: str) -> str:
    return f"{sp.bos}{prefix}"


def fewshot_intro(sp: SpecialText, mode: str, prefix: str) -> str:
    """``mode``: "similar" (kNN neighbours) or "random"."""
    return f"{sp.bos}Here are {mode} examples. {prefix}"


def chat_intro(sp: SpecialText) -> str:
    return f"{sp.bos}{CHAT_TASK}{MEDIA}"


def chat_round(sp: SpecialText, user: str, assistant: str) -> str:
    return f"user: {user} \nassistant: {sp.sep}{assistant}{EOC}{sp.eos}\n"


def prompt_text(text: str, sp: SpecialText) -> str:
    """A sample whose final answer is empty, cut right after the ``<SEP>`` that opens that answer: what
    the model continues at generation time."""
    cut = text.rfind(sp.sep)
    if cut < 0:
        raise ValueError("prompt_text: the text has no <SEP> to answer after")
    return text[:cut + len(sp.sep)]


def query_text(sp: SpecialText, prefix: str, query: str, shots: Sequence[tuple[str, str]] = (),
               fewshot: Optional[str] = None, extra_audios: int = 0) -> str:
    """What the model continues at generation time, in the *training* layout: the sample whose final
    answer is still to be written, cut right after that answer's ``<SEP>``. ``query`` and the context
    ``shots`` ((prompt, output) pairs) must already be in their trained form (a template's output,
    e.g. ``TemplateRegistry.augment``): they are only stripped, as training strips them, never
    re-cased (an option list training appended as ``\nOPTIONS:`` stays upper-case). ``fewshot``
    ("similar" / "random") opens with the few-shot intro; ``extra_audios`` puts more ``<audio>``
    before the query's own (several clips, one question)."""
    intro = single_intro(sp, prefix) if fewshot is None else fewshot_intro(sp, fewshot, prefix)
    blocks = "".join(answer_block(sp, p.strip(), o.strip()) for p, o in shots)
    return prompt_text(intro + blocks + MEDIA * extra_audios + answer_block(sp, query.strip(), ""), sp)


def build_text(item: Item, sp: SpecialText, registry: TemplateRegistry, **kw) -> str:
    """The sample string for ``item`` (see :func:`build_parts`)."""
    return build_parts(item, sp, registry, **kw).text


def build_parts(item: Item, sp: SpecialText, registry: TemplateRegistry, *, flamingo_task: str,
                split: str, augmentations: Mapping[str, float], prefix_prob: float,
                rng: Optional[np.random.Generator]) -> SampleText:
    """The sample text for ``item`` (training if ``split == 'train'``, else AF1's eval text)."""
    if item.dialogue is not None:
        parts = [chat_intro(sp)]
        for k, turn in enumerate(item.dialogue):
            if not isinstance(turn, Mapping) or turn.get("user") is None or turn.get("assistant") is None:
                raise DataError(f"{flamingo_task}: dialogue round {k} lacks user/assistant text")
            parts.append(chat_round(sp, turn["user"], turn["assistant"]))
        return SampleText("".join(parts))

    train = split == "train"
    task = f"{flamingo_task}/train" if train else valid_task_key(flamingo_task)
    n = len(item.shots)
    out = SampleText("", [], sp.eos)
    for k, shot in enumerate(item.shots):
        aug = registry.augment(path=shot.path, prompt=shot.prompt.lower(), output=shot.output.lower(),
                               task=task, split="train" if train else "val",
                               augmentations=augmentations, prefix_prob=prefix_prob, rng=rng,
                               no_options=(item.interleaved is not None and k < n - 1))
        if train:
            block = answer_block(sp, aug.prompt.strip(), aug.output.strip())
        else:
            block = answer_block(sp, _validation_case(aug.prompt), _validation_case(aug.output))
        if k == 0:
            if item.interleaved is None:
                out.intro = single_intro(sp, aug.prefix if train else _validation_case(aug.prefix))
            else:  # AF1 kept the few-shot prefix as is, also in validation
                out.intro = fewshot_intro(sp, item.interleaved, aug.prefix)
        out.blocks.append(block)
        if item.interleaved is None:
            break
    return out
