"""megaflamingo-infer: foundation prompts, chat, retrieval-augmented few-shot, batch JSONL.

    megaflamingo-infer --model DIR --audio a.wav [--audio b.wav] --prompt "classify this sound."
    megaflamingo-infer --model DIR --audio a.wav --chat                       # interactive
    megaflamingo-infer --model DIR --chat --dialogue talk.json --out answers.json
    megaflamingo-infer --model DIR --audio a.wav --prompt "..." --icl-from DATA/<ds>-<task>/train --k 8
    megaflamingo-infer --model DIR --manifest test.jsonl --data-root DATA --out predictions.jsonl
    megaflamingo-infer --model DIR --audio a.wav --prompt "..." --task AudioSet-EventClassification
    megaflamingo-infer --model DIR --audio a.wav --prompt "..." --rerank-clap 630k-audioset-fusion-best.pt --json

Prompts take the form training gave their task (prefix "The task is event classification. " where
training showed it): from --task, the --icl-from split's task, or each batch item's task; --prefix
TEXT replaces the prefix.

--rerank-clap CKPT is AF1's demo decoding: sample --num-samples answers (default 10; top-k 50,
top-p 0.95 unless given) and rank them by LAION-CLAP text-audio similarity with the clip; the best
is the answer, --json lists every distinct sample with its score and count.

--model takes a model directory (convert export / zero-to-fp32 / split output), a DeepSpeed
run or checkpoint directory, or an AF1 checkpoint (.pt or its parts; with --config).

A --dialogue file is JSON, one dialogue or a list of them:
    {"audio": "clips/dog.wav", "dialogue": [{"user": "What is this?", "assistant": "A dog."},
                                            {"user": "Is it indoors?"}]}
"audio" may also be called "path" or "name"; a relative path is taken from --data-root, else
from the dialogue file's folder. An "assistant" answer is optional (the next turns condition on
it); every round gets a "prediction".
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megaflamingo-infer", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model dir (export / zero-to-fp32 / split output), DeepSpeed "
                                                  "run or checkpoint dir, or AF1 .pt")
    p.add_argument("--config", help="config YAML (required for AF1 checkpoints)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="weights dtype on the device (default: as stored)")
    p.add_argument("--encoder-checkpoint", help="path of the audio encoder's weights (real encoders)")
    p.add_argument("--cache-dir", help="keep the model dir converted from a DeepSpeed/AF1 checkpoint here "
                   "(reused next time); default: a temporary dir, removed after loading")
    p.add_argument("--encoder-from", help="take the encoder record from this preprocessed split dir")
    # single / multi audio
    p.add_argument("--audio", action="append", default=[], help="audio file (repeat for several)")
    p.add_argument("--prompt", help="the question/instruction (AF1 style, e.g. 'describe this sound.')")
    p.add_argument("--task", help="prompt as training did for this task, AF1 style '<dataset>-<Task>' (e.g. "
                   "'AudioSet-EventClassification' -> prefix 'The task is event classification. ' if its "
                   "blend entry had prefix_prob >= 0.5 or it is not in the blend); default: none for --audio, "
                   "the split's task for --icl-from, each item's own task for --manifest")
    p.add_argument("--prefix", default=None, help="literal prefix instead of the task's (e.g. '' for none)")
    # chat
    p.add_argument("--chat", action="store_true", help="multi-turn chat (interactive, or --dialogue FILE)")
    p.add_argument("--dialogue", help="JSON dialogue file (with --chat): answers every user turn (format below)")
    # retrieval
    p.add_argument("--icl-from", help="preprocessed TRAIN split dir to retrieve in-context examples from")
    p.add_argument("--clip-checkpoint", help="LAION-CLAP checkpoint for the query's clip embedding (default: "
                   "the one recorded in the split's metadata; sha256 verified)")
    p.add_argument("--k", type=int, default=8, help="audios in the few-shot prompt (k-1 examples + query)")
    # batch
    p.add_argument("--manifest", help="manifest (JSONL / AF1 JSON) or preprocessed split dir")
    p.add_argument("--data-root", help="root of the manifest's audio paths")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="accept manifest paths outside --data-root (absolute or ../); refused by default")
    p.add_argument("--out", help="predictions JSONL (batch) / answers JSON (dialogue)")
    p.add_argument("--metrics-out", help="write the batch metrics JSON here too")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    p.add_argument("--limit", type=int, default=None, help="only the first N manifest items")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    # generation
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit in tokens (default 64)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy/beam")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    g.add_argument("--top-k", type=int, default=None,
                   help="sample among the k likeliest tokens (default 0: all; 50 with --rerank-clap)")
    g.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling mass (default 1.0: off; 0.95 with --rerank-clap)")
    g.add_argument("--num-beams", type=int, default=1, help="beam search width (default 1: greedy)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (default: nondeterministic)")
    g.add_argument("--num-samples", type=int, default=None, metavar="N",
                   help="sample N answers per query (needs --sample or --rerank-clap; default 1, 10 with "
                   "--rerank-clap): the first is the answer, --json lists all")
    g.add_argument("--rerank-clap", metavar="CKPT", help="LAION-CLAP checkpoint (.pt): rank the N samples by "
                   "text-audio similarity, the best is the answer (implies sampling)")
    g.add_argument("--rerank-tokenizer", metavar="DIR", help="RoBERTa tokenizer files for --rerank-clap "
                   "(default: roberta-base from the local Hugging Face cache; never downloaded)")
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON document on stdout (logs go to stderr)")
    return p


def _device(arg):
    import torch

    if not arg:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if arg.startswith("cuda") and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ValueError(f"--device {arg}: {why} (torch {torch.__version__}); use --device cpu")
    return arg


def _check_modes(a) -> None:
    if a.chat and a.manifest:
        raise ValueError("--chat and --manifest are exclusive")
    if a.icl_from and (a.chat or a.manifest):
        raise ValueError("--icl-from works with --audio/--prompt only")
    if not a.manifest and not a.chat and not a.audio:
        raise ValueError("give --audio FILE (with --prompt), --chat, or --manifest M")
    if a.k < 1:
        raise ValueError(f"--k must be >= 1, got {a.k}")
    if not a.manifest and not a.chat and not a.prompt:
        raise ValueError("--prompt is required with --audio")


def run(a) -> int:
    from megaflamingo.inference.embed import ModelEmbedder
    from megaflamingo.inference.load import encoder_record_from_dataset, load_model
    from megaflamingo.inference.rerank import sampling_settings
    from megaflamingo.inference.runner import Runner

    _check_modes(a)
    settings, n_samples = sampling_settings(a.num_samples, bool(a.rerank_clap), a.top_k, a.top_p,
                                            max_new_tokens=a.max_new_tokens, do_sample=a.sample,
                                            temperature=a.temperature, num_beams=a.num_beams, seed=a.seed)
    _check_sampling(a, n_samples)
    device = _device(a.device)
    rec = encoder_record_from_dataset(a.encoder_from) if a.encoder_from else None
    loaded = load_model(a.model, device=device, dtype=a.dtype, config=a.config, encoder_record=rec,
                        cache_dir=a.cache_dir)
    embedder = ModelEmbedder(loaded, device, a.encoder_checkpoint)
    if a.manifest:
        return _batch(a, loaded, settings, embedder)
    embedder.get()  # encoder errors surface before the model runs
    embedder.fill_silence()
    runner = Runner(loaded, settings)
    if a.chat:
        return _chat(a, loaded, runner, embedder)
    reranker = _reranker(a, loaded, device)
    windows = [embedder.embed(x) for x in a.audio]
    if a.icl_from:
        return _icl(a, loaded, runner, windows, device, n_samples, reranker)
    from megaflamingo.inference.prompts import TrainingForm, answer_suffix, multi_audio_prompt
    from megaflamingo.inference.rerank import answer_query
    from megaflamingo.inference.runner import Query

    form = TrainingForm.of(loaded.config)
    prefix = a.prefix if a.prefix is not None else form.prefix(a.task)
    text = multi_audio_prompt(loaded.tokenizer, a.prompt, len(windows), prefix, answer_suffix(loaded.config))
    g = answer_query(runner, Query(text, windows), n_samples, reranker, a.audio[0])
    _emit(a, {"audio": a.audio, "prompt": a.prompt, "answer": g.text, **g.fields()}, g.lines())
    return 0


def _check_sampling(a, n_samples: int) -> None:
    if (n_samples > 1 or a.rerank_clap) and (a.chat or a.manifest):
        raise ValueError("--num-samples > 1 and --rerank-clap work with --audio/--prompt (and --icl-from) only")
    if a.rerank_clap and len(a.audio) != 1:
        raise ValueError("--rerank-clap scores answers against one clip: give exactly one --audio")
    if a.rerank_clap and not Path(a.rerank_clap).is_file():  # before minutes of model loading
        raise FileNotFoundError(f"--rerank-clap: LAION-CLAP checkpoint {a.rerank_clap} not found")


def _reranker(a, loaded, device):
    if not a.rerank_clap:
        return None
    from megaflamingo.inference.rerank import load_reranker

    return load_reranker(a.rerank_clap, a.rerank_tokenizer, device, windows=loaded.encoder.get("windows") or {})


def _emit(a, obj, text):
    if a.json:
        print(json.dumps(obj, ensure_ascii=False))
    else:
        print(text)


def _icl(a, loaded, runner, windows, device, n_samples=1, reranker=None) -> int:
    from megaflamingo.inference.fewshot import fewshot_query, neighbours_of, open_index, split_task
    from megaflamingo.inference.prompts import TrainingForm
    from megaflamingo.inference.rerank import answer_query

    if len(windows) != 1:
        raise ValueError("--icl-from takes exactly one --audio (the query)")
    if a.k > loaded.model_config.max_num_fewshot:
        raise ValueError(f"--k {a.k} exceeds the model's max_num_fewshot={loaded.model_config.max_num_fewshot}")
    index = open_index(loaded, a.icl_from)
    neigh = neighbours_of(index, a.audio[0], windows[0], a.k - 1, device, a.clip_checkpoint)
    prefix = a.prefix
    if prefix is None and a.task:
        prefix = TrainingForm.of(loaded.config).prefix(a.task)
    g = answer_query(runner, fewshot_query(loaded, index, neigh, windows[0], a.prompt, prefix).query, n_samples,
                     reranker, a.audio[0])
    _emit(a, {"audio": a.audio, "prompt": a.prompt, "answer": g.text, "task": split_task(index),
              "examples": [{"id": n.id, "output": n.output, "distance": n.distance} for n in neigh], **g.fields()},
          g.lines())
    return 0


def _chat(a, loaded, runner, embedder) -> int:
    from megaflamingo.inference.chat import ChatSession, interactive, run_dialogue_file

    ctx = int(loaded.max_tokens)
    if a.dialogue:
        results = run_dialogue_file(runner, embedder.embed, a.dialogue, a.out, max_context=ctx,
                                    data_root=a.data_root)
        if not a.out or a.json:
            print(json.dumps(results, indent=2, ensure_ascii=False))
        return 0
    if len(a.audio) != 1:
        raise ValueError("interactive --chat needs exactly one --audio")
    session = ChatSession(runner, embedder.embed(a.audio[0]), max_context=ctx)
    interactive(session, sys.stdin, sys.stdout)
    return 0


def _batch(a, loaded, settings, embedder) -> int:
    from megaflamingo.eval.metrics import summarize_batch
    from megaflamingo.inference.batch import batch_items, iter_records, run_batch
    from megaflamingo.inference.prompts import TrainingForm, answer_suffix
    from megaflamingo.inference.runner import Runner

    if not a.out:
        raise ValueError("--manifest needs --out predictions.jsonl")
    items, embed = batch_items(loaded, a.manifest, a.data_root, embedder, a.allow_outside_root, a.task, a.limit)
    run_batch(Runner(loaded, settings), items, a.out, embed=embed, batch_size=a.batch_size,
              prompt_override=a.prompt, prefix=a.prefix, progress=not a.no_progress,
              suffix=answer_suffix(loaded.config), form=TrainingForm.of(loaded.config))
    metrics = summarize_batch(iter_records(Path(a.out)))
    metrics["predictions"] = str(a.out)
    if a.metrics_out:
        Path(a.metrics_out).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(metrics, indent=2))
    return 0


def main(argv=None) -> int:
    from megaflamingo.cli import results_only_on_stdout

    a = build_parser().parse_args(argv)
    results_only_on_stdout()
    try:
        return run(a)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        print(f"megaflamingo-infer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
