"""Dataset recipes on miniatures of the published layouts (dataset_miniatures.py): exact rows,
missing-file reports, AF1 names and prompts, options, bad input; the manifests are accepted by
read_manifest and by `embed`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.preprocess.dataset_miniatures import MINIATURES, make_audiocaps_with_start, make_clotho_v2, wav

from megaflamingo.data.manifests import read_manifest
from megaflamingo.preprocess.recipes import RecipeError, get_recipe, list_recipes, prepare
from megaflamingo.preprocess.tables import TableError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def run_recipe(tmp_path, name, make=None, **options):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir(parents=True)
    exp = (make or MINIATURES[name])(src)
    report = prepare(name, src, out, **{**exp.options, **options})
    return src, out, exp, report


def manifests_of(report) -> dict:
    got = {}
    for m in report["manifests"]:
        if m["manifest"]:
            recs = [json.loads(x) for x in Path(m["manifest"]).read_text(encoding="utf-8").splitlines()]
            got[(m["task"], m["split"])] = recs
    return got


@pytest.mark.parametrize("name", sorted(MINIATURES))
def test_recipe_on_published_layout(tmp_path, name):
    src, out, exp, report = run_recipe(tmp_path, name)
    got = manifests_of(report)
    assert {k: [(r["name"], r["output"], r["prompt"]) for r in v] for k, v in got.items()} == exp.rows
    missing = {(m["task"], m["split"]): m["missing_audio"]["first"]
               for m in report["manifests"] if m["missing_audio"]["files"]}
    assert missing == exp.missing
    declared = {t.name: set(t.splits) for t in get_recipe(name).tasks}
    for (task, split), recs in got.items():
        assert split in declared[task]
        path = out / task / f"{split}.jsonl"
        assert path.is_file() and not list(path.parent.glob(".*.tmp"))
        for r in recs:
            assert (src / r["name"]).is_file()          # relative to the source folder
            assert f"{r['dataset']}-{r['task']}" == task and r["split"] == split
        m = read_manifest(path, src)                     # what `embed` reads
        assert (f"{m.dataset}-{m.task}", m.split) == (task, split)
        assert [it.path for it in m.items] == [r["name"] for r in recs]
        assert [it.output for it in m.items] == [r["output"] for r in recs]


def test_task_names_are_those_of_the_stage_configs():
    """Every recipe task that AF1's stage configs train or validate on is spelled as there."""
    import re
    names = set()
    for f in CONFIG_DIR.glob("*.yaml"):
        names |= {m.group(1) for m in re.finditer(r"([A-Za-z0-9_.-]+-[A-Za-z_]+)/(?:interleaved_knn-)?"
                                                   r"(?:train|val|test)\b", f.read_text())}
    ours = {t.name for r in list_recipes() for t in r.tasks}
    expected_in_configs = {"Clotho-v2-AudioCaptioning", "Clotho-AQA-AQA", "MACS-AudioCaptioning",
                           "FSD50k-EventClassification", "CochlScene-SceneClassification",
                           "NSynth-MIR", "MusicCaps-AudioCaptioning", "Music-AVQA-AQA_All",
                           "Music-AVQA-AVQA_All", "WavCaps-AudioSet_SL-AudioCaptioning",
                           "WavCaps-BBC_Sound_Effects-AudioCaptioning",
                           "WavCaps-FreeSound-AudioCaptioning", "WavCaps-SoundBible-AudioCaptioning"}
    assert expected_in_configs <= names
    assert expected_in_configs <= ours


def test_af1_label_sets_match_recipe_labels():
    """The class names recipes write are the spellings AF1's option lists use (else the
    provide_all_labels options would not contain the answer)."""
    from megaflamingo.data.templates import TemplateRegistry
    from megaflamingo.preprocess.recipes import cochlscene, emotion, music
    reg = TemplateRegistry()
    assert set(reg.option_labels("CochlScene-SceneClassification/train")) == set(cochlscene.CLASSES)
    assert set(reg.option_labels("GTZAN-GenreClassification/train")) == set(music.GTZAN_GENRES)
    assert set(reg.option_labels("CREMA-D-EmotionClassification/train")) == set(emotion.CREMA_EMOTIONS.values())
    assert set(reg.option_labels("ravdess-EmotionClassification/train")) == set(emotion.RAVDESS_EMOTIONS.values())


