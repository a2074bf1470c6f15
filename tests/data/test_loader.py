"""Distributed, exactly resumable training iteration; fixed-order validation."""
import itertools

import pytest

from megaflamingo.config import Config, DataConfig, DatasetEntry, ModelConfig
from megaflamingo.data import build_train_loader, build_valid_loaders
from megaflamingo.data.reader import DataError

from tests.data.data_fixtures import D, W, make_knn, make_split

MODEL = ModelConfig(audio_embed_dim=D, max_num_window=W, max_num_fewshot=4)


@pytest.fixture
def blend_root(tmp_path):
    tr = make_split(tmp_path, "Clotho-AQA-AQA/train", 9)
    make_knn(tr, list(range(9)), [[(i + 1) % 9, (i + 4) % 9] for i in range(9)])
    make_split(tmp_path, "chime-home-EventClassification/train",
               [{"prompt": "x", "output": "television, silence, child speaking."}] * 5, seed=2)
    make_split(tmp_path, "AudioSetSL-Dialog/train",
               [{"dialogue": [{"user": "what?", "assistant": f"a dog {i}"}, {"user": "more?", "assistant": "no"}]}
                for i in range(4)], seed=3)
    make_split(tmp_path, "Clotho-AQA-AQA/val", 7, seed=4)
    return tmp_path


def _cfg(root, workers=0, group=False):
    return DataConfig(data_root=str(root), num_workers=workers, group_by_length=group, global_weight=0.7, blend={
        "Clotho-AQA-AQA/train": DatasetEntry(weight=1.0, prefix_prob=0.5,
                                             augmentations={"AQA_binary_instruction": 0.5, "default": 0.5}),
        "Clotho-AQA-AQA/interleaved_knn-train": DatasetEntry(weight=0.5),
        "chime-home-EventClassification/train": DatasetEntry(weight=1.3, augmentations={"default": 0.5, "num_words": 0.5}),
        "AudioSetSL-Dialog/train": DatasetEntry(weight=1.0),
    }, valid=["Clotho-AQA-AQA/val"])


def _key(b):
    return (b["input_ids"].tolist(), b["labels"].tolist(), b["audio_embeds"].sum().item(), b["dataset"])


def _run(loader, n):
    return [_key(b) for b in itertools.islice(_epochs(loader), n)]


def _epochs(loader):
    while True:
        yield from loader


def test_exact_resume_with_workers(blend_root, tiny_tok, tiny_token_ids):
    ref_loader = build_train_loader(_cfg(blend_root), tiny_tok, tiny_token_ids, 0, 1, 7, batch_size=3, model_cfg=MODEL)
    per_epoch = len(ref_loader)
    total = 2 * per_epoch + 2
    ref = _run(ref_loader, total)
    assert len({tuple(map(str, r[3])) for r in ref}) > 2  # several datasets present
    cut = per_epoch + 1  # resume in the middle of the second virtual epoch
    a = build_train_loader(_cfg(blend_root, workers=2), tiny_tok, tiny_token_ids, 0, 1, 7, batch_size=3,
                           model_cfg=MODEL)
    first = _run(a, cut)
    state = a.state_dict()
    assert state["epoch"] == 1 and state["batch_in_epoch"] == 1
    b = build_train_loader(_cfg(blend_root, workers=2), tiny_tok, tiny_token_ids, 0, 1, 7, batch_size=3,
                           model_cfg=MODEL)
    b.load_state_dict(state)
    rest = _run(b, total - cut)
    assert first + rest == ref
    # epochs differ (reshuffled order and fresh augmentation draws)
    assert ref[:per_epoch] != ref[per_epoch:2 * per_epoch]


def test_resume_refuses_a_different_setup(blend_root, tiny_tok, tiny_token_ids):
    a = build_train_loader(_cfg(blend_root), tiny_tok, tiny_token_ids, 0, 1, 7, batch_size=3, model_cfg=MODEL)
    st = a.state_dict()
    b = build_train_loader(_cfg(blend_root), tiny_tok, tiny_token_ids, 0, 2, 7, batch_size=3, model_cfg=MODEL)
    with pytest.raises(DataError, match="world_size"):
        b.load_state_dict(st)
    c = build_train_loader(_cfg(blend_root), tiny_tok, tiny_token_ids, 0, 1, 8, batch_size=3, model_cfg=MODEL)
    with pytest.raises(DataError, match="seed"):
        c.load_state_dict(st)


def test_ranks_partition_the_epoch(blend_root, tiny_tok, tiny_token_ids):
    ws = 2
    loaders = [build_train_loader(_cfg(blend_root), tiny_tok, tiny_token_ids, r, ws, 3, batch_size=2, model_cfg=MODEL)
               for r in range(ws)]
    plan = loaders[0].dataset.plan(0)
    pos = [sorted(int(p) for b in L.epoch_batches(0) for p in b) for L in loaders]
    assert len(pos[0]) == len(pos[1]) == -(-len(plan) // ws)
    assert set(pos[0]) | set(pos[1]) == set(range(len(plan)))
    n = len(plan)
    assert len(set(pos[0]) & set(pos[1])) == ws * len(pos[0]) - n  # only AF1's padding repeats
    batches = [list(L) for L in loaders]
    assert all(len(x) == len(batches[0]) for x in batches)


def test_group_by_length_covers_epoch(blend_root, tiny_tok, tiny_token_ids):
    L = build_train_loader(_cfg(blend_root, group=True), tiny_tok, tiny_token_ids, 0, 1, 3, batch_size=2, model_cfg=MODEL)
    flat = sorted(int(p) for b in L.epoch_batches(0) for p in b)
    assert flat == list(range(len(L.dataset.plan(0))))
    assert sum(b["input_ids"].shape[0] for b in L) == len(flat)


def test_root_config_accepted_and_batch_size_required(blend_root, tiny_tok, tiny_token_ids):
    cfg = Config(model=MODEL, data=_cfg(blend_root))
    cfg.encoder.name, cfg.encoder.embed_dim, cfg.encoder.max_windows = "tiny", D, W
    cfg.train.micro_batch_size = 5
    L = build_train_loader(cfg, tiny_tok, tiny_token_ids, 0, 1, 0)
    assert L.batch_size == 5
    with pytest.raises(TypeError, match="batch_size"):
        build_train_loader(cfg.data, tiny_tok, tiny_token_ids, 0, 1, 0)


def test_validation_fixed_order_and_split(blend_root, tiny_tok, tiny_token_ids):
    cfg = _cfg(blend_root)
    one = build_valid_loaders(cfg, tiny_tok, tiny_token_ids, batch_size=2, model_cfg=MODEL)
    (vl,) = one.values()
    r1, r2 = [_key(b) for b in vl], [_key(b) for b in vl]
    assert r1 == r2 and sum(len(k[3]) for k in r1) == 7
    # AF1 order: the shuffle seeded with sum(ord(name)); settings from the train entry, prefix always
    import numpy as np
    perm = np.arange(7)
    np.random.default_rng(sum(map(ord, "Clotho-AQA-AQA/val"))).shuffle(perm)
    assert vl.dataset.order.tolist() == perm.tolist()
    first = tiny_tok.decode(next(iter(vl))["input_ids"][0])
    assert first.startswith("</s></s>the task is audio question answering.<audio>")
    two = [build_valid_loaders(cfg, tiny_tok, tiny_token_ids, r, 2, batch_size=2, model_cfg=MODEL)["Clotho-AQA-AQA/val"]
           for r in range(2)]
    assert sorted(two[0].indices.tolist() + two[1].indices.tolist()) == [0, 0, 1, 2, 3, 4, 5, 6]
