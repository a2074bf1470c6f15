"""AF1's text formats at inference time: the training sample cut right after the last ``<SEP>``.

Training samples look like
  single:   ``{bos}{prefix}<audio>{prompt}<SEP>{output}<|endofchunk|>{eos}``
  few-shot: ``{bos}Here are similar examples. {prefix}<audio>{p1}<SEP>{o1}<|endofchunk|>...{eos}``
  chat:     ``{bos}The task is dialog. <audio>`` + per round
            ``user: {u} \\nassistant: <SEP>{a}<|endofchunk|>{eos}\\n``
so a prompt for generation is the same text up to and including the ``<SEP>`` that opens the
answer; the model then writes the answer and ``<|endofchunk|>``. As in AF1's *training* samples,
prompts and outputs are lower-cased and stripped and the prompt gets AF1's answer suffix
(``"\nAnswer:"``); the task prefix keeps its case. (AF1's evaluation path lower-cased prefix and
suffix too, i.e. it evaluated on text its training never produced; we use the training form.)
The tokenizer adds its own bos on top (AF1 relies on this; OPT-style ids start with two bos).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from megaflamingo.data import text as layout
from megaflamingo.data.loader import inference_settings
from megaflamingo.data.templates import ANSWER_SUFFIX, TemplateRegistry
from megaflamingo.tokens import EOC_TOKEN, MEDIA_TOKEN


def templates_of(config=None) -> TemplateRegistry:
    """The template registry the model's training data used (built-ins plus ``data.templates``)."""
    return TemplateRegistry.from_config(getattr(getattr(config, "data", None), "templates", None))


@dataclass
class TrainingForm:
    """How the model's training data rendered a task: its templates plus the blend's settings
    (``megaflamingo.data.loader.inference_settings``), so prompts reach the model in the form it
    learned (prefix only where training showed it, a task's fixed question, its answer spelling)."""

    registry: TemplateRegistry
    blend: dict

    @classmethod
    def of(cls, config=None) -> "TrainingForm":
        return cls(templates_of(config), dict(getattr(getattr(config, "data", None), "blend", None) or {}))

    def prefix(self, task: Optional[str]) -> str:
        if not task:
            return ""
        _, prefix_prob = inference_settings(self.blend, task)
        return self.registry.prefix(f"{task}/train") if prefix_prob else ""

    def render(self, task: str, path: str, prompt: str, output: Optional[str],
               no_options: bool = False) -> tuple[str, str, Optional[str]]:
        """(prefix, prompt + suffix, output) of one item, as validation renders it (per-item seed).
        ``no_options``: a few-shot example before the query (training never lists options there)."""
        augs, _ = inference_settings(self.blend, task)
        aug = self.registry.augment(path=path, prompt=clean(prompt), output=clean(output), task=f"{task}/train",
                                    split="val", augmentations=augs, prefix_prob=1.0, no_options=no_options)
        return self.prefix(task), aug.prompt, (None if output is None else aug.output)


def answer_suffix(config=None) -> str:
    """The suffix the model's training data used (the config's template override, else AF1's)."""
    return templates_of(config).suffix


def question(prompt: str, suffix: str = ANSWER_SUFFIX) -> str:
    """A prompt as training saw it: lower-cased, stripped, with the answer suffix (once)."""
    q = clean(prompt)
    tail = (suffix or "").strip()
    if tail and q.endswith(tail.lower()):  # the user typed it: keep one, in the training spelling
        q = q[: -len(tail)].rstrip()
    if suffix:
        q = (q + suffix).strip()
    return q


@dataclass(frozen=True)
class Example:
    """One in-context example: its prompt and the answer shown to the model. ``rendered``: both are in
    their trained form already (``TrainingForm.render``) and go in verbatim; otherwise they are a
    user's text and get the training normalisation (:func:`question`, :func:`clean`)."""

    prompt: str
    output: str
    rendered: bool = False

    def shot(self, suffix: str) -> tuple[str, str]:
        return (self.prompt, self.output) if self.rendered else (question(self.prompt, suffix), clean(self.output))


