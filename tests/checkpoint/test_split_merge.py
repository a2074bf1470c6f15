"""split / merge on synthetic state dicts: limits, disjointness, slicing, ties, hashes, every failure mode."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from megaflamingo.checkpoint import load_state_dict, merge, open_checkpoint
from megaflamingo.checkpoint.integrity import CheckpointError, sha256_file
from megaflamingo.checkpoint.source import from_state_dict
from megaflamingo.checkpoint.split import write_sharded
from megaflamingo.cli.convert import main as cli

from tests.checkpoint.ckpt_helpers import assert_same, synthetic_state_dict

LIMIT = 6000  # bytes: forces many parts; "big" (16 KB) must be sliced


def _split(tmp_path, layout="safetensors", limit=LIMIT, sd=None):
    sd = sd if sd is not None else synthetic_state_dict()
    out = tmp_path / f"split-{layout}"
    index = write_sharded(from_state_dict(sd), out, limit, layout, name="model", progress=False, log=lambda m: None)
    return sd, out, index


@pytest.mark.parametrize("layout", ["safetensors", "torch"])
def test_split_limits_index_and_roundtrip(tmp_path, layout):
    sd, out, index = _split(tmp_path, layout)
    meta = index["metadata"]
    files = meta["files"]
    assert len(files) >= 4
    stored_keys = []
    for fname, rec in files.items():
        p = out / fname
        assert p.stat().st_size == rec["size"] <= LIMIT
        assert sha256_file(p) == rec["sha256"]
        keys = list(safe_open(str(p), "pt").keys()) if layout == "safetensors" else \
            list(torch.load(p, weights_only=True))
        assert sorted(keys) == sorted(k for k, f in index["weight_map"].items() if f == fname)
        stored_keys += keys
    assert len(stored_keys) == len(set(stored_keys)), "parts must hold disjoint key subsets"
    # the tie is stored once and recorded; the oversized tensor is sliced and recorded
    assert meta["tied_weights"] == {"head.weight": "embed.weight"}
    assert "head.weight" not in stored_keys
    assert list(meta["sliced"]) == ["big"] and len(meta["sliced"]["big"]["pieces"]) >= 3
    # small tensors are never cut
    assert {"embed.weight", "layers.0.w", "layers.1.w"} <= set(stored_keys)
    back = load_state_dict(out)
    assert_same(sd, back)
    assert back["head.weight"] is back["embed.weight"]


def test_split_merge_cli_identical_tensors_and_hashes(tmp_path, capsys):
    sd = synthetic_state_dict()
    src = tmp_path / "model.safetensors"
    from megaflamingo.checkpoint.streaming import Entry, write_safetensors

    s = from_state_dict(sd)
    write_safetensors(src, [Entry(r.name, r) for r in s.refs],
                      {"megaflamingo.tied_weights": json.dumps(s.ties)})
    assert cli(["split", str(src), str(tmp_path / "parts"), "--max-size", "6KB", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "'big'" in err and "exceeds the part limit" in err
    assert cli(["merge", str(tmp_path / "parts"), str(tmp_path / "merged.safetensors"), "--no-progress"]) == 0
    merged = tmp_path / "merged.safetensors"
    plain = load_file(str(merged))  # readable by safetensors itself: the tie is stored once
    assert "head.weight" not in plain
    assert_same(sd, load_state_dict(merged))
    # split again -> byte-identical parts (deterministic) -> same hashes
    assert cli(["split", str(merged), str(tmp_path / "parts2"), "--max-size", "6KB", "--no-progress"]) == 0
    i1 = json.loads((tmp_path / "parts/model.safetensors.index.json").read_text())["metadata"]["files"]
    i2 = json.loads((tmp_path / "parts2/model.safetensors.index.json").read_text())["metadata"]["files"]
    assert i1 == i2


def _corrupt(p, offset_from_end=10):
    data = bytearray(p.read_bytes())
    data[-offset_from_end] ^= 0xFF
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "index_hash", "index_keys"])
def test_merge_detects_damage(tmp_path, damage):
    _, out, index = _split(tmp_path)
    fname = sorted(index["metadata"]["files"])[1]
    part = out / fname
    idx_path = out / "model.safetensors.index.json"
    if damage == "flip":
        _corrupt(part)
        match = rf"{fname}: sha256 mismatch"
    elif damage == "truncate":
        part.write_bytes(part.read_bytes()[:-7])
        match = rf"{fname}: truncated"
    elif damage == "missing":
        part.unlink()
        match = rf"missing checkpoint part: .*{fname}"
    elif damage == "index_hash":
        idx = json.loads(idx_path.read_text())
        idx["metadata"]["files"][fname]["sha256"] = "ab" * 32
        idx_path.write_text(json.dumps(idx))
        match = rf"{fname}: sha256 mismatch"
    else:  # index claims a key lives in a part that does not hold it
        idx = json.loads(idx_path.read_text())
        k = next(k for k, f in idx["weight_map"].items() if f != fname)
        idx["weight_map"][k] = fname
        idx_path.write_text(json.dumps(idx))
        match = rf"{fname}: keys disagree with model.safetensors.index.json"
    with pytest.raises(CheckpointError, match=match):
        merge(out, tmp_path / "m.safetensors", progress=False)
    assert not (tmp_path / "m.safetensors").exists()
    assert cli(["merge", str(out), str(tmp_path / "m.pt"), "--no-progress"]) == 2


def test_corrupted_safetensors_header_is_named(tmp_path):
    _, out, index = _split(tmp_path)
    fname = sorted(index["metadata"]["files"])[0]
    (out / fname).write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match=rf"{fname}"):
        open_checkpoint(out, verify=False)


def test_streaming_writer_is_standard_safetensors(tmp_path):
    from megaflamingo.checkpoint.streaming import Entry, write_safetensors

    sd = {k: v for k, v in synthetic_state_dict().items() if k != "head.weight"}
    sd["empty"] = torch.zeros(0, 3)
    s = from_state_dict(sd)
    rec = write_safetensors(tmp_path / "x.safetensors", [Entry(r.name, r) for r in s.refs], {"format": "pt"})
    assert rec.sha256 == sha256_file(tmp_path / "x.safetensors")
    assert_same(sd, load_file(str(tmp_path / "x.safetensors")))


def test_af1_layout_parts_merge_by_dict_update(tmp_path):
    # AF1-style: aliases are the same tensors under two names
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(3):
        w = torch.randn(24, 24, generator=g)
        sd[f"lang_encoder.model.decoder.layers.{i}.decoder_layer.fc.weight"] = w
        sd[f"lang_encoder.old_decoder_blocks.{i}.fc.weight"] = w
    sd["clap.w"] = torch.randn(10, generator=g)
    src = tmp_path / "foundation.pt"
    torch.save({"model_state_dict": sd}, src)
    assert cli(["split", str(src), str(tmp_path / "parts"), "--max-size", "8KB", "--no-progress"]) == 0
    parts = sorted((tmp_path / "parts").glob("foundation_part*.pt"))
    assert [p.name for p in parts] == [f"foundation_part{i}.pt" for i in range(1, len(parts) + 1)]
    assert len(parts) == 3
    merged = {}
    for p in parts:  # exactly how AF1's users merge: plain torch.load + dict update
        obj = torch.load(p, weights_only=True)
        assert list(obj) == ["model_state_dict"]
        assert p.stat().st_size <= 8000
        merged.update(obj["model_state_dict"])
    assert_same(sd, merged)
    # our merge verifies the sidecar hashes and writes AF1's merged file
    assert cli(["merge", str(tmp_path / "parts"), str(tmp_path / "merged.pt"), "--no-progress"]) == 0
    out = torch.load(tmp_path / "merged.pt", weights_only=True)["model_state_dict"]
    assert_same(sd, out)
    a, b = out["lang_encoder.old_decoder_blocks.1.fc.weight"], out["lang_encoder.model.decoder.layers.1.decoder_layer.fc.weight"]
    assert a.data_ptr() == b.data_ptr(), "aliases must stay one tensor"
    # a missing part is named
    parts[1].unlink()
    with pytest.raises(CheckpointError, match="foundation_part2.pt"):
        merge(tmp_path / "parts", tmp_path / "m2.pt", progress=False)


def test_af1_layout_refuses_oversized_tensor(tmp_path):
    torch.save({"model_state_dict": {"w": torch.randn(4000)}}, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match=r"'w'.*alone exceeds --max-size.*AF1"):
        write_sharded(open_checkpoint(tmp_path / "a.pt"), tmp_path / "o", 5000, "af1", progress=False)
    assert not (tmp_path / "o").exists()


def test_af1_parts_without_index_and_conflicts(tmp_path):
    a, b = torch.randn(3), torch.randn(4)
    torch.save({"model_state_dict": {"module.a": a}}, tmp_path / "chat_part1.pt")
    torch.save({"model_state_dict": {"module.b": b}}, tmp_path / "chat_part2.pt")
    got = load_state_dict(tmp_path)
    assert_same({"module.a": a, "module.b": b}, got)
    torch.save({"model_state_dict": {"module.a": a + 1}}, tmp_path / "chat_part3.pt")
    with pytest.raises(CheckpointError, match=r"chat_part3.pt: key 'module.a' also in .*chat_part1.pt"):
        load_state_dict(tmp_path)
    # a part that is not a plain tensor dict is refused (naming file and key)
    torch.save({"model_state_dict": {"module.c": [1, 2]}}, tmp_path / "chat_part3.pt")
    with pytest.raises(CheckpointError, match=r"chat_part3.pt: entry 'module.c' is a list"):
        load_state_dict(tmp_path)
