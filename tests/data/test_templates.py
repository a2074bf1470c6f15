"""AF1 prompt templates / augmentations reproduced from data (hand-derived expectations)."""
import numpy as np
import pytest

from megaflamingo.data.templates import TemplateError, TemplateRegistry, af1_seed

REG = TemplateRegistry()


def aug(task, prompt, output, fn, split="train", no_options=False, seed=0, prefix_prob=1.0, path="a.wav"):
    return REG.augment(path=path, prompt=prompt, output=output, task=task, split=split,
                       augmentations={fn: 1.0}, prefix_prob=prefix_prob,
                       rng=np.random.default_rng(seed) if split == "train" else None, no_options=no_options)


@pytest.mark.parametrize("task,prefix", [
    ("Clotho-AQA-AQA/train", "The task is audio question answering. "),
    ("Music-AVQA-AQA_All/train", "The task is audio question answering. "),
    ("Clotho-v2-AudioCaptioning/train", "The task is audio captioning. "),
    ("MusicCaps-AudioCaptioning/train", "The task is music captioning. "),
    ("LP-MusicCaps-MSD-AudioCaptioning/train", "The task is music captioning. "),
    ("NSynth-MIR/train", "The task is music information retrieval. "),
    ("musdbhq-InstrClassification/train", "The task is instrument classification. "),
    ("CochlScene-SceneClassification/train", "The task is scene classification. "),
    ("mtg-jamendo-MusicTagging/train", "The task is music tagging. "),
])
def test_task_prefix(task, prefix):
    assert REG.prefix(task) == prefix


def test_do_nothing_and_prefix_prob():
    a = aug("OpenAQA-AQA/train", "question: what?", "  it is a dog  ", "do_nothing")
    assert (a.prefix, a.prompt, a.output) == ("The task is audio question answering. ", "question: what?\nAnswer:",
                                             "it is a dog")
    a = aug("OpenAQA-AQA/train", "q", "o", "do_nothing", prefix_prob=0.0)
    assert a.prefix == ""


def test_aqa_binary_and_plain():
    a = aug("Clotho-AQA-AQA/train", "question: is it raining?", "yes", "AQA_binary_instruction")
    assert a.prompt == "please answer this question: is it raining?\nOPTIONS:\nyes.\nno.\nAnswer:"
    a = aug("Clotho-AQA-AQA/train", "question: what is it?", "rain", "AQA_binary_instruction")
    assert a.prompt == "please answer this question: what is it?\nAnswer:"
    a = aug("Clotho-AQA-AQA/train", "what is it? question: x", "rain", "default")
    assert a.prompt == "what is it? question: x\nAnswer:"  # plain AQA needs the prompt to start so
    a = aug("Music-AVQA-AQA_All/train", "what? question:", "yes, no", "AQA_binary_instruction")
    assert a.prompt.endswith("OPTIONS:\nyes.\nno.\nAnswer:") and "please answer this question:" in a.prompt


def test_captioning_variants():
    assert aug("Clotho-v2-AudioCaptioning/train", "x", "a dog.", "AC_short").prompt == \
        "describe the sound in a sentence.\nAnswer:"
    assert aug("MusicCaps-AudioCaptioning/train", "x", "y", "AC_long").prompt == \
        "describe the music at length.\nAnswer:"
    a = aug("MusicCaps-AudioCaptioning/train", "x", "a. b. c.", "AC_paragraph")
    assert a.prompt == "describe the music in a paragraph.\nAnswer:" and a.output == "a; b; c."
    # AF1's quirk when the caption has no '.': the text before the last char is repeated
    assert aug("MusicCaps-AudioCaptioning/train", "x", "abc", "AC_paragraph").output == "ab.abc"


def test_single_classification_and_options():
    a = aug("CochlScene-SceneClassification/train", "this acoustic scene is", "bus", "provide_all_labels")
    assert a.prompt.startswith("classify this sound.\nOPTIONS:\n - bus.\n - cafe.\n - car.\n - crowdedindoor.")
    assert a.prompt.endswith(" - subwaystation.\nAnswer:")
    a = aug("MELD-EmotionClassification/train", "x", "joy", "provide_all_labels")
    assert a.prompt == ("what is the emotion of this speech?\nOPTIONS:\n - angry.\n - disgusted.\n - fearful.\n"
                        " - happy.\n - neutral.\n - sad.\n - surprised.\nAnswer:")
    a = aug("MELD-SentimentClassification/train", "x", "positive", "provide_all_labels")
    assert a.prompt == "what is the sentiment of this speech?\nOPTIONS:\n - negative.\n - neutral.\n - positive.\nAnswer:"
    a = aug("ravdess-EmotionClassification/train", "x", "calm", "provide_all_labels")
    assert " - calm." in a.prompt and " - surprised." in a.prompt
    # few-shot context shots never get options
    a = aug("CochlScene-SceneClassification/train", "x", "bus", "provide_all_labels", no_options=True)
    assert a.augmentation == "default" and a.prompt == "classify this sound.\nAnswer:"
    assert aug("FMA-GenreClassification/train", "x", "rock", "default").prompt == "what is the genre of this music?\nAnswer:"
    assert aug("NSynth-InstrClassification/train", "x", "organ", "default").prompt == \
        "what is the instrument of this music?\nAnswer:"


