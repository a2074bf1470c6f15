"""AF1's answer re-ranking: sample several answers, keep the one LAION-CLAP finds closest to the audio.

AF1's demo sampled 10 answers (top-k 50, top-p 0.95) and sorted them by the cosine similarity of
LAION-CLAP's text embedding of each answer with LAION-CLAP's embedding of the clip. Here:

* the **text tower** is transformers' ``ClapTextModelWithProjection`` (the same RoBERTa encoder +
  two-layer projection LAION-CLAP uses), loaded from the user's LAION-CLAP ``.pt`` by renaming its
  ``text_branch.*`` / ``text_projection.{0,2}.*`` tensors (:func:`laion_text_state_dict`), tokenised
  as LAION does (RoBERTa BPE, truncated at 77 tokens);
* the **audio side** is :class:`megaflamingo.inference.embed.ClipEmbedder`, i.e. exactly the clip
  embedding preprocessing stores for kNN retrieval (first 10 s at 48 kHz, int16 round trip,
  repeat-pad). AF1's demo fed up to 33.25 s through LAION's fusion path, whose crops are random, so
  its scores changed from call to call; ours are deterministic.

Nothing here downloads: the checkpoint and the RoBERTa tokenizer come from paths (or the local
Hugging Face cache); tests build both at run time with random weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .runner import GenerationSettings, Query, Runner

# LAION-CLAP tokenises every text to exactly this many RoBERTa tokens.
LAION_TEXT_LENGTH = 77
# AF1's demo decoding for the candidates.
AF1_RERANK_SAMPLES = 10
AF1_RERANK_TOP_K = 50
AF1_RERANK_TOP_P = 0.95
# The name LAION-CLAP's own code loads its tokenizer by (used from the local HF cache when present).
DEFAULT_TOKENIZER = "roberta-base"


class RerankError(ValueError):
    """The re-ranker cannot be built or used (message names the file / field)."""


@dataclass(frozen=True)
class Candidate:
    """One distinct sampled answer: its LAION-CLAP score and how many samples produced it."""

    text: str
    score: float  # cosine similarity of the text and audio embeddings, in [-1, 1]
    count: int
    first_sample: int  # index of the first sample that produced it (the tie-break)


@dataclass
class Generated:
    """An answer to one query. With several samples: every sample in sampling order; re-ranked:
    also the best one's LAION-CLAP score and every distinct sample, best first."""

    text: str
    prompt: str
    score: Optional[float] = None
    candidates: list[Candidate] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)

    def fields(self) -> dict:
        """What a JSON report adds to the answer: ``samples`` (in sampling order) when there were
        several; ``score`` + ``candidates`` when re-ranked."""
        out = {"samples": list(self.samples)} if len(self.samples) > 1 else {}
        if self.candidates:
            out.update(score=self.score, candidates=[dataclasses.asdict(c) for c in self.candidates])
        return out

    def lines(self) -> str:
        """Plain-text report: the answer; below it, with several samples, one line per candidate
        (``score  count x  text``) or per sample."""
        out = [self.text]
        if self.candidates and len(self.samples) > 1:
            out += [f"{c.score:+.4f}  {c.count}x  {c.text}" for c in self.candidates]
        elif len(self.samples) > 1:
            out += [f"sample {i}: {t}" for i, t in enumerate(self.samples)]
        return "\n".join(out)


# --------------------------------------------------------------------------------------------
# sampling several answers


def sampling_settings(num_samples: Optional[int] = None, rerank: bool = False, top_k: Optional[int] = None,
                      top_p: Optional[float] = None, **kw) -> tuple[GenerationSettings, int]:
    """Decoding settings + number of samples for a request. ``top_k`` / ``top_p`` None = not
    chosen: AF1's 50 / 0.95 when re-ranking (which implies sampling, 10 samples unless
    ``num_samples``), else off (0 / 1.0). Several samples without sampling are refused (greedy and
    beam answers would all be equal). ``kw``: the other :class:`GenerationSettings` fields."""
    if rerank:
        if int(kw.get("num_beams", 1)) > 1:
            raise ValueError("re-ranking samples answers: beam search (num_beams > 1) does not apply")
        kw["do_sample"] = True
    n = int(num_samples) if num_samples is not None else (AF1_RERANK_SAMPLES if rerank else 1)
    if n < 1:
        raise ValueError(f"the number of samples must be >= 1, got {n}")
    if n > 1 and not kw.get("do_sample"):
        raise ValueError(f"{n} samples need sampling (--sample, or --rerank-clap): greedy and beam answers "
                         "are all equal")
    default_k, default_p = (AF1_RERANK_TOP_K, AF1_RERANK_TOP_P) if rerank else (0, 1.0)
    s = GenerationSettings(top_k=default_k if top_k is None else int(top_k),
                           top_p=default_p if top_p is None else float(top_p), **kw)
    s.validate()
    return s, n


