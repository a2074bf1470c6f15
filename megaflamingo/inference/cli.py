"""`megaflamingo-infer`: foundation prompts, chat, retrieval-augmented few-shot, batch JSONL.

    megaflamingo-infer --model DIR --audio a.wav [--audio b.wav] --prompt "classify this sound."
    megaflamingo-infer --model DIR --audio a.wav --chat                       # interactive
    megaflamingo-infer --model DIR --chat --dialogue talk.json --out answers.json
    megaflamingo-infer --model DIR --audio a.wav --prompt "..." --icl-from DATA/<ds>-<task>/train --k 8
    megaflamingo-infer --model DIR --manifest test.jsonl --data-root DATA --out predictions.jsonl
    megaflamingo-infer --model DIR --audio a.wav --prompt "..." --task AudioSet-EventClassification

Prompts take the form training gave their task (prefix "The task is event classification. " where
training showed it): from --task, the --icl-from split's task, or each batch item's task; --prefix
TEXT replaces the prefix.

--model takes an exported model directory, a DeepSpeed run/checkpoint directory, or an AF1
checkpoint (.pt or its parts; with --config).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megaflamingo-infer", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported model dir, DeepSpeed checkpoint dir, or AF1 .pt")
    p.add_argument("--config", help="config YAML (required for AF1 checkpoints)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None)
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
    p.add_argument("--dialogue", help="JSON dialogue file (with --chat): answers every user turn")
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
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="only the first N manifest items")
    p.add_argument("--no-progress", action="store_true")
    # generation
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy/beam")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return p


def _device(arg):
    import torch

    if arg:
        return arg
    return "cuda" if torch.cuda.is_available() else "cpu"


def run(a) -> int:
    from .load import encoder_record_from_dataset, load_model
    from .runner import GenerationSettings, Runner

    if a.chat and a.manifest:
        raise ValueError("--chat and --manifest are exclusive")
    if a.icl_from and (a.chat or a.manifest):
        raise ValueError("--icl-from works with --audio/--prompt only")
    if not a.manifest and not a.chat and not a.audio:
        raise ValueError("give --audio FILE (with --prompt), --chat, or --manifest M")
    if a.k < 1:
        raise ValueError(f"--k must be >= 1, got {a.k}")

    device = _device(a.device)
    rec = encoder_record_from_dataset(a.encoder_from) if a.encoder_from else None
    loaded = load_model(a.model, device=device, dtype=a.dtype, config=a.config, encoder_record=rec,
                        cache_dir=a.cache_dir)
    settings = GenerationSettings(max_new_tokens=a.max_new_tokens, do_sample=a.sample, temperature=a.temperature,
                                  top_k=a.top_k, top_p=a.top_p, num_beams=a.num_beams, seed=a.seed)
    runner_embedder = _Lazy(loaded, device, a.encoder_checkpoint)

    if a.manifest:
        return _batch(a, loaded, settings, runner_embedder)

    from .embed import AudioEmbedder  # noqa: F401  (import errors surface before the model runs)

    if a.chat:
        return _chat(a, loaded, settings, runner_embedder)

    if not a.prompt:
        raise ValueError("--prompt is required with --audio")
    runner = Runner(_with_silence(loaded, runner_embedder), settings)
    windows = [runner_embedder.embed(x) for x in a.audio]
    if a.icl_from:
        return _icl(a, loaded, runner, windows)
    from .prompts import TrainingForm, answer_suffix, multi_audio_prompt
    from .runner import Query

    prefix = _prefix(a, TrainingForm.of(loaded.config))
    text = multi_audio_prompt(loaded.tokenizer, a.prompt, len(windows), prefix, answer_suffix(loaded.config))
    answer = runner.answer([Query(text, windows)])[0]
    _emit(a, {"audio": a.audio, "prompt": a.prompt, "answer": answer}, answer)
    return 0


class _Lazy:
    """Builds the audio embedder on first use (batch runs over preprocessed splits never need it)."""

    def __init__(self, loaded, device, checkpoint):
        self.loaded, self.device, self.checkpoint, self._e = loaded, device, checkpoint, None

    def get(self):
        if self._e is None:
            from .embed import AudioEmbedder

            rec = self.loaded.encoder
            self._e = AudioEmbedder(rec["encoder"], rec.get("windows") or {}, self.device, self.checkpoint,
                                    rec.get("silence_embedding"))
        return self._e

    def embed(self, path, start: float = 0.0):
        if not Path(path).is_file():
            raise FileNotFoundError(f"audio file {path} does not exist")
        return self.get().embed(path, start)


def _with_silence(loaded, lazy):
    if loaded.encoder.get("silence_embedding") is None:
        loaded.encoder["silence_embedding"] = lazy.get().silence.tolist()
    return loaded


def _prefix(a, form, default_task=None) -> str:
    """--prefix as given, else the prefix training gave --task (or ``default_task``)."""
    return a.prefix if a.prefix is not None else form.prefix(a.task or default_task)


def _emit(a, obj, text):
    if a.json:
        print(json.dumps(obj, ensure_ascii=False))
    else:
        print(text)


def _icl(a, loaded, runner, windows) -> int:
    from .embed import compare_encoders, compare_windows
    from .prompts import Example, TrainingForm, answer_suffix, fewshot_prompt
    from .retrieval import RetrievalIndex, build_examples
    from .runner import Query

    if len(windows) != 1:
        raise ValueError("--icl-from takes exactly one --audio (the query)")
    if a.k > loaded.model_config.max_num_fewshot:
        raise ValueError(f"--k {a.k} exceeds the model's max_num_fewshot={loaded.model_config.max_num_fewshot}")
    index = RetrievalIndex(a.icl_from)
    # Neighbours' stored embeddings go into the model next to the query's: same encoder required.
    compare_encoders(loaded.encoder["encoder"], index.meta["encoder"], "the model", a.icl_from)
    compare_windows(loaded.encoder.get("windows") or {}, index.meta["windows"], "the model", a.icl_from)
    if index.use_clip:  # the split's keys are LAION-CLAP clip embeddings: embed the query the same way
        from .embed import ClipEmbedder

        key = ClipEmbedder(index.meta["clip_encoder"], index.meta["windows"], _device(a.device),
                           a.clip_checkpoint).embed(a.audio[0])
    else:
        key = index.key_for_windows(windows[0])
    # AF1 never shows the query's own file as an example (querying with a train clip).
    query = Path(a.audio[0]).resolve().as_posix()
    same_file = [p for p in set(index.paths) if query.endswith("/" + p.lstrip("/"))]
    neigh = index.neighbours(key, a.k - 1, exclude_paths=same_file)
    split_task = "-".join(index.meta[k] for k in ("dataset", "task") if index.meta.get(k)) or None
    form = TrainingForm.of(loaded.config)
    render = None
    if split_task:  # the examples as training showed them (e.g. mtg-jamendo's fixed question, no options)
        def render(n):
            return Example(*form.render(split_task, n.path, n.prompt, n.output, no_options=True)[1:])
    examples, ex_windows = build_examples(neigh, render)
    text = fewshot_prompt(loaded.tokenizer, examples, a.prompt, _prefix(a, form, split_task),
                          suffix=answer_suffix(loaded.config))
    answer = runner.answer([Query(text, ex_windows + windows)])[0]
    _emit(a, {"audio": a.audio, "prompt": a.prompt, "answer": answer,
              "examples": [{"id": n.id, "output": n.output, "distance": n.distance} for n in neigh]}, answer)
    return 0


def _chat(a, loaded, settings, lazy) -> int:
    from .chat import ChatSession, interactive, run_dialogue_file
    from .runner import Runner

    runner = Runner(_with_silence(loaded, lazy), settings)
    ctx = int(loaded.max_tokens)
    if a.dialogue:
        base = Path(a.data_root) if a.data_root else Path(a.dialogue).parent

        def windows_for(audio):
            p = Path(audio)
            return lazy.embed(p if p.is_absolute() or p.is_file() else base / p)

        results = run_dialogue_file(runner, windows_for, a.dialogue, a.out, max_context=ctx)
        if not a.out or a.json:
            print(json.dumps(results, indent=2, ensure_ascii=False))
        return 0
    if len(a.audio) != 1:
        raise ValueError("interactive --chat needs exactly one --audio")
    session = ChatSession(runner, lazy.embed(a.audio[0]), max_context=ctx)
    interactive(session, sys.stdin, sys.stdout)
    return 0


def _batch(a, loaded, settings, lazy) -> int:
    from .batch import items_from_manifest, items_from_split, run_batch
    from .embed import compare_encoders, compare_windows
    from .runner import Runner

    if not a.out:
        raise ValueError("--manifest needs --out predictions.jsonl")
    m = Path(a.manifest)
    if m.is_dir():
        items, record, _ = items_from_split(m)
        compare_encoders(loaded.encoder["encoder"], record["encoder"], "the model", str(m))
        compare_windows(loaded.encoder.get("windows") or {}, record["windows"], "the model", str(m))
        if loaded.encoder.get("silence_embedding") is None:
            loaded.encoder["silence_embedding"] = record["silence_embedding"]
        embed = None
    else:
        items, _ = items_from_manifest(m, a.data_root)
        root = Path(a.data_root) if a.data_root else m.parent
        _with_silence(loaded, lazy)

        def embed(it):
            from megaflamingo.audio.decode import resolve_in_root

            return lazy.embed(resolve_in_root(root, it.path, a.allow_outside_root), it.start)
    if a.limit is not None:
        items = items[:a.limit]
    if a.task:  # the user names the task for a manifest that lacks one (or to override it)
        items = [dataclasses.replace(it, task=a.task) for it in items]
    runner = Runner(loaded, settings)
    from .prompts import TrainingForm, answer_suffix

    metrics = run_batch(runner, items, a.out, embed=embed, batch_size=a.batch_size, prompt_override=a.prompt,
                        prefix=a.prefix, progress=not a.no_progress, suffix=answer_suffix(loaded.config),
                        form=TrainingForm.of(loaded.config))
    metrics["predictions"] = str(a.out)
    if a.metrics_out:
        Path(a.metrics_out).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(metrics, indent=2))
    return 0


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return run(a)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        print(f"megaflamingo-infer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
