import json

import pytest

from megaflamingo.testing import sounds as synthetic

CLS = f"{synthetic.DATASET}-{synthetic.TASK}"
CAP = f"{synthetic.DATASET}-{synthetic.CAPTION_TASK}"

# A registry for the synthetic set: the three kinds of benchmark the runner handles.
SYNTH_REGISTRY = {
    "version": 1,
    "defaults": {"decoding": {"num_beams": 1, "do_sample": False, "max_new_tokens": 8}},
    "benchmarks": {
        "synth-cls": {"split": f"{CLS}/test", "type": "classification", "mode": "in-distribution",
                      "metrics": ["accuracy", "macro_f1"],
                      "paper": {"metric": "accuracy", "value": 50.0, "unit": "%", "table": "made up"}},
        "synth-cls-icl": {"split": f"{CLS}/interleaved_knn-test", "type": "classification", "mode": "retrieval-icl",
                          "metrics": ["accuracy"], "decoding": {"num_beams": 2}},
        "synth-cap": {"split": f"{CAP}/test", "type": "caption", "mode": "zero-shot", "group_references": True,
                      "prompt": "describe this sound in detail.", "metrics": ["cider", "bleu4", "rouge_l"]},
    },
}


@pytest.fixture(scope="session")
def evalkit(tmp_path_factory):
    """Tiny trained model + Arrow test splits (classification, its kNN manifest, captions)."""
    import yaml

    from megaflamingo.cli.preprocess import main as preprocess_main
    from tests.inference.helpers import embed_splits, train_and_export

    root = tmp_path_factory.mktemp("eval")
    data = root / "data"
    synthetic.generate(data, synthetic.SplitSizes(train=12, val=0, test=2), max_s=10.0)
    arrow = root / "arrow"
    embed_splits(data, arrow, ("train", "test"), embed_dim=64)
    assert preprocess_main(["embed", "--manifest", str(data / "manifests" / CAP / "test.jsonl"),
                            "--data-root", str(data), "--out", str(arrow / CAP / "test"), "--encoder", "tiny",
                            "--embed-dim", "64", "--workers", "0", "--no-progress"]) in (0, None)
    assert preprocess_main(["knn", "--train-dir", str(arrow / CLS / "train"), "--split-dir", str(arrow / CLS / "test"),
                            "--k", "3", "--seed", "0"]) in (0, None)
    model = train_and_export(arrow, root / "model", embed_dim=64, fewshot=4, steps=160)
    reg = root / "synth_registry.yaml"
    reg.write_text(yaml.safe_dump(SYNTH_REGISTRY, sort_keys=False))
    return {"root": root, "data": data, "arrow": arrow, "model": model, "registry": reg}


def read_jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
