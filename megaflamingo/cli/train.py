"""megaflamingo-train --config CFG [key=value ...] [--dry-run [--json]] [--resume auto|none|DIR]
[--placeholder NAME=VALUE].

Runs as one process or under deepspeed / torchrun / srun / mpirun (see ``distributed.discover_env``).
Exit codes: 0 done; 2 bad config or data (one message, before training), a checkpoint that was refused
or does not verify, or a run dir another job holds; 75 stopped by SIGUSR1/SIGTERM after saving a
checkpoint, or without one when the signal came before the first step (requeue and rerun with
``--resume auto``); 1 anything else (too much bad data: one message).

From the start, a worker exits when its launcher dies (``engine.parent_watch``), and no ``torch.load``
in the process can unpickle code (``checkpoint.safe_load``).
"""
from __future__ import annotations

import argparse
import logging
import sys

from megaflamingo.checkpoint.integrity import CheckpointError
from megaflamingo.checkpoint.safe_load import install_guard
from megaflamingo.checkpoint.tag_manifest import TagVerificationError
from megaflamingo.config import ConfigError, load_config
from megaflamingo.engine import parent_watch, stop
from megaflamingo.engine.checkpointing import ResumeError
from megaflamingo.engine.data_health import BadDataError
from megaflamingo.engine.run_lock import RunLockedError
from megaflamingo.engine.trainer import EXIT_SIGNAL, NonFiniteLossError

AGREED = (RunLockedError, ResumeError, TagVerificationError, BadDataError, NonFiniteLossError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megaflamingo-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="stage YAML (ours or AF1's dialect)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=3e-5")
    p.add_argument("--dry-run", action="store_true", help="validate config and data, print the plan, exit")
    p.add_argument("--json", action="store_true",
                   help="with --dry-run: print the plan as one JSON document on stdout (logs go to stderr)")
    p.add_argument("--resume", default=None, help="auto (default from config) | none | checkpoint dir")
    p.add_argument("--placeholder", action="append", default=[], metavar="NAME=VALUE",
                   help="value for a ${NAME} / YOUR_NAME placeholder in the config (repeatable)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None) -> int:
    # First thing: from here on SIGUSR1/SIGTERM only set a flag (the trainer honours it, even one that
    # arrived during start-up) instead of killing the process before anything could be saved.
    old_handlers = stop.install()
    unguard = install_guard()
    try:
        return _main(argv)
    finally:
        unguard()
        stop.restore(old_handlers)


def _main(argv=None) -> int:
    from megaflamingo.cli import results_only_on_stdout

    args = parse_args(argv)
    from megaflamingo.engine.distributed import discover_env

    world = discover_env()
    parent_watch.install(world.launcher, world.world_size)
    logging.basicConfig(level=logging.INFO if world.rank == 0 else logging.WARNING,
                        format=f"[rank{world.rank}] %(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        placeholders = {}
        for item in args.placeholder:
            if "=" not in item:
                raise ConfigError(f"--placeholder {item!r}: expected NAME=VALUE")
            k, _, v = item.partition("=")
            placeholders[k] = v
        overrides = list(args.overrides)
        if args.resume is not None:
            overrides.append(f"train.resume={args.resume}")
        cfg = load_config(args.config, overrides, placeholders)
        # After the config is read, so a bad config is one line, without DeepSpeed's import notices.
        results_only_on_stdout()
        from megaflamingo.engine.build import lm_hidden_size, preflight
        from megaflamingo.engine.checkpointing import resolve_resume
        from megaflamingo.engine.ds_config import build_ds_config

        preflight(cfg)
        resolve_resume(cfg.train.resume, cfg.train.run_dir)  # a --resume that points at nothing fails here
        # JSON contradictions fail here, before any process group exists.
        build_ds_config(cfg, world.world_size, hidden_size=lm_hidden_size(cfg))
    except (ConfigError, FileNotFoundError, CheckpointError) as e:
        if world.rank == 0:
            print(f"megaflamingo-train: error: {e}", file=sys.stderr)
        return 2
    from megaflamingo.engine.distributed import shutdown
    from megaflamingo.engine.run import run

    try:
        result = run(cfg, world, dry_run=args.dry_run, plan_json=args.json)
    except (RunLockedError, CheckpointError, BadDataError, NonFiniteLossError) as e:
        # Every rank reaches the same verdict on these (one broadcast, a gathered verification, summed
        # counts, the non-finite vote), so rank 0 says it once; a refusal on one rank only (a file that
        # changed after verification) is said by that rank.
        if world.rank == 0 or not isinstance(e, AGREED):
            print(f"megaflamingo-train: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, (BadDataError, NonFiniteLossError)) else 2
    finally:
        shutdown()
    if result is not None and result.stopped_by_signal:
        return EXIT_SIGNAL
    return 0


if __name__ == "__main__":
    sys.exit(main())
