"""The CPU quickstart (README command 1): the whole pipeline on a laptop, from nothing.

    python -m megaflamingo.quickstart --out runs/quickstart        # `make quickstart`

1. generate a labelled synthetic audio dataset (8 sound classes, 3-12 s clips, 5 captions per clip
   describing its class, loudness and length; megaflamingo.testing.sounds)
2. preprocess it to Arrow with the `tiny` encoder (`megaflamingo-preprocess embed`) and build
   kNN few-shot manifests (`megaflamingo-preprocess knn`)
3. train a tiny model on classification + captioning with DeepSpeed ZeRO-3 on 2 CPU processes
   (`torchrun ... megaflamingo-train`), TensorBoard logs under <run_dir>/tensorboard, with task
   metrics (accuracy, CIDEr) and the cross-attention gates charted during training
4. consolidate, export and split the checkpoint (`megaflamingo-convert zero-to-fp32 / export / split`)
5. answer the classification prompt on the held-out test clips (`megaflamingo-infer --manifest`),
   computing their embeddings from the audio files in-process, and score the answers
6. score both test sets with `megaflamingo-eval` (2 processes; the benchmarks are <out>/benchmarks.yaml,
   a user registry), into <out>/eval/results.{json,md}
7. print where everything is, write <out>/summary.json, and end with the command that opens the web
   demo (`megaflamingo-demo`) on the trained model, with few-shot retrieval from its train split

Every step is the real console script run as a subprocess (exactly what a user would type; the
commands are echoed and logged under <out>/logs/). A step whose outputs exist is skipped on a rerun
(``--fresh`` starts over).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from megaflamingo.config.loader import resolve_config_path
from megaflamingo.testing import sounds as synthetic

DS_NAME = f"{synthetic.DATASET}-{synthetic.TASK}"
CAP_NAME = f"{synthetic.DATASET}-{synthetic.CAPTION_TASK}"
# The quickstart's benchmarks: a user registry beside the built-in AF1 one (docs/evaluation.md).
BENCHMARKS = {
    "version": 1,
    "defaults": {"decoding": {"num_beams": 1, "do_sample": False, "max_new_tokens": 8}},
    "benchmarks": {
        "synth-cls": {"split": f"{DS_NAME}/test", "type": "classification", "mode": "in-distribution",
                      "metrics": ["accuracy", "macro_f1"], "notes": "8 synthetic sound classes (chance 12.5%)"},
        "synth-cap": {"split": f"{CAP_NAME}/test", "type": "caption", "mode": "in-distribution",
                      "group_references": True, "metrics": ["cider", "bleu4", "rouge_l", "meteor"],
                      "decoding": {"max_new_tokens": 24},
                      "notes": "5 reference captions per clip (class, loudness, length)"},
    },
}


class QuickstartError(RuntimeError):
    pass


@dataclass
class Options:
    out: str = "runs/quickstart"
    train_per_class: int = 24
    val_per_class: int = 3
    test_per_class: int = 6
    steps: int = 500
    nproc: int = 2
    embed_dim: int = 128
    micro_batch_size: int = 8  # samples per micro-batch without packing
    # With packing (the shipped tiny_cpu config): rows of 512 tokens per micro-batch. 3 rows hold ~7.4 of
    # this task's samples (87-token single clips, 351-token 4-shot kNN ones), about the 8 of a padded
    # micro-batch, in 1536 positions instead of ~2800.
    packed_rows: int = 3
    lr: float = 2e-3
    seed: int = 0
    knn_k: int = 4
    knn_weight: float = 0.5
    caption_weight: float = 0.5
    eval_steps: int = 100
    eval_max_items: int = 16
    max_fewshot: int = 4
    min_accuracy: float = 0.9
    fresh: bool = False
    config: str = "tiny_cpu"  # a path, or the name of a config shipped with the package


def _py_module(mod: str) -> list[str]:
    return [sys.executable, "-m", mod]


def console_script(name: str) -> str:
    """How to type this environment's console script ``name``: the bare name when the shell finds
    this very script, else its path (a virtualenv that is not activated)."""
    mine = Path(sys.executable).parent / name
    if not mine.is_file() or shutil.which(name) == str(mine):
        return name
    rel = os.path.relpath(mine)
    return rel if not rel.startswith("..") else str(mine)


class Pipeline:
    def __init__(self, opts: Options):
        self.o = opts
        self.out = Path(opts.out).resolve()
        self.data = self.out / "data"
        self.arrow = self.out / "arrow"
        self.run_dir = self.out / "run"
        self.fp32 = self.out / "fp32"
        self.export = self.out / "export"
        self.parts = self.out / "export_parts"
        self.preds = self.out / "predictions.jsonl"
        self.eval_dir = self.out / "eval"
        self.registry = self.out / "benchmarks.yaml"
        self.logs = self.out / "logs"
        self.timings: dict[str, float] = {}

    # ---------------------------------------------------------------- helpers
    def sh(self, name: str, cmd: list[str], env: Optional[dict] = None) -> None:
        """Run one step's command, echoing it, teeing its output to logs/<name>.log."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        print(f"\n$ {' '.join(shlex.quote(str(c)) for c in cmd)}", flush=True)
        full_env = dict(os.environ)
        full_env.setdefault("OMP_NUM_THREADS", "1")
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.update(env or {})
        with open(log, "w", encoding="utf-8") as f:
            proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, env=full_env)
            tail: list[str] = []
            assert proc.stdout is not None
            for line in proc.stdout:
                f.write(line)
                tail = (tail + [line])[-40:]
                if not self._noise(line):
                    sys.stdout.write("  " + line)
                    sys.stdout.flush()
            rc = proc.wait()
        if rc != 0:
            raise QuickstartError(f"step '{name}' failed (exit {rc}); full log: {log}\n" + "".join(tail[-20:]))

    @staticmethod
    def _noise(line: str) -> bool:
        # DeepSpeed / torch print a lot at start-up; the log file keeps everything.
        return any(s in line for s in ("[WARNING]", "warnings.warn", "FutureWarning", "UserWarning",
                                       "[INFO] [real_accelerator", "DeprecationWarning"))

    def step(self, name: str, done: Path, fn) -> None:
        t0 = time.time()
        if done.exists() and not self.o.fresh:
            print(f"[{name}] already done ({done}); skipping", flush=True)
            return
        print(f"\n=== [{name}] ===", flush=True)
        fn()
        self.timings[name] = round(time.time() - t0, 1)

    # ---------------------------------------------------------------- steps
    def generate(self) -> None:
        ds = synthetic.generate(self.data, synthetic.SplitSizes(self.o.train_per_class, self.o.val_per_class,
                                                                self.o.test_per_class), seed=self.o.seed)
        print(f"  {len(synthetic.LABELS)} classes: {', '.join(synthetic.LABELS)}")
        for split, n in ds.counts.items():
            print(f"  {split}: {n} clips -> {ds.manifests[split]}")

    def manifest(self, split: str, ds: str = DS_NAME) -> Path:
        return self.data / "manifests" / ds / f"{split}.jsonl"

    def split_dir(self, split: str, ds: str = DS_NAME) -> Path:
        return self.arrow / ds / split

    def embed(self) -> None:
        jobs = [(DS_NAME, s) for s in ("train", "val", "test")] + [(CAP_NAME, s) for s in ("train", "test")]
        for ds, split in jobs:
            self.sh(f"embed-{ds}-{split}", _py_module("megaflamingo.cli.preprocess") + [
                "embed", "--manifest", self.manifest(split, ds), "--data-root", self.data,
                "--out", self.split_dir(split, ds), "--encoder", "tiny", "--embed-dim", self.o.embed_dim,
                "--workers", "1", "--batch-size", "16", "--no-progress"])

    def knn(self) -> None:
        # Few-shot interleaved samples: each train/val row gets k-1 neighbours from train.
        for split in ("train", "val"):
            self.sh(f"knn-{split}", _py_module("megaflamingo.cli.preprocess") + [
                "knn", "--train-dir", self.split_dir("train"), "--split-dir", self.split_dir(split),
                "--k", self.o.knn_k, "--seed", self.o.seed])

    def write_config(self) -> Path:
        """The engine's tiny CPU config with the quickstart's data, sizes and budget filled in,
        written next to the run so the user sees exactly what was trained."""
        import yaml

        o = self.o
        src = resolve_config_path(o.config)
        if not src.is_file():
            raise QuickstartError(f"config {o.config} not found (a path, or a shipped config name such as tiny_cpu)")
        raw = yaml.safe_load(src.read_text(encoding="utf-8")) or {}
        model, enc = raw.setdefault("model", {}), raw.setdefault("encoder", {})
        data, train = raw.setdefault("data", {}), raw.setdefault("train", {})
        slots = 16 * o.max_fewshot
        model.update(
            audio_embed_dim=o.embed_dim, max_num_window=16, max_num_fewshot=o.max_fewshot,
            # Small but not minimal: one audio layer over 16 windows/audio, xattn before each LM layer.
            audio_transformer={"n_head": 4, "n_layers": 1, "d_inner": 256, "max_num_media": slots,
                               "max_window_per_audio": 16, "dropout": 0.1},
            xattn={"every_n_layers": 1, "heads": 4, "dim_head": 32, "ff_mult": 2},
        )
        # Must describe the preprocessed data exactly (the data loader checks it against metadata.json).
        enc.update(name="tiny", random_init=True, embed_dim=o.embed_dim, sample_rate=44100, window_s=7.0,
                   overlap_s=5.25, max_windows=16)
        plain = {"prefix_prob": 0.0, "augmentations": {"do_nothing": 1.0}}
        blend = {f"{DS_NAME}/train": {"weight": 1.0, **plain}}
        if o.knn_k > 1:
            blend[f"{DS_NAME}/interleaved_knn-train"] = {"weight": o.knn_weight, **plain}
        if o.caption_weight > 0:
            blend[f"{CAP_NAME}/train"] = {"weight": o.caption_weight, **plain}
        data.update(data_root=str(self.arrow), blend=blend, valid=[f"{DS_NAME}/val"], max_tokens=512,
                    max_tokens_per_row=512, num_workers=0)
        rows = o.packed_rows if data.get("packing") else o.micro_batch_size
        train.update(run_dir=str(self.run_dir), stage="pretrain", micro_batch_size=rows,
                     gradient_accumulation_steps=1, lr=o.lr, lr_scheduler="constant", warmup_steps=10,
                     precision="fp32", max_steps=o.steps, seed=o.seed, logging_steps=10,
                     eval_steps=min(o.eval_steps, o.steps), save_steps=o.steps, keep_last=1,
                     # Task metrics in TensorBoard while it trains (eval/synth-cls/accuracy, eval/synth-cap/cider).
                     eval_benchmarks=list(BENCHMARKS["benchmarks"]), eval_registry=[str(self.write_registry())],
                     eval_max_items=o.eval_max_items, eval_batch_size=o.eval_max_items)
        path = self.out / "config.yaml"
        path.write_text("# written by megaflamingo.quickstart from " + o.config + "\n"
                        + yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        return path

    def write_registry(self) -> Path:
        import yaml

        self.registry.write_text(yaml.safe_dump(BENCHMARKS, sort_keys=False), encoding="utf-8")
        return self.registry

    def train(self) -> None:
        cfg = self.write_config()
        cmd = _py_module("torch.distributed.run") + [
            "--standalone", "--nnodes", "1", "--nproc_per_node", self.o.nproc,
            "-m", "megaflamingo.cli.train", "--config", cfg]
        self.sh("train", cmd)

    def demo_command(self) -> str:
        """The web demo on the exported model, few-shot examples retrieved (and playable) from the
        train split; the model's config names the data, so its task is the first preset."""
        cmd = [console_script("megaflamingo-demo"), "--model", self.export, "--icl-from", self.split_dir("train"),
               "--icl-audio-root", self.data]
        return " ".join(shlex.quote(str(c)) for c in cmd)

    def tensorboard_dir(self) -> Path:
        return self.run_dir / "tensorboard"

    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def convert(self) -> None:
        conv = _py_module("megaflamingo.cli.convert")
        self.sh("zero-to-fp32", conv + ["zero-to-fp32", self.checkpoint_dir(), self.fp32])
        self.sh("export", conv + ["export", self.checkpoint_dir(), self.export])
        # A deliberately tiny part size so the split/merge path is exercised on a small model.
        self.sh("split", conv + ["split", self.fp32, self.parts, "--max-size", "1MB"])

    def infer(self) -> None:
        self.sh("infer", _py_module("megaflamingo.cli.infer") + [
            "--model", self.export, "--manifest", self.manifest("test"), "--data-root", self.data,
            "--out", self.preds, "--batch-size", "16", "--max-new-tokens", "8",
            "--metrics-out", self.out / "metrics.json"])

    def evaluate(self) -> None:
        """Both test sets through the benchmark runner, split over ``nproc`` processes. Runs only while
        results.json is missing: predictions left by an interrupted run may be a previous model's."""
        if self.eval_dir.exists():
            shutil.rmtree(self.eval_dir)
        self.sh("eval", _py_module("torch.distributed.run") + [
            "--standalone", "--nnodes", "1", "--nproc_per_node", self.o.nproc, "-m", "megaflamingo.cli.eval",
            "--model", self.export, "--data-root", self.arrow, "--benchmarks", ",".join(BENCHMARKS["benchmarks"]),
            "--registry", self.write_registry(), "--out", self.eval_dir, "--batch-size", "16", "--no-progress"])

    def eval_summary(self) -> dict:
        """``{benchmark: {metric: value}}`` of ``eval/results.json``."""
        res = json.loads((self.eval_dir / "results.json").read_text())["benchmarks"]
        return {name: dict(entry["metrics"]) for name, entry in res.items()}

    # ---------------------------------------------------------------- driver
    def run(self) -> dict:
        t_start = time.time()
        if self.o.fresh and self.out.exists():
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.step("generate", self.data / "classes.json", self.generate)
        self.step("embed", self.split_dir("test") / "metadata.json", self.embed)
        self.step("knn", self.split_dir("val") / "interleaved_knn.arrow", self.knn)
        self.step("train", self.checkpoint_dir() / "latest", self.train)
        self.step("convert", self.parts, self.convert)
        if self.preds.exists() and self.o.fresh:
            self.preds.unlink()
        self.step("infer", self.out / "metrics.json", self.infer)
        self.step("eval", self.eval_dir / "results.json", self.evaluate)
        metrics = json.loads((self.out / "metrics.json").read_text())
        summary = {
            "accuracy": metrics.get("accuracy"),
            "macro_f1": metrics.get("macro_f1"),
            "eval": self.eval_summary(),
            "n_eval": metrics.get("n_classification", metrics.get("n_with_reference")),
            "n_classes": len(synthetic.LABELS),
            "chance": 1.0 / len(synthetic.LABELS),
            "run_dir": str(self.run_dir),
            "tensorboard_dir": str(self.tensorboard_dir()),
            "checkpoint_dir": str(self.checkpoint_dir()),
            "fp32_dir": str(self.fp32),
            "export_dir": str(self.export),
            "split_dir": str(self.parts),
            "predictions": str(self.preds),
            "eval_dir": str(self.eval_dir),
            "data_dir": str(self.data),
            "arrow_dir": str(self.arrow),
            "demo_command": self.demo_command(),
            "timings_s": self.timings,
            "total_s": round(time.time() - t_start, 1),
            "options": asdict(self.o),
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.report(summary)
        return summary

    def report(self, s: dict) -> None:
        acc = s["accuracy"]
        print("\n" + "=" * 72)
        print(f"held-out accuracy: {acc:.1%} on {s['n_eval']} test clips "
              f"({s['n_classes']} classes, chance {s['chance']:.1%})")
        for name, vals in s["eval"].items():
            print(f"megaflamingo-eval {name:9s}: " + ", ".join(f"{k} {v:.3f}" for k, v in vals.items()
                                                           if isinstance(v, float)))
        print(f"TensorBoard logs : {s['tensorboard_dir']}")
        print(f"  open with      : tensorboard --logdir {shlex.quote(s['tensorboard_dir'])}")
        print(f"checkpoint       : {s['checkpoint_dir']} (DeepSpeed ZeRO-3)")
        print(f"exported model   : {s['export_dir']}")
        print(f"split parts      : {s['split_dir']}")
        print(f"predictions      : {s['predictions']}")
        print(f"benchmark results: {Path(s['eval_dir']) / 'results.md'}")
        print(f"summary          : {Path(self.out) / 'summary.json'}")
        print(f"try it           : {console_script('megaflamingo-infer')} --model {shlex.quote(s['export_dir'])} "
              f"--audio {shlex.quote(str(Path(s['data_dir']) / 'audio/test/rising_chirp_000.wav'))} "
              f"--prompt 'classify this sound.'")
        print("=" * 72)
        print("open the web demo on this model (then the URL it prints, in a browser):")
        print(f"  {s['demo_command']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megaflamingo.quickstart", description=__doc__.split("\n\n")[0])
    d = Options()
    p.add_argument("--out", default=d.out, help="output folder (default %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps (default %(default)s)")
    p.add_argument("--train-per-class", type=int, default=d.train_per_class)
    p.add_argument("--test-per-class", type=int, default=d.test_per_class)
    p.add_argument("--val-per-class", type=int, default=d.val_per_class)
    p.add_argument("--nproc", type=int, default=d.nproc, help="training processes (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--config", default=d.config)
    p.add_argument("--min-accuracy", type=float, default=d.min_accuracy,
                   help="exit non-zero below this held-out accuracy (default %(default)s)")
    p.add_argument("--fresh", action="store_true", help="delete --out first and redo every step")
    a = p.parse_args(argv)
    opts = Options(out=a.out, steps=a.steps, train_per_class=a.train_per_class, val_per_class=a.val_per_class,
                   test_per_class=a.test_per_class, nproc=a.nproc, seed=a.seed, config=a.config,
                   min_accuracy=a.min_accuracy, fresh=a.fresh)
    try:
        summary = Pipeline(opts).run()
    except QuickstartError as e:
        print(f"\nquickstart: {e}", file=sys.stderr)
        return 1
    if summary["accuracy"] is None or summary["accuracy"] < opts.min_accuracy:
        print(f"quickstart: accuracy {summary['accuracy']} below the required {opts.min_accuracy}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
