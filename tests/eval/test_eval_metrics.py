"""Metric values against the libraries' own documented examples, and the captioning wrapper's
multi-reference behaviour (keys, grouping, tokenisers)."""
import sys
from pathlib import Path

import pytest

from megaflamingo.eval import metrics as M
from megaflamingo.eval.normalize import normalizer, split_labels

NAMES = {0: "cat", 1: "dog", 2: "pig", 3: "cow"}


def _names(xs):
    return [NAMES[x] for x in xs]


# ---------------------------------------------------------------- scikit-learn's documented examples

def test_accuracy_documented_example():
    # sklearn.metrics.accuracy_score docstring: y_pred=[0, 2, 1, 3], y_true=[0, 1, 2, 3] -> 0.5
    assert M.accuracy(_names([0, 2, 1, 3]), _names([0, 1, 2, 3])) == 0.5


def test_macro_f1_documented_example():
    # sklearn.metrics.f1_score docstring: y_true=[0,1,2,0,1,2], y_pred=[0,2,1,0,0,1]:
    # macro 0.267, weighted 0.267 (per class [0.8, 0, 0])
    t, p = _names([0, 1, 2, 0, 1, 2]), _names([0, 2, 1, 0, 0, 1])
    got = M.macro_f1(p, t)
    assert got == pytest.approx(0.267, abs=5e-4) and got == pytest.approx(0.8 / 3)
    assert M.macro_f1(p, t, average="weighted") == pytest.approx(0.267, abs=5e-4)


def test_prediction_outside_the_label_set_is_a_miss_not_a_class():
    t = ["cat", "dog", "cat", "dog"]
    p = ["cat", "a purring animal", "cat", "dog"]
    # dog: tp 1, fn 1 -> F1 2/3; cat: tp 2 -> 1.0; the free-form answer is no third class.
    assert M.macro_f1(p, t) == pytest.approx((1 + 2 / 3) / 2)
    assert M.accuracy(p, t) == 0.75


