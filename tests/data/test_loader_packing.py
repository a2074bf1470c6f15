"""TrainLoader with data.packing through the real Arrow reader: the same samples as the padded path, exact
resumption (with workers, mid-epoch and across epochs), ranks with uneven shares getting the same number of
micro-batches, left-out samples counted, and resuming with other packing settings refused."""
import itertools
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from megaflamingo.config import DataConfig, DatasetEntry, ModelConfig
from megaflamingo.data import build_train_loader
from megaflamingo.data.packing import pack_lengths
from megaflamingo.data.reader import DataError
from megaflamingo.data.sampling import af1_distributed_indices

from tests.data.data_fixtures import D, W, make_knn, make_split

MODEL = ModelConfig(audio_embed_dim=D, max_num_window=W, max_num_fewshot=4)


@pytest.fixture
def mixed_root(tmp_path):
    """Short single-audio AQA rows, longer 3-shot kNN samples and long dialogues: uneven lengths."""
    tr = make_split(tmp_path, "Clotho-AQA-AQA/train", 12)
    make_knn(tr, list(range(12)), [[(i + 1) % 12, (i + 5) % 12] for i in range(12)])
    make_split(tmp_path, "AudioSetSL-Dialog/train",
               [{"dialogue": [{"user": "what is it " * 3, "assistant": f"a dog barking loudly {i} " * 4},
                              {"user": "more?", "assistant": "no, that is all " * 3}]} for i in range(6)], seed=3)
    return tmp_path


def _cfg(root, workers=0, packing=True, **kw):
    kw.setdefault("max_tokens_per_row", 320)
    return DataConfig(data_root=str(root), num_workers=workers, packing=packing, max_tokens=160, blend={
        "Clotho-AQA-AQA/train": DatasetEntry(weight=1.0, prefix_prob=0.5,
                                             augmentations={"AQA_binary_instruction": 0.5, "default": 0.5}),
        "Clotho-AQA-AQA/interleaved_knn-train": DatasetEntry(weight=1.0),
        "AudioSetSL-Dialog/train": DatasetEntry(weight=1.0),
    }, **kw)


def _loader(root, tok, ids, rank=0, world=1, batch_size=2, seed=5, **kw):
    return build_train_loader(_cfg(root, **kw), tok, ids, rank, world, seed, batch_size=batch_size, model_cfg=MODEL)


def _key(b):
    return (b["input_ids"].tolist(), b["labels"].tolist(), b["audio_embeds"].sum().item(), b["dataset"], b["keys"])


def _run(loader, n):
    def epochs():
        while True:
            yield from loader
    return [_key(b) for b in itertools.islice(epochs(), n)]


def _samples(batch, packed):
    """(dataset, ids, labels, audio) of every sample of a batch."""
    out = []
    if packed:
        lay = batch["layout"]
        for s in range(lay.num_samples):
            r, a, n = int(lay.sample_row[s]), int(lay.sample_start[s]), int(lay.sample_length[s])
            lab = batch["labels"][r, a:a + n]
            out.append((batch["dataset"][s], tuple(batch["input_ids"][r, a:a + n].tolist()), tuple(lab.tolist()),
                        round(float(batch["audio_embeds"][s].sum()), 3)))
    else:
        for b in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][b].sum())
            out.append((batch["dataset"][b], tuple(batch["input_ids"][b, :n].tolist()),
                        tuple(batch["labels"][b, :n].tolist()), round(float(batch["audio_embeds"][b].sum()), 3)))
    return out


def test_packed_epoch_holds_the_padded_epochs_samples(mixed_root, tiny_tok, tiny_token_ids):
    packed = _loader(mixed_root, tiny_tok, tiny_token_ids, batch_size=3)
    padded = _loader(mixed_root, tiny_tok, tiny_token_ids, batch_size=3, packing=False)
    got = Counter(s for b in packed for s in _samples(b, True))
    want = Counter(s for b in padded for s in _samples(b, False))
    assert got == want and sum(got.values()) == len(packed.dataset.plan(0))
    assert len(packed) < len(padded)  # rows hold several samples
    first = packed.packed_plan(0).batches
    assert max(len(mb) for mb in first) == 3 and max(len(row) for mb in first for row in mb) > 1
    b = next(iter(packed))  # epoch 1 now
    assert b["input_ids"].shape[0] <= 3 and b["input_ids"].shape[1] <= 320 and b["num_samples"] > 3
    assert 0.5 < packed.packed_plan(0).stats.fill_rate <= 1.0


