"""The registry (AF1's suite as data, user files over it) and how benchmark items are prompted."""
import re
from pathlib import Path

import pytest
import yaml

from megaflamingo.eval.registry import RegistryError, load_registry, parse_registry

REPO = Path(__file__).resolve().parents[2]


def test_builtin_registry_covers_af1_suite():
    reg = load_registry()
    kinds = {b.type for b in reg.benchmarks.values()}
    assert kinds == {"caption", "classification", "aqa", "multilabel"}
    assert {b.mode for b in reg.benchmarks.values()} == {"zero-shot", "in-distribution", "retrieval-icl"}
    for b in reg.benchmarks.values():
        assert b.decoding["num_beams"] == 3 and b.decoding["do_sample"] is False  # AF1's benchmark decoding
        assert b.primary in b.metrics
        if b.paper is not None and b.paper.value is not None:  # a number is only there with its citation
            assert b.paper.table and b.paper.source, b.name
    assert reg["clotho-v2-caption"].paper.value == 0.465 and reg["clotho-v2-caption"].group_references


def test_dataset_names_match_the_training_configs():
    """A benchmark over a dataset the AF1 configs train on must spell it as they do."""
    known = set()
    for cfg in (REPO / "configs").glob("*.yaml"):
        text = cfg.read_text()
        known |= set(re.findall(r"^\s+-?\s*([A-Za-z0-9_.-]+-[A-Za-z_]+)/", text, re.M))
    reg = load_registry()
    lowered = {k.lower(): k for k in known}
    for b in reg.benchmarks.values():
        t = b.flamingo_task
        if t.lower() in lowered:
            assert t == lowered[t.lower()], f"{b.name}: {t} is spelled {lowered[t.lower()]} in configs/"
    in_configs = {b.flamingo_task for b in reg.benchmarks.values()} & known
    assert {"Clotho-v2-AudioCaptioning", "Clotho-AQA-AQA", "CochlScene-SceneClassification",
            "NonSpeech7k-EventClassification", "FSD50k-EventClassification", "SONYC-UST-EventClassification",
            "Music-AVQA-AQA_All", "NSynth-MIR"} <= in_configs


def test_option_lists_resolve_from_the_templates():
    from megaflamingo.data.templates import TemplateRegistry

    tr = TemplateRegistry()
    for b in load_registry().benchmarks.values():
        if b.options == "templates":
            assert tr.option_labels(b.flamingo_task), f"{b.name}: no label set for {b.flamingo_task}"