def test_multilabel_documented_example():
    # sklearn.metrics.f1_score docstring (multilabel): y_true=[[0,0,0],[1,1,1],[0,1,1]],
    # y_pred=[[0,0,0],[1,1,1],[1,1,0]] -> per label [0.667, 1, 0.667], so macro 7/9.
    cols = ["a", "b", "c"]

    def sets(rows):
        return [[c for c, v in zip(cols, r) if v] for r in rows]

    t = sets([[0, 0, 0], [1, 1, 1], [0, 1, 1]])
    p = sets([[0, 0, 0], [1, 1, 1], [1, 1, 0]])
    got = M.multilabel_scores(p, t, ["macro_f1", "micro_f1"])
    assert got["macro_f1"] == pytest.approx(7 / 9)
    assert got["micro_f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 1))  # tp 4, fp 1, fn 1


def test_multilabel_extra_labels_are_false_positives():
    got = M.multilabel_scores([["dog", "siren"]], [["dog"]], ["samples_f1", "micro_f1", "macro_f1"])
    assert got["samples_f1"] == pytest.approx(2 / 3) and got["micro_f1"] == pytest.approx(2 / 3)
    assert got["macro_f1"] == 1.0  # over the reference classes only


def test_average_precision_documented_example():
    # sklearn.metrics.average_precision_score docstring: y_true=[0,0,1,1], scores [0.1,0.4,0.35,0.8] -> 0.83.
    # map_hard ranks by 0/1 decisions; with these decisions at threshold 0.375 it is AP of [0,1,0,1] labels.
    from sklearn.metrics import average_precision_score

    assert average_precision_score([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.83, abs=5e-3)
    refs = [[], [], ["x"], ["x"]]
    preds = [[], ["x"], [], ["x"]]  # decisions: 0, 1, 0, 1
    assert M.multilabel_scores(preds, refs, ["map_hard"])["map_hard"] == pytest.approx(
        average_precision_score([0, 0, 1, 1], [0, 1, 0, 1]))


def test_accuracy_any_matches_any_reference():
    assert M.accuracy_any(["two", "3", "yes"], [["2", "two"], ["three", "four"], ["yes"]]) == pytest.approx(2 / 3)


# ---------------------------------------------------------------- captioning (pycocoevalcap)

# NLTK's documented corpus_bleu example (nltk.translate.bleu_score.corpus_bleu: 0.5920778868801042),
# already tokenised; pycocoevalcap's BLEU (closest reference length, no smoothing) must agree.
HYP1 = "It is a guide to action which ensures that the military always obeys the commands of the party"
REF1 = ["It is a guide to action that ensures that the military will forever heed Party commands",
        "It is the guiding principle which guarantees the military forces always being under the command of the Party",
        "It is the practical guide for the army always to heed the directions of the party"]
HYP2 = "he read the book because he was interested in world history"
REF2 = ["he was interested in world history because he read the book"]


def test_bleu4_documented_example():
    got = M.caption_scores([HYP1, HYP2], [REF1, REF2], ["bleu4"], tokenizer="none")
    assert got["bleu4"] == pytest.approx(0.5920778868801042, abs=1e-6)


CLIPS = {
    "c1": ["a dog barks twice in the distance", "a dog is barking far away", "distant barking of a dog",
           "a dog barks in the distance", "someone's dog barks a few times"],
    "c2": ["rain falls steadily on a metal roof", "heavy rain on a tin roof", "rain falls on a roof",
           "steady rainfall hitting a roof", "rain drums on the roof"],
    "c3": ["a car engine starts and idles", "an engine revs then idles", "a vehicle engine starting up",
           "a motor starts and runs", "a car engine starts"],
}
PREDS = {"c1": "a dog barks in the distance", "c2": "rain falls on a roof", "c3": "a car engine starts"}


def _score(preds, clips, metrics=("cider", "bleu4", "rouge_l"), tokenizer="simple"):
    keys = list(clips)
    return M.caption_scores([preds[k] for k in keys], [clips[k] for k in keys], metrics, tokenizer=tokenizer)


def test_multi_reference_captioning():
    base = _score(PREDS, CLIPS)
    assert base["tokenizer"] == "simple" and base["cider"] > 0.5
    # All five references count: dropping the one each prediction repeats lowers the scores.
    fewer = {k: [r for r in v if r != PREDS[k]] for k, v in CLIPS.items()}
    worse = _score(PREDS, fewer)
    assert all(worse[m] < base[m] for m in ("cider", "bleu4"))
    # Order of references and of clips is irrelevant; which prediction goes with which clip is not.
    shuffled = {k: list(reversed(v)) for k, v in reversed(list(CLIPS.items()))}
    again = _score(PREDS, shuffled)
    assert all(again[m] == pytest.approx(base[m]) for m in ("cider", "bleu4", "rouge_l"))
    swapped = _score({"c1": PREDS["c2"], "c2": PREDS["c3"], "c3": PREDS["c1"]}, CLIPS)
    assert swapped["cider"] < 0.2 * base["cider"]
    # A single string reference is one reference.
    one = M.caption_scores(["a dog barks"], ["a dog barks"], ["bleu1"], tokenizer="simple")
    assert one["bleu1"] == pytest.approx(1.0)


@pytest.mark.slow  # two Java start-ups (PTB tokenizer, METEOR jar)
@pytest.mark.skipif(not M.java_available(), reason="needs a Java runtime")
def test_ptb_tokenizer_and_meteor():
    ptb = _score(PREDS, CLIPS, ("cider", "bleu4", "rouge_l", "meteor"), tokenizer="auto")
    simple = _score(PREDS, CLIPS, ("cider", "bleu4", "rouge_l"))
    assert ptb["tokenizer"] == "ptb"
    # These captions have no punctuation that the tokenisers treat differently.
    assert all(ptb[m] == pytest.approx(simple[m]) for m in ("cider", "bleu4", "rouge_l"))
    assert 0.3 < ptb["meteor"] <= 1.0
    # Punctuation and case do not change PTB-tokenised scores; an empty answer does not hang METEOR.
    loud = {k: v.upper() + "." for k, v in PREDS.items()}
    assert _score(loud, CLIPS, ("cider",), tokenizer="ptb")["cider"] == pytest.approx(ptb["cider"])
    empty = M.caption_scores(["", "rain falls on a roof"], [CLIPS["c1"], CLIPS["c2"]], ["meteor", "bleu4"])
    assert 0 <= empty["meteor"] < ptb["meteor"]


@pytest.mark.skipif(not M.java_available(), reason="needs a Java runtime")
def test_ptb_tokenize_equals_the_librarys_tokenizer():
    """Our call of the library's jar (sentence file in the temp dir, not in site-packages) tokenises
    exactly as pycocoevalcap's own PTBTokenizer."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    caps = {"a": ["A dog's bark -- twice, far away!", "Rain (heavy) on a tin roof..."],
            "b": ["don't stop: the café's engine\nidles", "\"Quoted\" text; and `ticks`"], "c": [""]}
    lib = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in caps.items()})
    jar_dir = Path(sys.modules[PTBTokenizer.__module__].__file__).parent
    before = jar_dir.stat().st_mtime_ns  # the library's own call created and removed a file there
    assert M.ptb_tokenize(caps) == lib
    assert jar_dir.stat().st_mtime_ns == before  # ours wrote nothing beside the jar (read-only installs work)
    assert lib["a"][0] == "a dog 's bark twice far away"


def test_without_java_captions_still_score_and_say_how(monkeypatch):
    monkeypatch.setattr(M, "java_available", lambda: False)
    got = _score(PREDS, CLIPS, ("cider", "meteor"), tokenizer="auto")
    assert got["tokenizer"] == "simple" and got["cider"] == pytest.approx(_score(PREDS, CLIPS, ("cider",))["cider"])
    assert got["meteor"] is None and "Java" in got["unavailable"]["meteor"]
    with pytest.raises(M.MetricUnavailable, match="Java"):
        _score(PREDS, CLIPS, ("cider",), tokenizer="ptb")


def test_batch_inference_metrics_are_the_library_metrics():
    """megaflamingo-infer --manifest scores with the benchmark metrics (sklearn, pycocoevalcap), after
    AF1's answer normalisation; a caption is one reference per record."""
    recs = [{"output": "Low tone", "prediction": "low tone.", "task": "X-EventClassification"},
            {"output": "high tone", "prediction": "low tone", "task": "X-EventClassification"},
            {"output": HYP_REF[1], "prediction": HYP_REF[0], "task": "X-AudioCaptioning"},
            {"id": "bad", "error": "unreadable audio"}, {"prediction": "no reference"}]
    s = M.summarize_batch(recs)
    assert (s["n_with_reference"], s["n_failed"], s["n_classification"], s["n_caption"]) == (3, 1, 2, 1)
    assert s["accuracy"] == 0.5 and s["macro_f1"] == pytest.approx(M.macro_f1(["low tone"] * 2, ["low tone", "high tone"]))
    assert s["bleu4"] == pytest.approx(M.bleu4([HYP_REF[0]], [HYP_REF[1]]))
    assert s["cider"] == pytest.approx(M.caption_scores([HYP_REF[0]], [HYP_REF[1]], ["cider"])["cider"])
    # A label list decides what is classification when tasks do not say.
    by_label = M.summarize_batch([{"output": "dog", "prediction": "dog"}, {"output": "a dog barks", "prediction": "x"}],
                                 labels=["Dog"])
    assert by_label["n_classification"] == 1 and by_label["n_caption"] == 1


HYP_REF = ("a dog barks twice in the distance", "a dog barks far away in the distance")


def test_normalisation():
    n = normalizer(["af1", "emotion_names"])
    assert n("  Anger. ") == "angry" and n("Happy") == "happy"
    assert normalizer(["af1", "underscores_to_spaces"])("Electric_guitar.") == "electric guitar"
    assert split_labels("dog, siren;  car horn") == ["dog", "siren", "car horn"]
