"""Fast, single-process unit tests of the engine pieces (no process group)."""
import json
import os
from pathlib import Path

import pytest
import torch

from megaflamingo.config import ConfigError
from megaflamingo.engine import checkpointing as ck
from megaflamingo.engine.distributed import discover_env
from megaflamingo.engine.ds_config import build_ds_config
from megaflamingo.engine.flops import flop_spec
from megaflamingo.engine.optim import lr_lambda, param_groups
from megaflamingo.testing.tiny_task import SyntheticBatches, make_config, tiny_raw_config
from megaflamingo.model.loss import token_losses


def cfg_with(**train):
    raw = tiny_raw_config()
    raw["train"] = dict({"micro_batch_size": 3, "gradient_accumulation_steps": 2, "grad_clip": 0.5,
                         "precision": "bf16", "max_steps": 10}, **train)
    return make_config(raw)


# ------------------------------------------------------------------ DeepSpeed config merge


def test_ds_merge_fills_train_numbers_and_auto_buckets():
    cfg = cfg_with()
    ds = build_ds_config(cfg, world_size=4, hidden_size=64, ds_json={
        "_comment": "x", "train_micro_batch_size_per_gpu": "auto", "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                              "stage3_param_persistence_threshold": "auto"}})
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 3 * 2 * 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    z = ds["zero_optimization"]
    assert z["reduce_bucket_size"] == 64 * 64 and z["stage3_param_persistence_threshold"] == 640
    assert "_comment" not in ds


@pytest.mark.parametrize("key,value,field", [
    ("train_micro_batch_size_per_gpu", 8, "train.micro_batch_size"),
    ("gradient_accumulation_steps", 1, "train.gradient_accumulation_steps"),
    ("train_batch_size", 7, "world size"),
    ("gradient_clipping", 1.0, "train.grad_clip"),
])
def test_ds_merge_contradiction_is_a_clear_error(key, value, field):
    with pytest.raises(ConfigError) as e:
        build_ds_config(cfg_with(), 2, ds_json={key: value, "zero_optimization": {"stage": 2}})
    assert key in str(e.value) and field in str(e.value)


def test_ds_merge_precision_contradiction_and_refused_sections():
    with pytest.raises(ConfigError, match="fp16.*train.precision|enabled.*train.precision"):
        build_ds_config(cfg_with(), 1, ds_json={"fp16": {"enabled": True}})
    with pytest.raises(ConfigError, match="optimizer"):
        build_ds_config(cfg_with(), 1, ds_json={"optimizer": {"type": "AdamW"}})
    with pytest.raises(ConfigError, match="zero_optimization.reduce_bucket_size"):
        build_ds_config(cfg_with(), 1, hidden_size=None,
                        ds_json={"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}})


def test_ds_merge_overrides_and_shipped_jsons():
    raw = tiny_raw_config()
    raw["train"] = {"micro_batch_size": 2, "gradient_accumulation_steps": 1, "precision": "fp32"}
    for name, stage in (("zero2.json", 2), ("zero3.json", 3), ("zero3_offload.json", 3)):
        raw["deepspeed"] = {"config": f"ds_configs/{name}", "overrides": {"zero_optimization.overlap_comm": False}}
        ds = build_ds_config(make_config(raw), 2, hidden_size=64)
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["zero_optimization"]["overlap_comm"] is False
        assert ds["train_batch_size"] == 4


# ------------------------------------------------------------------ optimizer and schedules


@pytest.fixture(scope="module")
def tiny_model():
    from megaflamingo.engine.build import build_run_model, build_run_tokenizer

    cfg = cfg_with(precision="fp32")
    tok, ids = build_run_tokenizer(cfg)
    torch.manual_seed(0)
    return build_run_model(cfg, tok, ids, None), ids, len(tok)


def test_param_groups_decay_only_xattn_and_skip_frozen(tiny_model):
    model, _, _ = tiny_model
    groups = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = [names[id(p)] for p in groups[0]["params"]]
    no_decay = [names[id(p)] for p in groups[1]["params"]]
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decay and all("gated_cross_attn" in n for n in decay)
    assert no_decay and all(n.startswith("audio_transformer") for n in no_decay)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(decay) | set(no_decay) == trainable
    assert not any("decoder_layer" in n or "embed" in n for n in trainable)


def test_optimizer_falls_back_when_fused_adam_cannot_be_built(tiny_model, monkeypatch, caplog):
    """On a GPU node without a CUDA toolkit DeepSpeed's FusedAdam fails to JIT-build: the run goes on
    with torch's fused AdamW (same update rule) and says so, instead of dying at start-up."""
    import logging

    import deepspeed.ops.adam as ds_adam

    from megaflamingo.engine.optim import build_optimizer

    model, _, _ = tiny_model
    t = make_config(tiny_raw_config()).train

    def broken(*a, **kw):
        raise RuntimeError("Error building extension 'fused_adam'\nnvcc not found")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ds_adam, "FusedAdam", broken)
    with caplog.at_level(logging.WARNING, logger="megaflamingo.train"):
        opt = build_optimizer(model, t)
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True
    assert opt.param_groups[0]["weight_decay"] == t.weight_decay and opt.defaults["lr"] == t.lr
    assert "FusedAdam unavailable (RuntimeError: Error building extension 'fused_adam')" in caplog.text


def test_lr_schedules():
    cfg = cfg_with(warmup_steps=10, lr_scheduler="constant")
    f = lr_lambda(cfg.train, None)
    assert [f(s) for s in (0, 5, 10, 1000)] == [0.0, 0.5, 1.0, 1.0]
    cfg = cfg_with(warmup_steps=10, lr_scheduler="cosine", min_lr_ratio=0.1)
    f = lr_lambda(cfg.train, 110)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    cfg = cfg_with(warmup_steps=0, lr_scheduler="linear")
    f = lr_lambda(cfg.train, 100)
    assert f(0) == 1.0 and f(50) == pytest.approx(0.5) and f(100) == 0.0
    with pytest.raises(ValueError, match="max_steps"):
        lr_lambda(cfg.train, None)


def test_token_losses_match_hf_loss(tiny_model):
    model, ids, vocab = tiny_model
    batch = SyntheticBatches(ids, vocab, micro_batch=3, windows_per_audio=4, embed_dim=32).make(0, 0)
    model.eval()
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], audio_embeds=batch["audio_embeds"],
                    audio_mask=batch["audio_mask"], labels=batch["labels"])
    s, c = token_losses(out.logits, batch["labels"])
    assert int(c.sum()) == int((batch["labels"][:, 1:] != -100).sum()) > 0
    torch.testing.assert_close(s.sum() / c.sum(), out.loss, rtol=1e-5, atol=1e-6)


def test_flop_counting_frozen_4x_trainable_6x():
    lin_frozen = torch.nn.Linear(8, 4, bias=False).requires_grad_(False)
    lin_train = torch.nn.Linear(4, 8, bias=False)
    spec = flop_spec(torch.nn.Sequential(lin_frozen, lin_train))
    assert spec.text_linear == 4 * 32 + 6 * 32
    assert spec.per_batch(2, 5, 0) == 2 * 5 * (4 * 32 + 6 * 32)


def test_flop_spec_of_audio_flamingo_includes_attention_terms(tiny_model):
    model, _, _ = tiny_model
    spec = flop_spec(model)
    assert spec.lm_layers == 2 and spec.lm_width == 64
    assert spec.xattn_blocks == 2 and spec.xattn_inner == 32
    assert spec.audio_layers == 1 and spec.audio_width == 32
    base = spec.per_batch(1, 10, 4)
    longer = spec.per_batch(1, 20, 4)
    assert longer > 2 * base  # attention grows quadratically in T
    head = model.lang_encoder.get_output_embeddings()
    assert spec.head_linear == (6.0 if head.weight.requires_grad else 4.0) * head.weight.numel() > 0
    # supervised-only logits: the head runs on 3 of the 10 rows
    assert spec.per_batch(1, 10, 4, head_rows=3) == pytest.approx(base - 7 * spec.head_linear)


# ------------------------------------------------------------------ launcher discovery


def test_discover_env_mpi_and_slurm():
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    w = discover_env(env)
    assert (w.rank, w.world_size, w.local_rank, w.launcher) == (3, 4, 1, "mpi")
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["RANK"] == "3"
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_STEP_ID": "0",
           "SLURM_STEP_NODELIST": "zzznode[7-8]", "SLURM_JOB_ID": "123", "PATH": ""}
    w = discover_env(env)
    assert (w.rank, w.world_size, w.launcher) == (1, 2, "slurm")
    assert env["MASTER_ADDR"] == "zzznode7" and env["MASTER_PORT"] == str(20123)
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert discover_env(env).launcher == "torch"
    env = {}
    w = discover_env(env)
    assert (w.rank, w.world_size, w.launcher) == (0, 1, "single") and int(env["MASTER_PORT"]) > 0