def test_audiocaps_pattern_with_start_time(tmp_path):
    src, out, exp, report = run_recipe(tmp_path, "audiocaps", make_audiocaps_with_start)
    got = manifests_of(report)
    assert {k: [(r["name"], r["output"], r["prompt"]) for r in v] for k, v in got.items()} == exp.rows
    assert all("audio_start" not in r for v in got.values() for r in v)   # trimmed clips start at 0


def test_audiocaps_full_videos_and_split_folders(tmp_path):
    """Whole soundtracks: audio_start = start_time; a {split} field places files by split."""
    src = tmp_path / "src"
    make_audiocaps_with_start(src)
    for split, yid in (("train", "r1nicOVtvkQ"), ("val", "vfY_TJq7n_U")):
        wav(src, f"full/{split}/{yid}.wav")
    report = prepare("audiocaps", src, tmp_path / "out", audio_pattern="full/{split}/{youtube_id}.wav",
                     full_videos="true")
    got = manifests_of(report)
    rows = got[("audiocaps-AudioCaptioning", "train")]
    assert [(r["name"], r["audio_start"], r["duration"]) for r in rows] == [("full/train/r1nicOVtvkQ.wav", 130.0, 10.0)]
    assert [r["audio_start"] for r in got[("audiocaps-AudioCaptioning", "val")]] == [130.0, 130.0]
    miss = {m["split"]: m["missing_audio"]["files"] for m in report["manifests"]}
    assert miss == {"train": 2, "val": 0, "test": 1}


def test_audiocaps_pattern_with_unknown_field(tmp_path):
    src = tmp_path / "src"
    make_audiocaps_with_start(src)
    with pytest.raises(RecipeError, match=r"\{ytid\}.*columns: audiocap_id, youtube_id, start_time, caption"):
        prepare("audiocaps", src, tmp_path / "out", audio_pattern="{ytid}.wav")
    assert not (tmp_path / "out" / "audiocaps-AudioCaptioning").exists() or \
        not list((tmp_path / "out" / "audiocaps-AudioCaptioning").iterdir())


def test_fold_options(tmp_path):
    src, out, exp, report = run_recipe(tmp_path, "esc50", holdout_fold=1)
    got = manifests_of(report)
    T = "ESC50-EventClassification"
    assert [r["name"] for r in got[(T, "test")]] == ["audio/1-100032-A-0.wav", "audio/1-100038-A-14.wav"]
    assert [r["name"] for r in got[(T, "train")]] == ["audio/2-102414-C-17.wav"]
    with pytest.raises(RecipeError, match="holdout_fold must be in 1..5"):
        prepare("esc50", tmp_path / "src", tmp_path / "o2", holdout_fold="9")
    _, _, _, rep = run_recipe(tmp_path / "us", "urbansound8k", holdout_fold="10", val_fold="5")
    got = manifests_of(rep)
    U = "UrbanSound8K-EventClassification"
    assert sorted(k[1] for k in got) == ["test", "val"]
    assert [r["name"] for r in got[(U, "test")]] == ["audio/fold10/101729-0-0-1.wav"]
    assert [r["duration"] for r in got[(U, "val")]] == [pytest.approx(0.317551), pytest.approx(4.0)]


