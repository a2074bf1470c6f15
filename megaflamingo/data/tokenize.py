"""Fast, exact tokenisation of sample texts (see :class:`FastEncoder`)."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from megaflamingo.tokens import EOC_TOKEN as EOC
from megaflamingo.tokens import MEDIA_TOKEN as MEDIA

from .text import SampleText, SpecialText


class FastEncoder:
    """Tokenise like ``tokenizer(text, max_length=m, truncation=True)['input_ids']`` (special tokens
    added, right truncation), faster:

    * through a private copy of the Rust backend (skips the Python wrapper, never touches the
      caller's tokenizer settings);
    * piecewise: a tokenizer splits text at special tokens and encodes the pieces independently,
      so ``intro`` is encoded as the start of the text and every ``<audio>...<|endofchunk|>`` block
      on its own, memoised (prompts and few-shot neighbours repeat a lot). Whether this tokenizer
      really behaves so (no whitespace stripping around special tokens, ...) is checked on probe
      texts when the encoder is first used; if not, whole texts are encoded.
    """

    def __init__(self, tokenizer, special: Optional[SpecialText] = None, cache_size: int = 100_000):
        self.tokenizer = tokenizer
        self.special = special
        self.cache_size = int(cache_size)  # 0: no memoising (pieces are still encoded separately)
        self._backend = None
        self._cache: dict[str, np.ndarray] = {}  # int32 ids (about 0.5 KB per cached shot)
        self._intros: dict[str, np.ndarray] = {}
        self.piecewise: Optional[bool] = None
        self.hits = self.misses = 0

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_backend=None, _cache={}, _intros={}, piecewise=None, hits=0, misses=0)
        return state

    def _get_backend(self):
        if self._backend is None and getattr(self.tokenizer, "is_fast", False):
            from tokenizers import Tokenizer

            bk = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
            bk.no_truncation()
            bk.no_padding()
            self._backend = bk
        return self._backend

    def _full(self, text: str) -> list[int]:
        bk = self._get_backend()
        if bk is not None:
            return bk.encode(text).ids
        return self.tokenizer(text)["input_ids"]

    def _probe(self) -> bool:
        sp = self.special
        if sp is None or self._get_backend() is None:
            return False
        blocks = [f"{MEDIA}describe the sound.\nAnswer:{sp.sep}A dog, barks. {EOC}",
                  f"{MEDIA} question: is it  loud?\n{sp.sep} yes \n{EOC}",
                  f"{MEDIA}\u00e9t\u00e9 \u4e2d\u6587 caf\u00e9?{sp.sep}Ol\u00e1!{EOC}"]
        intros = [sp.bos, f"{sp.bos}The task is audio captioning. ",
                  f"{sp.bos}Here are similar examples. ", f"{sp.bos}Here are random examples. The task is x. "]
        for intro in intros:
            for k in (1, 3):
                st = SampleText(intro, blocks[:k], sp.eos)
                if self._pieces(st) != self._full(st.text):
                    return False
        return True

    def _memo(self, table: dict, text: str, special: bool) -> np.ndarray:
        if self.cache_size <= 0:
            self.misses += 1
            return np.asarray(self._backend.encode(text, add_special_tokens=special).ids, dtype=np.int32)
        ids = table.get(text)
        if ids is None:
            self.misses += 1
            ids = np.asarray(self._backend.encode(text, add_special_tokens=special).ids, dtype=np.int32)
            if len(table) >= self.cache_size:
                table.clear()
            table[text] = ids
        else:
            self.hits += 1
        return ids

    def _encode_pieces(self, text: SampleText, max_length: int) -> np.ndarray:
        parts = [self._memo(self._intros, text.intro, True)]
        n = len(parts[0])
        pieces = text.blocks + ([text.tail] if text.tail else [])
        i = 0
        while i < len(pieces) and n < max_length:  # pieces past max_length would be cut anyway
            ids = self._cache.get(pieces[i]) if self.cache_size > 0 else None
            if ids is not None:
                self.hits += 1
                got = [ids]
            else:
                # encode a run of uncached pieces in one call (cheaper per piece), sized by a
                # guess of >= 32 tokens per piece so that little beyond max_length is tokenised
                j = i + 1
                limit = i + max(1, (max_length - n) // 32)
                while j < len(pieces) and j < limit and (self.cache_size <= 0 or pieces[j] not in self._cache):
                    j += 1
                got = self._encode_many(pieces[i:j])
            for ids in got:
                if n >= max_length:
                    break
                parts.append(ids)
                n += len(ids)
                i += 1
        return np.concatenate(parts)[:max_length].astype(np.int64)

    def _encode_many(self, texts: list[str]) -> list[np.ndarray]:
        self.misses += len(texts)
        # batch calls only when tokenizers will not spread them over threads (per-core costs stay
        # per core; DataLoader workers are the way to use more cores)
        fast = getattr(self._backend, "encode_batch_fast", None)
        serial = os.environ.get("TOKENIZERS_PARALLELISM", "").lower() in ("false", "0", "off", "no")
        if fast is not None and serial and len(texts) > 1:
            encs = fast(texts, add_special_tokens=False)
        else:
            encs = [self._backend.encode(t, add_special_tokens=False) for t in texts]
        out = [np.asarray(e.ids, dtype=np.int32) for e in encs]
        if self.cache_size > 0:
            if len(self._cache) + len(texts) > self.cache_size:
                self._cache.clear()
            self._cache.update(zip(texts, out))
        return out

    def _pieces(self, st: SampleText) -> list[int]:
        parts = [self._memo(self._intros, st.intro, True)]
        parts.extend(self._memo(self._cache, b, False) for b in st.blocks)
        if st.tail:
            parts.append(self._memo(self._cache, st.tail, False))
        return np.concatenate(parts).tolist()

    def __call__(self, text, max_length: int) -> np.ndarray:
        if isinstance(text, SampleText):
            if self.piecewise is None:
                self.piecewise = self._probe()
                self._cache.clear()
                self._intros.clear()
            if self.piecewise and text.blocks:
                return self._encode_pieces(text, max_length)
            text = text.text
        return np.asarray(self._full(text)[:max_length], dtype=np.int64)
