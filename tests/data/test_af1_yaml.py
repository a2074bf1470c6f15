"""An AF1 blending YAML works unchanged: pretrain, 8-shot SFT and chat batches from Arrow only."""
import textwrap

import pytest
import torch
import yaml

from megaflamingo.config import load_config
from megaflamingo.data import build_train_loader, build_valid_loaders

from tests.data.data_fixtures import encoder_meta, make_knn, make_split

D, W = 8, 4


def _yaml(tmp_path, blend: str, valid: str, fewshot: int, extra: str = "") -> str:
    """An AF1-dialect YAML (sections as in foundation/configs/*.yaml)."""
    doc = {
        "train_config": {"batch_size": 3, "seed": 11},
        "data_config": {
            "dataset_blending_global_weight": 0.5,
            "dataset_blending_config": yaml.safe_load(textwrap.dedent(blend)),
            "dataset_file_root": "YOUR_DATA_ROOT_DIR/arrow",
            "data_root": "YOUR_DATA_ROOT_DIR/audio",
            "dataset_blending_output": "dataset_blending.json",
            "max_tokens": 512, "num_workers": 0,
            "valid_dataset_config": yaml.safe_load(textwrap.dedent(valid)),
        },
        "clap_config": {"method": "microsoft-clap", "audio_embed_dim": D, "model_name": "clapcap",
                        "window_length": 7.0, "window_overlap": 5.25, "max_num_window": W,
                        "max_num_fewshot": fewshot},
        "model_config": {"audio_transformer_kwargs": {"n_head": 8, "n_layers": 3, "d_inner": 2048,
                                                      "max_num_media": W * fewshot, "max_window_per_audio": W}},
    }
    if extra:
        doc.update(yaml.safe_load(extra))
    p = tmp_path / "af1.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(p)


@pytest.fixture
def arrow_root(tmp_path):
    root = tmp_path / "arrow"
    enc = encoder_meta(name="clapcap")
    for name, n, rows in (("Clotho-AQA-AQA/train", 8, None), ("Clotho-AQA-AQA/val", 5, None),
                          ("Clotho-v2-AudioCaptioning/train", 6, [{"prompt": "generate audio caption",
                                                                   "output": f"A dog barks {i}."} for i in range(6)]),
                          ("Clotho-v2-AudioCaptioning/val", 4, [{"prompt": "generate audio caption",
                                                                 "output": f"Rain {i}."} for i in range(4)]),
                          ("dialog_AudioSetSL-Dialog/train", 3, [{"dialogue": [{"user": "hi?", "assistant": f"dog {i}"}]}
                                                                 for i in range(3)])):
        make_split(root, name, rows if rows is not None else n, encoder=enc, max_windows=W)
    make_knn(root / "Clotho-AQA-AQA/train", list(range(8)), [[(i + j) % 8 for j in range(1, 8)] for i in range(8)])
    make_knn(root / "Clotho-v2-AudioCaptioning/val", list(range(4)), [[(i + j) % 6 for j in range(1, 8)] for i in range(4)])
    return tmp_path


def _check_batches(loader, token_ids, fewshot):
    seen = 0
    for b in loader:
        B, T = b["input_ids"].shape
        assert b["audio_embeds"].shape == (B, fewshot * W, D) and b["audio_mask"].shape == (B, fewshot * W)
        assert b["labels"].shape == (B, T) and ((b["labels"] != -100).sum(1) > 0).all()
        n_media = (b["input_ids"] == token_ids.media).sum(1)
        # one <audio> token per audio that has windows, and audios fill slots from the start
        has_audio = b["audio_mask"].view(B, fewshot, W)[:, :, 0]
        assert torch.equal(has_audio.sum(1), n_media)
        assert torch.equal(has_audio, torch.arange(fewshot).expand(B, -1) < n_media[:, None])
        seen += B
    return seen


def test_sft_8shot_yaml(arrow_root, tiny_tok, tiny_token_ids):
    path = _yaml(arrow_root, """\
        Clotho-AQA-AQA/train: {weight: 3.5, prefix_prob: 1.0, augmentations: {AQA_binary_instruction: 1.0}}
        Clotho-AQA-AQA/interleaved_knn-train: {weight: 0.5, prefix_prob: 1.0, augmentations: {AQA_binary_instruction: 1.0}}
        Clotho-v2-AudioCaptioning/train: {weight: 2.0, prefix_prob: 1.0, augmentations: {AC_short: 1.0}}
        """, """\
        Clotho-AQA-AQA/val: true
        Clotho-v2-AudioCaptioning/interleaved_knn-val: true
        """, 8, extra="sft_config: {pretrained_path: x, pretrained_ckpt: y.pt, unfreeze_full_lm: true}")
    cfg = load_config(path, placeholders={"YOUR_DATA_ROOT_DIR": str(arrow_root)})
    assert cfg.train.stage == "sft"
    assert cfg.encoder.name == "clapcap"  # checked against the datasets' metadata
    loader = build_train_loader(cfg, tiny_tok, tiny_token_ids, 0, 1, cfg.train.seed)
    plan = loader.dataset.plan(0)
    assert len(plan) == int(8 * 3.5 * 0.5) + int(8 * 0.5 * 0.5) + int(6 * 2.0 * 0.5)
    assert _check_batches(loader, tiny_token_ids, 8) == len(plan)
    valid = build_valid_loaders(cfg, tiny_tok, tiny_token_ids)
    assert list(valid) == ["Clotho-AQA-AQA/val", "Clotho-v2-AudioCaptioning/interleaved_knn-val"]
    b = next(iter(valid["Clotho-v2-AudioCaptioning/interleaved_knn-val"]))
    assert (b["input_ids"] == tiny_token_ids.media).sum(1).tolist() == [8] * b["input_ids"].shape[0]
    text = tiny_tok.decode(b["input_ids"][0])
    assert "Here are similar examples. The task is audio captioning. <audio>describe the sound in a sentence." in text


def test_pretrain_and_chat_yaml(arrow_root, tiny_tok, tiny_token_ids):
    path = _yaml(arrow_root, """\
        Clotho-v2-AudioCaptioning/train: {weight: 1.0, prefix_prob: 0.5, augmentations: {AC_short: 0.5, do_nothing: 0.5}}
        """, "{}", 1)
    cfg = load_config(path, placeholders={"YOUR_DATA_ROOT_DIR": str(arrow_root)})
    assert cfg.train.stage == "pretrain"
    loader = build_train_loader(cfg, tiny_tok, tiny_token_ids, 0, 1, 0)
    assert _check_batches(loader, tiny_token_ids, 1) == 3
    path = _yaml(arrow_root, """\
        dialog_AudioSetSL-Dialog/train: {weight: 2.0}
        """, "{}", 1, extra="sft_config: {pretrained_path: x, pretrained_ckpt: y.pt}")
    cfg = load_config(path, placeholders={"YOUR_DATA_ROOT_DIR": str(arrow_root)})
    assert cfg.train.stage == "chat"
    loader = build_train_loader(cfg, tiny_tok, tiny_token_ids, 0, 1, 0)
    assert _check_batches(loader, tiny_token_ids, 1) == 3
    b = next(iter(build_train_loader(cfg, tiny_tok, tiny_token_ids, 0, 1, 0)))
    assert tiny_tok.decode(b["input_ids"][0]).startswith("</s></s>The task is dialog. <audio>user: hi? \nassistant: <SEP>dog")