def test_exact_resume_with_workers(mixed_root, tiny_tok, tiny_token_ids):
    ref_loader = _loader(mixed_root, tiny_tok, tiny_token_ids)
    per_epoch = len(ref_loader)
    total = 2 * per_epoch + 2
    ref = _run(ref_loader, total)
    assert ref[:per_epoch] != ref[per_epoch:2 * per_epoch]  # the epochs differ (order, augmentation draws)
    cut = per_epoch + 1  # resume in the middle of the second virtual epoch
    a = _loader(mixed_root, tiny_tok, tiny_token_ids, workers=2)
    first = _run(a, cut)
    state = a.state_dict()
    assert state["epoch"] == 1 and state["batch_in_epoch"] == 1 and state["packing"]["rows_per_batch"] == 2
    b = _loader(mixed_root, tiny_tok, tiny_token_ids, workers=2)
    b.load_state_dict(state)
    assert first + _run(b, total - cut) == ref

    for other in (dict(max_tokens_per_row=200), dict(packing=False), dict(packing_lookahead=3)):
        c = _loader(mixed_root, tiny_tok, tiny_token_ids, **other)
        with pytest.raises(DataError, match="saved packing="):
            c.load_state_dict(state)


def test_two_ranks_with_uneven_shares_get_the_same_number_of_batches(mixed_root, tiny_tok, tiny_token_ids):
    ws = 2
    loaders = [_loader(mixed_root, tiny_tok, tiny_token_ids, rank=r, world=ws, seed=5) for r in range(ws)]
    n = len(loaders[0].dataset.plan(0))
    # DistributedSampler's shares (what unpacked training uses) are uneven in tokens: packed alone, they
    # would give the ranks different numbers of micro-batches
    ds = loaders[0].dataset
    lengths = [len(ds[(0, int(p))]["input_ids"]) for p in range(n)]
    alone = [len(pack_lengths([lengths[p] for p in af1_distributed_indices(n, r, ws, True, 5, 0)],
                              loaders[0].packing)) for r in range(ws)]
    assert alone[0] != alone[1], alone
    plans = [L.packed_plan(0) for L in loaders]
    assert len(plans[0].batches) == len(plans[1].batches) and len(loaders[0]) == len(loaders[1])
    batches = [list(L) for L in loaders]
    assert len(batches[0]) == len(batches[1]) == len(plans[0].batches)
    assert all(b["num_samples"] >= 1 for bs in batches for b in bs)
    pos = [p for pl in plans for mb in pl.batches for row in mb for p in row]
    assert set(pos) == set(range(n)) and len(pos) == n + plans[0].stats.duplicates
    # both ranks iterate into the next epoch together
    assert loaders[0].epoch == loaders[1].epoch == 1


def test_samples_without_a_supervised_token_are_left_out_and_counted(mixed_root, tiny_tok, tiny_token_ids):
    # max_tokens=24 cuts the long dialogues / kNN samples before their first answer
    cfg = replace(_cfg(mixed_root), max_tokens=24)
    L = build_train_loader(cfg, tiny_tok, tiny_token_ids, 0, 1, 5, batch_size=2, model_cfg=MODEL)
    batches = list(L)
    assert L.skipped > 0
    kept = sum(b["num_samples"] for b in batches)
    assert kept + L.skipped == len(L.dataset.plan(0))
    for b in batches:
        lay = b["layout"]
        for s in range(lay.num_samples):
            r, a, n = int(lay.sample_row[s]), int(lay.sample_start[s]), int(lay.sample_length[s])
            assert (b["labels"][r, a + 1:a + n] != -100).any()


def test_packed_batches_are_pinnable_and_movable(mixed_root, tiny_tok, tiny_token_ids):
    b = next(iter(_loader(mixed_root, tiny_tok, tiny_token_ids)))
    lay = b["layout"]
    moved = lay.to("cpu")
    assert torch.equal(moved.seq_cu, lay.seq_cu) and torch.equal(moved.xattn.key_index, lay.xattn.key_index)
    if torch.cuda.is_available():  # pin_memory needs an accelerator
        assert lay.pin_memory().position_ids.is_pinned()
    assert np.isfinite(b["audio_embeds"].numpy()).all()
