"""`megaflamingo-convert`: checkpoint conversion CLI (thin: logic lives in megaflamingo.checkpoint).

Subcommands: zero-to-fp32, export, split, merge, af1-import, af1-export. See docs/checkpoints.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _size(text):
    from megaflamingo.checkpoint.integrity import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megaflamingo-convert",
                                description="Convert, export, split, merge and import/export (AF1) checkpoints.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, verify=True):
        sp.add_argument("--trust-file", action="store_true",
                        help="allow torch files with arbitrary pickled objects (weights_only=False): only for "
                             "files you trust")
        if verify:
            sp.add_argument("--no-verify", action="store_true",
                            help="skip the integrity check (size/sha256 of indexed parts, size/CRC-32 of a trainer "
                                 "checkpoint's files)")
        sp.add_argument("--no-progress", action="store_true", help="no progress output")
        sp.add_argument("--json", action="store_true",
                        help="print the result as one JSON document on stdout (logs go to stderr)")

    shard_help = "largest shard file, e.g. 5GB, 500MB (default 5GB); a bigger tensor gets a shard of its own"

    z = sub.add_parser("zero-to-fp32", help="consolidate a DeepSpeed ZeRO-1/2/3 checkpoint into fp32 weights "
                                            "(+ the run's config, encoder record and tokenizer: a model dir)")
    z.add_argument("ckpt_dir", help="a training run dir (its checkpoints/ is used) or a DeepSpeed checkpoint dir")
    z.add_argument("out", help="output directory")
    z.add_argument("--tag", default=None, help="checkpoint tag (default: the 'latest' file)")
    z.add_argument("--exclude-frozen", action="store_true", help="leave out frozen (requires_grad=False) parameters")
    z.add_argument("--format", choices=["safetensors", "torch"], default="safetensors",
                   help="safetensors shards (default) or torch .bin shards")
    z.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="dtype of the written weights")
    z.add_argument("--max-shard-size", type=_size, default=_size("5GB"), help=shard_help)
    common(z)

    e = sub.add_parser("export", help="a self-contained model directory (config, tokenizer, safetensors shards)")
    e.add_argument("src", help="run dir, ZeRO checkpoint dir, consolidated dir/file, or model dir")
    e.add_argument("out", help="output model directory")
    e.add_argument("--config", default=None, help="config YAML/JSON (default: found next to the checkpoint)")
    e.add_argument("--trainable-only", action="store_true",
                   help="only the audio transformer, xattn and other trained parameters")
    e.add_argument("--include", default=None, help="regex of extra keys for --trainable-only (unfrozen LM parts)")
    e.add_argument("--tag", default=None, help="checkpoint tag of a ZeRO checkpoint (default: the 'latest' file)")
    e.add_argument("--tokenizer", default=None, help="tokenizer directory to ship (default: the config's)")
    e.add_argument("--max-shard-size", type=_size, default=_size("5GB"), help=shard_help)
    e.add_argument("--no-key-check", action="store_true", help="do not check keys against the config's model")
    common(e)

    s = sub.add_parser("split", help="split a state dict into parts no larger than --max-size, with an index")
    s.add_argument("src", help="a model dir, a checkpoint file or an indexed dir (a model dir's config, encoder "
                               "record and tokenizer are copied beside the parts)")
    s.add_argument("out", help="output directory")
    s.add_argument("--max-size", type=_size, required=True, help="e.g. 17GB, 500MB, 64KiB")
    s.add_argument("--layout", choices=["auto", "safetensors", "torch", "af1"], default="auto",
                   help="auto: af1 for AF1 files ({'model_state_dict': ...}), safetensors otherwise")
    s.add_argument("--name", default=None, help="AF1 layout part prefix (default: the input's stem)")
    common(s)

    m = sub.add_parser("merge", help="merge parts (ours or AF1's <name>_partN.pt) into one file, verifying hashes")
    m.add_argument("inputs", nargs="+", help="an index directory, an AF1 parts directory, or part files")
    m.add_argument("out", help="output .safetensors / .pt file, or a directory")
    g = m.add_mutually_exclusive_group()
    g.add_argument("--af1", dest="af1", action="store_true", default=None,
                   help="wrap a .pt output as {'model_state_dict': ...} (default for AF1 inputs)")
    g.add_argument("--no-af1", dest="af1", action="store_false", help="write a plain state dict")
    common(m)

    ai = sub.add_parser("af1-import", help="AF1 foundation.pt / chat.pt (or its parts) -> our model directory")
    ai.add_argument("inputs", nargs="+", help="the .pt file, its parts, or a directory of parts")
    ai.add_argument("out", help="output model directory")
    ai.add_argument("--config", required=True, help="our YAML (or AF1's YAML) describing the model/LM/tokenizer")
    ai.add_argument("--max-shard-size", type=_size, default=_size("5GB"), help=shard_help)
    common(ai)

    ae = sub.add_parser("af1-export", help="our model directory -> AF1's {'model_state_dict': ...} (AF1 key names)")
    ae.add_argument("src", help="model directory (export / af1-import output)")
    ae.add_argument("out", help="output .pt file, or a directory for --max-size parts")
    ae.add_argument("--max-size", type=_size, default=None, help="write AF1's <name>_partN.pt parts instead")
    ae.add_argument("--name", default=None, help="part prefix (default: the output directory's name)")
    common(ae)
    return p


def run(args) -> dict:
    from megaflamingo.checkpoint import export as ex
    from megaflamingo.checkpoint.merge import merge

    prog = not args.no_progress
    verify = not getattr(args, "no_verify", False)
    if args.cmd == "zero-to-fp32":
        idx = ex.consolidate(args.ckpt_dir, args.out, args.tag, args.exclude_frozen, args.format,
                             args.max_shard_size, args.dtype, args.trust_file, prog, verify)
        return {"out": args.out, "files": len(idx["metadata"]["files"]), "bytes": idx["metadata"]["total_size"],
                "tied": idx["metadata"]["tied_weights"]}
    if args.cmd == "export":
        idx = ex.export(args.src, args.out, args.config, args.trainable_only, args.tag, args.include, args.tokenizer,
                        args.max_shard_size, args.trust_file, verify, not args.no_key_check, prog)
        return {"out": args.out, "files": len(idx["metadata"]["files"]), "bytes": idx["metadata"]["total_size"]}
    if args.cmd == "split":
        idx = ex.split(args.src, args.out, args.max_size, args.layout, args.name, verify, args.trust_file, prog)
        return {"out": args.out, "layout": idx["layout"], "files": idx["metadata"]["files"],
                "sliced": list(idx["metadata"]["sliced"]), "copied": idx["copied"]}
    if args.cmd == "merge":
        return merge(args.inputs, args.out, af1=args.af1, verify=verify, trust=args.trust_file, progress=prog)
    if args.cmd == "af1-import":
        src = args.inputs if len(args.inputs) > 1 else args.inputs[0]
        idx = ex.af1_import(src, args.out, args.config, args.trust_file, verify, args.max_shard_size, prog)
        return {"out": args.out, "files": len(idx["metadata"]["files"])}
    if args.cmd == "af1-export":
        return ex.af1_export(args.src, args.out, args.max_size, args.name or Path(args.out).name, verify, prog)
    raise AssertionError(args.cmd)


def _summary(cmd: str, result: dict) -> str:
    files = result.get("files")
    n = len(files) if isinstance(files, (dict, list)) else files
    size = f", {result['bytes'] / 1e6:.1f} MB" if isinstance(result.get("bytes"), int) else ""
    where = result.get("out") or result.get("file") or ""
    return f"{cmd}: wrote {where}" + (f" ({n} file(s){size})" if n is not None else "")


def main(argv=None) -> int:
    from megaflamingo.cli import results_only_on_stdout

    args = build_parser().parse_args(argv)
    results_only_on_stdout()
    from megaflamingo.checkpoint.integrity import CheckpointError
    from megaflamingo.checkpoint.safe_load import UnsafeCheckpointError
    from megaflamingo.config import ConfigError

    try:
        result = run(args)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        # bad input: one clear line, no traceback
        hint = ""
        if isinstance(e, UnsafeCheckpointError) and not getattr(args, "trust_file", False):
            hint = " If you trust this file, pass --trust-file (loads with weights_only=False: it can run code)."
        print(f"megaflamingo-convert {args.cmd}: error: {e}{hint}", file=sys.stderr)
        return 2
    print(json.dumps(result, default=str) if args.json else _summary(args.cmd, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
