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