def test_multi_label_num_words_and_all_labels():
    a = aug("chime-home-EventClassification/train", "x", "television, silence.", "default")
    assert a.output == "television, silence"
    assert a.prompt.startswith("use a few labels to describe this sound. All labels are: child speaking, ")
    a = aug("chime-home-EventClassification/train", "x", "television, silence.", "default", no_options=True)
    assert a.prompt == "use a few labels to describe this sound.\nAnswer:"
    a = aug("SONYC-UST-EventClassification/train", "x", "siren, car horn, jackhammer", "num_words", seed=3)
    assert a.prompt.startswith("Describe the sound in 3 labels. All labels are: small sounding engine")
    assert sorted(a.output.split(", ")) == ["car horn", "jackhammer", "siren"]
    a = aug("AudioSet-EventClassification/train", "x", "dog", "num_words")
    assert a.prompt == "Describe the sound in 1 label.\nAnswer:"


def test_other_defaults():
    assert aug("FSD50k-EventClassification/train", "x", "y", "default").prompt == \
        "describe this sound in the order from specific to general.\nAnswer:"
    a = aug("mtg-jamendo-MusicTagging/train", "x", "rock; piano; happy", "default")
    assert a.prompt == "what are the genres, instruments, and mood/theme of the music?\nAnswer:"
    assert a.output == "rock. piano. happy"


def test_training_is_deterministic_under_seed_and_varies():
    augs = {"default": 0.5, "num_words": 0.5}
    outs = set()
    for seed in range(20):
        r1 = REG.augment(path="p", prompt="x", output="a, b, c, d", task="SONYC-UST-EventClassification/train",
                         split="train", augmentations=augs, prefix_prob=0.5, rng=np.random.default_rng(seed))
        r2 = REG.augment(path="p", prompt="x", output="a, b, c, d", task="SONYC-UST-EventClassification/train",
                         split="train", augmentations=augs, prefix_prob=0.5, rng=np.random.default_rng(seed))
        assert r1 == r2
        outs.add((r1.augmentation, r1.prefix, r1.output))
    assert len(outs) > 3


def test_validation_uses_af1_per_sample_seed():
    augs = {"default": 0.5, "num_words": 0.5}
    task, path, prompt, output = "chime-home-EventClassification/train", "d/x.wav", "x", "a, b, c"
    seed = sum(map(ord, path + prompt + output + task))
    assert af1_seed(path + prompt + output + task) == seed
    want_fn = np.random.default_rng(seed).choice(list(augs), p=list(augs.values()))
    got = REG.augment(path=path, prompt=prompt, output=output, task=task, split="val",
                      augmentations=augs, prefix_prob=1.0)
    assert got.augmentation == want_fn
    if want_fn == "num_words":
        classes = output.split(", ")
        np.random.default_rng(seed).shuffle(classes)
        assert got.output == ", ".join(classes)
    # deterministic, independent of any global state
    np.random.seed(123)
    assert REG.augment(path=path, prompt=prompt, output=output, task=task, split="val",
                       augmentations=augs, prefix_prob=1.0) == got


def test_registry_is_extensible_from_config():
    reg = TemplateRegistry.from_config({
        "rules": [{"name": "birds", "tasks": [{"startswith": ["BirdSet"]}], "when": ["default"],
                   "ops": [["set_prompt", "which bird is singing?"]]}],
        "label_sets": [{"startswith": ["BirdSet"], "labels": ["robin", "crow"]}],
        "prefixes": {"BirdSet-BirdClassification": "The task is bird spotting. "},
    })
    a = reg.augment(path="p", prompt="x", output="crow", task="BirdSet-BirdClassification/train", split="train",
                    augmentations={"default": 1.0}, prefix_prob=1.0, rng=np.random.default_rng(0))
    assert (a.prefix, a.prompt, a.augmented) == ("The task is bird spotting. ", "which bird is singing?\nAnswer:", True)
    assert reg.option_labels("BirdSet-BirdClassification/train") == ["robin", "crow"]
    # built-ins untouched
    assert TemplateRegistry().option_labels("BirdSet-BirdClassification/train") == []
    with pytest.raises(TemplateError, match="unknown edit"):
        TemplateRegistry.from_config({"rules": [{"name": "x", "ops": [["explode"]]}]})
    with pytest.raises(TemplateError, match="unknown key"):
        TemplateRegistry.from_config({"rulez": []})
