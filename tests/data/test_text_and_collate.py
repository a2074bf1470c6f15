"""Sample text, tokenisation, audio slots, chat and collation."""
import dataclasses

import numpy as np
import pytest
import torch

from megaflamingo.config import DataConfig, DatasetEntry, ModelConfig
from megaflamingo.data import build_train_loader, build_valid_loaders
from megaflamingo.data.sources import Item, Shot
from megaflamingo.data.text import SampleText, SpecialText, build_text
from megaflamingo.data.tokenize import FastEncoder
from megaflamingo.data.collate import Collator
from megaflamingo.data.labels import build_labels
from megaflamingo.data.templates import TemplateRegistry
from megaflamingo.testing import tiny_tokenizer, token_ids

from tests.data.data_fixtures import D, W, make_knn, make_split

MODEL = ModelConfig(audio_embed_dim=D, max_num_window=W, max_num_fewshot=4)


def _shot(i, prompt="question: is it loud?", output="Yes"):
    return Shot(f"d/{i}.wav", prompt, output, np.full((1, D), i, np.float32))


def test_fewshot_text_train_and_val(tiny_tok, tiny_token_ids):
    sp = SpecialText.from_tokenizer(tiny_tok, tiny_token_ids)
    item = Item([_shot(0), _shot(1), _shot(2, output="No")], interleaved="similar")
    kw = dict(flamingo_task="Clotho-AQA-AQA", augmentations={"AQA_binary_instruction": 1.0}, prefix_prob=1.0)
    t = build_text(item, sp, TemplateRegistry(), split="train", rng=np.random.default_rng(0), **kw)
    shot = "<audio>please answer this question: is it loud?\nOPTIONS:\nyes.\nno.\nAnswer:<SEP>{}<|endofchunk|>"
    assert t == ("</s>Here are similar examples. The task is audio question answering. "
                 + shot.format("yes") + shot.format("yes") + shot.format("no") + "</s>")
    v = build_text(item, sp, TemplateRegistry(), split="val", rng=None, **kw)
    # validation: pieces stripped + lower-cased, the few-shot prefix kept as is (AF1)
    assert v.startswith("</s>Here are similar examples. The task is audio question answering. <audio>")
    assert "\noptions:\nyes.\nno.\nanswer:<SEP>" in v
    single = build_text(Item([_shot(0)]), sp, TemplateRegistry(), split="val", rng=None, **kw)
    assert single.startswith("</s>the task is audio question answering.<audio>please answer")


def test_chat_text(tiny_tok, tiny_token_ids):
    sp = SpecialText.from_tokenizer(tiny_tok, tiny_token_ids)
    item = Item([_shot(0)], dialogue=[{"user": "What is It?", "assistant": "A Dog."},
                                      {"user": "loud?", "assistant": "yes"}])
    t = build_text(item, sp, TemplateRegistry(), flamingo_task="AudioSetSL-Dialog", split="train",
                   augmentations={"do_nothing": 1.0}, prefix_prob=0.0, rng=np.random.default_rng(0))
    assert t == ("</s>The task is dialog. <audio>user: What is It? \nassistant: <SEP>A Dog.<|endofchunk|></s>\n"
                 "user: loud? \nassistant: <SEP>yes<|endofchunk|></s>\n")


@pytest.mark.parametrize("style", ["opt", "llama"])
def test_fast_encoder_equals_tokenizer_call(style):
    tok = tiny_tokenizer(style)
    enc = FastEncoder(tok)
    text = ("</s>Here are similar examples. The task is audio captioning. <audio>describe the sound"
            "\nAnswer:<SEP>a dog barks<|endofchunk|>") * 6 + "</s>"
    for m in (512, 40, 7):
        want = tok(text, max_length=m, truncation="only_first", padding="longest")["input_ids"]
        assert enc(text, m).tolist() == want
    ids = token_ids(tok)
    full = enc(text, 10_000)
    assert full[0] == ids.bos and (full == ids.media).sum() == 6 and (full == ids.sep).sum() == 6


def test_collate_pads_right_and_fills_silence(tiny_token_ids):
    silence = np.full(D, -7.0, np.float32)
    w0 = np.ones((2, D), np.float16)
    w1 = np.full((W, D), 2, np.float16)
    s1 = {"input_ids": np.array([2, 2, 3, 9, 5, 10, 4, 2]), "windows": [w0, w1], "silence": silence, "dataset": "a"}
    s2 = {"input_ids": np.array([2, 2, 3, 9, 5, 11, 4, 2, 7, 7, 5, 12, 4, 2]), "windows": [w1],
          "silence": silence, "dataset": "b"}
    ids = dataclasses.replace(tiny_token_ids, media=3, sep=5, eoc=4, eos=2, pad=1)
    b = Collator(ids, 4 * W, W, D)([s1, s2])
    assert b["input_ids"].shape == (2, 14) and b["input_ids"][0, 8:].eq(1).all()
    assert b["attention_mask"].sum(1).tolist() == [8, 14]
    assert torch.equal(b["labels"], build_labels(b["input_ids"], ids))
    assert b["audio_embeds"].dtype == torch.float32 and b["audio_embeds"].shape == (2, 4 * W, D)
    m = b["audio_mask"]
    assert m.dtype == torch.bool
    assert m[0].tolist() == [True] * 2 + [False] * (W - 2) + [True] * W + [False] * (2 * W)
    assert m[1].tolist() == [True] * W + [False] * (3 * W)
    assert (b["audio_embeds"][0, 2:W] == -7).all() and (b["audio_embeds"][0, W:2 * W] == 2).all()
    assert (b["audio_embeds"][~m] == -7).all()
    assert b["dataset"] == ["a", "b"] and b["num_skipped"] == 0


