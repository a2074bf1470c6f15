"""Batch inference over a manifest: resumable JSONL predictions + task metrics.

Inputs: a raw manifest (AF1 JSON / JSON list / JSONL, audio under ``--data-root``; embeddings are
computed in-process with the model's encoder), or a preprocessed split directory (its stored window
embeddings are used; its encoder must be the model's).

Prompts take the form the model's training gave their task: an item with a task (a preprocessed
split's ``task`` column, or a manifest's dataset and task) is rendered with the training blend's
augmentations as validation renders them (e.g. mtg-jamendo's fixed question) and gets the task
prefix where training showed it, so predictions are scored against the answer form training taught. ``prefix`` (``--prefix``) replaces
the task prefix for every item; ``prompt_override`` (``--prompt``) is used as given.

Output: one JSON object per line ``{id, path, prompt, prediction, output?, task?}`` (``output``: the
reference in its trained form), flushed after every batch. A rerun skips ids already in the file (a torn last line from a killed run is dropped),
so ``--out`` doubles as the resume state. Metrics are computed over the whole file at the end.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from megaflamingo.audio.decode import AudioError
from megaflamingo.io import cut_torn_tail

from .prompts import ANSWER_SUFFIX, multi_audio_prompt
from .runner import Query, Runner


@dataclass
class Item:
    id: str
    path: str
    prompt: Optional[str]
    output: Optional[str]
    task: Optional[str]
    start: float = 0.0
    windows: Optional[np.ndarray] = None  # precomputed (preprocessed split)


def read_done(out: Path) -> set[str]:
    """Ids already written; drops a torn final line (the only line a kill can leave half-written)."""
    if not out.is_file():
        return set()
    cut_torn_tail(out)
    done: set[str] = set()
    for n, line in enumerate(out.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{out}: line {n} is not a JSON record; refusing to append to it") from None
        if not isinstance(rec, dict) or "id" not in rec:
            raise ValueError(f"{out}: line {n} has no 'id'; not a predictions file?")
        done.add(str(rec["id"]))
    return done


def eval_text(it: Item, form=None, prefix: Optional[str] = None,
              prompt_override: Optional[str] = None) -> tuple[str, str, Optional[str], bool]:
    """(prefix, prompt, reference, rendered) for ``it`` in the form the model's training gave its task
    (``form``: ``prompts.TrainingForm``); ``prefix`` replaces the task's, ``prompt_override`` the prompt.
    ``rendered``: the prompt is the trained form already (to be used verbatim, see
    ``prompts.multi_audio_prompt``), else it is raw text that still gets the training normalisation."""
    prompt = prompt_override or it.prompt
    if not prompt:
        raise ValueError(f"item {it.id}: no prompt (give the manifest a 'prompt' or pass --prompt)")
    if form is None or not it.task:
        return prefix or "", prompt, it.output, False
    # rendered from the item's own prompt (it seeds the augmentation choice, as in validation)
    task_pre, trained_prompt, ref = form.render(it.task, it.path, it.prompt or prompt, it.output)
    # --prompt is the user's question as typed; the reference still takes its trained form
    pre = task_pre if prefix is None else prefix
    return (pre, prompt, ref, False) if prompt_override else (pre, trained_prompt, ref, True)


def query_text(tokenizer, it: Item, form=None, prefix: Optional[str] = None, prompt_override: Optional[str] = None,
               suffix: str = ANSWER_SUFFIX) -> tuple[str, Optional[str]]:
    """(generation prompt, reference) of one item (see :func:`eval_text`)."""
    pre, prompt, ref, rendered = eval_text(it, form, prefix, prompt_override)
    return multi_audio_prompt(tokenizer, prompt, 1, pre, suffix, rendered=rendered), ref


def items_from_manifest(path: str | os.PathLike, data_root: Optional[str]) -> tuple[list[Item], Optional[str]]:
    from megaflamingo.data.manifests import read_manifest

    man = read_manifest(path, data_root)
    # AF1's flamingo task "<dataset>-<Task>", the key of the training templates
    task = f"{man.dataset}-{man.task}" if man.dataset and man.task else man.task
    items = []
    for it in man.items:
        if it.dialogue is not None and it.prompt is None:
            raise ValueError(f"{path}: item {it.index} is a dialogue; use --chat --dialogue for chat data")
        items.append(Item(id=it.id or f"{it.index}", path=it.path, prompt=it.prompt, output=it.output,
                          task=task, start=it.start))
    return items, task


def items_from_split(split_dir: str | os.PathLike) -> tuple[list[Item], dict, Optional[str]]:
    import pyarrow as pa

    from megaflamingo.data.arrow_format import open_shards, read_metadata, row_windows

    meta = read_metadata(split_dir)
    tables = open_shards(split_dir)
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    cols = table.select(["id", "path", "prompt", "output", "task", "start"]).to_pylist()
    items = [Item(id=r["id"], path=r["path"], prompt=r["prompt"], output=r["output"], task=r["task"],
                  start=r["start"], windows=np.array(row_windows(table, i), dtype=np.float32))
             for i, r in enumerate(cols)]
    record = {"encoder": meta["encoder"], "windows": meta["windows"], "silence_embedding": meta["silence_embedding"]}
    return items, record, meta.get("task")


def run_batch(
    runner: Runner,
    items: Sequence[Item],
    out: str | os.PathLike,
    embed: Optional[Callable[[Item], np.ndarray]] = None,
    batch_size: int = 8,
    prompt_override: Optional[str] = None,
    prefix: Optional[str] = None,
    progress: bool = True,
    suffix: str = ANSWER_SUFFIX,
    form=None,
) -> int:
    """Answer every item not yet in ``out``; return how many were answered now (score the whole file
    with ``megaflamingo.eval.metrics.summarize_batch(iter_records(out))``).

    ``form``: how the model's training rendered each task (``prompts.TrainingForm.of(config)``);
    without it items are prompted as given, with ``prefix`` (default none)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ids = [it.id for it in items]
    dup = {i for i in ids if ids.count(i) > 1} if len(set(ids)) != len(ids) else set()
    if dup:
        raise ValueError(f"duplicate item ids in the manifest: {sorted(dup)[:5]}")
    done = read_done(out)
    todo = [it for it in items if it.id not in done]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), initial=len(items) - len(todo), unit="clip", desc="infer", dynamic_ncols=True)
    with open(out, "a", encoding="utf-8") as f:
        for lo in range(0, len(todo), batch_size):
            chunk, queries, refs = [], [], []
            for it in todo[lo:lo + batch_size]:
                text, ref = query_text(runner.tok, it, form, prefix, prompt_override, suffix)
                try:
                    windows = it.windows if it.windows is not None else embed(it)
                except AudioError as e:
                    # A bad file is reported in the output (so a resumed run skips it too), not fatal.
                    f.write(json.dumps({"id": it.id, "path": it.path, "error": str(e)}, ensure_ascii=False) + "\n")
                    continue
                chunk.append(it)
                refs.append(ref)
                queries.append(Query(text, [windows], id=it.id))
            answers = runner.answer(queries) if queries else []
            for it, ref, ans in zip(chunk, refs, answers):
                rec = {"id": it.id, "path": it.path, "prompt": prompt_override or it.prompt, "prediction": ans}
                if ref is not None:
                    rec["output"] = ref
                if it.task:
                    rec["task"] = it.task
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            if bar is not None:
                bar.update(len(todo[lo:lo + batch_size]))
    if bar is not None:
        bar.close()
    return len(todo)