def sample_answers(runner: Runner, query: Query, n: int) -> list[str]:
    """``n`` samples for one query: the query repeated ``n`` times in one batch (rows draw
    independent tokens from the one seeded generator, so a seed reproduces all ``n``)."""
    if n < 1:
        raise ValueError(f"num_samples must be >= 1, got {n}")
    if not runner.settings.do_sample:
        raise ValueError("several samples need sampling (do_sample=True); greedy/beam answers are all equal")
    return runner.answer([query] * n)


def rank_samples(reranker: "ClapReranker", audio, samples: Sequence[str], prompt: str) -> Generated:
    """The samples ordered by LAION-CLAP similarity with ``audio`` (a file or its clip embedding)."""
    cands = reranker.rank(audio, samples)
    return Generated(cands[0].text, prompt, cands[0].score, cands, list(samples))


def answer_query(runner: Runner, query: Query, num_samples: int = 1, reranker: Optional["ClapReranker"] = None,
                 audio: Optional[str | os.PathLike] = None, model_lock=None) -> Generated:
    """One answer (``num_samples`` 1, no ``reranker``), the first of ``num_samples`` samples, or,
    with ``reranker``, the sample LAION-CLAP finds closest to ``audio`` (the clip the query is about).
    ``model_lock``: held while the model generates (a server's callers share one model)."""
    if reranker is not None and audio is None:
        raise ValueError("re-ranking needs the audio file the query is about")
    with model_lock or contextlib.nullcontext():
        if reranker is None and num_samples == 1:
            return Generated(runner.answer([query])[0], query.text)
        samples = sample_answers(runner, query, num_samples)
    if reranker is None:
        return Generated(samples[0], query.text, samples=samples)
    return rank_samples(reranker, audio, samples, query.text)


# --------------------------------------------------------------------------------------------
# the text tower


def laion_text_state_dict(sd: dict) -> dict:
    """LAION-CLAP checkpoint tensors -> ``ClapTextModelWithProjection`` names (text side only).

    ``text_branch.X`` (a ``RobertaModel``) -> ``text_model.X``; ``text_projection.0`` / ``.2`` (the
    Linear layers of LAION's ``Sequential(Linear, ReLU, Linear)``) -> ``text_projection.linear1`` /
    ``linear2``. Keys are expected without the DDP ``module.`` prefix."""
    out = {}
    for k, v in sd.items():
        if k.startswith("text_branch."):
            out["text_model." + k[len("text_branch."):]] = v
        elif k.startswith("text_projection.0."):
            out["text_projection.linear1." + k[len("text_projection.0."):]] = v
        elif k.startswith("text_projection.2."):
            out["text_projection.linear2." + k[len("text_projection.2."):]] = v
    return out