def clean(text: Optional[str]) -> str:
    """AF1's evaluation normalisation: strip + lower-case."""
    return (text or "").strip().lower()


def task_prefix(task: Optional[str]) -> str:
    """The prefix training puts before a task's samples: ``'EventClassification'`` or
    ``'AudioSet-EventClassification'`` -> ``'The task is event classification. '``, with the data
    pipeline's renames (``AQA`` -> audio question answering, music captioning for MusicCaps, ...).
    ``TrainingForm.prefix`` adds a config's own prefixes and its blend's prefix_prob."""
    return templates_of(None).prefix(f"{task}/train") if task else ""


def _special(tokenizer) -> layout.SpecialText:
    return layout.SpecialText.from_tokenizer(tokenizer)


def single_prompt(tokenizer, prompt: str, prefix: str = "", suffix: str = ANSWER_SUFFIX,
                  rendered: bool = False) -> str:
    """One audio, one question."""
    return multi_audio_prompt(tokenizer, prompt, 1, prefix, suffix, rendered)


def multi_audio_prompt(tokenizer, prompt: str, num_audios: int, prefix: str = "",
                       suffix: str = ANSWER_SUFFIX, rendered: bool = False) -> str:
    """Several audios for one question (``--audio A --audio B``): one ``<audio>`` per clip, the
    question after the last one (every text token sees all audios before it).

    ``prompt`` is a user's question (lower-cased, answer suffix added, as training normalised its
    raw prompts) unless ``rendered``: then it is the trained form of an item's prompt
    (``TrainingForm.render``: suffix included, option lists in the case training wrote them), used
    as is."""
    if num_audios < 1:
        raise ValueError("need at least one audio")
    if not prompt.strip():
        raise ValueError("empty prompt")
    query = prompt if rendered else question(prompt, suffix)
    return layout.query_text(_special(tokenizer), _prefix(prefix), query, extra_audios=num_audios - 1)


def fewshot_prompt(tokenizer, examples: Sequence[Example], prompt: str, prefix: str = "",
                   mode: str = "similar", suffix: str = ANSWER_SUFFIX, rendered: bool = False) -> str:
    """Retrieval-augmented few-shot prompt: the examples (audio + answer each), then the query
    (``rendered``: as in :func:`multi_audio_prompt`; each example says for itself)."""
    if mode not in ("similar", "random"):
        raise ValueError(f"mode must be 'similar' or 'random', got {mode!r}")
    query = prompt if rendered else question(prompt, suffix)
    return layout.query_text(_special(tokenizer), _prefix(prefix), query, [ex.shot(suffix) for ex in examples],
                             fewshot=mode)


def chat_prompt(tokenizer, history: Sequence[tuple[str, str]], user: str) -> str:
    """Chat: finished rounds (user, assistant) in full, then the new user turn up to ``<SEP>``.
    Chat text is not lower-cased (AF1's chat data keeps case)."""
    if not user.strip():
        raise ValueError("empty user message")
    sp = _special(tokenizer)
    text = layout.chat_intro(sp) + "".join(layout.chat_round(sp, u, a) for u, a in history)
    return layout.prompt_text(text + layout.chat_round(sp, user, ""), sp)


def _prefix(prefix: str) -> str:
    # Kept verbatim (AF1 lower-cases prompts and outputs, but its training prefix keeps its case:
    # "The task is ... "); a prefix without the trailing space gets one.
    p = (prefix or "").strip()
    return p + " " if p else ""


def decode_answer(tokenizer, new_ids) -> str:
    """Text of generated ids up to the first ``<|endofchunk|>`` / eos, special tokens dropped."""
    ids = [int(i) for i in new_ids]
    stops = {tokenizer.convert_tokens_to_ids(EOC_TOKEN), tokenizer.eos_token_id}
    for j, t in enumerate(ids):
        if t in stops:
            ids = ids[:j]
            break
    drop = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.sep_token_id,
            tokenizer.convert_tokens_to_ids(MEDIA_TOKEN)}
    ids = [t for t in ids if t not in drop]
    return tokenizer.decode(ids, skip_special_tokens=False).strip()
