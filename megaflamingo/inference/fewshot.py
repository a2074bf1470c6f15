"""Retrieval-augmented few-shot answers (AF1's ICL-based RAG): retrieve the query's nearest examples
from a preprocessed train split, show them in their trained form, then ask the query."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .embed import ClipEmbedder, compare_encoders, compare_windows
from .prompts import Example, TrainingForm, answer_suffix, fewshot_prompt
from .retrieval import Neighbour, RetrievalIndex, build_examples
from .runner import Query


@dataclass
class FewShot:
    """A built few-shot query: the model input, the retrieved rows (nearest first) and the examples
    as the prompt shows them (prompt order: farthest first, the nearest right before the query)."""

    query: Query
    neighbours: list[Neighbour]
    examples: list[tuple[Neighbour, Example]]


def split_task(index: RetrievalIndex) -> Optional[str]:
    """The ``<Dataset>-<Task>`` of the split the index was built from."""
    return "-".join(index.meta[k] for k in ("dataset", "task") if index.meta.get(k)) or None


def open_index(loaded, train_split: str) -> RetrievalIndex:
    """A retrieval index over ``train_split``, refused when its embeddings are not the model's (the
    neighbours' stored embeddings go into the model next to the query's)."""
    index = RetrievalIndex(train_split)
    compare_encoders(loaded.encoder["encoder"], index.meta["encoder"], "the model", str(train_split))
    compare_windows(loaded.encoder.get("windows") or {}, index.meta["windows"], "the model", str(train_split))
    return index


def check_shots(loaded, k: int) -> None:
    """``k`` audios (k - 1 examples + the query) must fit the model's few-shot slots."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > loaded.model_config.max_num_fewshot:
        raise ValueError(f"k={k} exceeds the model's max_num_fewshot={loaded.model_config.max_num_fewshot}")


def clip_embedder_for(index: RetrievalIndex, device: str = "cpu",
                      clip_checkpoint: Optional[str] = None) -> Optional[ClipEmbedder]:
    """The query embedder of a split keyed by LAION-CLAP clip embeddings (None for window-mean keys);
    build it once where many queries come (it loads LAION-CLAP)."""
    if not index.use_clip:
        return None
    return ClipEmbedder(index.meta["clip_encoder"], index.meta["windows"], device, clip_checkpoint)


def neighbours_of(index: RetrievalIndex, audio_path: str, windows: np.ndarray, k: int, device: str = "cpu",
                  clip_checkpoint: Optional[str] = None, clip_embedder: Optional[ClipEmbedder] = None
                  ) -> list[Neighbour]:
    """The k nearest train rows of a query clip, never rows of the query's own file.
    ``clip_embedder``: a prebuilt :func:`clip_embedder_for` (else built here when the split needs it)."""
    if index.use_clip:  # the split's keys are LAION-CLAP clip embeddings: embed the query the same way
        embedder = clip_embedder or clip_embedder_for(index, device, clip_checkpoint)
        key = embedder.embed(audio_path)
    else:
        key = index.key_for_windows(windows)
    # AF1 never shows the query's own file as an example (querying with a train clip).
    query = Path(audio_path).resolve().as_posix()
    same_file = [p for p in set(index.paths) if query.endswith("/" + p.lstrip("/"))]
    return index.neighbours(key, k, exclude_paths=same_file)


def fewshot_query(loaded, index: RetrievalIndex, neigh: list[Neighbour], windows: np.ndarray, prompt: str,
                  prefix: Optional[str] = None) -> FewShot:
    """The model input asking ``prompt`` about the query audio with ``neigh`` as in-context examples
    (farthest first), each rendered as training showed its task; ``prefix`` replaces the task's prefix."""
    task = split_task(index)
    form = TrainingForm.of(loaded.config)
    render = None
    if task:  # the examples as training showed them (e.g. mtg-jamendo's fixed question, no options)
        def render(n):
            return Example(*form.render(task, n.path, n.prompt, n.output, no_options=True)[1:], rendered=True)
    examples, ex_windows = build_examples(neigh, render)
    text = fewshot_prompt(loaded.tokenizer, examples, prompt, form.prefix(task) if prefix is None else prefix,
                          suffix=answer_suffix(loaded.config))
    query = Query(text, ex_windows + [windows])
    return FewShot(query, list(neigh), list(zip(reversed(neigh), examples)))

