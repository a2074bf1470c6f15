"""Bad input gives a clear error naming the dataset/file/row, never a silent wrong batch."""
import numpy as np
import pytest

from megaflamingo.config import DataConfig, DatasetEntry, EncoderConfig, ModelConfig
from megaflamingo.data import build_train_loader
from megaflamingo.data.reader import ArrowDataset, DataError, parse_blend_name

from tests.data.data_fixtures import D, W, encoder_meta, make_knn, make_split

MODEL = ModelConfig(audio_embed_dim=D, max_num_window=W, max_num_fewshot=4)


def _build(root, names, tok, ids, model=MODEL, **kw):
    cfg = DataConfig(data_root=str(root), num_workers=0, blend={n: DatasetEntry() for n in names})
    return build_train_loader(cfg, tok, ids, 0, 1, 0, batch_size=2, model_cfg=model, **kw)


def test_missing_dataset_dir(tmp_path, tiny_tok, tiny_token_ids):
    make_split(tmp_path, "A-AQA/train", 3)
    with pytest.raises(DataError, match=r"'B-AQA/train'.*does not exist"):
        _build(tmp_path, ["A-AQA/train", "B-AQA/train"], tiny_tok, tiny_token_ids)
    with pytest.raises(DataError, match="data_root"):
        _build(tmp_path / "nope", ["A-AQA/train"], tiny_tok, tiny_token_ids)


def test_missing_and_bad_knn_manifest(tmp_path, tiny_tok, tiny_token_ids):
    tr = make_split(tmp_path, "A-AQA/train", 4)
    with pytest.raises(DataError, match="interleaved_knn.arrow does not exist"):
        _build(tmp_path, ["A-AQA/interleaved_knn-train"], tiny_tok, tiny_token_ids)
    make_knn(tr, [0, 1, 2], [[1, 2], [2, 3], [3, 4]])
    with pytest.raises(DataError, match=r"row 2 lists neighbour 4.*has 4 rows"):
        _build(tmp_path, ["A-AQA/interleaved_knn-train"], tiny_tok, tiny_token_ids)
    make_knn(tr, [0, 9], [[1, 2], [2, 3]])
    with pytest.raises(DataError, match=r"row 1 points at query row 9"):
        _build(tmp_path, ["A-AQA/interleaved_knn-train"], tiny_tok, tiny_token_ids)
    make_knn(tr, [0], [[1, 2]], train_dir="../nope")
    with pytest.raises(DataError, match="its train split .*nope does not exist"):
        _build(tmp_path, ["A-AQA/interleaved_knn-train"], tiny_tok, tiny_token_ids)
    make_knn(tr, [0], [[1, 2, 3, 1, 2]])  # 5 neighbours + query > max_num_fewshot=4
    with pytest.raises(DataError, match="max_num_fewshot"):
        _build(tmp_path, ["A-AQA/interleaved_knn-train"], tiny_tok, tiny_token_ids)


def test_dataset_outside_data_root_needs_opt_in(tmp_path, tiny_tok, tiny_token_ids):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    make_split(root, "A-AQA/train", 4)
    make_split(elsewhere, "B-AQA/train", 4, seed=1)
    escaping = ["../elsewhere/B-AQA/train", str(elsewhere / "B-AQA" / "train")]
    for name in escaping:
        with pytest.raises(DataError, match=r"outside data.data_root.*data.allow_outside_root"):
            _build(root, ["A-AQA/train", name], tiny_tok, tiny_token_ids)
        cfg = DataConfig(data_root=str(root), num_workers=0, allow_outside_root=True,
                         blend={"A-AQA/train": DatasetEntry(), name: DatasetEntry()})
        loader = build_train_loader(cfg, tiny_tok, tiny_token_ids, 0, 1, 0, batch_size=2, model_cfg=MODEL)
        assert {d for b in loader for d in b["dataset"]} == {"A-AQA/train", name}

    # A kNN manifest whose train split lies outside the root is refused the same way.
    q = make_split(root, "C-AQA/val", 2, seed=2)
    make_knn(q, [0, 1], [[1], [2]], train_dir="../../../elsewhere/B-AQA/train")
    with pytest.raises(DataError, match=r"its train split .*outside data.data_root"):
        _build(root, ["C-AQA/interleaved_knn-val"], tiny_tok, tiny_token_ids)
    cfg = DataConfig(data_root=str(root), num_workers=0, allow_outside_root=True,
                     blend={"C-AQA/interleaved_knn-val": DatasetEntry()})
    assert len(build_train_loader(cfg, tiny_tok, tiny_token_ids, 0, 1, 0, batch_size=2, model_cfg=MODEL)) > 0


