"""Run the engine on the tiny real AudioFlamingo + SyntheticBatches; launched by the engine tests
as `python worker.py SPEC.json` or under torchrun. Not a test module (no test_ prefix)."""
import json
import os
import signal
import sys

import torch


class Interleave:
    """One process playing several ranks' data: micro-batches of rank 0, 1, ... in turn (so a
    single process with accumulation = world sees the same global batches as the multi-rank run)."""

    def __init__(self, loaders):
        self.loaders = loaders

    def __len__(self):
        return len(self.loaders[0]) * len(self.loaders)

    def set_epoch(self, e):
        for l in self.loaders:
            l.set_epoch(e)

    def state_dict(self):
        return [l.state_dict() for l in self.loaders]

    def load_state_dict(self, st):
        for l, s in zip(self.loaders, st):
            l.load_state_dict(s)

    def __iter__(self):
        its = [iter(l) for l in self.loaders]
        while True:
            for it in its:
                b = next(it, None)
                if b is None:
                    return
                yield b


def main(spec_path):
    spec = json.load(open(spec_path))
    from megaflamingo.engine.build import build_run_model, build_run_tokenizer
    from megaflamingo.engine.distributed import device_for, discover_env, init_distributed
    from megaflamingo.engine.ds_config import build_ds_config
    from megaflamingo.engine.run import seed_everything
    from megaflamingo.testing.tiny_task import SyntheticBatches, make_config, tiny_raw_config
    from megaflamingo.engine.trainer import Trainer

    torch.set_num_threads(1)
    world = discover_env()
    raw = tiny_raw_config()
    raw["train"] = spec["train"]
    raw["deepspeed"] = spec.get("deepspeed", {})
    raw["data"] = spec.get("data", {})
    if spec.get("lm_path"):  # a saved HF checkpoint: exercises from_pretrained (under zero.Init with ZeRO-3)
        raw["model"]["lm"], raw["model"]["lm_config"] = spec["lm_path"], None
    cfg = make_config(raw)
    device = device_for(world)
    init_distributed(world, cfg.train.dist_timeout_s)
    seed_everything(cfg.train.seed, world.rank)
    tok, ids = build_run_tokenizer(cfg)
    ds = build_ds_config(cfg, world.world_size, hidden_size=64)
    # The tiny OPT has no dropout; AF1's audio transformer keeps its 0.1 (so RNG restore matters).
    model = build_run_model(cfg, tok, ids, ds)
    # which parameters zero.Init did not partition while the model was built (ZeRO-3 + zero_init: none)
    whole_at_build = sorted(n for n, p in model.named_parameters() if not hasattr(p, "ds_id"))
    if spec.get("init_from"):
        return init_from_and_report(spec, model, cfg, world, device, ds)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()  # non-reentrant (AudioFlamingo always is)
    kw = dict(micro_batch=cfg.train.micro_batch_size, num_batches=spec.get("num_batches", 64),
              windows_per_audio=4, embed_dim=32, seed=7,
              nonfinite_at=[tuple(x) for x in spec.get("nonfinite_at", [])])
    emulate = int(spec.get("emulate_world", 1))
    if emulate > 1:
        loader = Interleave([SyntheticBatches(ids, len(tok), rank=r, world_size=emulate, **kw) for r in range(emulate)])
    else:
        loader = SyntheticBatches(ids, len(tok), rank=world.rank, world_size=world.world_size, **kw)
    if spec.get("loader_start_pos"):  # replay another run's data position (universal-checkpoint test)
        for l in getattr(loader, "loaders", [loader]):
            l.pos = int(spec["loader_start_pos"])
    valid = {}
    if spec.get("valid"):
        valid = {"synth-val": SyntheticBatches(ids, len(tok), rank=world.rank, world_size=world.world_size,
                                               **dict(kw, num_batches=2, seed=99))}
    if spec.get("signal_at_batch") is not None:  # SIGUSR1 to ourselves while batch k is being fetched
        inner, k = loader, int(spec["signal_at_batch"])

        class Signalling:
            def __len__(self):
                return len(inner)

            def state_dict(self):
                return inner.state_dict()

            def load_state_dict(self, st):
                inner.load_state_dict(st)

            def __iter__(self):
                for b in inner:
                    if inner.pos - 1 == k:
                        os.kill(os.getpid(), signal.SIGUSR1)
                    yield b

        loader = Signalling()
    if spec.get("signal_before_trainer"):  # a SIGTERM during start-up, after the CLI's early handler
        from megaflamingo.engine import stop

        stop.install()
        os.kill(os.getpid(), signal.SIGTERM)
    kill_at = spec.get("kill_at_step")
    task_eval = None
    if cfg.train.eval_benchmarks:  # generation-based task metrics on an Arrow split (engine.evaluation)
        from megaflamingo.engine.evaluation import TaskEval

        task_eval = TaskEval.from_config(cfg, tok, ids)
    trainer = Trainer(cfg, model, loader, valid, world, device, ds_config=ds, task_eval=task_eval)
    if kill_at and world.rank == 0:
        orig = trainer._save

        def save_then_maybe_die():
            orig()
            if trainer.step >= kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # a hard crash right after step k's checkpoint

        trainer._save = save_then_maybe_die
    res = trainer.train()
    if world.rank == 0:
        out = {"stopped_by_signal": res.stopped_by_signal, "losses": res.losses, "step": res.step, "skipped": res.nonfinite_skipped,
               "resumed_from": res.resumed_from, "valid": res.valid, "eval": res.eval, "trainable": trainer.trainable,
               "frozen": trainer.frozen, "whole_at_build": whole_at_build,
               "model_class": type(model).__mro__[1].__name__}
        with open(spec["result"], "w") as f:
            json.dump(out, f)


def init_from_and_report(spec, model, cfg, world, device, ds):
    """Stage init on every rank, then DeepSpeed start-up; each rank reports how often it read the
    checkpoint and a checksum of every (gathered) parameter and buffer it ends up with."""
    import deepspeed

    from megaflamingo.engine import build
    from megaflamingo.engine.trainer import Trainer

    reads = []
    orig = build._read_init_weights
    build._read_init_weights = lambda m, p: reads.append(str(p)) or orig(m, p)
    try:
        build.load_init_weights(model, spec["init_from"], world.rank)
    except Exception as e:  # noqa: BLE001 - reported to the test
        with open(f"{spec['result']}.rank{world.rank}", "w") as f:
            json.dump({"error": str(e)}, f)
        raise
    trainer = Trainer(cfg, model, [], {}, world, device, ds_config=ds)
    module = trainer.engine.module
    sums = {}
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        with deepspeed.zero.GatheredParameters([t] if hasattr(t, "ds_id") else []):
            sums[name] = [float(t.detach().double().sum()), float(t.detach().double().abs().sum())]
    with open(f"{spec['result']}.rank{world.rank}", "w") as f:
        json.dump({"reads": len(reads), "sums": sums}, f)


if __name__ == "__main__":
    from megaflamingo.engine.distributed import shutdown

    # As the trainer: tear the process group down before interpreter exit, or a rank that finished
    # cleanly can abort ("terminate called without an active exception") and fail the launch.
    try:
        main(sys.argv[1])
    finally:
        shutdown()