# ------------------------------------------------------------------ checkpoint bookkeeping


class FakeEngine:
    def __init__(self, crash=False):
        self.crash = crash

    def save_checkpoint(self, save_dir, tag, save_latest):
        assert save_latest is False  # DeepSpeed's own `latest` would be written before other ranks finish
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        with open(os.path.join(save_dir, tag, "shard.pt"), "w") as f:
            f.write("x")
        if self.crash:
            raise KeyboardInterrupt("killed mid-save")


def test_latest_only_points_to_complete_checkpoints_and_keep_last(tmp_path):
    m = ck.CheckpointManager(tmp_path, rank=0, world_size=1, keep_last=2)
    for step in (10, 20, 30):
        m.save(FakeEngine(), step, {"config_hash": "h"}, {"loader": {"pos": step}})
    assert m.latest_tag() == "step-00000030"
    assert m.complete_tags() == ["step-00000020", "step-00000030"]  # keep-last-K
    with pytest.raises(KeyboardInterrupt):
        m.save(FakeEngine(crash=True), 40, {}, {})
    assert (tmp_path / "checkpoints" / "step-00000040").is_dir()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000030"
    assert m.latest_tag() == "step-00000030"
    (tmp_path / "checkpoints" / "latest").unlink()  # even without `latest`, only complete tags count
    assert m.latest_tag() == "step-00000030"
    st = torch.load(tmp_path / "checkpoints" / "step-00000030" / "megaflamingo_rank0.pt", weights_only=True)
    assert st["loader"] == {"pos": 30}
    meta = json.loads((tmp_path / "checkpoints" / "step-00000030" / "megaflamingo.json").read_text())
    assert meta["step"] == 30 and meta["world_size"] == 1


