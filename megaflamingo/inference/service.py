"""A loaded model serving requests about audio files: answers, chat turns, few-shot, re-ranking.

What the demo (and any other long-lived front end) needs beside `megaflamingo-infer`'s one-shot
path, with the same code underneath: the model is loaded once; each file is checked
(:mod:`.uploads`) and embedded once through preprocessing's front end (:class:`.embed.AudioEmbedder`,
cached by content); prompts come from :mod:`.prompts` / :mod:`.fewshot` / :mod:`.chat` exactly as
the CLI builds them; generation is the :class:`.runner.Runner`'s. One request runs the model at a
time (a lock), so concurrent callers queue instead of sharing the model mid-forward.
"""
from __future__ import annotations

import collections
import hashlib
import os
import threading
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .chat import ChatSession
from .prompts import TrainingForm, answer_suffix, multi_audio_prompt
from .rerank import Generated, answer_query
from .runner import GenerationSettings, Query, Runner
from .uploads import DEFAULT_MAX_SECONDS, AudioInfo, UploadError, inspect_upload


def _digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


class InferenceService:
    """``loaded``: :func:`megaflamingo.inference.load.load_model`'s result; ``embedder``: its
    :class:`.embed.ModelEmbedder`. ``index``: a :func:`.fewshot.open_index` for few-shot
    (optional); ``clip_embedder``: its :func:`.fewshot.clip_embedder_for` when the index is keyed by
    LAION-CLAP clip embeddings; ``reranker``: a :class:`.rerank.ClapReranker` (optional)."""

    def __init__(self, loaded, embedder, index=None, clip_embedder=None, reranker=None,
                 max_seconds: float = DEFAULT_MAX_SECONDS, cache_size: int = 32):
        self.loaded = loaded
        self.embedder = embedder
        self.windows_layout = dict(loaded.encoder.get("windows") or {})
        embedder.get()  # encoder errors surface at start-up, as in the CLI
        embedder.fill_silence()
        if index is not None and index.use_clip and clip_embedder is None:
            raise ValueError(f"{index.dir}: keyed by LAION-CLAP clip embeddings; give its clip embedder")
        self.index, self.clip_embedder, self.reranker = index, clip_embedder, reranker
        self.max_seconds = float(max_seconds)
        self.form = TrainingForm.of(loaded.config)
        self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._cache_size = int(cache_size)
        self._cache_lock = threading.Lock()
        self._model_lock = threading.Lock()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_paths(cls, model: str, device: str = "cpu", dtype: Optional[str] = None, config: Optional[str] = None,
                   encoder_checkpoint: Optional[str] = None, encoder_from: Optional[str] = None,
                   cache_dir: Optional[str] = None, icl_from: Optional[str] = None,
                   clip_checkpoint: Optional[str] = None, rerank_clap: Optional[str] = None,
                   rerank_tokenizer: Optional[str] = None, max_seconds: float = DEFAULT_MAX_SECONDS
                   ) -> "InferenceService":
        from .embed import ModelEmbedder
        from .fewshot import clip_embedder_for, open_index
        from .load import encoder_record_from_dataset, load_model

        rec = encoder_record_from_dataset(encoder_from) if encoder_from else None
        loaded = load_model(model, device=device, dtype=dtype, config=config, encoder_record=rec, cache_dir=cache_dir)
        embedder = ModelEmbedder(loaded, device, encoder_checkpoint)
        index = clip = None
        if icl_from:
            index = open_index(loaded, icl_from)
            clip = clip_embedder_for(index, device, clip_checkpoint)
        reranker = None
        if rerank_clap:
            from .rerank import load_reranker

            reranker = load_reranker(rerank_clap, rerank_tokenizer, device, windows=loaded.encoder.get("windows") or {})
        return cls(loaded, embedder, index, clip, reranker, max_seconds)

    # ------------------------------------------------------------------ audio
    @property
    def sample_rate(self) -> int:
        return int(self.embedder.get().encoder.sample_rate)

    def inspect(self, path: Optional[str | os.PathLike]) -> AudioInfo:
        return inspect_upload(path, self.windows_layout, self.sample_rate, self.max_seconds)

    def windows(self, path: str | os.PathLike) -> np.ndarray:
        """Window embeddings of a checked file, computed once per distinct content."""
        self.inspect(path)
        key = _digest(path)
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        from megaflamingo.audio.decode import AudioError

        with self._model_lock:
            try:
                w = self.embedder.embed(path)
            except AudioError as e:  # inspect() accepted it, so this is rare (e.g. ffmpeg mid-file errors)
                raise UploadError(f"the audio cannot be used ({e})") from None
        with self._cache_lock:
            self._cache[key] = w
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return w

    # ------------------------------------------------------------------ prompts
    def prefix_for(self, task: Optional[str], prefix: Optional[str] = None) -> str:
        return prefix if prefix is not None else self.form.prefix(task)

    def foundation_query(self, path, prompt: str, task: Optional[str] = None, prefix: Optional[str] = None) -> Query:
        if not (prompt or "").strip():
            raise UploadError("type an instruction first")
        w = self.windows(path)
        text = multi_audio_prompt(self.loaded.tokenizer, prompt, 1, self.prefix_for(task, prefix),
                                  answer_suffix(self.loaded.config))
        return Query(text, [w])

    def chat_query(self, path, message: str, history: Sequence[tuple[str, str]], settings: GenerationSettings) -> Query:
        if not (message or "").strip():
            raise UploadError("type a message first")
        w = self.windows(path)
        session = ChatSession(Runner(self.loaded, settings), w, list(history), max_context=int(self.loaded.max_tokens))
        return Query(session.prompt_for(message), [w])

    def fewshot_query(self, path, prompt: str, k: int, task: Optional[str] = None, prefix: Optional[str] = None):
        """-> :class:`.fewshot.FewShot`: ``k`` audios (k - 1 retrieved examples + the query) as
        ``megaflamingo-infer --icl-from`` builds them; ``task`` sets the prefix as ``--task`` does."""
        from .fewshot import check_shots, fewshot_query, neighbours_of

        if self.index is None:
            raise UploadError("few-shot needs a train split to retrieve from (start with --icl-from SPLIT_DIR)")
        if not (prompt or "").strip():
            raise UploadError("type an instruction first")
        check_shots(self.loaded, int(k))
        w = self.windows(path)
        with self._model_lock:
            neigh = neighbours_of(self.index, str(path), w, int(k) - 1, clip_embedder=self.clip_embedder)
        if prefix is None and task:
            prefix = self.form.prefix(task)
        return fewshot_query(self.loaded, self.index, neigh, w, prompt, prefix)

    # ------------------------------------------------------------------ generation
    def generate(self, query: Query, settings: GenerationSettings, audio_path=None, num_samples: int = 1,
                 rerank: bool = False) -> Generated:
        """Greedy/beam/sampled answer (:func:`.rerank.answer_query`'s rules); ``rerank``:
        ``num_samples`` samples ordered by LAION-CLAP similarity with ``audio_path`` (the best is the
        answer). The model runs under the service's lock; scoring under the re-ranker's own."""
        runner = Runner(self.loaded, settings)
        if rerank and self.reranker is None:
            raise UploadError("re-ranking needs a LAION-CLAP checkpoint (start with --rerank-clap CKPT)")
        return answer_query(runner, query, num_samples, self.reranker if rerank else None, audio_path,
                            model_lock=self._model_lock)

    def answer(self, path, prompt: str, settings: Optional[GenerationSettings] = None, task: Optional[str] = None,
               prefix: Optional[str] = None, num_samples: int = 1, rerank: bool = False) -> Generated:
        settings = settings or GenerationSettings(max_new_tokens=64)
        return self.generate(self.foundation_query(path, prompt, task, prefix), settings, path, num_samples, rerank)

    def chat(self, path, message: str, history: Sequence[tuple[str, str]] = (),
             settings: Optional[GenerationSettings] = None, num_samples: int = 1, rerank: bool = False) -> Generated:
        settings = settings or GenerationSettings(max_new_tokens=64)
        return self.generate(self.chat_query(path, message, history, settings), settings, path, num_samples, rerank)

    def fewshot(self, path, prompt: str, k: int, settings: Optional[GenerationSettings] = None,
                task: Optional[str] = None, prefix: Optional[str] = None, num_samples: int = 1,
                rerank: bool = False):
        """-> (Generated, FewShot)."""
        settings = settings or GenerationSettings(max_new_tokens=64)
        fs = self.fewshot_query(path, prompt, k, task, prefix)
        return self.generate(fs.query, settings, path, num_samples, rerank), fs

    # ------------------------------------------------------------------ neighbours' audio
    def neighbour_audio(self, neighbour, audio_root: Optional[str | os.PathLike]):
        """(sample_rate, int16 samples) of a retrieved example for playback, or None when the
        split's audio is not available (no root given, file gone, path escaping the root)."""
        if audio_root is None:
            return None
        from megaflamingo.audio.decode import AudioError, read_raw, resolve_in_root
        from megaflamingo.audio.windows import max_span_seconds

        w = self.windows_layout
        span = max_span_seconds(float(w.get("window_s", 7.0)), float(w.get("overlap_s", 5.25)),
                                int(w.get("max_windows", 16)))
        try:
            p = resolve_in_root(audio_root, neighbour.path)
            row = self.index.table.slice(neighbour.row, 1).select(["start"]).to_pylist()[0]
            raw = read_raw(Path(p), float(row.get("start") or 0.0), span, min_file_bytes=0)
        except (AudioError, OSError, KeyError):
            return None
        return raw.sample_rate, (np.clip(raw.samples, -1, 1) * 32767).astype(np.int16)
