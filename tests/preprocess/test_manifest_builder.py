"""The generic `manifest` builder on real caption tables: Clotho-style caption_1..5, AudioCaps-style
ids without extension, split columns, and errors that list the columns found."""
from __future__ import annotations

import json

import pytest

from megaflamingo.data.manifests import ManifestError, read_manifest
from megaflamingo.preprocess.manifest import build_manifest
from megaflamingo.testing import write_audio


def recs(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def clips(tmp_path):
    d = tmp_path / "clips"
    for rel in ("dev/a b, c.wav", "dev/rain.flac", "eval/door.wav"):
        write_audio(d / rel, "tone", 0.2, 8000)
    return d


def test_caption_glob_one_row_per_caption(tmp_path, clips):
    (tmp_path / "caps.csv").write_bytes(
        b"\xef\xbb\xbffile_name,caption_1,caption_2,caption_3\r\n"
        b"\"a b, c.wav\",one,\"two, with comma\",three\r\nrain.flac,wet,,drip\r\nnone.wav,x,y,z\r\n")
    s = build_manifest(clips, tmp_path / "caps.csv", tmp_path / "m.jsonl", text_columns=["caption_*"],
                       dataset="Mine", task="AudioCaptioning", split="train")
    out = recs(tmp_path / "m.jsonl")
    assert [(r["path"], r["output"]) for r in out] == [
        ("dev/a b, c.wav", "one"), ("dev/a b, c.wav", "two, with comma"), ("dev/a b, c.wav", "three"),
        ("dev/rain.flac", "wet"), ("dev/rain.flac", "drip")]
    assert s["written"] == 5 and s["labels_without_audio"] == ["none.wav"]
    assert s["audio_without_labels"] == ["eval/door.wav"]
    m = read_manifest(tmp_path / "m.jsonl", clips)
    assert (m.dataset, m.task, m.split) == ("Mine", "AudioCaptioning", "train")


def test_file_pattern_ids_without_extension(tmp_path):
    d = tmp_path / "audio"
    write_audio(d / "train/r1nicOVtvkQ.wav", "tone", 0.2, 8000)
    write_audio(d / "train/UDGBjjwyaqE_20.flac", "tone", 0.2, 8000)
    (tmp_path / "train.csv").write_text("audiocap_id,youtube_id,start_time,caption\n"
                                        "1,r1nicOVtvkQ,130,A woman talks\n2,UDGBjjwyaqE,20,Clanging\n")
    build_manifest(d, tmp_path / "train.csv", tmp_path / "a.jsonl", file_pattern="{youtube_id}.*")
    assert [r["path"] for r in recs(tmp_path / "a.jsonl")] == ["train/r1nicOVtvkQ.wav"]
    build_manifest(d, tmp_path / "train.csv", tmp_path / "b.jsonl", file_pattern="{youtube_id}_{start_time}")
    assert [r["path"] for r in recs(tmp_path / "b.jsonl")] == ["train/UDGBjjwyaqE_20.flac"]
    with pytest.raises(ManifestError, match=r"\{ytid\}.*columns found: audiocap_id, youtube_id, start_time, caption"):
        build_manifest(d, tmp_path / "train.csv", tmp_path / "c.jsonl", file_pattern="{ytid}.wav")


def test_split_column_filter_and_per_split_outputs(tmp_path, clips):
    (tmp_path / "t.csv").write_text("fname,labels,split\n\"a b, c.wav\",\"Dog,Bark\",train\n"
                                    "rain.flac,Rain,val\ndoor.wav,Door,train\n")
    build_manifest(clips, tmp_path / "t.csv", tmp_path / "v.jsonl", split_column="split", split="val",
                   text_columns=["labels"], prompt="classify this sound.")
    assert [(r["path"], r["output"], r["prompt"], r["split"]) for r in recs(tmp_path / "v.jsonl")] == [
        ("dev/rain.flac", "Rain", "classify this sound.", "val")]
    s = build_manifest(clips, tmp_path / "t.csv", tmp_path / "per" / "{split}.jsonl", split_column="split")
    assert s["manifests"] == {str(tmp_path / "per" / "train.jsonl"): 2, str(tmp_path / "per" / "val.jsonl"): 1}
    assert [r["output"] for r in recs(tmp_path / "per" / "train.jsonl")] == ["Dog,Bark", "Door"]
    with pytest.raises(ManifestError, match=r"put \{split\} in --out"):
        build_manifest(clips, tmp_path / "t.csv", tmp_path / "x.jsonl", split_column="split")
    with pytest.raises(ManifestError, match=r"no split column 'fold' \(columns found: fname, labels, split\)"):
        build_manifest(clips, tmp_path / "t.csv", tmp_path / "x.jsonl", split_column="fold", split="1")


def test_errors_list_the_columns_found(tmp_path, clips):
    (tmp_path / "c.csv").write_text("file_name,caption_1,caption_2\na.wav,x,y\n")
    with pytest.raises(ManifestError, match=r"--text-column 'caption_\*'.*columns found: file_name, caption_1, caption_2"):
        build_manifest(clips, tmp_path / "c.csv", tmp_path / "o.jsonl")
    with pytest.raises(ManifestError, match=r"--text-column 'text\*' matches no column"):
        build_manifest(clips, tmp_path / "c.csv", tmp_path / "o.jsonl", text_columns=["text*"])
    (tmp_path / "d.csv").write_text("youtube_id,caption\nabc,x\n")
    with pytest.raises(ManifestError, match=r"no file column .*--file-pattern.*columns found: youtube_id, caption"):
        build_manifest(clips, tmp_path / "d.csv", tmp_path / "o.jsonl")
    with pytest.raises(ManifestError, match="labels file .* does not exist"):
        build_manifest(clips, tmp_path / "missing.csv", tmp_path / "o.jsonl")


def test_cli_manifest_options_and_errors(tmp_path, clips, capsys):
    from megaflamingo.cli.preprocess import main
    (tmp_path / "caps.csv").write_text("file_name,caption_1,caption_2\n\"a b, c.wav\",one,two\n")
    assert main(["manifest", "--folder", str(clips), "--labels", str(tmp_path / "caps.csv"),
                 "--out", str(tmp_path / "m.jsonl"), "--text-column", "caption_1",
                 "--text-column", "caption_2", "--split", "train"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 2
    assert main(["manifest", "--folder", str(clips), "--labels", str(tmp_path / "nope.csv"),
                 "--out", str(tmp_path / "m2.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.csv does not exist" in err[0]


def test_build_manifest_from_json_labels(tmp_path):
    write_audio(tmp_path / "f/a.wav", "tone", 0.5, 16000)
    write_audio(tmp_path / "f/b.wav", "tone", 0.5, 16000)
    (tmp_path / "labels.json").write_text(json.dumps({"a.wav": ["cap 1", "cap 2"], "zzz.wav": "x"}))
    s = build_manifest(tmp_path / "f", tmp_path / "labels.json", tmp_path / "out.jsonl",
                       data_root=str(tmp_path))
    recs = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["path"], r["output"]) for r in recs] == [("f/a.wav", "cap 1"), ("f/a.wav", "cap 2")]
    assert s["labels_without_audio"] == ["zzz.wav"] and s["audio_without_labels"] == ["b.wav"]
    (tmp_path / "bad.csv").write_text("name,whatever\na.wav,x\n")
    with pytest.raises(ManifestError, match="text column"):
        build_manifest(tmp_path / "f", tmp_path / "bad.csv", tmp_path / "o2.jsonl")
