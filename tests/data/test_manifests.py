"""Manifest readers: AF1 JSON (plain + chat), JSON lists, JSONL, and their error messages."""
from __future__ import annotations

import json

import pytest

from megaflamingo.data.manifests import ManifestError, read_manifest


def _af1(tmp_path, data_root, **over):
    m = {"dataset_path": str(data_root / "datasets" / "Clotho"), "split": "train",
         "split_path": "audio/train", "flamingo_task": "Clotho-v2-AudioCaptioning", "total_num": 2,
         "data": {"1": {"name": "b.wav", "prompt": "p1", "output": "o1", "audio_start": 3.5},
                  "0": {"name": "a.wav", "prompt": "p0", "output": "o0"}}}
    m.update(over)
    path = tmp_path / "train.json"
    path.write_text(json.dumps(m))
    return path


def test_af1_json(tmp_path):
    root = tmp_path / "root"
    m = read_manifest(_af1(tmp_path, root), root)
    assert (m.dataset, m.task, m.split) == ("Clotho-v2", "AudioCaptioning", "train")
    assert [i.path for i in m.items] == ["datasets/Clotho/audio/train/a.wav",
                                         "datasets/Clotho/audio/train/b.wav"]
    assert [i.start for i in m.items] == [0.0, 3.5] and m.items[1].output == "o1"
    assert len(m.sha256) == 64


def test_af1_json_errors(tmp_path):
    root = tmp_path / "root"
    with pytest.raises(ManifestError, match="not under the data root"):
        read_manifest(_af1(tmp_path, root, dataset_path="/elsewhere/x"), root)
    with pytest.raises(ManifestError, match="total_num"):
        read_manifest(_af1(tmp_path, root, total_num=5), root)
    with pytest.raises(ManifestError, match=r"data\[0\].*'output'"):
        read_manifest(_af1(tmp_path, root, total_num=1, data={"0": {"name": "a.wav", "prompt": "p"}}), root)
    p = tmp_path / "interleaved_knn-train.json"
    p.write_text(json.dumps({"interleaved_data": {}}))
    with pytest.raises(ManifestError, match="interleaved"):
        read_manifest(p, root)


def test_chat_manifest(tmp_path):
    root = tmp_path
    data = {"0": {"name": "x.wav", "dialogue": [{"user": "what?", "assistant": "a dog."},
                                                 {"user": "and?", "assistant": "barking."}]}}
    m = read_manifest(_af1(tmp_path, root, dataset_path=str(root), split_path=None,
                           flamingo_task="AudioSkills-Dialog", total_num=1, data=data), root)
    assert m.items[0].path == "x.wav" and m.task == "Dialog"
    assert m.items[0].dialogue[1] == {"user": "and?", "assistant": "barking."}
    bad = {"0": {"name": "x.wav", "dialogue": [{"user": "q"}]}}
    with pytest.raises(ManifestError, match="dialogue round 0"):
        read_manifest(_af1(tmp_path, root, dataset_path=str(root), total_num=1, data=bad), root)


def test_jsonl_and_json_list(tmp_path):
    lines = [{"path": "a.wav", "prompt": "p", "output": "o", "split": "val"},
             {"path": str(tmp_path / "sub" / "b.wav"), "output": "o2", "audio_start": "1.5"}]
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    m = read_manifest(p, tmp_path)
    assert [i.path for i in m.items] == ["a.wav", "sub/b.wav"] and m.items[1].start == 1.5
    assert m.split == "val" and m.dataset is None
    q = tmp_path / "m.json"
    q.write_text(json.dumps(lines))
    assert [i.path for i in read_manifest(q, tmp_path).items] == ["a.wav", "sub/b.wav"]
    p.write_text(json.dumps(lines[0]) + "\n{broken\n")
    with pytest.raises(ManifestError, match="line 2"):
        read_manifest(p, tmp_path)
    p.write_text(json.dumps({"path": "a", "output": "o", "split": "x"}) + "\n"
                 + json.dumps({"path": "b", "output": "o", "split": "y"}) + "\n")
    with pytest.raises(ManifestError, match="disagree on 'split'"):
        read_manifest(p, tmp_path)