def test_shards_are_fsynced_before_the_marker(tmp_path, monkeypatch):
    synced = []

    def record(path):
        marker = tmp_path / "checkpoints" / "step-00000010" / ck.MARKER
        synced.append((Path(path).name, marker.exists()))

    monkeypatch.setattr(ck, "fsync_path", record)
    ck.CheckpointManager(tmp_path, rank=0, world_size=1, keep_last=2).save(FakeEngine(), 10, {}, {})
    before_marker = {name for name, marker_there in synced if not marker_there}
    assert {"shard.pt", "megaflamingo_rank0.pt", "step-00000010"} <= before_marker
    assert ("checkpoints", True) in synced  # the directory holding `latest`, after the renames


def test_each_rank_fsyncs_only_its_own_files(tmp_path, monkeypatch):
    names = ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt",
             "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero_pp_rank_12_mp_rank_00_optim_states.pt",
             "mp_rank_00_model_states.pt", "megaflamingo_rank1.pt", "megaflamingo_rank0.pt"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    monkeypatch.setattr(ck, "fsync_path", lambda p: None)
    got = {r: sorted(f.name for f in ck.fsync_own_files(tmp_path, r)) for r in (0, 1, 12)}
    assert got[0] == sorted([names[0], names[4], names[6]])
    assert got[1] == sorted([names[1], names[2], names[5]])
    assert got[12] == [names[3]]


def test_rng_state_roundtrip_weights_only(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(1)
    st = ck.rng_state()
    torch.save(st, tmp_path / "r.pt")
    a = (torch.rand(3), np.random.rand(2), random.random())
    ck.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True))
    b = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]


def test_config_hash_ignores_bookkeeping_only():
    a = cfg_with(run_dir="a", max_steps=5).to_dict()
    b = cfg_with(run_dir="b", max_steps=9).to_dict()
    c = cfg_with(lr=1e-3).to_dict()
    assert ck.config_hash(a) == ck.config_hash(b) != ck.config_hash(c)