def test_recipe_options(tmp_path):
    _, _, _, rep = run_recipe(tmp_path / "a", "clotho-aqa", min_confidence="yes")
    rows = manifests_of(rep)[("Clotho-AQA-AQA", "train")]
    assert [r["output"] for r in rows] == ["yes", "car"]
    skipped = next(m for m in rep["manifests"] if m["split"] == "train")["skipped"]
    assert skipped["low_confidence"]["count"] == 2
    _, _, _, rep = run_recipe(tmp_path / "b", "ravdess", vocal_channel="both", split="train")
    rows = manifests_of(rep)[("ravdess-EmotionClassification", "train")]
    assert [r["output"] for r in rows] == ["neutral", "disgusted", "surprised", "angry"]
    _, _, _, rep = run_recipe(tmp_path / "c", "nsynth", tasks="InstrClassification")
    assert {k[0] for k in manifests_of(rep)} == {"NSynth-InstrClassification"}
    _, _, _, rep = run_recipe(tmp_path / "d", "clotho-v2", validation_as="train")
    got = manifests_of(rep)
    assert sorted(k[1] for k in got) == ["test", "train"]
    assert len(got[("Clotho-v2-AudioCaptioning", "train")]) == 15


def test_bad_names_and_options(tmp_path):
    with pytest.raises(RecipeError, match="did you mean clotho-v2"):
        get_recipe("clotho_v2")
    (tmp_path / "src").mkdir()
    with pytest.raises(RecipeError, match=r"unknown option colour \(options: esc10, holdout_fold, split, val_fold\)"):
        prepare("esc50", tmp_path / "src", tmp_path / "out", colour="red")
    with pytest.raises(RecipeError, match="takes true/false"):
        prepare("esc50", tmp_path / "src", tmp_path / "out", esc10="maybe")
    with pytest.raises(RecipeError, match="must be one of train, val, test"):
        prepare("esc50", tmp_path / "src", tmp_path / "out", split="dev")
    with pytest.raises(RecipeError, match=r"meta/esc50\.csv not found under"):
        prepare("esc50", tmp_path / "src", tmp_path / "out")
    with pytest.raises(RecipeError, match="source folder .* does not exist"):
        prepare("esc50", tmp_path / "nope", tmp_path / "out")


def test_bad_metadata_names_the_line_and_writes_nothing(tmp_path):
    src = tmp_path / "src"
    make_clotho_v2(src)
    # an unquoted comma in the evaluation captions: the run fails after development was read
    (src / "clotho_captions_evaluation.csv").write_text(
        "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n"
        "door.wav,one,two,three,four,five\ndoor.wav,a,b,c,d,e, and more\n")
    with pytest.raises(TableError, match=r"clotho_captions_evaluation\.csv:3: 7 fields but the header has 6"):
        prepare("clotho-v2", src, tmp_path / "out")
    leftovers = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert leftovers == []
    (src / "clotho_captions_evaluation.csv").write_text("name,caption\nx.wav,y\n")
    with pytest.raises(TableError, match=r"no column 'file_name' \(columns found: name, caption\)"):
        prepare("clotho-v2", src, tmp_path / "out")


def test_rerun_replaces_manifests(tmp_path):
    src, out, exp, _ = run_recipe(tmp_path, "esc50")
    path = out / "ESC50-EventClassification" / "test.jsonl"
    first = path.read_bytes()
    prepare("esc50", src, out)
    assert path.read_bytes() == first                         # deterministic
    prepare("esc50", src, out, esc10="true")
    assert [json.loads(x)["output"] for x in path.read_text().splitlines()] == ["dog"]


