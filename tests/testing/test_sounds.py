"""SynthSounds (megaflamingo.testing.sounds): readable manifests, balanced classes, multi-window clips, seeded."""
import json

import soundfile as sf

from megaflamingo.testing import sounds as synthetic
from megaflamingo.data.manifests import read_manifest


def test_generate_layout_and_determinism(tmp_path):
    sizes = synthetic.SplitSizes(train=2, val=0, test=1)
    ds = synthetic.generate(tmp_path / "a", sizes, seed=3, min_s=3.0, max_s=9.0)
    assert set(ds.manifests) == {"train", "test"} and ds.counts == {"train": 16, "test": 8}
    m = read_manifest(ds.manifests["train"], tmp_path / "a")
    assert (m.dataset, m.task, m.split) == (synthetic.DATASET, synthetic.TASK, "train")
    labels = [it.output for it in m.items]
    assert sorted(set(labels)) == sorted(synthetic.LABELS) and all(labels.count(l) == 2 for l in synthetic.LABELS)
    rows = [json.loads(l) for l in ds.manifests["train"].read_text().splitlines()]
    assert any(r["duration"] > 7.0 for r in rows) and any(r["duration"] <= 7.0 for r in rows)
    for r in rows[:4]:
        info = sf.info(str(tmp_path / "a" / r["name"]))
        assert abs(info.duration - r["duration"]) < 0.01
    caps = read_manifest(ds.caption_manifests["train"], tmp_path / "a")
    assert caps.task == synthetic.CAPTION_TASK and all(it.output for it in caps.items)
    # Same seed -> identical audio; another seed -> different audio.
    b = synthetic.generate(tmp_path / "b", sizes, seed=3, min_s=3.0, max_s=9.0)
    c = synthetic.generate(tmp_path / "c", sizes, seed=4, min_s=3.0, max_s=9.0)
    f = rows[0]["name"]
    assert (tmp_path / "a" / f).read_bytes() == (b.root / f).read_bytes()
    assert (tmp_path / "a" / f).read_bytes() != (c.root / f).read_bytes()


def test_captions_describe_each_clip_in_several_references(tmp_path):
    """Captioning rows: 5 paraphrases per clip (AF1's one-row-per-caption layout), each naming the
    clip's class, loudness and length as measured from the audio itself."""
    import numpy as np

    ds = synthetic.generate(tmp_path, synthetic.SplitSizes(train=0, val=0, test=3), seed=1)
    rows = [json.loads(l) for l in ds.caption_manifests["test"].read_text().splitlines()]
    by_clip: dict[str, list[dict]] = {}
    for r in rows:
        by_clip.setdefault(r["name"], []).append(r)
    assert len(by_clip) == 3 * len(synthetic.LABELS)
    assert all(len(v) == synthetic.N_REFERENCES == 5 for v in by_clip.values())
    words = {False: {"quiet"}, True: {"loud"}}
    lengths_words = {False: {"short"}, True: {"long"}}
    levels, lengths = set(), set()
    for name, refs in by_clip.items():
        assert [r["id"].rsplit("#", 1)[1] for r in refs] == ["0", "1", "2", "3", "4"]
        assert len({r["output"] for r in refs}) == 5  # paraphrases, not copies
        x, _ = sf.read(str(tmp_path / name))
        loud = float(np.abs(x).max()) >= synthetic.LOUD_FROM
        cls = next(c for c in synthetic.CLASSES if c.label == refs[0]["label"])
        long_ = refs[0]["duration"] > synthetic.LONG_FROM_S
        for r in refs:
            toks = set(r["output"].replace(",", "").split())
            assert toks & words[loud] and not toks & words[not loud], r["output"]
            assert toks & lengths_words[long_] and not toks & lengths_words[not long_], r["output"]
            assert any(s in r["output"] for s in cls.subjects), r["output"]
        levels.add(loud)
        lengths.add(long_)
    assert levels == {True, False} and lengths == {True, False}  # both kinds of clip occur
    # Training rows: one reference per clip by default, cycling through the five templates.
    train = synthetic.generate(tmp_path / "t", synthetic.SplitSizes(train=5, val=0, test=0), seed=1)
    rows = [json.loads(l) for l in train.caption_manifests["train"].read_text().splitlines()]
    assert len(rows) == 5 * len(synthetic.LABELS) and len({r["name"] for r in rows}) == len(rows)
    assert {r["id"].rsplit("#", 1)[1] for r in rows} == {"0", "1", "2", "3", "4"}
