"""Turn prompts + per-audio window embeddings into model inputs and answers.

Audio layout is the training layout: ``L = max_num_fewshot * max_num_window`` slots,
audio k owns slots ``[W*k, W*k + W)``, its windows first, the rest filled with the encoder's
embedding of a silent window and masked out. The audio transformer attends over every slot (AF1
masks nothing there), so padding with anything else than what training used would change answers.
Prompts are left-padded for generation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from megaflamingo.tokens import MEDIA_TOKEN

from .prompts import decode_answer


@dataclass
class GenerationSettings:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    seed: Optional[int] = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")


@dataclass
class Query:
    """One generation request: the prompt text (ending in ``<SEP>``) and one window-embedding array
    ``[num_windows, D]`` per ``<audio>`` in the text, in order."""

    text: str
    audios: list[np.ndarray]
    id: Optional[str] = None
    meta: dict = field(default_factory=dict)


class Runner:
    """Batches queries for one loaded model (see :func:`megaflamingo.inference.load.load_model`)."""

    def __init__(self, loaded, settings: Optional[GenerationSettings] = None):
        self.loaded = loaded
        self.model = loaded.model
        self.tok = loaded.tokenizer
        self.ids = loaded.tokens
        self.settings = settings or GenerationSettings()
        self.settings.validate()
        self.windows = int(loaded.model_config.max_num_window)
        self.max_audios = int(loaded.model_config.max_num_fewshot)
        self.dim = int(loaded.model_config.audio_embed_dim)
        self.silence = np.asarray(loaded.silence_embedding, dtype=np.float32).reshape(-1)
        if self.silence.shape[0] != self.dim:
            raise ValueError(f"silence embedding has {self.silence.shape[0]} dims, model expects {self.dim}")
        self.max_tokens = int(getattr(loaded, "max_tokens", 512) or 512)
        # Hard limit: the LM's position table (prompts longer than training's max_tokens still work
        # up to it, with the usual length-generalisation caveats).
        lm_conf = getattr(getattr(self.model, "lang_encoder", None), "config", None)
        self.context = int(getattr(lm_conf, "max_position_embeddings", 0) or 0) or 4 * self.max_tokens

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def build_batch(self, queries: Sequence[Query]) -> dict:
        if not queries:
            raise ValueError("no queries")
        B, L, D, W = len(queries), self.windows * self.max_audios, self.dim, self.windows
        embeds = np.broadcast_to(self.silence, (B, L, D)).copy()
        mask = np.zeros((B, L), dtype=bool)
        for b, q in enumerate(queries):
            n_media = q.text.count(MEDIA_TOKEN)
            name = q.id or f"query {b}"
            if n_media != len(q.audios):
                raise ValueError(f"{name}: prompt has {n_media} <audio> tokens but {len(q.audios)} audios were given")
            if n_media > self.max_audios:
                raise ValueError(f"{name}: {n_media} audios exceed the model's max_num_fewshot={self.max_audios}")
            for k, a in enumerate(q.audios):
                a = np.asarray(a, dtype=np.float32)
                if a.ndim != 2 or a.shape[1] != D:
                    raise ValueError(f"{name}: audio {k} embeddings have shape {a.shape}, expected [n, {D}]")
                if not 1 <= a.shape[0] <= W:
                    raise ValueError(f"{name}: audio {k} has {a.shape[0]} windows (model takes 1..{W})")
                if not np.isfinite(a).all():
                    raise ValueError(f"{name}: audio {k} embeddings contain NaN/inf")
                embeds[b, W * k: W * k + a.shape[0]] = a
                mask[b, W * k: W * k + a.shape[0]] = True
        enc = [self.tok(q.text, add_special_tokens=True)["input_ids"] for q in queries]
        for q, e in zip(queries, enc):
            if len(e) + self.settings.max_new_tokens > self.context:
                raise ValueError(f"{q.id or 'query'}: prompt of {len(e)} tokens + {self.settings.max_new_tokens} new "
                                 f"tokens exceed the model's context of {self.context}")
        T = max(len(e) for e in enc)
        pad = self.ids.pad
        input_ids = torch.full((B, T), pad, dtype=torch.long)
        attn = torch.zeros((B, T), dtype=torch.long)
        for b, e in enumerate(enc):  # left padding
            input_ids[b, T - len(e):] = torch.tensor(e, dtype=torch.long)
            attn[b, T - len(e):] = 1
        dtype = next(self.model.parameters()).dtype
        return {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attn.to(self.device),
            "audio_embeds": torch.from_numpy(embeds).to(self.device, dtype=dtype),
            "audio_mask": torch.from_numpy(mask).to(self.device),
        }

    @torch.no_grad()
    def answer(self, queries: Sequence[Query]) -> list[str]:
        s = self.settings
        batch = self.build_batch(queries)
        gen = None
        if s.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(int(s.seed))
        self.model.eval()
        out = self.model.generate(
            **batch,
            max_new_tokens=s.max_new_tokens, do_sample=s.do_sample, temperature=s.temperature,
            top_k=s.top_k, top_p=s.top_p, num_beams=s.num_beams, length_penalty=s.length_penalty,
            eos_token_id=[self.ids.eoc, self.ids.eos], pad_token_id=self.ids.pad, generator=gen,
        )
        T = batch["input_ids"].shape[1]
        return [decode_answer(self.tok, row[T:].tolist()) for row in out]