def test_synthetic_batches_resume_exactly():
    from megaflamingo.testing import tiny_tokenizer, token_ids

    tok = tiny_tokenizer()
    ids = token_ids(tok)
    a = SyntheticBatches(ids, len(tok), num_batches=5)
    it = iter(a)
    next(it), next(it)
    st = a.state_dict()
    rest = [b["input_ids"] for b in it]
    b = SyntheticBatches(ids, len(tok), num_batches=5)
    b.load_state_dict(st)
    again = [x["input_ids"] for x in b]
    assert len(rest) == 3 and all(torch.equal(x, y) for x, y in zip(rest, again))


def test_init_from_af1_checkpoint_file(tiny_model, tmp_path):
    """An AF1-style .pt (model_state_dict with AF1's duplicate aliases and clap.* keys) initialises a
    freshly built model exactly."""
    from megaflamingo.compat import af1
    from megaflamingo.engine.build import build_run_model, build_run_tokenizer, load_init_weights

    src, _, _ = tiny_model
    sd = af1.export_state_dict(src)
    sd["clap.some.weight"] = torch.zeros(2)
    torch.save({"model_state_dict": sd}, tmp_path / "checkpoint_99.pt")
    cfg = cfg_with(precision="fp32")
    tok, ids = build_run_tokenizer(cfg)
    torch.manual_seed(99)
    dst = build_run_model(cfg, tok, ids, None)
    assert not torch.equal(dst.audio_transformer.layer_norm.weight, src.audio_transformer.layer_norm.weight) or \
        not all(torch.equal(a, b) for a, b in zip(dst.parameters(), src.parameters()))
    info = load_init_weights(dst, str(tmp_path / "checkpoint_99.pt"), rank=0)
    assert info["missing"] == []
    for (n, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="unexpected"):
        torch.save({"model_state_dict": {"lang_encoder.nonsense": torch.zeros(1)}}, tmp_path / "bad.pt")
        load_init_weights(dst, str(tmp_path / "bad.pt"), rank=0)


def test_build_lm_sizes_embeddings_to_the_tokenizer_like_af1():
    """AF1 resizes the LM to len(tokenizer) in both directions (OPT ships 50272 rows for 50268
    tokens), so its checkpoints only load into an LM sized the same way."""
    from megaflamingo.config import load_config
    from megaflamingo.model.build import build_lm
    from megaflamingo.testing import tiny_lm_config_dict

    for rows in (520, 500):
        cfg = load_config()
        cfg.model.lm_config = tiny_lm_config_dict("opt", vocab_size=rows)
        lm = build_lm(cfg.model, 512)
        assert lm.get_input_embeddings().num_embeddings == 512
        assert lm.get_output_embeddings().weight.shape[0] == 512


_RANK0_WORK = """
import datetime, json, os, sys, time
import torch.distributed as dist
from megaflamingo.engine.distributed import on_rank0_others_wait

rank, mode, out = int(os.environ["RANK"]), sys.argv[1], sys.argv[2]
# A collective timeout far shorter than rank 0's work: only the helper's own timeout may apply.
dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=2))

def work():
    time.sleep(5)
    if mode == "fail":
        raise ValueError("disk full")
    open(out + ".done", "w").close()

try:
    on_rank0_others_wait(work, rank, timeout_s=60, what="the test job")
    res = {"ok": os.path.exists(out + ".done")}
except Exception as e:
    res = {"error": f"{type(e).__name__}: {e}"}
dist.barrier()
json.dump(res, open(f"{out}.rank{rank}", "w"))
dist.destroy_process_group()
"""


@pytest.mark.parametrize("mode", ["ok", "fail"])
def test_rank0_work_outlasts_the_collective_timeout_and_reports_errors(tmp_path, mode):
    """Universal-checkpoint conversion runs on rank 0 for minutes; the other ranks must wait for it
    (not die at dist_timeout_s) and must see its failure instead of hanging."""
    import socket
    import subprocess
    import sys

    script = tmp_path / "job.py"
    script.write_text(_RANK0_WORK)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "res")
    procs = [subprocess.Popen([sys.executable, str(script), mode, out], cwd=Path(__file__).parents[2],
                              env=dict(os.environ, RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in procs:
        p.communicate(timeout=120)
    res = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)]
    if mode == "ok":
        assert res == [{"ok": True}, {"ok": True}]
    else:
        assert res[0] == {"error": "ValueError: disk full"}
        assert "rank 0 failed the test job" in res[1]["error"] and "disk full" in res[1]["error"]