def test_mixed_encoders_in_one_blend(tmp_path, tiny_tok, tiny_token_ids):
    make_split(tmp_path, "A-AQA/train", 3)
    make_split(tmp_path, "B-AQA/train", 3, encoder=encoder_meta(name="clapcap", sha="zzz"))
    with pytest.raises(DataError, match="different encoders"):
        _build(tmp_path, ["A-AQA/train", "B-AQA/train"], tiny_tok, tiny_token_ids)
    with pytest.raises(DataError, match="encoder.name 'clapcap'"):
        _build(tmp_path, ["A-AQA/train"], tiny_tok, tiny_token_ids, encoder_cfg=EncoderConfig(name="clapcap"))


def test_model_config_mismatch(tmp_path, tiny_tok, tiny_token_ids):
    make_split(tmp_path, "A-AQA/train", 3)
    with pytest.raises(DataError, match=r"8-d.*audio_embed_dim is 1024"):
        _build(tmp_path, ["A-AQA/train"], tiny_tok, tiny_token_ids, model=ModelConfig())
    with pytest.raises(DataError, match="max_num_window is 16"):
        _build(tmp_path, ["A-AQA/train"], tiny_tok, tiny_token_ids,
               model=ModelConfig(audio_embed_dim=D, max_num_window=16))


def test_empty_dataset(tmp_path, tiny_tok, tiny_token_ids):
    make_split(tmp_path, "A-AQA/train", [])
    with pytest.raises(DataError, match="has no rows"):
        _build(tmp_path, ["A-AQA/train"], tiny_tok, tiny_token_ids)


def test_row_without_text(tmp_path, tiny_tok, tiny_token_ids):
    make_split(tmp_path, "A-AQA/train", [{"prompt": "question: a?", "output": None}])
    loader = _build(tmp_path, ["A-AQA/train"], tiny_tok, tiny_token_ids)
    with pytest.raises(DataError, match=r"A-AQA/train.*row 0.*no prompt/output"):
        list(loader)


def test_bad_names_and_metadata(tmp_path):
    with pytest.raises(DataError, match="expected '<dataset>-<task>/<split>'"):
        parse_blend_name("justaname")
    assert parse_blend_name("Clotho-AQA-AQA/interleaved_knn-train").split_dir == "Clotho-AQA-AQA/train"
    d = tmp_path / "A-AQA" / "train"
    d.mkdir(parents=True)
    with pytest.raises(DataError, match="metadata.json does not exist"):
        ArrowDataset(d)
    make_split(tmp_path, "C-AQA/train", 4)
    (tmp_path / "C-AQA/train/shard-00001.arrow").unlink()
    with pytest.raises(DataError, match="shard-00001.arrow"):
        ArrowDataset(tmp_path / "C-AQA/train").windows(0)


def test_reader_random_access_and_pickle(tmp_path):
    import pickle
    make_split(tmp_path, "A-AQA/train", 8, seed=5)
    ds = ArrowDataset(tmp_path / "A-AQA/train")
    w5 = ds.windows(5).copy()
    assert w5.dtype == np.float16 and w5.shape[1] == D and 1 <= w5.shape[0] <= W
    assert ds.row(5)["id"] == "A-AQA/train#5" and ds.row(5)["prompt"].endswith("number 5?")
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._batches is None and np.array_equal(clone.windows(5), w5)
    assert len(pickle.dumps(ds)) < 4096  # only the path and metadata travel to workers
    with pytest.raises(IndexError):
        ds.windows(8)


def test_blend_too_small_for_an_epoch(tmp_path, tiny_tok, tiny_token_ids):
    make_split(tmp_path, "A-AQA/train", 3)
    cfg = DataConfig(data_root=str(tmp_path), num_workers=0, global_weight=0.1,
                     blend={"A-AQA/train": DatasetEntry(weight=1.0)})
    loader = build_train_loader(cfg, tiny_tok, tiny_token_ids, 0, 1, 0, batch_size=2, model_cfg=MODEL)
    with pytest.raises(DataError, match="virtual epoch 0 of the blend is empty"):
        list(loader)