def text_config_from_state_dict(sd: dict, overrides: Optional[dict] = None):
    """A ``ClapTextConfig`` with the sizes the mapped tensors have. Head count is not visible in
    shapes: RoBERTa's rule (64-dim heads: 12 for roberta-base) unless ``overrides`` says otherwise.
    Layer-norm eps 1e-5 is RoBERTa's, which LAION-CLAP's text branch is (transformers' CLAP
    default of 1e-12 is not)."""
    from transformers import ClapTextConfig

    try:
        vocab, hidden = sd["text_model.embeddings.word_embeddings.weight"].shape
        positions = sd["text_model.embeddings.position_embeddings.weight"].shape[0]
        types_ = sd["text_model.embeddings.token_type_embeddings.weight"].shape[0]
        inter = sd["text_model.encoder.layer.0.intermediate.dense.weight"].shape[0]
        proj = sd["text_projection.linear2.weight"].shape[0]
    except KeyError as e:
        raise RerankError(f"no LAION-CLAP text tower tensor {e} (expected text_branch.* and "
                          "text_projection.{0,2}.* in the checkpoint)") from None
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layer."))
    args = dict(vocab_size=int(vocab), hidden_size=int(hidden), num_hidden_layers=layers,
                num_attention_heads=max(1, int(hidden) // 64), intermediate_size=int(inter),
                max_position_embeddings=int(positions), type_vocab_size=int(types_), projection_dim=int(proj),
                layer_norm_eps=1e-5, hidden_act="gelu", projection_hidden_act="relu", pad_token_id=1,
                bos_token_id=0, eos_token_id=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    args.update(overrides or {})
    if args["hidden_size"] % args["num_attention_heads"]:
        raise RerankError(f"text tower hidden size {args['hidden_size']} is not divisible by "
                          f"{args['num_attention_heads']} heads (give num_attention_heads)")
    return ClapTextConfig(**args)


def load_tokenizer(name_or_path: Optional[str] = None):
    """The RoBERTa tokenizer LAION-CLAP was trained with: a local directory (vocab.json +
    merges.txt, or tokenizer.json), or a hub name found in the local Hugging Face cache."""
    from transformers import AutoTokenizer

    src = name_or_path or DEFAULT_TOKENIZER
    try:  # never a download: a directory, or what the local Hugging Face cache holds
        tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    except Exception as e:  # missing files / not cached: say what to pass
        raise RerankError(f"cannot load the LAION-CLAP text tokenizer {src!r} ({type(e).__name__}: {e}); "
                          "pass a directory with the roberta-base tokenizer files") from None
    if len(tok) < 8:  # an offline failure can yield a silently empty tokenizer
        raise RerankError(f"tokenizer {src!r} has only {len(tok)} tokens")
    return tok


class ClapTextTower:
    """Texts -> L2-normalised LAION-CLAP text embeddings ``[N, D]`` (float32 numpy)."""

    def __init__(self, model, tokenizer, device: str = "cpu", max_length: int = LAION_TEXT_LENGTH):
        cfg = model.config
        if tokenizer.pad_token_id != cfg.pad_token_id:
            raise RerankError(f"tokenizer pad id {tokenizer.pad_token_id} != the text tower's {cfg.pad_token_id} "
                              "(not the RoBERTa tokenizer this checkpoint was trained with?)")
        if len(tokenizer) > cfg.vocab_size:
            raise RerankError(f"tokenizer has {len(tokenizer)} tokens, the text tower's vocabulary {cfg.vocab_size}")
        # RoBERTa positions start after the padding index, so 77 tokens need 79 position rows.
        if max_length + cfg.pad_token_id + 1 > cfg.max_position_embeddings:
            raise RerankError(f"max_length {max_length} does not fit {cfg.max_position_embeddings} positions")
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.device = torch.device(device)

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @classmethod
    def from_state_dict(cls, sd: dict, tokenizer, device: str = "cpu", config_overrides: Optional[dict] = None,
                        source: str = "checkpoint") -> "ClapTextTower":
        from transformers import ClapTextModelWithProjection

        mapped = laion_text_state_dict(sd)
        cfg = text_config_from_state_dict(mapped, config_overrides)
        model = ClapTextModelWithProjection(cfg)
        own = model.state_dict()
        # Buffers (position / token-type ids) are rebuilt by the model; old checkpoints store them.
        buffers = {n for n, _ in model.named_buffers()}
        weights = {k: v for k, v in mapped.items() if k not in buffers}
        missing = [k for k in own if k not in weights and k not in buffers]
        unexpected = [k for k in weights if k not in own]
        if missing or unexpected:
            raise RerankError(f"{source}: LAION-CLAP text tower does not match a RoBERTa tower: missing "
                              f"{missing[:4]}, unexpected {unexpected[:4]}")
        bad = [k for k in weights if tuple(weights[k].shape) != tuple(own[k].shape)]
        if bad:
            raise RerankError(f"{source}: text tower shape mismatch for {bad[:4]}")
        model.load_state_dict(weights, strict=False)
        return cls(model, tokenizer, device)

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.embed_dim), np.float32)
        out = []
        for i in range(0, len(texts), batch_size):
            # LAION pads every text to 77 tokens; padding is masked out (and RoBERTa's positions
            # count real tokens only), so padding to the batch's longest gives the same embeddings
            # at a fraction of the cost for short answers.
            enc = self.tokenizer(texts[i:i + batch_size], padding="longest", truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            res = self.model(input_ids=enc["input_ids"].to(self.device),
                             attention_mask=enc["attention_mask"].to(self.device))
            out.append(torch.nn.functional.normalize(res.text_embeds.float(), dim=-1).cpu().numpy())
        return np.concatenate(out, 0)


# --------------------------------------------------------------------------------------------
# the re-ranker


def cosine_scores(audio_embedding: np.ndarray, text_embeddings: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Cosine similarity of one audio embedding with each text embedding (AF1: eps 1e-6)."""
    a = np.asarray(audio_embedding, dtype=np.float64).reshape(-1)
    t = np.asarray(text_embeddings, dtype=np.float64)
    if t.ndim != 2 or t.shape[1] != a.shape[0]:
        raise RerankError(f"text embeddings {t.shape} do not match the audio embedding ({a.shape[0]})")
    denom = np.maximum(np.linalg.norm(t, axis=1) * np.linalg.norm(a), eps)
    return (t @ a / denom).astype(np.float32)


def rank_candidates(samples: Sequence[str], scores_by_text: dict) -> list[Candidate]:
    """Distinct samples, best score first; equal scores keep sampling order."""
    first: dict[str, int] = {}
    counts: dict[str, int] = {}
    for i, s in enumerate(samples):
        first.setdefault(s, i)
        counts[s] = counts.get(s, 0) + 1
    cands = [Candidate(s, float(scores_by_text[s]), counts[s], first[s]) for s in first]
    return sorted(cands, key=lambda c: (-c.score, c.first_sample))


class ClapReranker:
    """Scores answers against a clip with LAION-CLAP; ``rank(audio, samples)`` -> candidates."""

    def __init__(self, text_tower: ClapTextTower, clip_embedder, source: str = ""):
        dim = int(clip_embedder.encoder.embed_dim)
        if dim != text_tower.embed_dim:
            raise RerankError(f"{source or 'LAION-CLAP'}: audio embeddings have {dim} dims, text embeddings "
                              f"{text_tower.embed_dim}")
        self.text = text_tower
        self.audio = clip_embedder
        self.source = source
        self._lock = threading.Lock()  # one forward at a time (the demo serves several users)

    def audio_embedding(self, path: str | os.PathLike) -> np.ndarray:
        with self._lock:
            return np.asarray(self.audio.embed(path), dtype=np.float32)

    def scores(self, audio: str | os.PathLike | np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """``audio``: a file path, or its precomputed clip embedding."""
        emb = self.audio_embedding(audio) if isinstance(audio, (str, os.PathLike)) else audio
        with self._lock:
            t = self.text.embed(texts)
        return cosine_scores(emb, t)

    def rank(self, audio: str | os.PathLike | np.ndarray, samples: Sequence[str]) -> list[Candidate]:
        if not samples:
            raise RerankError("no answers to re-rank")
        distinct = list(dict.fromkeys(samples))
        s = self.scores(audio, distinct)
        return rank_candidates(samples, dict(zip(distinct, s.tolist())))


def checkpoint_is_fusion(sd: dict) -> bool:
    """LAION's fusion checkpoints (``*fusion*``) carry the feature-fusion block in the audio branch."""
    return any(k.startswith("audio_branch.") and ".fusion_model." in k for k in sd)


def load_reranker(checkpoint: str | os.PathLike, tokenizer=None, device: str = "cpu", windows: Optional[dict] = None,
                  text_config: Optional[dict] = None) -> ClapReranker:
    """The user's LAION-CLAP checkpoint (e.g. ``630k-audioset-fusion-best.pt``), read with
    ``weights_only=True``: its text tower, and its audio tower through :class:`ClipEmbedder`.
    ``tokenizer``: a tokenizer object, a directory, or None (``roberta-base`` from the local cache).
    ``windows``: the model's window layout (the read span of a clip, as preprocessing)."""
    from megaflamingo.audio.encoders import EncoderError, load_checkpoint

    from .embed import ClipEmbedder

    path = Path(checkpoint)
    if not path.is_file():
        raise RerankError(f"LAION-CLAP checkpoint {path} not found")
    try:
        sd = load_checkpoint(path)
    except EncoderError as e:
        raise RerankError(str(e)) from None
    tok = tokenizer if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)) \
        else load_tokenizer(None if tokenizer is None else str(tokenizer))
    tower = ClapTextTower.from_state_dict(sd, tok, device, text_config, source=str(path))
    record = {"name": "laion-clap", "checkpoint": str(path), "random_init": False,
              "config": {"fusion": checkpoint_is_fusion(sd), "clip_seconds": 10.0, "seed": 0}}
    del sd  # the audio side reads the file again with its own strict loader
    try:
        clip = ClipEmbedder(record, windows or {}, device, str(path))
    except (EncoderError, ValueError) as e:
        raise RerankError(f"{path}: LAION-CLAP audio tower: {e}") from None
    return ClapReranker(tower, clip, source=str(path))
