"""AF1's LAION-CLAP re-ranking: the text tower loaded from a LAION-layout checkpoint equals LAION's own
text path, the audio side is exactly preprocessing's clip embedding, and answers are ranked by the
cosine of the two (random weights, built offline)."""
import json

import numpy as np
import pytest
import torch

from megaflamingo.inference.rerank import (Candidate, ClapReranker, ClapTextTower, RerankError, checkpoint_is_fusion,
                                           cosine_scores, load_reranker, rank_candidates)

from megaflamingo.testing.clap import tiny_roberta_tokenizer, torchvision_stub, write_laion_checkpoint

TEXTS = ["a low tone hums", "white noise hiss", "a dog barks in the rain", "", "a low tone hums loud"]


@pytest.fixture(scope="module")
def tok(laion_checkpoint):
    return laion_checkpoint["tokenizer"]


@pytest.fixture(scope="module")
def text_ref(laion_checkpoint):
    return laion_checkpoint["text"]


@pytest.fixture(scope="module")
def laion(laion_checkpoint, tok):
    """The full LAION-layout checkpoint (random HTSAT-tiny audio + the reference text branch), the
    re-ranker loaded from it, and the clip embedder the preprocessing path builds from it."""
    from megaflamingo.inference.embed import ClipEmbedder

    path = laion_checkpoint["path"]
    with torchvision_stub():
        reranker = load_reranker(path, tok)
        # what `megaflamingo-preprocess embed --clip-encoder laion-clap --no-fusion` would build
        record = {"name": "laion-clap", "random_init": False, "config": {"fusion": False, "clip_seconds": 10.0}}
        reference_clip = ClipEmbedder(record, {}, "cpu", str(path))
    return {"path": path, "reranker": reranker, "clip": reference_clip}


def _wav(trained, label="low tone"):
    import json

    rows = [json.loads(l) for l in trained["ds"].manifests["test"].read_text().splitlines()]
    return trained["data"] / next(r for r in rows if r["label"] == label)["name"]


def test_text_tower_equals_laion_text_path(tmp_path, tok, text_ref):
    from megaflamingo.audio.encoders import load_checkpoint

    path = write_laion_checkpoint(tmp_path / "text.pt", text_ref, audio=False)
    tower = ClapTextTower.from_state_dict(load_checkpoint(path), tok)
    cfg = tower.model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size, cfg.layer_norm_eps) == (2, 2, 128, 1e-5)
    got = tower.embed(TEXTS)
    want = text_ref(tok, TEXTS).numpy()
    assert got.shape == (len(TEXTS), 512)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert np.abs(got[0] - got[1]).max() > 1e-2  # different texts, different embeddings
    # Batching does not change an embedding (padding to 77 tokens is masked out).
    np.testing.assert_allclose(tower.embed(TEXTS[:1]), got[:1], atol=1e-5)
    np.testing.assert_allclose(tower.embed(TEXTS, batch_size=2), got, atol=1e-5)


def test_text_tower_refuses_what_does_not_fit(tmp_path, tok, text_ref):
    from megaflamingo.audio.encoders import load_checkpoint

    sd = load_checkpoint(write_laion_checkpoint(tmp_path / "t.pt", text_ref, audio=False))
    no_text = {k: v for k, v in sd.items() if not k.startswith("text_")}
    with pytest.raises(RerankError, match="text tower"):
        ClapTextTower.from_state_dict(no_text, tok)
    broken = dict(sd)
    broken.pop("text_branch.encoder.layer.1.output.dense.weight")
    with pytest.raises(RerankError, match="missing"):
        ClapTextTower.from_state_dict(broken, tok)
    small = tiny_roberta_tokenizer(vocab_size=600)  # more tokens than the tower's vocabulary
    with pytest.raises(RerankError, match="vocabulary"):
        ClapTextTower.from_state_dict(sd, small)
    with pytest.raises(RerankError, match="not found"):
        load_reranker(tmp_path / "missing.pt", tok)


