"""Model loading: the encoder record travels with the model dir; AF1 checkpoints answer like the
model they came from; converted dirs do not leak; tied weights are re-tied."""
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from megaflamingo.testing import sounds as synthetic
from megaflamingo.cli.infer import main


def _clip(t):
    return json.loads(t["ds"].manifests["test"].read_text().splitlines()[0])["name"]


def _answer(capsys, model, audio, *extra):
    rc = main(["--model", str(model), "--audio", str(audio), "--prompt", synthetic.CLASSIFY_PROMPT,
               "--max-new-tokens", "6", "--json", *extra])
    lines = capsys.readouterr()
    assert rc == 0, lines.err[-2000:]
    return json.loads(lines.out.strip().splitlines()[-1])["answer"]


def test_moved_model_dir_uses_its_encoder_record(trained, tmp_path, capsys):
    """A model dir copied elsewhere, with no training data reachable, embeds audio as recorded
    in its encoder.json; a record that does not match the encoder it rebuilds is refused."""
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(trained["model"], moved)
    conf = json.loads((moved / "config.json").read_text())
    conf.setdefault("data", {})["data_root"] = str(tmp_path / "deleted-dataset")  # gone on this machine
    (moved / "config.json").write_text(json.dumps(conf))
    audio = tmp_path / "q.wav"
    shutil.copyfile(trained["data"] / _clip(trained), audio)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the training data
        assert _answer(capsys, moved, audio) == _answer(capsys, trained["model"], audio)

    rec = json.loads((moved / "encoder.json").read_text())
    assert rec["encoder"]["name"] == "tiny" and rec["windows"]["window_s"] > 0
    rec["encoder"].setdefault("config", {})["seed"] = 1234  # embeddings of a differently seeded encoder
    (moved / "encoder.json").write_text(json.dumps(rec))
    rc = main(["--model", str(moved), "--audio", str(audio), "--prompt", "x", "--json"])
    assert rc != 0 and "silence embedding differs" in capsys.readouterr().err

    (moved / "encoder.json").unlink()  # nothing recorded, nothing found: the config's section, warned
    with pytest.warns(UserWarning, match="encoder.json"):
        from megaflamingo.inference.load import load_model
        load_model(moved)


def _leftovers():
    return {p.name for p in Path(tempfile.gettempdir()).glob("megaflamingo-*")}


def test_af1_checkpoint_answers_like_the_original(trained, tmp_path, capsys):
    from megaflamingo.compat import af1
    from megaflamingo.checkpoint.load import load_state_dict
    from megaflamingo.inference.load import load_model

    original = load_model(trained["model"])
    pt = tmp_path / "foundation.pt"
    torch.save({"model_state_dict": af1.export_state_dict(original.model)}, pt)
    audio = trained["data"] / _clip(trained)
    before = _leftovers()
    want = _answer(capsys, trained["model"], audio)
    # AF1 files carry no encoder record: take it from the data the model was trained on.
    af1_args = ("--config", str(trained["model"] / "config.json"),
                "--encoder-from", str(trained["arrow"] / f"{synthetic.DATASET}-{synthetic.TASK}" / "train"))
    assert _answer(capsys, pt, audio, *af1_args) == want
    assert _leftovers() == before  # the temporary import is removed after loading

    cache = tmp_path / "cache"
    assert _answer(capsys, pt, audio, *af1_args, "--cache-dir", str(cache)) == want
    (kept,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert (kept / "config.json").is_file()
    # The imported dir stores tied weights once; the index records the tie and reading re-ties it.
    sd = load_state_dict(kept)
    own = original.model.state_dict()
    tied = [(a, b) for a in own for b in own if a < b and own[a].data_ptr() == own[b].data_ptr()]
    assert tied, "the tiny OPT LM ties lm_head to the input embeddings"
    for a, b in tied:
        assert a in sd and b in sd and sd[a] is sd[b]
        torch.testing.assert_close(sd[a], own[a])


@pytest.mark.slow
def test_icl_retrieval_over_laion_clap_clip_embeddings(trained, tmp_path, capsys, torchvision_stub):
    """--icl-from a split whose kNN keys are LAION-CLAP clip embeddings (random weights here): the
    query is embedded with the rebuilt LAION-CLAP and its neighbours are the brute-force nearest."""
    import numpy as np

    from megaflamingo.data.arrow_format import open_shards, read_metadata
    from megaflamingo.inference.embed import ClipEmbedder
    from megaflamingo.cli.preprocess import main as preprocess_main

    ds = f"{synthetic.DATASET}-{synthetic.TASK}"
    rows = trained["ds"].manifests["train"].read_text().splitlines()[::2][:6]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("\n".join(rows) + "\n")
    split = tmp_path / "arrow" / ds / "train"
    assert preprocess_main(["embed", "--manifest", str(manifest), "--data-root", str(trained["data"]),
                            "--out", str(split), "--encoder", "tiny", "--embed-dim", "64", "--clip-encoder",
                            "laion-clap", "--random-init", "--workers", "0", "--no-progress"]) in (0, None)
    meta = read_metadata(split)
    assert meta["clip_encoder"]["name"] == "laion-clap"
    table = open_shards(split)[0]
    clips = np.asarray(table.column("clip_embedding").to_pylist(), dtype=np.float32)
    paths, ids = table.column("path").to_pylist(), table.column("id").to_pylist()

    q = 2
    query = trained["data"] / paths[q]
    # The query key recomputed in-process equals the one preprocessing stored for that clip.
    np.testing.assert_allclose(ClipEmbedder(meta["clip_encoder"], meta["windows"]).embed(query), clips[q],
                               atol=1e-4)
    k = 4
    rc = main(["--model", str(trained["model"]), "--audio", str(query), "--prompt", synthetic.CLASSIFY_PROMPT,
               "--icl-from", str(split), "--k", str(k), "--max-new-tokens", "4", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    got = [e["id"] for e in json.loads(out.out.strip().splitlines()[-1])["examples"]]
    d = ((clips - clips[q]) ** 2).sum(1)
    brute = [ids[i] for i in np.argsort(d, kind="stable") if paths[i] != paths[q]][:k - 1]
    assert got == brute