def test_user_registry_adds_and_replaces(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text(yaml.safe_dump({"benchmarks": {
        "cochlscene": {"split": "CochlScene-SceneClassification/val", "type": "classification",
                       "mode": "in-distribution", "metrics": ["accuracy"]},
        "my-set": {"split": "Mine-EventClassification/test", "type": "classification", "mode": "zero-shot",
                   "prompt": "classify this sound.", "options": ["a", "b"], "metrics": ["accuracy", "macro_f1"],
                   "decoding": {"num_beams": 1}}}}))
    reg = load_registry([f])
    assert reg["cochlscene"].split.endswith("/val") and reg["cochlscene"].paper is None
    # The built-in defaults (AF1's decoding) apply under the entry's own settings.
    assert reg["my-set"].decoding == {"num_beams": 1, "do_sample": False, "max_new_tokens": 128}
    assert "clotho-v2-caption" in reg  # built-ins stay


@pytest.mark.parametrize("entry, msg", [
    ({"split": "nodash/test", "type": "caption", "mode": "zero-shot", "metrics": ["cider"]}, "split"),
    ({"split": "A-B/test", "type": "captions", "mode": "zero-shot", "metrics": ["cider"]}, "type"),
    ({"split": "A-B/test", "type": "caption", "mode": "zero-shot", "metrics": ["accuracy"]}, "metric 'accuracy'"),
    ({"split": "A-B/test", "type": "caption", "mode": "retrieval-icl", "metrics": ["cider"]}, "retrieval-icl"),
    ({"split": "A-B/test", "type": "caption", "mode": "zero-shot", "metrics": ["cider"], "decoding": {"beams": 2}},
     "decoding.beams"),
    ({"split": "A-B/test", "type": "aqa", "mode": "zero-shot", "metrics": ["accuracy"], "subset": "odd"}, "subset"),
    ({"split": "A-B/test", "type": "classification", "mode": "zero-shot", "metrics": ["accuracy"],
      "options": "templates"}, "prompt"),
    ({"split": "A-B/test", "type": "caption", "mode": "zero-shot", "metrics": ["cider"], "colour": 1}, "colour"),
])
def test_bad_entries_name_file_benchmark_and_field(entry, msg):
    with pytest.raises(RegistryError) as e:
        parse_registry({"benchmarks": {"x": entry}}, "mine.yaml")
    assert "mine.yaml: benchmark x" in str(e.value) and msg in str(e.value)


def test_rendering_follows_the_models_training(evalkit):
    """A task in the model's blend: the training sample text cut after the query's <SEP>, built by
    the data pipeline itself; a task the model never trained on: the registry's prompt + AF1's
    option list (as its provide_all_labels wrote it) + the task prefix."""
    import numpy as np

    from megaflamingo.config import DatasetEntry
    from megaflamingo.data.sources import Source
    from megaflamingo.data.text import SpecialText, build_parts
    from megaflamingo.data.templates import TemplateRegistry
    from megaflamingo.eval.items import build_items
    from megaflamingo.eval.registry import Benchmark
    from megaflamingo.inference.prompts import TrainingForm
    from megaflamingo.tokens import tiny_tokenizer

    from .conftest import CLS

    tok = tiny_tokenizer()
    b = Benchmark(name="t", split=f"{CLS}/test", type="classification", mode="zero-shot", metrics=("accuracy",),
                  primary="accuracy", prompt="which sound is it?", options=["zeta", "alpha"])
    # provide_all_labels on a task with a label set: the rule appends OPTIONS after lower-casing.
    rules = {"label_sets": [{"startswith": [CLS], "labels": ["low tone", "click train"]}],
             "rules": [{"name": "synth_all", "tasks": [{"startswith": [CLS]}], "when": ["provide_all_labels"],
                        "ops": [["set_prompt", "classify this sound."], ["append_options"]]}]}
    entry = DatasetEntry(prefix_prob=1.0, augmentations={"provide_all_labels": 1.0})
    trained = TrainingForm(TemplateRegistry.from_config(rules), {f"{CLS}/train": entry})
    items, info = build_items(b, evalkit["arrow"], tok, trained, limit=3)
    assert info["rendering"] == "trained-form" and len(items) == 3
    src = Source(evalkit["arrow"], f"{CLS}/test")
    sp = SpecialText.from_tokenizer(tok)
    for k, it in enumerate(items):
        train = build_parts(src.item(k), sp, trained.registry, flamingo_task=CLS, split="train",
                            augmentations=entry.augmentations, prefix_prob=1.0, rng=np.random.default_rng(k)).text
        cut = train[: train.rindex(sp.sep) + len(sp.sep)]
        assert it.text == cut, (it.text, cut)
        assert "\nOPTIONS:\n - click train.\n - low tone." in it.text and "which sound" not in it.text
        assert it.references == [train[len(cut):].split("<|endofchunk|>")[0]]
    fresh = TrainingForm(TemplateRegistry(), {})
    items, info = build_items(b, evalkit["arrow"], tok, fresh, limit=2)
    assert info["rendering"].startswith("zero-shot") and info["options_listed"]
    assert items[0].text == ("</s>The task is event classification. <audio>which sound is it?"
                             "\nOPTIONS:\n - alpha.\n - zeta.\nAnswer:<SEP>")


def test_icl_items_put_neighbours_first(evalkit):
    from megaflamingo.data.templates import TemplateRegistry
    from megaflamingo.eval.items import build_items
    from megaflamingo.eval.registry import Benchmark
    from megaflamingo.inference.prompts import TrainingForm
    from megaflamingo.tokens import tiny_tokenizer

    from .conftest import CLS

    b = Benchmark(name="t", split=f"{CLS}/interleaved_knn-test", type="classification", mode="retrieval-icl",
                  metrics=("accuracy",), primary="accuracy")
    items, _ = build_items(b, evalkit["arrow"], tiny_tokenizer(), TrainingForm(TemplateRegistry(), {}))
    it = items[0]
    assert len(it.audios) == 3 and it.text.count("<audio>") == 3  # k=3: 2 neighbours + the query
    assert it.text.startswith("</s>Here are similar examples. ") and it.text.count("<|endofchunk|>") == 2
    from megaflamingo.testing import sounds as synthetic

    # Each context shot shows its answer (a class label); the query ends at <SEP>.
    answers = [blk.split("<SEP>")[1] for blk in it.text.split("<|endofchunk|>")[:-1]]
    assert all(a in synthetic.LABELS for a in answers) and it.text.endswith("\nAnswer:<SEP>")