def test_cosine_and_ranking_rules():
    a = np.array([1.0, 0.0, 0.0])
    t = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [-3.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    np.testing.assert_allclose(cosine_scores(a, t), [1.0, 0.0, -1.0, 2 ** -0.5], atol=1e-6)
    with pytest.raises(RerankError):
        cosine_scores(a, t[:, :2])
    # Duplicates are merged (counted); equal scores keep the order they were sampled in.
    samples = ["b", "a", "c", "a", "d", "b", "a"]
    got = rank_candidates(samples, {"a": 0.5, "b": 0.9, "c": 0.5, "d": -0.1})
    assert got == [Candidate("b", 0.9, 2, 0), Candidate("a", 0.5, 3, 1), Candidate("c", 0.5, 1, 2),
                   Candidate("d", -0.1, 1, 4)]
    assert checkpoint_is_fusion({"audio_branch.patch_embed.fusion_model.local_att.0.weight": 0})
    assert not checkpoint_is_fusion({"audio_branch.patch_embed.proj.weight": 0, "text_branch.fusion_model.x": 0})


def test_reranker_ranks_by_text_audio_cosine(trained, tok, text_ref, laion):
    """Scores are the cosine of LAION's text embedding and preprocessing's clip embedding."""
    reranker, wav = laion["reranker"], _wav(trained)
    audio = laion["clip"].embed(wav)  # the kNN key preprocessing would store for this clip
    np.testing.assert_allclose(reranker.audio_embedding(wav), audio, atol=1e-6)
    text = text_ref(tok, TEXTS).numpy()
    want = text @ audio / (np.linalg.norm(text, axis=1) * np.linalg.norm(audio))
    got = reranker.rank(wav, TEXTS)
    assert [c.text for c in got] == [TEXTS[i] for i in np.argsort(-want, kind="stable")]
    np.testing.assert_allclose([c.score for c in got], np.sort(want)[::-1], atol=1e-5)
    assert len({round(c.score, 4) for c in got}) == len(TEXTS)  # the scores really differ
    # Deterministic: the same file scores the same again (AF1's fusion crops were random).
    assert reranker.rank(wav, TEXTS) == got
    np.testing.assert_allclose(reranker.scores(audio, TEXTS), want, atol=1e-5)  # a precomputed embedding


def test_reranker_from_checkpoint_matches_its_parts(laion):
    reranker = laion["reranker"]
    assert reranker.audio.encoder.describe()["config"]["fusion"] is False  # detected from the keys
    assert reranker.text.embed_dim == 512
    # The audio tower really came from the file (not random init): its weights equal the file's.
    sd = torch.load(str(laion["path"]), map_location="cpu", weights_only=True)["state_dict"]
    w = sd["module.audio_projection.0.weight"]
    assert torch.equal(reranker.audio.encoder.module.audio_projection[0].weight.cpu(), w)
    with pytest.raises(RerankError, match="dims"):  # a text tower of another joint size does not pair
        ClapReranker(ClapTextTower(_tower_of_dim(256), tiny_roberta_tokenizer()), reranker.audio)


def _tower_of_dim(dim):
    from transformers import ClapTextConfig, ClapTextModelWithProjection

    return ClapTextModelWithProjection(ClapTextConfig(vocab_size=400, hidden_size=64, num_hidden_layers=1,
                                                      num_attention_heads=1, intermediate_size=64,
                                                      max_position_embeddings=80, projection_dim=dim))


def test_service_samples_and_reranks(trained, laion):
    """N seeded samples of the trained model, ordered by CLAP score; the best is the answer."""
    from megaflamingo.inference.embed import ModelEmbedder
    from megaflamingo.inference.load import load_model
    from megaflamingo.inference.rerank import sample_answers
    from megaflamingo.inference.runner import GenerationSettings
    from megaflamingo.inference.service import InferenceService
    from megaflamingo.testing import sounds as synthetic

    loaded = load_model(trained["model"])
    service = InferenceService(loaded, ModelEmbedder(loaded), reranker=laion["reranker"])
    wav = _wav(trained)
    s = GenerationSettings(max_new_tokens=6, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, seed=11)
    g = service.answer(wav, synthetic.CLASSIFY_PROMPT, s, num_samples=8, rerank=True)
    again = service.answer(wav, synthetic.CLASSIFY_PROMPT, s, num_samples=8, rerank=True)
    assert g.candidates == again.candidates  # seeded sampling + deterministic scores
    assert sum(c.count for c in g.candidates) == 8
    assert g.text == g.candidates[0].text and g.score == g.candidates[0].score
    assert [c.score for c in g.candidates] == sorted((c.score for c in g.candidates), reverse=True)
    samples = sample_answers(service_runner(service, s), service.foundation_query(wav, synthetic.CLASSIFY_PROMPT), 8)
    assert {c.text for c in g.candidates} == set(samples)
    want = laion["reranker"].scores(wav, [c.text for c in g.candidates])
    np.testing.assert_allclose([c.score for c in g.candidates], want, atol=1e-6)
    with pytest.raises(ValueError, match="sampling"):
        service.answer(wav, synthetic.CLASSIFY_PROMPT, GenerationSettings(max_new_tokens=4), num_samples=3,
                       rerank=True)


def service_runner(service, settings):
    from megaflamingo.inference.runner import Runner

    return Runner(service.loaded, settings)


# ------------------------------------------------------------------------ megaflamingo-infer


def test_sampling_settings_rules():
    from megaflamingo.inference.rerank import sampling_settings

    s, n = sampling_settings(None, rerank=True, max_new_tokens=8)
    assert (n, s.do_sample, s.top_k, s.top_p, s.num_beams) == (10, True, 50, 0.95, 1)  # AF1's demo decoding
    s, n = sampling_settings(4, rerank=True, top_k=0, top_p=0.5, temperature=0.7)
    assert (n, s.top_k, s.top_p, s.temperature) == (4, 0, 0.5, 0.7)  # what the user chose wins
    s, n = sampling_settings(None, max_new_tokens=8)
    assert (n, s.do_sample, s.top_k, s.top_p) == (1, False, 0, 1.0)  # greedy, filters off
    assert sampling_settings(3, do_sample=True)[1] == 3
    with pytest.raises(ValueError, match="need sampling"):
        sampling_settings(3)
    with pytest.raises(ValueError, match="beam"):
        sampling_settings(None, rerank=True, num_beams=3)
    with pytest.raises(ValueError, match=">= 1"):
        sampling_settings(0, rerank=True)
    with pytest.raises(ValueError, match="top_p"):
        sampling_settings(None, rerank=True, top_p=1.5)


def _infer(capsys, *argv):
    from megaflamingo.cli.infer import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.slow
def test_cli_reranks_samples(trained, laion_checkpoint, laion, torchvision_stub, capsys):
    """`--num-samples 6 --rerank-clap CKPT --json`: every distinct sample with its LAION-CLAP score,
    best first; the samples are AF1's top-k 50 / top-p 0.95 draws; the same seed, the same list."""
    from megaflamingo.inference.load import load_model
    from megaflamingo.inference.rerank import sample_answers
    from megaflamingo.inference.runner import GenerationSettings, Runner
    from megaflamingo.inference.service import InferenceService
    from megaflamingo.inference.embed import ModelEmbedder
    from megaflamingo.testing import sounds as synthetic

    wav = _wav(trained)
    argv = ["--model", trained["model"], "--audio", wav, "--prompt", synthetic.CLASSIFY_PROMPT, "--num-samples", 6,
            "--temperature", 1.5, "--seed", 3, "--max-new-tokens", 6, "--rerank-clap", laion_checkpoint["path"],
            "--rerank-tokenizer", laion_checkpoint["tokenizer_dir"], "--device", "cpu"]
    rc, out, err = _infer(capsys, *argv, "--json")
    assert rc == 0, err
    got = json.loads(out)
    cands = got["candidates"]
    assert [c["score"] for c in cands] == sorted((c["score"] for c in cands), reverse=True)
    assert sum(c["count"] for c in cands) == 6 and len(got["samples"]) == 6
    assert got["answer"] == cands[0]["text"] and got["score"] == cands[0]["score"]
    assert {c["text"] for c in cands} == set(got["samples"])
    np.testing.assert_allclose([c["score"] for c in cands], laion["reranker"].scores(wav, [c["text"] for c in cands]),
                               atol=1e-5)
    # The samples are exactly the library's seeded draws with AF1's filters.
    loaded = load_model(trained["model"])
    service = InferenceService(loaded, ModelEmbedder(loaded))
    s = GenerationSettings(max_new_tokens=6, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, seed=3)
    assert sample_answers(Runner(loaded, s), service.foundation_query(wav, synthetic.CLASSIFY_PROMPT), 6) == got["samples"]
    # Plain text: the answer, then one line per candidate; the same seed gives the same list.
    rc, out, _ = _infer(capsys, *argv)
    assert rc == 0
    assert out.rstrip("\n").split("\n") == [got["answer"]] + [f"{c['score']:+.4f}  {c['count']}x  {c['text']}"
                                                                for c in cands]


@pytest.mark.slow
def test_cli_samples_and_fewshot_reranks(trained, laion_checkpoint, torchvision_stub, capsys):
    from megaflamingo.testing import sounds as synthetic

    wav, ds = _wav(trained, "white noise"), f"{synthetic.DATASET}-{synthetic.TASK}"
    base = ["--model", trained["model"], "--audio", wav, "--prompt", synthetic.CLASSIFY_PROMPT, "--max-new-tokens", 6,
            "--seed", 1, "--json"]
    rc, out, err = _infer(capsys, *base, "--sample", "--num-samples", 4, "--temperature", 1.5)
    got = json.loads(out)
    assert rc == 0 and len(got["samples"]) == 4 and got["answer"] == got["samples"][0] and "candidates" not in got
    rc, out, err = _infer(capsys, *base, "--icl-from", trained["arrow"] / ds / "train", "--k", 3, "--num-samples", 5,
                          "--rerank-clap", laion_checkpoint["path"], "--rerank-tokenizer",
                          laion_checkpoint["tokenizer_dir"])
    assert rc == 0, err
    got = json.loads(out)
    assert len(got["examples"]) == 2 and sum(c["count"] for c in got["candidates"]) == 5
    assert got["answer"] == got["candidates"][0]["text"]


def test_cli_refuses_bad_sampling_requests(trained, laion_checkpoint, tmp_path, capsys):
    wav = _wav(trained)
    base = ["--model", trained["model"], "--audio", wav, "--prompt", "what is it?"]
    cases = [
        (["--num-samples", 3], "need sampling"),
        (["--rerank-clap", tmp_path / "missing.pt"], "missing.pt not found"),
        (["--rerank-clap", laion_checkpoint["path"], "--num-beams", 3], "beam"),
        (["--rerank-clap", laion_checkpoint["path"], "--audio", wav], "exactly one --audio"),
        (["--rerank-clap", laion_checkpoint["path"], "--chat"], "--audio/--prompt"),
        (["--sample", "--num-samples", 0], ">= 1"),
        (["--rerank-clap", laion_checkpoint["path"], "--rerank-tokenizer", tmp_path], "tokenizer"),
    ]
    for extra, message in cases:
        rc, out, err = _infer(capsys, *base, *extra)
        assert rc == 2 and message in err and "Traceback" not in err, (extra, err)
