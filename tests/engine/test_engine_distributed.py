"""Real multi-process DeepSpeed runs on CPU (gloo) of the tiny AudioFlamingo on a learnable task:
ZeRO-3 learning, exact resume after kill -9, ZeRO-2 / ZeRO-3 / single-process agreement, the
universal checkpoint 2 ranks -> 1 rank, non-finite loss handling, TensorBoard read-back."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("worker.py")
pytestmark = [pytest.mark.slow, pytest.mark.distributed]

BASE_TRAIN = {"micro_batch_size": 4, "gradient_accumulation_steps": 1, "lr": 1e-2, "warmup_steps": 2,
              "precision": "fp32", "max_steps": 10, "logging_steps": 5, "save_steps": 4, "eval_steps": 5,
              "keep_last": 3, "progress_bar": False, "dist_timeout_s": 60}


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp, name, nproc=2, ds="ds_configs/zero3.json", timeout=240, **spec_kw):
    train = dict(BASE_TRAIN, run_dir=str(tmp / name))
    train.update(spec_kw.pop("train", {}))
    spec = {"train": train, "deepspeed": {"config": ds, **spec_kw.pop("deepspeed", {})},
            "result": str(tmp / f"{name}.json"), **spec_kw}
    spec_path = tmp / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_port()), str(WORKER), str(spec_path)]
    else:
        cmd = [sys.executable, str(WORKER), str(spec_path)]
    t0 = time.time()
    # Own session: on a timeout the whole tree (launcher + ranks) is killed, never left orphaned.
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         cwd=Path(__file__).parents[2], start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"{name}: no exit within {timeout} s\n{err[-3000:]}")
    proc = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    result = json.loads((tmp / f"{name}.json").read_text()) if (tmp / f"{name}.json").exists() else None
    return proc, result, time.time() - t0


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The reference: 2 ranks, ZeRO-3, 10 steps, checkpoints at 4 and 8, validation every 5."""
    tmp = tmp_path_factory.mktemp("engine_dist")
    # A "pretrained" LM on disk, so the run loads it with from_pretrained inside zero.Init.
    import torch
    from transformers import AutoModelForCausalLM

    from megaflamingo.testing import tiny_opt_config

    torch.manual_seed(123)
    AutoModelForCausalLM.from_config(tiny_opt_config(vocab_size=512, hidden_size=64, num_layers=2)).save_pretrained(
        tmp / "lm")
    proc, res, _ = launch(tmp, "ref", valid=True, lm_path=str(tmp / "lm"), **task_eval_spec(tmp))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp, res


def task_eval_spec(tmp):
    """Generation-based task metrics on a SynthTiny Arrow split during the run: 7 items over 2 ranks in
    batches of 3 (rank 1 runs a stand-in batch at the end), beam search, under ZeRO-3."""
    import yaml

    from megaflamingo.testing.tiny_task import write_tiny_dataset

    write_tiny_dataset(tmp / "data", rows={"val": 7})
    reg = tmp / "benchmarks.yaml"
    reg.write_text(yaml.safe_dump({"benchmarks": {"tiny-val": {
        "split": "SynthTiny-EventClassification/val", "type": "classification", "mode": "in-distribution",
        "metrics": ["accuracy", "macro_f1"]}}}))
    return {"data": {"data_root": str(tmp / "data")},
            "train": {"eval_benchmarks": ["tiny-val"], "eval_registry": [str(reg)], "eval_batch_size": 3,
                      "eval_max_new_tokens": 3, "eval_num_beams": 2}}


def test_partitioned_pretrained_lm_loaded_and_frozen(ref):
    """from_pretrained under zero.Init put the saved weights into the sharded LM, and 10 steps did not
    move them (frozen): the consolidated checkpoint holds exactly the saved tensors."""
    import re

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    tmp, _ = ref
    saved = load_file(str(tmp / "lm" / "model.safetensors"))
    ours = get_fp32_state_dict_from_zero_checkpoint(str(tmp / "ref" / "checkpoints"), tag="step-00000010")
    assert len(saved) > 10
    for k, v in saved.items():
        key = "lang_encoder." + re.sub(r"(layers\.\d+\.)", r"\1decoder_layer.", k)
        assert key in ours, key
        assert torch_equal(ours[key], v), key
    gates = [k for k in ours if k.endswith("attn_gate")]
    assert gates and any(float(ours[k].detach().abs().max()) > 0 for k in gates)  # the xattn gates did train


