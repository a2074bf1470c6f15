"""Prompt templates and text augmentations of AF1, expressed as data.

AF1 chose, per sample, an *augmentation* name from the blend entry (``do_nothing``, ``default``,
``provide_all_labels``, ``num_words``, ``AQA_binary_instruction``, ``AC_short``, ``AC_long``,
``AC_paragraph``) and then ran a long chain of task-specific edits. Here that chain is a list of
:class:`Rule` records (which tasks, which augmentation names, which edits), plus tables of label
sets and task-name spellings. A small set of edit verbs (``OPS``) interprets the rules. Users add
or override rules, label sets and prefixes through ``DataConfig.templates`` (see
:meth:`TemplateRegistry.from_config`); nothing needs code changes for a new dataset.

Randomness: training draws from a ``numpy.random.Generator`` the caller seeds per sample (so a
resumed run draws the same); validation reproduces AF1's per-sample seed, the sum of the code
points of ``path + prompt + output + task``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from .blending import af1_seed

ANSWER_SUFFIX = "\nAnswer:"

# AF1 maps raw emotion names onto one spelling when listing the options of an emotion task.
EMOTION_NAMES = {
    "amused": "amused", "anger": "angry", "angry": "angry", "anxious": "anxious",
    "apologetic": "apologetic", "assertive": "assertive", "calm": "calm", "concerned": "concerned",
    "contempt": "contempt", "disgust": "disgusted", "disgusted": "disgusted",
    "encouraging": "encouraging", "excited": "excited", "fear": "fearful", "fearful": "fearful",
    "frustated": "frustated", "happy": "happy", "joy": "happy", "neutral": "neutral", "sad": "sad",
    "sadness": "sad", "sleepy": "sleepy", "surprise": "surprised", "surprised": "surprised",
    "pleasantly surprised": "pleasantly surprised",
}

# Label sets for ``provide_all_labels`` (first match wins), as (task match, labels, map names?).
LABEL_SETS: list[dict] = [
    {"startswith": ["CREMA-D"], "labels": ["sad", "fearful", "neutral", "disgusted", "angry", "happy"]},
    {"startswith": ["emov-db"], "labels": ["amused", "sleepy", "neutral", "disgusted", "angry"]},
    {"startswith": ["jl-corpus"], "labels": ["sad", "apologetic", "neutral", "concerned", "excited",
                                             "anxious", "encouraging", "angry", "assertive", "happy"]},
    {"startswith": ["MELD"], "contains": ["EmotionClassification"],
     "labels": ["neutral", "joy", "sadness", "anger", "surprise", "fear", "disgust"]},
    {"startswith": ["MELD"], "contains": ["SentimentClassification"],
     "labels": ["positive", "neutral", "negative"]},
    {"startswith": ["MSP-PODCAST-Publish-1.9"],
     "labels": ["angry", "sad", "happy", "surprise", "fear", "disgust", "contempt", "neutral"]},
    {"startswith": ["ravdess"], "labels": ["sad", "fearful", "calm", "neutral", "disgusted", "angry",
                                           "happy", "surprised"]},
    {"startswith": ["tess"], "labels": ["pleasantly surprised", "sad", "fearful", "neutral",
                                        "disgusted", "angry", "happy"]},
    {"startswith": ["OMGEmotion"], "labels": ["fearful", "angry", "disgusted", "neutral", "sad",
                                              "happy", "surprised"]},
    {"startswith": ["NSynth-InstrClassification"],
     "labels": ["organ", "mallet", "brass", "vocal", "keyboard", "reed", "flute", "guitar", "bass",
                "synth_lead", "string"]},
    {"startswith": ["NSynth-SourceClassification"], "labels": ["synthetic", "electronic", "acoustic"]},
    {"startswith": ["musdbhq"], "labels": ["mixture", "other", "vocals", "bass", "drums"]},
    {"startswith": ["Medley-solos-DB"],
     "labels": ["clarinet", "flute", "distorted electric guitar", "trumpet", "violin", "piano",
                "female singer", "tenor saxophone"]},
    {"startswith": ["GTZAN"], "labels": ["blues", "classical", "country", "disco", "hiphop", "jazz",
                                         "metal", "pop", "reggae", "rock"]},
    {"startswith": ["UrbanSound8K"],
     "labels": ["air conditioner", "car horn", "children playing", "dog bark", "drilling",
                "engine idling", "gun shot", "jackhammer", "siren", "street music"]},
    {"startswith": ["CochlScene"],
     "labels": ["bus", "cafe", "car", "crowdedindoor", "elevator", "kitchen", "park",
                "residentialarea", "restaurant", "restroom", "street", "subway", "subwaystation"]},
    {"startswith": ["NonSpeech7k"], "labels": ["cough", "breath", "screaming", "laugh", "sneeze",
                                               "yawn", "crying"]},
]

# Multi-label tasks whose full label list AF1 appends to the prompt (unless few-shot context).
ALL_LABELS_SUFFIX_SETS: list[dict] = [
    {"startswith": ["chime-home"],
     "labels": ["child speaking", "male speaking", "female speaking", "human activity",
                "television", "household appliances", "silence"]},
    {"startswith": ["SONYC-UST"],
     "labels": ["small sounding engine", "medium sounding engine", "large sounding engine",
                "rock drill", "jackhammer", "hoe ram", "pile driver", "non machinery impact",
                "chainsaw", "small medium rotating saw", "large rotating saw", "car horn",
                "car alarm", "siren", "reverse beeper", "stationary music", "mobile music",
                "ice cream truck", "person or small group talking",
                "person or small group shouting", "large crowd", "amplified speech",
                "dog barking whining"]},
]

_AQA = {"startswith": ["Clotho-AQA-AQA", "Music-AVQA", "MU-LLAMA"]}
_SINGLE = {"startswith": ["CREMA-D", "emov-db", "jl-corpus", "MELD", "MSP-PODCAST-Publish-1.9",
                          "ravdess", "tess", "OMGEmotion", "Medley-solos-DB", "musdbhq",
                          "NSynth-InstrClassification", "NSynth-SourceClassification",
                          "UrbanSound8K", "CochlScene", "NonSpeech7k"],
           "contains": ["GenreClassification"]}
_MULTI = {"startswith": ["WavText5K-Tagging", "Clotho-AQA-EventClassification",
                         "AudioSet-EventClassification", "AudioSetFull", "chime-home", "SONYC-UST"]}
_QUESTION = "please answer this question:"

# The AF1 edit chain, in AF1's order. Every rule whose conditions hold is applied.
#   tasks: list of match clauses that must ALL hold (a clause holds if any startswith/contains hits)
#   when: augmentation names the rule applies to (absent = any)
#   no_options: True/False restricts to few-shot context shots / the final shot (absent = both)
#   ops: edits; marks: whether the rule counts as "augmented" (AF1 printed a warning otherwise)
RULES: list[dict] = [
    {"name": "aqa_binary", "tasks": [_AQA], "when": ["AQA_binary_instruction"], "output_yes_no": True,
     "ops": [["replace_prompt", "question:", _QUESTION], ["append_prompt", "\nOPTIONS:\nyes.\nno."]]},
    {"name": "aqa_binary_fallback", "tasks": [_AQA], "when": ["AQA_binary_instruction"],
     "output_yes_no": False, "ops": [["replace_prompt_if_startswith", "question:", _QUESTION]]},
    {"name": "aqa", "tasks": [_AQA], "unless": ["AQA_binary_instruction"],
     "ops": [["replace_prompt_if_startswith", "question:", _QUESTION]]},
    {"name": "ac_short", "tasks": [{"contains": ["AudioCaptioning"]}], "when": ["AC_short"],
     "ops": [["set_prompt", "describe the sound in a sentence."]]},
    {"name": "ac_long", "tasks": [{"contains": ["AudioCaptioning"]}], "when": ["AC_long"],
     "ops": [["set_prompt", "describe the sound at length."]]},
    {"name": "ac_paragraph", "tasks": [{"contains": ["AudioCaptioning"]}], "when": ["AC_paragraph"],
     "ops": [["set_prompt", "describe the sound in a paragraph."], ["paragraph_output"]]},
    {"name": "musiccaps_wording", "tasks": [{"contains": ["AudioCaptioning"]}, {"contains": ["MusicCaps"]}],
     "marks": False, "ops": [["replace_prompt", "sound", "music"]]},
    {"name": "single_class", "tasks": [_SINGLE], "when": ["default", "provide_all_labels"], "ops": []},
    {"name": "emotion_prompt", "when": ["default", "provide_all_labels"],
     "tasks": [_SINGLE, {"startswith": ["CREMA-D", "emov-db", "jl-corpus", "MELD-EmotionClassification",
                                        "MSP-PODCAST-Publish-1.9", "ravdess", "tess", "OMGEmotion"]}],
     "ops": [["set_prompt", "what is the emotion of this speech?"]]},
    {"name": "sentiment_prompt", "when": ["default", "provide_all_labels"],
     "tasks": [_SINGLE, {"startswith": ["MELD-SentimentClassification"]}],
     "ops": [["set_prompt", "what is the sentiment of this speech?"]]},
    {"name": "instrument_prompt", "when": ["default", "provide_all_labels"],
     "tasks": [_SINGLE, {"contains": ["InstrClassification"]}],
     "ops": [["set_prompt", "what is the instrument of this music?"]]},
    {"name": "source_prompt", "when": ["default", "provide_all_labels"],
     "tasks": [_SINGLE, {"contains": ["SourceClassification"]}],
     "ops": [["set_prompt", "what is the source of this music?"]]},
    {"name": "genre_prompt", "when": ["default", "provide_all_labels"],
     "tasks": [_SINGLE, {"contains": ["GenreClassification"]}],
     "ops": [["set_prompt", "what is the genre of this music?"]]},
    {"name": "sound_prompt", "when": ["default", "provide_all_labels"],
     "tasks": [_SINGLE, {"startswith": ["UrbanSound8K", "CochlScene"]}],
     "ops": [["set_prompt", "classify this sound."]]},
    {"name": "provide_all_labels", "tasks": [_SINGLE], "when": ["provide_all_labels"],
     "ops": [["append_options"]]},
    {"name": "multi_label", "tasks": [_MULTI], "marks": False,
     "ops": [["set_prompt", "use a few labels to describe this sound."], ["strip_output_suffix", "."]]},
    {"name": "num_words", "tasks": [_MULTI], "when": ["num_words"], "ops": [["num_words"]]},
    {"name": "multi_label_context", "tasks": [_MULTI, {"startswith": ["chime-home", "SONYC-UST"]}],
     "no_options": True, "ops": []},
    {"name": "multi_label_all", "tasks": [_MULTI], "no_options": False, "ops": [["append_all_labels"]]},
    {"name": "fsd50k", "tasks": [{"startswith": ["FSD50k"]}], "when": ["default"],
     "ops": [["set_prompt", "describe this sound in the order from specific to general."]]},
    {"name": "nsynth_quality", "tasks": [{"startswith": ["NSynth-QualityClassification"]}],
     "when": ["default"], "ops": [["set_prompt", "what are the qualities of the music?"]]},
    {"name": "mtg_jamendo", "tasks": [{"startswith": ["mtg-jamendo-MusicTagging"]}], "when": ["default"],
     "ops": [["set_prompt", "what are the genres, instruments, and mood/theme of the music?"],
             ["replace_output", ";", "."]]},
]

# How "The task is {task}." spells a task: CamelCase split into lower-case words, then these
# renames (first prefix match wins); dataset names that mark captioning as music captioning.
TASK_RENAMES: list[list[str]] = [
    ["a q a", "audio question answering"],
    ["a v q a", "audio vision question answering"],
    ["instr classification", "instrument classification"],
    ["m i r", "music information retrieval"],
]
DATASET_ALIASES = ["audiocaps", "audioset", "msp-podcast", "wavcaps", "lp-musiccaps"]
MUSIC_CAPTION_DATASETS = ["musiccaps"]


class TemplateError(ValueError):
    """A template/augmentation definition or use is invalid (message names the entry)."""


def _clause_hits(task: str, clause: Mapping[str, Sequence[str]]) -> bool:
    return any(task.startswith(s) for s in clause.get("startswith", ())) or any(
        s in task for s in clause.get("contains", ()))


def _label_set_hits(task: str, entry: Mapping[str, Any]) -> bool:
    # label sets: one of `startswith` (if given) AND every `contains` (if given)
    starts = entry.get("startswith")
    if starts and not any(task.startswith(s) for s in starts):
        return False
    return all(c in task for c in entry.get("contains", ()))


@dataclass
class Augmented:
    prefix: str
    prompt: str  # includes the "\nAnswer:" suffix
    output: str
    augmentation: str
    augmented: bool


@dataclass
class _State:
    prompt: str
    output: str
    task: str
    split: str
    rng: np.random.Generator
    registry: "TemplateRegistry"
    seed: Optional[int]


def _op_paragraph(s: _State) -> None:
    # AF1: every '.' becomes ';' except the last one (with its quirk when there is no '.').
    out = s.output.strip()
    last = out.rfind(".")
    out2 = out.replace(".", ";")
    s.output = out2[:last] + "." + out2[last + 1:]


def _op_num_words(s: _State) -> None:
    classes = s.output.split(", ")
    s.prompt = "Describe the sound in {} {}.".format(len(classes), "label" if len(classes) == 1 else "labels")
    if s.split == "train":
        s.rng.shuffle(classes)
    else:  # AF1 reshuffles with a fresh generator seeded like the choice
        np.random.default_rng(s.seed).shuffle(classes)
    s.output = ", ".join(classes)


def _op_append_options(s: _State) -> None:
    labels = s.registry.option_labels(s.task)
    if labels:
        s.prompt = s.prompt + "\nOPTIONS:\n - {}.".format(".\n - ".join(sorted(labels)))


def _op_append_all_labels(s: _State) -> None:
    labels = s.registry.all_labels(s.task)
    if labels:
        s.prompt = s.prompt + " All labels are: " + ", ".join(labels) + "."


def _op_replace_if_startswith(s: _State, old: str, new: str) -> None:
    if s.prompt.startswith(old):
        s.prompt = s.prompt.replace(old, new)


def _op_strip_output_suffix(s: _State, suffix: str) -> None:
    if s.output.endswith(suffix):
        s.output = s.output[: -len(suffix)]


OPS: dict[str, Callable[..., None]] = {
    "set_prompt": lambda s, text: setattr(s, "prompt", text),
    "append_prompt": lambda s, text: setattr(s, "prompt", s.prompt + text),
    "replace_prompt": lambda s, old, new: setattr(s, "prompt", s.prompt.replace(old, new)),
    "replace_prompt_if_startswith": _op_replace_if_startswith,
    "replace_output": lambda s, old, new: setattr(s, "output", s.output.replace(old, new)),
    "strip_output_suffix": _op_strip_output_suffix,
    "paragraph_output": _op_paragraph,
    "num_words": _op_num_words,
    "append_options": _op_append_options,
    "append_all_labels": _op_append_all_labels,
    "lowercase_output": lambda s: setattr(s, "output", s.output.lower()),
}


def _is_yes_no(output: str) -> bool:
    return all(x.strip().lower() in ("yes", "no") for x in output.split(","))


@dataclass
class TemplateRegistry:
    """All prompt/augmentation data; :meth:`augment` applies it to one (prompt, output) pair."""

    rules: list[dict] = field(default_factory=lambda: copy.deepcopy(RULES))
    label_sets: list[dict] = field(default_factory=lambda: copy.deepcopy(LABEL_SETS))
    all_label_sets: list[dict] = field(default_factory=lambda: copy.deepcopy(ALL_LABELS_SUFFIX_SETS))
    emotion_names: dict[str, str] = field(default_factory=lambda: dict(EMOTION_NAMES))
    task_renames: list[list[str]] = field(default_factory=lambda: copy.deepcopy(TASK_RENAMES))
    prefixes: dict[str, str] = field(default_factory=dict)  # flamingo task -> explicit prefix
    suffix: str = ANSWER_SUFFIX

    # ----------------------------------------------------------------------------- building
    @classmethod
    def from_config(cls, templates: Optional[Mapping[str, Any]]) -> "TemplateRegistry":
        """Built-ins extended by ``DataConfig.templates``:

        ``rules`` (appended after the built-ins; a rule with an existing ``name`` replaces it),
        ``label_sets`` / ``all_label_sets`` (checked BEFORE the built-ins), ``task_renames``,
        ``prefixes`` ({flamingo task: prefix text}), ``suffix``, ``emotion_names``.
        """
        reg = cls()
        t = dict(templates or {})
        allowed = {"rules", "label_sets", "all_label_sets", "task_renames", "prefixes", "suffix",
                   "emotion_names"}
        unknown = sorted(set(t) - allowed)
        if unknown:
            raise TemplateError(f"data.templates.{unknown[0]}: unknown key (allowed: {', '.join(sorted(allowed))})")
        for i, rule in enumerate(t.get("rules", []) or []):
            reg._check_rule(rule, f"data.templates.rules[{i}]")
            names = [r.get("name") for r in reg.rules]
            if rule.get("name") in names:
                reg.rules[names.index(rule["name"])] = copy.deepcopy(dict(rule))
            else:
                reg.rules.append(copy.deepcopy(dict(rule)))
        for key in ("label_sets", "all_label_sets"):
            extra = t.get(key) or []
            for i, entry in enumerate(extra):
                if not isinstance(entry, Mapping) or "labels" not in entry:
                    raise TemplateError(f"data.templates.{key}[{i}]: needs 'labels' and startswith/contains")
            setattr(reg, key, [dict(e) for e in extra] + getattr(reg, key))
        if t.get("task_renames"):
            reg.task_renames = [list(x) for x in t["task_renames"]] + reg.task_renames
        reg.prefixes.update(t.get("prefixes") or {})
        reg.emotion_names.update(t.get("emotion_names") or {})
        if "suffix" in t:
            reg.suffix = str(t["suffix"])
        return reg

    @staticmethod
    def _check_rule(rule: Any, where: str) -> None:
        if not isinstance(rule, Mapping):
            raise TemplateError(f"{where}: a rule must be a mapping")
        unknown = set(rule) - {"name", "tasks", "when", "unless", "no_options", "output_yes_no", "ops", "marks"}
        if unknown:
            raise TemplateError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        for j, op in enumerate(rule.get("ops", [])):
            if not op or op[0] not in OPS:
                raise TemplateError(f"{where}.ops[{j}]: unknown edit {op!r} (known: {', '.join(sorted(OPS))})")

    # ----------------------------------------------------------------------------- lookups
    def _distribution(self, task: str, augmentations: Mapping[str, float]):
        key = tuple(augmentations.items())
        cache = self.__dict__.setdefault("_dists", {})
        got = cache.get(key)
        if got is None:
            names = list(augmentations)
            if not names:
                raise TemplateError(f"{task}: no augmentations given")
            p = np.asarray([float(augmentations[n]) for n in names], dtype=np.float64)
            if (p < 0).any() or p.sum() <= 0:
                raise TemplateError(f"{task}: augmentation probabilities must be >= 0 and sum to > 0")
            if abs(p.sum() - 1.0) > 1e-8:
                p = p / p.sum()
            got = cache[key] = (names, p, np.cumsum(p))
        return got

    def _rules_for(self, task: str) -> list[dict]:
        """Rules whose task clauses match ``task`` (memoised: tasks are few, samples many)."""
        cache = self.__dict__.setdefault("_task_rules", {})
        rules = cache.get(task)
        if rules is None:
            rules = [r for r in self.rules if all(_clause_hits(task, c) for c in r.get("tasks", []))]
            cache[task] = rules
        return rules

    def option_labels(self, task: str) -> list[str]:
        for entry in self.label_sets:
            if _label_set_hits(task, entry):
                labels = list(entry["labels"])
                if "EmotionClassification" in task:
                    labels = [self.emotion_names.get(x, x) for x in labels]
                return labels
        return []

    def all_labels(self, task: str) -> list[str]:
        for entry in self.all_label_sets:
            if _label_set_hits(task, entry):
                return list(entry["labels"])
        return []

    def prefix(self, task: str) -> str:
        """``The task is <task words>. `` for a task string ``<dataset>-<Task>/<split>``."""
        cache = self.__dict__.setdefault("_prefixes", {})
        if task not in cache:
            cache[task] = self._make_prefix(task)
        return cache[task]

    def _make_prefix(self, task: str) -> str:
        head = task.split("/")[0]
        if head in self.prefixes:
            return self.prefixes[head]
        if "interleaved" in task:  # (AF1 never passes interleaved names here; kept for users)
            for mode in ("random", "knn"):
                task = task.replace(f"interleaved_{mode}-", "")
            head = task.split("/")[0]
        dataset = "-".join(head.split("-")[:-1]).lower()
        for alias in DATASET_ALIASES:
            if dataset.startswith(alias):
                dataset = alias
                break
        dataset = dataset.replace("_", " ").replace("-", " ")
        words = "".join(" " + c if c.isupper() else c for c in head.split("-")[-1]).lstrip().lower()
        if any(m in dataset for m in MUSIC_CAPTION_DATASETS) and words == "audio captioning":
            words = "music captioning"
        for old, new in self.task_renames:
            if words.startswith(old):
                words = new
                break
        return f"The task is {words}. "

    # ----------------------------------------------------------------------------- applying
    def augment(self, *, path: str, prompt: str, output: str, task: str, split: str,
                augmentations: Mapping[str, float], prefix_prob: float,
                rng: Optional[np.random.Generator] = None, no_options: bool = False) -> Augmented:
        """One shot's (prefix, prompt + suffix, output), as AF1's ``Augmentation.augment``.

        ``task`` is ``<dataset>-<Task>/<split>`` as AF1 formed it (``/train`` for training and
        for validation sets whose settings come from the training blend). Training draws from
        ``rng`` (augmentation choice, prefix coin, label shuffle, in AF1's order); validation uses
        AF1's per-sample seed.
        """
        names, p, cdf = self._distribution(task, augmentations)
        seed = None
        if split == "train":
            if rng is None:
                raise TemplateError("training augmentation needs a seeded rng")
            # one uniform draw + inverse CDF (cheaper than Generator.choice, same distribution)
            fn = names[min(int(np.searchsorted(cdf, rng.random(), side="right")), len(names) - 1)]
            coin_rng = rng
        else:
            seed = af1_seed(path + prompt + output + task)
            fn = str(np.random.default_rng(seed).choice(names, p=p))
            coin_rng = rng if rng is not None else np.random.default_rng(seed)
        if no_options and fn == "provide_all_labels":
            fn = "default"
        # AF1 draws the prefix coin even when the probability is 1 (rand() > 1 never holds).
        prefix = "" if coin_rng.random() > prefix_prob else self.prefix(task)
        output = output.strip()
        if fn == "do_nothing":
            return Augmented(prefix, prompt + self.suffix, output, fn, False)

        state = _State(prompt, output, task, split, coin_rng, self, seed)
        augmented = False
        for rule in self._rules_for(task):
            if "when" in rule and fn not in rule["when"]:
                continue
            if fn in rule.get("unless", ()):
                continue
            if "no_options" in rule and bool(rule["no_options"]) != no_options:
                continue
            if "output_yes_no" in rule and bool(rule["output_yes_no"]) != _is_yes_no(state.output):
                continue
            for op in rule.get("ops", []):
                OPS[op[0]](state, *op[1:])
            if rule.get("marks", True):
                augmented = True
        return Augmented(prefix, state.prompt + self.suffix, state.output, fn, augmented)
