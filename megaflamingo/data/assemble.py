"""Turn dataset rows into model samples: text (AF1 templates), token ids, audio window slots.

Text layouts (AF1):
  single      ``{bos}{prefix}<audio>{prompt}{sep}{output}<|endofchunk|>{eos}``
  few-shot    ``{bos}Here are {similar|random} examples. {prefix}`` + per shot
              ``<audio>{prompt}{sep}{output}<|endofchunk|>`` + ``{eos}``
  chat        ``{bos}The task is dialog. <audio>`` + per round
              ``user: {u} \\nassistant: {sep}{a}<|endofchunk|>{eos}\\n``
The tokenizer adds its own bos in front (so OPT samples start with two ``</s>``), then the ids are
cut at ``max_tokens``. Validation text is stripped and lower-cased piecewise as AF1 did.

Audio: audio k (0-based) owns window slots ``[k*W, (k+1)*W)``; its windows fill the first
``num_windows`` slots (mask 1). Every other slot holds the dataset's embedding of a silent window
(mask 0), which is what AF1's zero-padded audio produced after the encoder.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from megaflamingo.data.reader import (ArrowDataset, BlendName, DataError, KnnManifest, inside_root,
                                      parse_blend_name)
from megaflamingo.data.templates import TemplateRegistry

MEDIA = "<audio>"
EOC = "<|endofchunk|>"


@dataclass
class Shot:
    path: str
    prompt: str
    output: str
    windows: np.ndarray  # [n, D]


@dataclass
class Item:
    """What one blend position resolves to before templating."""

    shots: list[Shot] = field(default_factory=list)       # few-shot context first, query last
    dialogue: Optional[list[dict]] = None
    interleaved: Optional[str] = None                       # "similar" / "random" / None


class Source:
    """One blend/valid entry: a split directory, read directly or through its kNN manifest."""

    def __init__(self, data_root: str | Path, name: str, datasets: Optional[dict] = None,
                 allow_outside_root: bool = False):
        self.bn: BlendName = parse_blend_name(name)
        self.name = name
        cache = datasets if datasets is not None else {}
        directory = inside_root(data_root, self.bn.split_dir, allow_outside_root, what=f"{name}: dataset directory")
        if not directory.is_dir():
            raise DataError(f"{name}: dataset directory {directory} does not exist")
        key = str(directory.resolve())
        if key not in cache:
            cache[key] = ArrowDataset(directory)
        self.ds: ArrowDataset = cache[key]
        self.knn: Optional[KnnManifest] = None
        if self.bn.interleaved:
            self.knn = KnnManifest(self.ds, self.bn.manifest_file, cache,
                                   data_root=None if allow_outside_root else data_root)
        if len(self) == 0:
            raise DataError(f"{name}: {'kNN manifest' if self.knn else 'dataset'} "
                            f"{self.knn.path if self.knn else directory} has no rows")

    def __len__(self) -> int:
        return len(self.knn) if self.knn is not None else self.ds.num_rows

    @property
    def flamingo_task(self) -> str:
        return self.bn.flamingo_task

    def _shot(self, ds: ArrowDataset, row: int, allow_dialogue: bool = False) -> Shot | Item:
        path, prompt, output, windows, has_dialogue = ds.shot(row)
        if has_dialogue and allow_dialogue:
            return Item([Shot(path, "", "", windows)], dialogue=ds.text(row, "dialogue"))
        if prompt is None or output is None:
            raise DataError(f"{self.name}: row {row} of {ds.directory} has no prompt/output "
                            f"(id {ds.text(row, 'id')!r}); a chat dataset needs 'dialogue'")
        return Shot(path, prompt, output, windows)

    def item(self, j: int) -> Item:
        if self.knn is None:
            got = self._shot(self.ds, j, allow_dialogue=True)
            return got if isinstance(got, Item) else Item([got])
        shots = [self._shot(self.knn.train, int(n)) for n in self.knn.neighbors(j)]
        shots.append(self._shot(self.ds, int(self.knn.index[j])))
        return Item(shots, interleaved="similar" if self.bn.interleaved == "knn" else "random")

    def text_lengths(self) -> np.ndarray:
        """Rough text length per item (characters), for length-grouped batching."""
        if not hasattr(self, "_lengths"):
            ds = self.ds
            own = ds.column_lengths("prompt") + ds.column_lengths("output") + 16
            if self.knn is None:
                self._lengths = own
            else:
                tr = self.knn.train
                t_own = own if tr is ds else tr.column_lengths("prompt") + tr.column_lengths("output") + 16
                per_val = t_own[self.knn.values]
                csum = np.concatenate([[0], np.cumsum(per_val)])
                nb_sum = csum[self.knn.offsets[1:]] - csum[self.knn.offsets[:-1]]
                self._lengths = own[self.knn.index] + nb_sum
        return self._lengths

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_lengths", None)
        return state


# ----------------------------------------------------------------------------------- text


@dataclass(frozen=True)
class SpecialText:
    bos: str
    eos: str
    sep: str

    @classmethod
    def from_tokenizer(cls, tokenizer, token_ids: Mapping[str, int]) -> "SpecialText":
        conv = tokenizer.convert_ids_to_tokens
        return cls(bos=conv(int(token_ids["bos"])), eos=conv(int(token_ids["eos"])), sep=conv(int(token_ids["sep"])))


def _eval(x: str) -> str:
    return x.strip().lower()


def valid_task_key(flamingo_task: str) -> str:
    """AF1's task string for a validation set that borrows its settings from the training blend."""
    task = f"{flamingo_task}/val"
    for a, b in (("/val", "/train"), ("/test", "/train"), ("-val", "-train"), ("-test", "-train")):
        task = task.replace(a, b)
    return task