def torch_equal(a, b):
    import torch

    return torch.equal(a.float(), b.float())


def test_zero3_two_ranks_learns(ref):
    tmp, res = ref
    losses = res["losses"]
    assert len(losses) == 10 and res["step"] == 10
    # the HF-model AudioFlamingo is built partitioned: LM, audio transformer and xattn under zero.Init
    assert res["model_class"] == "PreTrainedModel" and res["whole_at_build"] == []
    assert sum(losses[-3:]) / 3 < losses[0] - 0.4, losses  # well below the start
    assert res["valid"]["synth-val"] < losses[0]
    ckpt = tmp / "ref" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step-00000010"
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000004", "step-00000008", "step-00000010"]
    for tag in ("step-00000008",):
        assert len(list((ckpt / tag).glob("*optim_states.pt"))) == 2  # one shard per rank
        assert len(list((ckpt / tag).glob("megaflamingo_rank*.pt"))) == 2  # RNG + loader of each rank


def test_tensorboard_has_every_metric(ref):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    tmp, res = ref
    acc = EventAccumulator(str(tmp / "ref" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    gates = {f"xattn/{g}/layer_{i:02d}" for g in ("attn_gate", "ff_gate") for i in (0, 1)}
    want = {"loss/train", "loss/train/synth-a", "loss/train/synth-b", "optim/lr", "optim/grad_norm",
            "perf/tokens_per_s", "perf/samples_per_s", "perf/mfu_pct", "time/data_wait_s", "time/step_s",
            "memory/peak_rss_gb", "optim/nonfinite_skipped", "data/bad_rows", "loss/valid", "loss/valid/synth-val", "time/valid_s",
            "eval/tiny-val/accuracy", "eval/tiny-val/macro_f1", "time/eval_s"} | gates
    assert want <= tags, want - tags
    assert {t.split("/")[0] for t in tags} == {"loss", "optim", "perf", "time", "memory", "eval", "xattn", "data"}
    loss = [e.value for e in acc.Scalars("loss/train")]
    assert [e.step for e in acc.Scalars("loss/train")] == [1, 5, 10]  # from step 1: the start is visible
    assert loss[0] == pytest.approx(res["losses"][0], rel=1e-3)
    assert loss[1] == pytest.approx(sum(res["losses"][1:5]) / 4, rel=1e-3)
    # The window's loss is the token-weighted mean of the per-dataset losses: between them.
    per_ds = [[e.value for e in acc.Scalars(f"loss/train/{d}")] for d in ("synth-a", "synth-b")]
    for total, a, b in zip(loss, *per_ds):
        assert min(a, b) - 1e-6 <= total <= max(a, b) + 1e-6 and a != b
    assert all(0 < e.value < 100 for e in acc.Scalars("perf/mfu_pct"))  # percent
    assert all(e.value > 0 for e in acc.Scalars("perf/tokens_per_s"))
    assert acc.Scalars("optim/lr")[-1].value == pytest.approx(1e-2)
    assert acc.Scalars("loss/valid/synth-val")[-1].value == pytest.approx(res["valid"]["synth-val"], rel=1e-5)
    # Gates: tanh values, 0 at the start (AF1 initialises them to 0), opened by training.
    for g in gates:
        vals = [e.value for e in acc.Scalars(g)]
        assert all(-1 < v < 1 for v in vals) and abs(vals[-1]) > 0, (g, vals)
    # Task metrics at every eval step, under ZeRO-3 on both ranks; rank 0's numbers in the result too.
    acc_pts = acc.Scalars("eval/tiny-val/accuracy")
    assert [e.step for e in acc_pts] == [5, 10] and all(0 <= e.value <= 1 for e in acc_pts)
    assert acc_pts[-1].value == pytest.approx(res["eval"]["tiny-val"]["accuracy"])
    log = [json.loads(l) for l in (tmp / "ref" / "eval_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [5, 10] and log[-1]["tiny-val"] == res["eval"]["tiny-val"]
    texts = set(acc.Tags()["tensors"])  # text summaries: "<tag>/text_summary"
    assert {"eval/tiny-val/samples/text_summary", "config/text_summary"} <= texts
    table = acc.Tensors("eval/tiny-val/samples/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert table.startswith("| prompt | prediction | references |") and table.count("\n") == 2 + 4 - 1
    # The resolved config, once, in this run's own HPARAMS (not a sub-run).
    hp = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(hp["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["train.lr"].number_value == pytest.approx(1e-2)
    assert start.hparams["train.eval_benchmarks"].string_value == '["tiny-val"]'


def test_exact_resume_after_kill9(ref):
    tmp, res = ref
    lm = str(tmp / "lm")  # frozen weights are re-read from the LM source on resume, as in real runs
    proc, _, wall = launch(tmp, "crash", kill_at_step=4, lm_path=lm)
    assert proc.returncode != 0  # rank 0 was SIGKILLed; the job must not hang or report success
    assert wall < 120
    ckpt = tmp / "crash" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step-00000004"
    proc, resumed, _ = launch(tmp, "crash", lm_path=lm)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert resumed["resumed_from"] == "step-00000004"
    assert resumed["losses"] == res["losses"][4:]  # bit for bit


def test_zero2_zero3_single_process_agree(ref):
    tmp, _ = ref
    # zero.Init draws the LM's random init differently, so compare runs that all build it unpartitioned.
    # The ZeRO-3 run also uses non-reentrant activation checkpointing (frozen LM, partitioned params).
    proc, z3, _ = launch(tmp, "z3", deepspeed={"zero_init": False},
                         train={"max_steps": 6, "save_steps": 100, "gradient_checkpointing": True})
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc, z2, _ = launch(tmp, "z2", ds="ds_configs/zero2.json", train={"max_steps": 6, "save_steps": 100})
    assert proc.returncode == 0, proc.stderr[-4000:]
    # One process playing both ranks' data with accumulation 2 sees the same global batches.
    proc, single, _ = launch(tmp, "single", nproc=1, ds="ds_configs/zero2.json", emulate_world=2,
                             deepspeed={"overrides": {"zero_optimization.stage": 0}},
                             train={"max_steps": 6, "save_steps": 100, "gradient_accumulation_steps": 2})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert z3["losses"][-1] < z3["losses"][0] - 0.1
    # Same first two steps to float precision; from then on Adam (sign-like early updates of
    # near-zero gradients) amplifies reduction-order differences a little.
    for other in (z2["losses"], single["losses"]):
        assert other[:2] == pytest.approx(z3["losses"][:2], rel=1e-5)
        assert other == pytest.approx(z3["losses"], rel=2e-3)


def test_universal_checkpoint_two_ranks_to_one(ref):
    tmp, res = ref
    # Resume the 2-rank step-8 checkpoint on 1 rank that replays both ranks' data from batch 8:
    # the next two steps must match the 2-rank run's steps 9 and 10.
    proc, uni, _ = launch(tmp, "uni", nproc=1, emulate_world=2, loader_start_pos=8, lm_path=str(tmp / "lm"),
                          train={"resume": str(tmp / "ref" / "checkpoints" / "step-00000008"),
                                 "gradient_accumulation_steps": 2, "save_steps": 100})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert uni["resumed_from"] == "step-00000008-universal"
    # Conversion and new checkpoints land in the new run, never in the run resumed from.
    assert sorted(p.name for p in (tmp / "ref" / "checkpoints").iterdir() if p.name.startswith("step-")) == [
        "step-00000004", "step-00000008", "step-00000010"]
    assert (tmp / "uni" / "checkpoints" / "latest").read_text() == "step-00000010"
    assert uni["losses"] == pytest.approx(res["losses"][8:], rel=2e-4, abs=1e-5)


def test_nonfinite_skip_signal_stop_resume_and_abort(tmp_path):
    # Micro-batch 1 overflows (skipped, counted); SIGUSR1 arrives while batch 3 is fetched: the step in
    # flight (step 3) finishes, a checkpoint is saved, the run stops; the rerun resumes and completes.
    proc, res, _ = launch(tmp_path, "nan", nproc=1, nonfinite_at=[[0, 1]], signal_at_batch=3,
                          train={"max_steps": 5, "save_steps": 100})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "non-finite loss, micro-batch skipped" in proc.stdout + proc.stderr
    assert res["skipped"] == 1 and all(x == x for x in res["losses"])
    assert res["stopped_by_signal"] and res["step"] == 3
    assert (tmp_path / "nan" / "checkpoints" / "latest").read_text() == "step-00000003"
    proc, res2, _ = launch(tmp_path, "nan", nproc=1, nonfinite_at=[[0, 1]], train={"max_steps": 5, "save_steps": 100})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert res2["resumed_from"] == "step-00000003" and res2["step"] == 5 and len(res2["losses"]) == 2
    assert res2["skipped"] == 1  # the counter survives the restart
    # A stop signal during start-up (before deepspeed.initialize): resumed, no step, nothing saved, exit 75.
    proc, res3, _ = launch(tmp_path, "nan", nproc=1, signal_before_trainer=True, train={"max_steps": 7})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert res3["stopped_by_signal"] and res3["step"] == 5 and res3["losses"] == []
    assert res3["resumed_from"] == "step-00000005"
    assert (tmp_path / "nan" / "checkpoints" / "latest").read_text() == "step-00000005"
    assert "stopped by signal before the first step" in proc.stdout + proc.stderr
    # N non-finite micro-batches in a row abort (non-zero exit) without a checkpoint.
    proc, _, _ = launch(tmp_path, "nan3", nproc=1, nonfinite_at=[[0, 1], [0, 2], [0, 3]],
                        train={"max_steps": 4, "max_consecutive_nonfinite": 3})
    assert proc.returncode != 0
    assert "3 non-finite losses in a row" in proc.stderr
    assert not (tmp_path / "nan3" / "checkpoints" / "latest").exists()


def test_init_from_our_deepspeed_checkpoint_dir(ref):
    """Stage init (SFT from pretraining) reads our ZeRO-3 checkpoint directory into a fresh model."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from megaflamingo.engine.build import build_run_model, build_run_tokenizer, load_init_weights
    from megaflamingo.testing.tiny_task import make_config, tiny_raw_config

    tmp, _ = ref
    cfg = make_config(tiny_raw_config())
    tok, ids = build_run_tokenizer(cfg)
    torch.manual_seed(5)
    model = build_run_model(cfg, tok, ids, None)
    info = load_init_weights(model, str(tmp / "ref" / "checkpoints"), rank=0)  # follows `latest`
    assert info["loaded"] > 0 and not [m for m in info["missing"] if "gated_cross_attn" in m]
    want = get_fp32_state_dict_from_zero_checkpoint(str(tmp / "ref" / "checkpoints"), tag="step-00000010")
    got = dict(model.named_parameters())
    for k in ("audio_transformer.layer_norm.weight",):
        assert k in got
    for k, v in want.items():
        if k in got:
            assert torch.equal(got[k].detach(), v.detach().to(got[k].dtype)), k


@pytest.mark.parametrize("ds", ["ds_configs/zero3.json", "ds_configs/zero2.json"])
def test_init_from_is_read_by_rank_zero_only(ref, tmp_path, ds):
    """Two ranks initialise from the reference checkpoint: only rank 0 reads it (an AF1-size file
    per rank would exhaust a node's memory), yet after DeepSpeed start-up both ranks hold exactly the
    checkpoint's tensors (ZeRO-3 partitions and ZeRO-2 replicas alike)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    src, _ = ref
    ckpt = src / "ref" / "checkpoints"
    name = "init_" + Path(ds).stem
    proc, _, _ = launch(tmp_path, name, ds=ds, init_from=str(ckpt), train={"max_steps": 1})
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"{name}.json.rank{r}").read_text()) for r in (0, 1)]
    assert [r["reads"] for r in ranks] == [1, 0]
    want = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=(ckpt / "latest").read_text().strip())
    checked = 0
    for key, v in want.items():
        if key in ranks[0]["sums"]:
            expect = [float(v.detach().double().sum()), float(v.detach().double().abs().sum())]
            for r in ranks:
                assert r["sums"][key] == pytest.approx(expect, rel=1e-6, abs=1e-6), (key, r["sums"][key], expect)
            checked += 1
    assert checked >= 20


def test_init_from_error_on_rank_zero_reaches_every_rank(tmp_path):
    """A checkpoint that rank 0 cannot read stops every rank promptly with its message; no rank is
    left waiting in a collective until the timeout."""
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    proc, _, secs = launch(tmp_path, "init_bad", init_from=str(bad), train={"max_steps": 1}, timeout=120)
    assert proc.returncode != 0
    msgs = {r: json.loads((tmp_path / f"init_bad.json.rank{r}").read_text())["error"] for r in (0, 1)}
    assert "rank 0 could not read it" in msgs[1] and "bad.pt" in msgs[1]
    assert secs < BASE_TRAIN["dist_timeout_s"]
