"""TensorBoard helpers (gate values, hparams flattening) and the training-time task evaluation, in one
process (the 2-rank ZeRO-3 run is in test_engine_distributed)."""
import json

import pytest
import torch
import yaml

from megaflamingo.engine import tags
from megaflamingo.errors import ConfigError
from megaflamingo.testing.tiny_task import make_config, tiny_raw_config, write_tiny_dataset


@pytest.fixture(scope="module")
def model_and_tok():
    from megaflamingo.engine.build import build_run_tokenizer
    from megaflamingo.model.build import build_from_config

    cfg = make_config(tiny_raw_config())
    tok, _ = build_run_tokenizer(cfg)
    torch.manual_seed(0)
    model, tokens = build_from_config(cfg.model, tok)
    return model, tok, tokens


def test_gate_values_are_tanh_per_layer(model_and_tok):
    model, _, _ = model_and_tok
    blocks = tags.gated_blocks(model)
    assert [i for i, _ in blocks] == [0, 1]  # every_n_layers=1 on a 2-layer LM
    assert set(tags.gate_values(blocks).values()) == {0.0}  # AF1 initialises the gates to 0
    with torch.no_grad():
        blocks[1][1].attn_gate.fill_(0.5)
        blocks[0][1].ff_gate.fill_(-2.0)
    vals = tags.gate_values(blocks)
    assert vals["xattn/attn_gate/layer_01"] == pytest.approx(float(torch.tanh(torch.tensor(0.5))))
    assert vals["xattn/ff_gate/layer_00"] == pytest.approx(float(torch.tanh(torch.tensor(-2.0))))
    assert vals["xattn/attn_gate/layer_00"] == 0.0 and len(vals) == 4
    with torch.no_grad():
        for _, b in blocks:
            b.attn_gate.zero_()
            b.ff_gate.zero_()


def test_flat_hparams_keeps_every_value_tensorboard_can_show():
    cfg = make_config(tiny_raw_config())
    flat = tags.flat_hparams(cfg.to_dict())
    assert flat["train.lr"] == cfg.train.lr and flat["model.xattn.heads"] == 2
    assert flat["train.max_steps"] == "null" and json.loads(flat["train.betas"]) == list(cfg.train.betas)
    assert all(isinstance(v, (int, float, str)) for v in flat.values())
    from torch.utils.tensorboard.summary import hparams

    hparams(flat, {"loss/valid": 0.0})  # accepted as is (raises on a value type it cannot show)


def _eval_cfg(tmp_path, **train):
    write_tiny_dataset(tmp_path / "data", rows={"val": 5})
    reg = tmp_path / "benchmarks.yaml"
    reg.write_text(yaml.safe_dump({"benchmarks": {"tiny-val": {
        "split": "SynthTiny-EventClassification/val", "type": "classification", "mode": "in-distribution",
        "metrics": ["accuracy", "macro_f1"]}}}))
    raw = tiny_raw_config()
    raw["data"] = {"data_root": str(tmp_path / "data")}
    raw["train"] = dict({"eval_benchmarks": ["tiny-val"], "eval_registry": [str(reg)], "eval_max_items": 4,
                         "eval_batch_size": 3, "eval_max_new_tokens": 2, "eval_num_beams": 1}, **train)
    return make_config(raw)


def test_task_eval_scores_the_first_items_with_the_registry_metrics(tmp_path, model_and_tok):
    from megaflamingo.engine.evaluation import TaskEval

    model, tok, tokens = model_and_tok
    te = TaskEval.from_config(_eval_cfg(tmp_path), tok, tokens)
    (suite,) = te.suites
    assert len(suite.items) == 4 and suite.bench.decoding["max_new_tokens"] == 2
    assert suite.bench.decoding["num_beams"] == 1  # the config's override over the registry's 3 beams
    res = te.run(model)
    assert set(res.metrics) == {"tiny-val"} and set(res.metrics["tiny-val"]) == {"accuracy", "macro_f1"}
    assert 0 <= res.metrics["tiny-val"]["accuracy"] <= 1 and res.seconds > 0
    table = res.samples["tiny-val"].splitlines()
    assert table[0] == "| prompt | prediction | references |" and len(table) == 2 + 4
    assert all(r.endswith(" |") and r.count(" | ") >= 2 for r in table[2:])
    assert te.loaded.model is None  # the trained model is not kept between evaluations


@pytest.mark.parametrize("train,match", [
    ({"eval_benchmarks": ["nope"]}, "train.eval_benchmarks.*unknown benchmark"),
    ({"eval_benchmarks": ["clotho-v2-caption"]}, "train.eval_benchmarks.*not found under"),
    ({"eval_registry": ["/nonexistent.yaml"]}, "train.eval_registry"),
])
def test_task_eval_errors_name_the_config_field(tmp_path, model_and_tok, train, match):
    from megaflamingo.engine.evaluation import TaskEval

    _, tok, tokens = model_and_tok
    with pytest.raises(ConfigError, match=match):
        TaskEval.from_config(_eval_cfg(tmp_path, **train), tok, tokens)


def test_no_task_eval_unless_benchmarks_are_named(model_and_tok):
    from megaflamingo.engine.evaluation import TaskEval

    _, tok, tokens = model_and_tok
    assert TaskEval.from_config(make_config(tiny_raw_config()), tok, tokens) is None
    with pytest.raises(ConfigError, match="train.eval_max_items"):
        raw = tiny_raw_config()
        raw["train"] = {"eval_benchmarks": ["x"], "eval_max_items": 0}
        make_config(raw)
