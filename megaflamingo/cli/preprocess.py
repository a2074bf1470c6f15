"""`megaflamingo-preprocess {prepare,embed,merge,knn,manifest}` (also `python -m megaflamingo.cli.preprocess`).

    # a public dataset as downloaded -> AF1 manifests (megaflamingo-preprocess prepare --list)
    megaflamingo-preprocess prepare clotho-v2 --source DATA/clotho --out DATA/manifests

    # folder + captions table -> JSONL manifest (for data without AF1's per-dataset scripts)
    megaflamingo-preprocess manifest --folder DATA/clips --labels captions.csv --out train.jsonl \
        --data-root DATA --dataset mine --task AudioCaptioning --split train
    # window embeddings (AF1: ClapCap) + LAION-CLAP clip embeddings for kNN
    megaflamingo-preprocess embed --manifest train.jsonl --data-root DATA \
        --out arrow/mine-AudioCaptioning/train --encoder clapcap --checkpoint clapcap_weights_2023.pth \
        --clip-encoder laion-clap --clip-checkpoint 630k-audioset-fusion-best.pt --device cuda
    # at scale: one job per --shard I/N (or a Slurm array / torchrun ranks), then
    megaflamingo-preprocess merge --out arrow/mine-AudioCaptioning/train
    # few-shot neighbours for every row of a split, from train
    megaflamingo-preprocess knn --split-dir arrow/mine-AudioCaptioning/val -k 8

Exit codes: 0 ok; 1 the run finished but more files than --max-bad-fraction were unusable
(see `bad_files` in metadata.json); 2 usage / manifest / encoder / resume-mismatch errors.
"""
from __future__ import annotations

import argparse
import json
import sys

