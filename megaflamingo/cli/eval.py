"""`megaflamingo-eval`: AF1's benchmark suite (or any registry entry) on a model, beside the paper.

    megaflamingo-eval --model MODEL --data-root ARROW_ROOT --benchmarks af1 --out DIR
    megaflamingo-eval --model MODEL --data-root ARROW_ROOT --benchmarks cochlscene,clotho-v2-caption \\
        --out DIR [--limit N] [--resume] [--registry FILE] [--batch-size B]
    torchrun --nproc_per_node 8 -m megaflamingo.cli.eval --model ... --out DIR     # items split over ranks
    megaflamingo-eval --compare A/results.json B/results.json
    megaflamingo-eval --list [--registry FILE]

Writes DIR/<benchmark>.predictions.jsonl (appended as it goes; --resume continues a killed run),
DIR/results.json (benchmark -> metrics, n, settings) and DIR/results.md (ours beside AF1's paper).
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megaflamingo-eval", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="exported model dir, DeepSpeed checkpoint dir, or AF1 .pt (with --config)")
    p.add_argument("--data-root", help="root of the preprocessed Arrow splits (<Dataset>-<Task>/<split>)")
    p.add_argument("--benchmarks", default="af1", help="NAME[,NAME...] from the registry, or 'af1' (every "
                   "registry benchmark present under --data-root; default)")
    p.add_argument("--out", help="output directory")
    p.add_argument("--limit", type=int, help="first N items of each benchmark")
    p.add_argument("--resume", action="store_true", help="continue the predictions already in --out")
    p.add_argument("--registry", action="append", default=[], help="extra registry YAML (repeatable; entries "
                   "with a built-in name replace it)")
    p.add_argument("--batch-size", type=int, default=8, help="generation batch per rank (default %(default)s)")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: this rank's GPU if any)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--config", help="config YAML (AF1 checkpoints)")
    p.add_argument("--cache-dir", help="keep a converted DeepSpeed/AF1 checkpoint here")
    p.add_argument("--max-new-tokens", type=int, help="override the registry's decoding (recorded in settings)")
    p.add_argument("--num-beams", type=int, help="override the registry's decoding (recorded in settings)")
    p.add_argument("--allow-outside-root", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--timeout-s", type=int, default=1800, help="seconds a collective may wait for another rank "
                   "before the run fails (several ranks; default %(default)s)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="print two results.json side by side")
    p.add_argument("--list", action="store_true", help="list the registry's benchmarks")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if a.compare:
            from megaflamingo.eval.report import compare, load_results

            print(compare(load_results(a.compare[0]), load_results(a.compare[1]), a.compare[0], a.compare[1]), end="")
            return 0
        if a.list:
            from megaflamingo.eval.registry import load_registry

            for b in load_registry(a.registry).benchmarks.values():
                paper = "" if b.paper is None or b.paper.value is None else f"  AF1 {b.paper.value}{b.paper.unit}"
                print(f"{b.name:24s} {b.split:55s} {b.mode:16s} {','.join(b.metrics)}{paper}")
            return 0
        missing = [f for f in ("model", "data_root", "out") if not getattr(a, f)]
        if missing:
            raise ValueError("missing " + ", ".join("--" + m.replace("_", "-") for m in missing))
        from megaflamingo.engine.distributed import discover_env, init_distributed
        from megaflamingo.eval.evaluate import EvalOptions, evaluate

        world = discover_env()  # torchrun / srun / mpirun variables -> one process group
        if world.world_size > 1:
            init_distributed(world, a.timeout_s)
        opts = EvalOptions(model=a.model, data_root=a.data_root, benchmarks=a.benchmarks, out=a.out, limit=a.limit,
                           resume=a.resume, registry_files=a.registry, batch_size=a.batch_size, device=a.device,
                           dtype=a.dtype, config=a.config, cache_dir=a.cache_dir, max_new_tokens=a.max_new_tokens,
                           num_beams=a.num_beams, progress=not a.no_progress, allow_outside_root=a.allow_outside_root)
        results = evaluate(opts, local_rank=world.local_rank)
        if results:
            print(f"results: {opts.out}/results.json, {opts.out}/results.md")
        return 0
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        print(f"megaflamingo-eval: error: {e}", file=sys.stderr)
        return 2
    finally:
        from megaflamingo.engine.distributed import shutdown

        shutdown()


if __name__ == "__main__":
    sys.exit(main())