def test_loader_fewshot_batches_use_train_neighbours(tmp_path, tiny_tok, tiny_token_ids):
    tr = make_split(tmp_path, "Clotho-AQA-AQA/train", 6)
    va = make_split(tmp_path, "Clotho-AQA-AQA/val", 4, seed=1)
    nbrs = [[(i + 1) % 6, (i + 3) % 6] for i in range(4)]
    make_knn(va, [3, 2, 1, 0], nbrs)
    cfg = DataConfig(data_root=str(tmp_path), num_workers=0,
                     blend={"Clotho-AQA-AQA/train": DatasetEntry(prefix_prob=1.0, augmentations={"do_nothing": 1.0})},
                     valid=["Clotho-AQA-AQA/interleaved_knn-val"])
    loaders = build_valid_loaders(cfg, tiny_tok, tiny_token_ids, batch_size=4, model_cfg=MODEL, max_samples=None)
    (vl,) = loaders.values()
    b = next(iter(vl))
    from megaflamingo.data.reader import ArrowDataset
    train, val = ArrowDataset(tr), ArrowDataset(va)
    order = vl.dataset.order
    for r in range(4):
        j = int(order[r])
        expect = [train.windows(n) for n in nbrs[j]] + [val.windows(int([3, 2, 1, 0][j]))]
        for k, w in enumerate(expect):
            got = b["audio_embeds"][r, k * W:k * W + len(w)]
            assert torch.equal(got, torch.from_numpy(w.astype(np.float32)))
            assert b["audio_mask"][r, k * W:(k + 1) * W].sum() == len(w)
        assert (b["audio_embeds"][r, 3 * W:] == -7).all() and not b["audio_mask"][r, 3 * W:].any()
        n_audio = (b["input_ids"][r] == tiny_token_ids.media).sum()
        assert n_audio == 3
        text = tiny_tok.decode(b["input_ids"][r])
        assert text.startswith("</s></s>Here are similar examples. The task is audio question answering. ")


def test_truncated_before_answer_is_skipped_and_counted(tmp_path, tiny_tok, tiny_token_ids):
    long_q = "question: " + "loud quiet " * 60
    rows = [{"prompt": long_q, "output": "yes"}, {"prompt": "question: dog?", "output": "no"},
            {"prompt": long_q, "output": "no"}]
    make_split(tmp_path, "X-AQA/train", rows)
    cfg = DataConfig(data_root=str(tmp_path), num_workers=0, max_tokens=64,
                     blend={"X-AQA/train": DatasetEntry(augmentations={"do_nothing": 1.0})})
    loader = build_train_loader(cfg, tiny_tok, tiny_token_ids, 0, 1, 0, batch_size=2, model_cfg=MODEL)
    batches = list(loader)
    assert sum(b["input_ids"].shape[0] for b in batches) == 1 and loader.skipped == 2
    for b in batches:
        assert ((b["labels"] != -100).sum(1) > 0).all()


from hypothesis import given, settings, strategies as st  # noqa: E402


_TXT = st.lists(st.sampled_from(list("ab dogé中\n.,?!:'-") + ["the ", " sound", "  ", "Answer:"]),
                max_size=30).map("".join)
_TOKS = {s: (tiny_tokenizer(s), None) for s in ("opt", "llama")}


@pytest.mark.parametrize("style,serial", [("opt", "false"), ("opt", ""), ("llama", "false")])
@settings(max_examples=50, deadline=None)
@given(intro=_TXT, shots=st.lists(st.tuples(_TXT, _TXT), min_size=1, max_size=6),
       max_len=st.sampled_from([8, 30, 512]), cache=st.sampled_from([0, 3, 100]))
def test_piecewise_tokenisation_equals_whole_text(style, serial, intro, shots, max_len, cache):
    import os
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = serial  # "false": batched encoding of uncached pieces
    try:
        tok = _TOKS[style][0]
        ids = token_ids(tok)
        sp = SpecialText.from_tokenizer(tok, ids)
        enc = FastEncoder(tok, sp, cache_size=cache)
        parts = SampleText(sp.bos + intro, [f"<audio>{p}{sp.sep}{o}<|endofchunk|>" for p, o in shots], sp.eos)
        got = enc(parts, max_len)
        assert enc.piecewise is True
        want = tok(parts.text, max_length=max_len, truncation=True)["input_ids"]
        assert got.tolist() == want
        assert enc(parts, max_len).tolist() == want  # memoised second time
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def test_probe_falls_back_when_special_tokens_strip_whitespace():
    from tokenizers import AddedToken
    tok = tiny_tokenizer("opt")
    tok.backend_tokenizer.add_special_tokens([AddedToken("<audio>", lstrip=True, special=True)])
    sp = SpecialText.from_tokenizer(tok, token_ids(tok))
    enc = FastEncoder(tok, sp)
    parts = SampleText(sp.bos + "The task is x. ", ["<audio>a dog<SEP>yes<|endofchunk|>"], sp.eos)
    assert enc(parts, 100).tolist() == tok(parts.text)["input_ids"]
    assert enc.piecewise is False  # pieces would differ (the space before <audio> is absorbed)