@dataclass
class SampleText:
    """A sample string cut where the tokenizer cuts anyway (at special tokens): ``intro`` (starts the
    text), ``blocks`` (each ``<audio>...<|endofchunk|>``), ``tail`` (the closing eos)."""

    intro: str
    blocks: list[str] = field(default_factory=list)
    tail: str = ""

    @property
    def text(self) -> str:
        return self.intro + "".join(self.blocks) + self.tail


def build_text(item: Item, sp: SpecialText, registry: TemplateRegistry, **kw) -> str:
    """The sample string for ``item`` (see :func:`build_parts`)."""
    return build_parts(item, sp, registry, **kw).text


def build_parts(item: Item, sp: SpecialText, registry: TemplateRegistry, *, flamingo_task: str,
                split: str, augmentations: Mapping[str, float], prefix_prob: float,
                rng: Optional[np.random.Generator]) -> SampleText:
    """The sample text for ``item`` (training if ``split == 'train'``, else AF1's eval text)."""
    if item.dialogue is not None:
        parts = [f"{sp.bos}The task is dialog. {MEDIA}"]
        for k, turn in enumerate(item.dialogue):
            if not isinstance(turn, Mapping) or turn.get("user") is None or turn.get("assistant") is None:
                raise DataError(f"{flamingo_task}: dialogue round {k} lacks user/assistant text")
            parts.append(f"user: {turn['user']} \nassistant: {sp.sep}{turn['assistant']}{EOC}{sp.eos}\n")
        return SampleText("".join(parts))

    train = split == "train"
    task = f"{flamingo_task}/train" if train else valid_task_key(flamingo_task)
    n = len(item.shots)
    out = SampleText("", [], sp.eos)
    for k, shot in enumerate(item.shots):
        aug = registry.augment(path=shot.path, prompt=shot.prompt.lower(), output=shot.output.lower(),
                               task=task, split="train" if train else "val",
                               augmentations=augmentations, prefix_prob=prefix_prob, rng=rng,
                               no_options=(item.interleaved is not None and k < n - 1))
        if train:
            block = f"{MEDIA}{aug.prompt.strip()}{sp.sep}{aug.output.strip()}{EOC}"
        else:
            block = f"{MEDIA}{_eval(aug.prompt)}{sp.sep}{_eval(aug.output)}{EOC}"
        if k == 0:
            if item.interleaved is None:
                out.intro = f"{sp.bos}{aug.prefix if train else _eval(aug.prefix)}"
            else:  # AF1 kept the few-shot prefix as is, also in validation
                out.intro = f"{sp.bos}Here are {item.interleaved} examples. {aug.prefix}"
        out.blocks.append(block)
        if item.interleaved is None:
            break
    return out


# ----------------------------------------------------------------------------------- tokens


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

    def __init__(self, tokenizer, special: Optional["SpecialText"] = None, cache_size: int = 100_000):
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


# ----------------------------------------------------------------------------------- audio


def fill_audio_slots(out, mask, windows: Sequence[np.ndarray], silence: np.ndarray, max_windows: int) -> None:
    """Write one sample's audio into ``out`` [L, D] / ``mask`` [L] (preallocated torch tensors or
    numpy arrays). Unused slots get ``silence`` and mask 0."""
    L = out.shape[0]
    if len(windows) * max_windows > L:
        raise DataError(f"sample has {len(windows)} audios but the model has room for "
                        f"{L // max_windows} (model.max_num_fewshot)")
    if isinstance(out, np.ndarray):
        out[:] = silence
        mask[:] = False
        put = lambda lo, w: out.__setitem__(slice(lo, lo + len(w)), w)  # noqa: E731
    else:  # torch copies (with dtype conversion) are vectorised, numpy's float16 casts are not
        import torch

        out.copy_(torch.from_numpy(np.asarray(silence, dtype=np.float32)).expand_as(out))
        mask.zero_()
        put = lambda lo, w: out[lo:lo + len(w)].copy_(torch.from_numpy(w))  # noqa: E731
    for k, w in enumerate(windows):
        n = w.shape[0]
        if n == 0 or n > max_windows:
            raise DataError(f"audio {k} has {n} windows (allowed 1..{max_windows})")
        put(k * max_windows, w)
        mask[k * max_windows:k * max_windows + n] = True