from megaflamingo.audio.decode import AF1_MIN_FILE_BYTES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megaflamingo-preprocess",
                                description="Offline preprocessing: audio -> Arrow window embeddings")
    sub = p.add_subparsers(dest="cmd", required=True)

    e = sub.add_parser("embed", help="decode + window + encode a manifest into Arrow shards",
                       description="Decode, window and encode the audio of a manifest into Arrow shards. "
                                   "With --config the encoder and window settings come from the training "
                                   "config (a flag that contradicts it is an error), so the data fits the model.")
    e.add_argument("--manifest", required=True, help="AF1 JSON manifest, JSON list or JSONL")
    e.add_argument("--data-root", required=True, help="audio paths are relative to this folder")
    e.add_argument("--out", help="output split directory <dataset>-<task>/<split> (default with --config: "
                                 "under the config's data.data_root, named after the manifest's dataset, task "
                                 "and split)")
    e.add_argument("--config", help="training config (YAML, or a shipped name such as tiny_cpu): encoder, "
                                    "dimensions, windows and sample rate come from its encoder section")
    e.add_argument("--placeholder", action="append", default=[], metavar="NAME=VALUE",
                   help="value for a ${NAME} placeholder in --config (repeatable)")
    e.add_argument("--encoder", choices=["clapcap", "laion-clap", "tiny"], default=None,
                   help="window encoder (default: clapcap, AF1's)")
    e.add_argument("--checkpoint", help="encoder weights (clapcap_weights_2023.pth, "
                                        "630k-audioset-fusion-best.pt)")
    e.add_argument("--random-init", action="store_true", default=None,
                   help="random encoder weights (tests only; recorded in metadata.json)")
    e.add_argument("--embed-dim", type=int, help="tiny encoder output size (default 1024)")
    e.add_argument("--seed", type=int, default=0, help="tiny encoder weights seed")
    e.add_argument("--no-fusion", dest="fusion", action="store_false", default=None,
                   help="LAION-CLAP without feature fusion (630k-audioset-best.pt)")
    e.add_argument("--clip-encoder", default="auto", choices=["auto", "none", "mean", "laion-clap"],
                   help="clip embedding for kNN: laion-clap (AF1), mean of the window embeddings "
                        "(tiny/quickstart), none. auto: laion-clap for laion-clap, mean for tiny, "
                        "none otherwise")
    e.add_argument("--clip-checkpoint", help="LAION-CLAP weights when --clip-encoder laion-clap")
    e.add_argument("--batch-size", type=int, default=32, help="windows per encoder forward")
    e.add_argument("--workers", type=int, default=2, help="decoding processes (0: in-process)")
    e.add_argument("--shard", help="I/N: this job's share (default: Slurm array / RANK env, else 0/1)")
    e.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (cuda: LOCAL_RANK picks N)")
    e.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="storage dtype of window embeddings")
    e.add_argument("--rows-per-shard", type=int, default=1024,
                   help="manifest items per Arrow shard, the unit of resuming and of --shard (default 1024)")
    e.add_argument("--min-file-bytes", type=int, default=AF1_MIN_FILE_BYTES,
                   help="skip smaller files (AF1's floor; 0 disables)")
    e.add_argument("--max-bad-fraction", type=float, default=0.05,
                   help="exit 1 when more than this fraction of the files is unusable")
    e.add_argument("--dataset", help="dataset name when the manifest does not say (AF1: the part before "
                                     "the task in <dataset>-<task>)")
    e.add_argument("--task", help="task name when the manifest does not say (e.g. AudioCaptioning)")
    e.add_argument("--split", help="split name when the manifest does not say (train, val, test)")
    e.add_argument("--window-s", type=float, help="window length in seconds (default 7.0, AF1's)")
    e.add_argument("--overlap-s", type=float, help="overlap of consecutive windows in seconds (default 5.25)")
    e.add_argument("--max-windows", type=int, help="windows kept per clip (default 16: 33.25 s)")
    e.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    e.add_argument("--allow-outside-root", action="store_true",
                   help="accept manifest paths outside --data-root (absolute or ../); refused by default")

    m = sub.add_parser("merge", help="write metadata.json once every shard job has finished")
    m.add_argument("--out", required=True, help="the split directory the embed jobs wrote")
    m.add_argument("--max-bad-fraction", type=float, default=0.05,
                   help="exit 1 when more than this fraction of the files was unusable (default 0.05)")

    k = sub.add_parser("knn", help="few-shot neighbours from the train split (AF1 interleaved_knn)")
    k.add_argument("--split-dir", required=True, help="embedded split to make few-shot rows for")
    k.add_argument("--train-dir", help="embedded train split (default: <split-dir>/../train)")
    k.add_argument("-k", "--k", type=int, default=8, help="few-shot size; k-1 neighbours kept (AF1: 8)")
    k.add_argument("--seed", type=int, default=0, help="seed of the neighbour shuffling (default 0)")
    k.add_argument("--index", choices=["flat", "ivf"], default="flat",
                   help="exact search (flat) or an inverted-file index for large train splits (ivf)")
    k.add_argument("--nlist", type=int, help="ivf: number of clusters (default: about sqrt of the rows)")
    k.add_argument("--nprobe", type=int, default=16, help="ivf: clusters searched per query (default 16)")

    f = sub.add_parser("manifest", help="folder + CSV/JSON of captions or labels -> JSONL manifest")
    f.add_argument("--folder", required=True, help="folder holding the audio files")
    f.add_argument("--labels", required=True,
                   help="CSV/TSV, JSON list or {file: caption}, JSONL or YAML table of captions/labels")
    f.add_argument("--out", required=True,
                   help="JSONL file to write ({split} in it: one file per --split-column value)")
    f.add_argument("--data-root", help="paths are written relative to this (default: --folder)")
    f.add_argument("--prompt", default="describe the sound in a sentence.",
                   help="prompt of every row without a 'prompt' column (default: %(default)s)")
    f.add_argument("--file-column", help="column naming the audio file (default: file, path, name, "
                                         "filename, audio, file_name or fname)")
    f.add_argument("--file-pattern", help="audio file from the row's columns, e.g. '{youtube_id}.wav' "
                                          "('.*': any audio extension); instead of --file-column")
    f.add_argument("--text-column", action="append", dest="text_columns", metavar="COLUMN",
                   help="column(s) holding the output text; repeatable, globs allowed ('caption_*'); "
                        "each non-empty cell becomes one row (default: output, caption, label, "
                        "labels, text or answer)")
    f.add_argument("--split-column", help="column holding each row's split (with --split: keep only "
                                          "those rows; without: {split} in --out)")
    f.add_argument("--start-column", default="audio_start",
                   help="column holding the start offset in seconds (default: %(default)s)")
    f.add_argument("--dataset", help="dataset name written into each row")
    f.add_argument("--task", help="task name written into each row (AF1 CamelCase: AudioCaptioning)")
    f.add_argument("--split", help="split name written into each row (train, val, test)")

    r = sub.add_parser(
        "prepare", help="a public dataset as downloaded -> AF1 manifests <Dataset>-<Task>/<split>.jsonl",
        description="Read a public dataset in its publisher's layout and write AF1-style JSONL "
                    "manifests OUT/<Dataset>-<Task>/<split>.jsonl (audio paths relative to SOURCE, "
                    "so embed --data-root SOURCE finds them). stdout: the report as JSON; stderr: "
                    "one line per manifest and what was missing. Exit 1 when nothing was written.")
    r.add_argument("recipe", nargs="?", help="dataset recipe, e.g. clotho-v2 (see --list)")
    r.add_argument("--source", help="the dataset folder, as downloaded and extracted")
    r.add_argument("--out", help="manifest root; writes OUT/<Dataset>-<Task>/<split>.jsonl")
    r.add_argument("--audio-pattern",
                   help="how downloaded clips are named, for datasets that do not ship audio "
                        "(audiocaps, musiccaps, music-avqa): metadata columns as fields, e.g. "
                        "'{youtube_id}.wav' or 'audio/{split}/{youtube_id}_{start_time}.flac'; "
                        "'.*' matches any audio extension")
    r.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe option (repeatable; each recipe's options are in --list)")
    r.add_argument("--list", action="store_true",
                   help="list the recipes with their tasks, splits and options, then exit")
    r.add_argument("--json", action="store_true", help="with --list: print the list as JSON")
    return p


def _prepare(args) -> int:
    from megaflamingo.preprocess import recipes

    if args.list:
        if args.json:
            print(json.dumps([r.describe() for r in recipes.list_recipes()], indent=2))
        else:
            print(recipes.describe_recipes())
        return 0
    if not args.recipe or not args.source or not args.out:
        raise recipes.RecipeError("prepare needs RECIPE --source DIR --out DIR (or --list)")
    opts = recipes.parse_option_pairs(args.option, args.audio_pattern)
    report = recipes.prepare(args.recipe, args.source, args.out, **opts)
    for line in recipes.report_lines(report):
        print(f"[prepare] {line}", file=sys.stderr)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0 if report["total_rows"] else 1


# embed settings a training config can give: flag value when given, else the config's, else these
_EMBED_DEFAULTS = {"encoder": "clapcap", "checkpoint": None, "random_init": False, "embed_dim": None,
                   "fusion": True, "clip_checkpoint": None, "window_s": 7.0, "overlap_s": 5.25, "max_windows": 16}


def _embed_settings(args) -> dict:
    from megaflamingo.config import load_config
    from megaflamingo.preprocess.embed import EmbedError, default_out, options_from_config

    given = {k: getattr(args, k) for k in _EMBED_DEFAULTS if getattr(args, k) is not None}
    out = dict(_EMBED_DEFAULTS)
    if args.config:
        placeholders = dict(p.partition("=")[::2] for p in args.placeholder)
        cfg = load_config(args.config, placeholders=placeholders)
        out.update(options_from_config(cfg, given, cfg.source or args.config))
    out.update(given)
    out["out"] = args.out
    if args.out is None:
        if not args.config:
            raise EmbedError("embed needs --out (or --config, whose data.data_root holds the splits)")
        out["out"] = default_out(cfg, args.manifest, args.data_root, args.dataset, args.task, args.split)
    return out


def _bad_exit(bad: int, total: int, limit: float, what: str) -> int:
    frac = bad / total if total else 0.0
    if frac > limit:
        print(f"[preprocess] {what}: {bad}/{total} files unusable ({frac:.1%}) > --max-bad-fraction "
              f"{limit:.1%}", file=sys.stderr)
        return 1
    return 0


def _device(dev: str) -> str:
    import os
    if dev == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return dev


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megaflamingo.audio.encoders import EncoderError
    from megaflamingo.data.arrow_format import FormatError
    from megaflamingo.data.knn import KnnError
    from megaflamingo.data.manifests import ManifestError
    from megaflamingo.preprocess.embed import EmbedError, EmbedOptions, finalize, parse_shard, run_embed

    from megaflamingo.errors import ConfigError

    errors = (EmbedError, EncoderError, ManifestError, KnnError, FormatError, ConfigError)
    try:
        if args.cmd == "embed":
            opts = EmbedOptions(**_embed_settings(args), manifest=args.manifest, data_root=args.data_root,
                                seed=args.seed, clip_encoder=args.clip_encoder, batch_size=args.batch_size,
                                workers=args.workers, shard=parse_shard(args.shard), device=_device(args.device),
                                dtype=args.dtype, rows_per_shard=args.rows_per_shard,
                                min_file_bytes=args.min_file_bytes, max_bad_fraction=args.max_bad_fraction,
                                dataset=args.dataset, task=args.task, split=args.split, progress=args.progress,
                                allow_outside_root=args.allow_outside_root)
            s = run_embed(opts, log=lambda msg: print(msg, file=sys.stderr))
            print(json.dumps({"summary": s}, indent=2))
            bad = sum(s["bad_by_reason"].values())
            return _bad_exit(bad, s["processed_items"], args.max_bad_fraction, "this job")
        if args.cmd == "merge":
            meta = finalize(args.out)
            total = meta["num_manifest_items"]
            reasons: dict[str, int] = {}
            for b in meta["bad_files"]:
                reasons[b["reason"]] = reasons.get(b["reason"], 0) + 1
            print(json.dumps({"num_rows": meta["num_rows"], "audio_hours": meta["audio_hours"],
                              "bad_by_reason": reasons}, indent=2))
            return _bad_exit(len(meta["bad_files"]), total, args.max_bad_fraction, "dataset")
        if args.cmd == "knn":
            from megaflamingo.data.knn import build_knn
            info = build_knn(args.split_dir, args.train_dir, k=args.k, seed=args.seed,
                             index_type=args.index, nlist=args.nlist, nprobe=args.nprobe,
                             log=lambda msg: print(f"[knn] warning: {msg}", file=sys.stderr))
            print(json.dumps(info, indent=2))
            return 0
        if args.cmd == "manifest":
            from megaflamingo.preprocess.manifest import build_manifest
            s = build_manifest(args.folder, args.labels, args.out, prompt=args.prompt,
                               data_root=args.data_root, dataset=args.dataset, task=args.task,
                               split=args.split, file_column=args.file_column,
                               text_columns=args.text_columns, file_pattern=args.file_pattern,
                               split_column=args.split_column, start_column=args.start_column)
            print(json.dumps({"written": s["written"], "manifests": s["manifests"],
                              "labels_without_audio": len(s["labels_without_audio"]),
                              "audio_without_labels": len(s["audio_without_labels"])}, indent=2))
            for name in s["labels_without_audio"][:20]:
                print(f"[manifest] no audio file for label row {name!r}", file=sys.stderr)
            return 0
        if args.cmd == "prepare":
            return _prepare(args)
    except errors as e:
        print(f"megaflamingo-preprocess {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