def iter_records(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def batch_items(loaded, manifest: str | os.PathLike, data_root: Optional[str], embedder,
                allow_outside_root: bool = False, task: Optional[str] = None,
                limit: Optional[int] = None) -> tuple[list[Item], Optional[Callable[[Item], np.ndarray]]]:
    """The items of a manifest (embedded on the fly by ``embedder``, a ``ModelEmbedder``) or of a
    preprocessed split dir (its stored embeddings, refused unless made by the model's encoder), and
    the embedding function (None for a split). ``task`` names the task for a manifest lacking one."""
    from megaflamingo.audio.decode import resolve_in_root

    from .embed import compare_encoders, compare_windows

    m = Path(manifest)
    if m.is_dir():
        items, record, _ = items_from_split(m)
        compare_encoders(loaded.encoder["encoder"], record["encoder"], "the model", str(m))
        compare_windows(loaded.encoder.get("windows") or {}, record["windows"], "the model", str(m))
        if loaded.encoder.get("silence_embedding") is None:
            loaded.encoder["silence_embedding"] = record["silence_embedding"]
        embed = None
    else:
        items, _ = items_from_manifest(m, data_root)
        root = Path(data_root) if data_root else m.parent
        embedder.fill_silence()

        def embed(it: Item) -> np.ndarray:
            return embedder.embed(resolve_in_root(root, it.path, allow_outside_root), it.start)
    if limit is not None:
        items = items[:limit]
    if task:  # the user names the task for a manifest that lacks one (or to override it)
        items = [dataclasses.replace(it, task=task) for it in items]
    return items, embed