def test_cli_prepare_list_and_run(tmp_path, capsys):
    from megaflamingo.cli.preprocess import main
    assert main(["prepare", "--list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in listed} == {r.name for r in list_recipes()}
    clotho = next(r for r in listed if r["name"] == "clotho-v2")
    assert clotho["tasks"] == [{"name": "Clotho-v2-AudioCaptioning", "splits": ["train", "val", "test"],
                                "prompt": "describe the sound in a sentence."}]
    src = tmp_path / "src"
    make_clotho_v2(src)
    assert main(["prepare", "clotho-v2", "--source", str(src), "--out", str(tmp_path / "out")]) == 0
    cap = capsys.readouterr()
    report = json.loads(cap.out)                               # stdout is exactly one JSON document
    assert report["total_rows"] == 19
    assert "1 files listed in the metadata are not under" in cap.err and "'gone missing.wav'" in cap.err
    assert json.loads((tmp_path / "out" / "clotho-v2.report.json").read_text())["total_rows"] == 19
    assert main(["prepare", "clotho-v2", "--source", str(src), "--out", str(tmp_path / "o"),
                 "--audio-pattern", "{x}.wav"]) == 2
    assert "ships its own audio" in capsys.readouterr().err
    assert main(["prepare", "nosuch", "--source", str(src), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown recipe 'nosuch'" in err[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "meta").mkdir()
    (empty / "meta/esc50.csv").write_text("filename,fold,target,category\n1-1-A-0.wav,1,0,dog\n")
    assert main(["prepare", "esc50", "--source", str(empty), "--out", str(tmp_path / "o3")]) == 1


def test_embed_runs_on_a_recipe_manifest(tmp_path, capsys):
    """The output of a recipe goes straight into `embed` (tiny encoder): names, task, split."""
    from megaflamingo.cli.preprocess import main
    src, out, exp, report = run_recipe(tmp_path, "clotho-v2")
    arrow = tmp_path / "arrow" / "Clotho-v2-AudioCaptioning" / "train"
    rc = main(["embed", "--manifest", str(out / "Clotho-v2-AudioCaptioning" / "train.jsonl"),
               "--data-root", str(src), "--out", str(arrow), "--encoder", "tiny", "--embed-dim", "8",
               "--max-windows", "4", "--workers", "0", "--min-file-bytes", "0", "--no-progress"])
    assert rc == 0
    meta = json.loads((arrow / "metadata.json").read_text())
    assert meta["num_rows"] == 10
    import pyarrow as pa
    rows = []
    for shard in sorted(arrow.glob("shard-*.arrow")):
        with pa.memory_map(str(shard)) as f:
            rows += pa.ipc.open_file(f).read_all().to_pylist()
    assert [r["path"] for r in rows] == [r[0] for r in exp.rows[("Clotho-v2-AudioCaptioning", "train")]]
    assert {r["task"] for r in rows} == {"Clotho-v2-AudioCaptioning"}


@pytest.mark.slow
def test_every_recipe_output_embeds_and_trains(tmp_path, capsys):
    """Every recipe's manifests, from its miniature: `embed --config` (tiny encoder) writes each split,
    and `megaflamingo-train --dry-run` accepts a blend of all of them (pre-flight, loaders, templates,
    a first collated batch)."""
    import yaml

    from megaflamingo.cli.preprocess import main as preprocess
    from megaflamingo.cli.train import main as train
    from megaflamingo.testing.tiny_task import tiny_raw_config

    arrow = tmp_path / "arrow"
    raw = tiny_raw_config(embed_dim=8, windows=4)
    raw["data"] = {"data_root": str(arrow), "blend": {}, "num_workers": 0}
    raw["train"] = {"run_dir": str(tmp_path / "run"), "micro_batch_size": 2, "progress_bar": False}
    cfg = tmp_path / "embed.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    splits = []
    for name, make in sorted(MINIATURES.items()):
        src, out = tmp_path / "src" / name, tmp_path / "manifests" / name
        src.mkdir(parents=True)
        prepare(name, src, out, **make(src).options)
        for manifest in sorted(out.glob("*/*.jsonl")):
            assert preprocess(["embed", "--config", str(cfg), "--manifest", str(manifest), "--data-root", str(src),
                               "--workers", "0", "--no-progress", "--min-file-bytes", "0"]) == 0, manifest
            splits.append(f"{manifest.parent.name}/{manifest.stem}")
    assert len({s.split("/")[0] for s in splits}) >= 20  # every task of the 16 recipes
    raw["data"]["blend"] = {s: {"weight": 1.0} for s in splits}
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    capsys.readouterr()
    assert train(["--config", str(cfg), "--dry-run", "--json"]) == 0, capsys.readouterr().err[-3000:]
    plan = json.loads(capsys.readouterr().out)
    assert plan["datasets"] == splits and plan["first_batch_shapes"]["audio_embeds"][-1] == 8
