"""The demo's library side, without a browser: upload checks, the page's controls -> decoding, chat
history formats, the spectrogram view, and the service answering exactly as `megaflamingo-infer`."""
import json
import shutil

import numpy as np
import pytest

from megaflamingo.testing import sounds as synthetic
from megaflamingo.inference.demo import (BEAM, GREEDY, RERANK, SAMPLE, chat_messages, decoding_settings,
                                         history_pairs)
from megaflamingo.inference.uploads import UploadError, inspect_upload
from megaflamingo.testing import write_audio

from .helpers import infer_dialogue, infer_json

DS = f"{synthetic.DATASET}-{synthetic.TASK}"


def _rows(t):
    return [json.loads(l) for l in t["ds"].manifests["test"].read_text().splitlines()]


# ------------------------------------------------------------------------------------- uploads


def test_inspect_upload_accepts_audio_and_counts_windows(tmp_path):
    from megaflamingo.audio.windows import sliding_windows

    for seconds, sr, ch in ((3.0, 16000, 1), (10.0, 44100, 2), (40.0, 22050, 1)):
        p = write_audio(tmp_path / f"a{seconds}.flac", "chirp_up", seconds, sr, channels=ch)
        info = inspect_upload(p)
        assert abs(info.duration_s - seconds) < 1e-3 and info.sample_rate == sr and info.channels == ch
        used = min(seconds, 33.25)
        assert abs(info.used_s - used) < 1e-3
        assert info.num_windows == sliding_windows(int(round(used * 44100)), 44100)[0]
        assert -3.0 < info.peak_dbfs < 0.0  # write_audio peaks at 0.8
    assert "first 33.25 s" in inspect_upload(tmp_path / "a40.0.flac").summary()
    assert "2 channels" in inspect_upload(tmp_path / "a10.0.flac").summary()


def test_inspect_upload_refuses_with_a_sentence(tmp_path):
    import soundfile as sf

    silent = write_audio(tmp_path / "silent.wav", "silence", 3.0)
    quiet = tmp_path / "quiet.wav"  # -100 dBFS: peak-normalising it would blow up noise
    sf.write(str(quiet), (1e-5 * np.sin(np.arange(3 * 44100) / 7.0)).astype(np.float32), 44100, subtype="FLOAT")
    text = tmp_path / "notes.wav"
    text.write_text("not audio at all\n" * 2000)
    tiny = write_audio(tmp_path / "blip.wav", "tone", 0.1, 16000)
    long = write_audio(tmp_path / "long.wav", "tone", 12.0, 8000)
    cases = [(None, "no audio"), (silent, "silent \\(all zeros\\)"), (quiet, "silent \\(peak -100 dBFS\\)"),
             (text, "could not be decoded"), (tiny, "too small"), (tmp_path / "gone.wav", "gone")]
    for path, msg in cases:
        with pytest.raises(UploadError, match=msg):
            inspect_upload(path)
    with pytest.raises(UploadError, match="12.0 s long; this demo takes clips up to 10 s"):
        inspect_upload(long, max_seconds=10)
    assert inspect_upload(long, max_seconds=20).num_windows == 4


# ------------------------------------------------------------------------------------- controls


def test_decoding_controls_map_to_generation_settings():
    s, rr = decoding_settings(GREEDY, 32, 4, 0.7, 10, 0.9, 5)
    assert (s.max_new_tokens, s.do_sample, s.num_beams, rr) == (32, False, 1, False)
    s, rr = decoding_settings(BEAM, 16, 4, 0.7, 10, 0.9, 5)
    assert (s.num_beams, s.do_sample, rr) == (4, False, False)
    s, rr = decoding_settings(SAMPLE, 16, 4, 0.7, 10, 0.9, 5)
    assert (s.do_sample, s.temperature, s.top_k, s.top_p, s.seed, rr) == (True, 0.7, 10, 0.9, 5, False)
    s, rr = decoding_settings(RERANK, 16, 4, 1.0, 50, 0.95, None)
    assert s.do_sample and s.seed is None and rr
    assert decoding_settings(SAMPLE, 16, seed=float("nan"))[0].seed is None  # an emptied number box
    with pytest.raises(ValueError, match="temperature"):
        decoding_settings(SAMPLE, 16, temperature=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoding_settings(GREEDY, 0)
    with pytest.raises(ValueError, match="mode"):
        decoding_settings("nucleus", 8)


def test_chat_history_formats():
    pairs = [("hi", "hello"), ("what is it?", "a tone")]
    assert history_pairs(pairs) == pairs
    assert history_pairs([list(p) for p in pairs]) == pairs
    assert history_pairs(chat_messages(pairs)) == pairs
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
             {"role": "assistant", "content": {"text": "hello"}},
             {"role": "user", "content": "unanswered"}]
    assert history_pairs(parts) == [("hi", "hello")]  # an open user turn is not a finished round
    assert history_pairs(None) == [] and history_pairs([]) == []
    for bad in ("hi", [("only one",)], [{"role": "robot", "content": "x"}]):
        with pytest.raises(ValueError):
            history_pairs(bad)
    # An empty reply is shown as a note but kept empty for the model's next turn.
    shown = chat_messages([("q", "")])
    assert shown[1]["content"] != "" and history_pairs([("q", "")]) == [("q", "")]


def test_spectrogram_marks_the_windows_and_the_padding():
    from megaflamingo.audio.windows import sliding_windows
    from megaflamingo.inference.views import spectrogram_image

    sr = 8000
    audio = np.sin(2 * np.pi * 500 * np.arange(int(9.0 * sr)) / sr).astype(np.float32)
    img = spectrogram_image(audio, sr, width=700, height=100)
    n, full, spans = sliding_windows(len(audio), sr)
    assert n == 3 and img.dtype == np.uint8 and img.shape[1] == 700 and img.shape[0] >= 100 + 6 * n
    edge = int(len(audio) / full * 700)
    spec = img[20:100].astype(int)
    assert spec[:, edge + 2:].std(axis=(0, 2)).max() < 40  # padding: flat grey hatch
    assert spec[:, : edge - 2].std() > 20  # the audio: a spectrogram
    strip = img[100:100 + 6 * n + 8]
    for i, (s0, _) in enumerate(spans):  # a bracket starts at each window's start
        x = int(s0 / full * 700)
        assert (strip[:, x] != 255).any(), i


# ------------------------------------------------------------------------------------- service


@pytest.fixture(scope="module")
def service(trained):
    from megaflamingo.inference.service import InferenceService

    return InferenceService.from_paths(str(trained["model"]), icl_from=str(trained["arrow"] / DS / "train"))


def test_service_answers_as_the_cli(trained, service, capsys, tmp_path):
    from megaflamingo.inference.runner import GenerationSettings

    rows = _rows(trained)
    for r in rows[:4]:
        wav = trained["data"] / r["name"]
        cli = infer_json(capsys, "--model", str(trained["model"]), "--audio", str(wav), "--prompt", r["prompt"],
                        "--max-new-tokens", "8")
        got = service.answer(wav, r["prompt"], GenerationSettings(max_new_tokens=8))
        assert got.text == cli["answer"], r["name"]
        assert got.prompt.endswith("\nAnswer:<SEP>") and got.score is None
    # Beam search and a task prefix go through the same path as the CLI's flags.
    wav = trained["data"] / rows[0]["name"]
    cli = infer_json(capsys, "--model", str(trained["model"]), "--audio", str(wav), "--prompt", "describe it.",
                    "--task", "AudioSet-EventClassification", "--num-beams", "3", "--max-new-tokens", "6")
    got = service.answer(wav, "describe it.", GenerationSettings(max_new_tokens=6, num_beams=3),
                         task="AudioSet-EventClassification")
    assert got.text == cli["answer"] and "The task is event classification. <audio>" in got.prompt
    # One embedding per distinct content: a copy of the file hits the cache.
    copy = shutil.copy(wav, tmp_path / "copy.wav")
    assert service.windows(copy) is service.windows(wav)
    np.testing.assert_array_equal(service.windows(wav), service.embedder.embed(wav))


def test_service_chat_and_fewshot_as_the_cli(trained, service, capsys, tmp_path):
    from megaflamingo.inference.runner import GenerationSettings

    row = next(r for r in _rows(trained) if r["label"] == "click train")
    wav = trained["data"] / row["name"]
    turns = ["what do you hear?", "is it loud?"]
    want = infer_dialogue(trained["model"], wav, turns, tmp_path, max_new_tokens=6)
    s = GenerationSettings(max_new_tokens=6)
    first = service.chat(wav, turns[0], [], s)
    second = service.chat(wav, turns[1], [(turns[0], first.text)], s)
    assert [first.text, second.text] == want
    assert second.prompt.count("user:") == 2 and "The task is dialog. <audio>" in second.prompt

    cli = infer_json(capsys, "--model", str(trained["model"]), "--audio", str(wav), "--prompt", row["prompt"],
                    "--icl-from", str(trained["arrow"] / DS / "train"), "--k", "4", "--max-new-tokens", "8")
    g, fs = service.fewshot(wav, row["prompt"], 4, GenerationSettings(max_new_tokens=8))
    assert g.text == cli["answer"]
    assert [n.id for n in fs.neighbours] == [e["id"] for e in cli["examples"]]
    assert [n.id for n, _ in fs.examples] == [e["id"] for e in reversed(cli["examples"])]  # prompt order
    assert g.prompt.startswith(service.loaded.tokenizer.bos_token + "Here are similar examples.")
    assert service.neighbour_audio(fs.neighbours[0], trained["data"])[1].dtype == np.int16
    assert service.neighbour_audio(fs.neighbours[0], tmp_path) is None  # not under that root


def test_service_refuses_bad_requests(trained, service, tmp_path):
    from megaflamingo.inference.runner import GenerationSettings
    from megaflamingo.inference.service import InferenceService

    wav = trained["data"] / _rows(trained)[0]["name"]
    with pytest.raises(UploadError, match="instruction"):
        service.answer(wav, "   ")
    with pytest.raises(UploadError, match="silent"):
        service.answer(write_audio(tmp_path / "s.wav", "silence", 2.0), "what is it?")
    with pytest.raises(ValueError, match="max_num_fewshot"):
        service.fewshot(wav, "x", 9)
    with pytest.raises(UploadError, match="--rerank-clap"):
        service.answer(wav, "x", GenerationSettings(max_new_tokens=4, do_sample=True), num_samples=3, rerank=True)
    plain = InferenceService(service.loaded, service.embedder)
    with pytest.raises(UploadError, match="--icl-from"):
        plain.fewshot(wav, "x", 2)


def test_trained_presets_read_the_training_splits(trained, service):
    """The model's own tasks become presets (with their split's prompt) while the data is there."""
    import dataclasses

    from megaflamingo.inference.demo import trained_presets

    cfg = service.loaded.config
    assert trained_presets(cfg) == []  # this model's config records no data root
    here = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_root=str(trained["arrow"])))
    first = next(iter(cfg.data.blend))
    prompt = json.loads(trained["ds"].manifests["train"].read_text().splitlines()[0])["prompt"]
    assert trained_presets(here) == [(f"{DS} (trained)", DS, prompt)] and first.startswith(DS)
    gone = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_root=str(trained["root"] / "moved")))
    assert trained_presets(gone) == []


def test_docs_list_every_demo_option_and_show_the_page():
    """docs/inference.md documents every option of megaflamingo-demo (and the re-ranking flags of
    megaflamingo-infer), and the screenshots it shows exist."""
    import re
    from pathlib import Path

    from megaflamingo.cli.demo import build_parser as demo_parser
    from megaflamingo.cli.infer import build_parser as infer_parser

    docs = Path(__file__).resolve().parents[2] / "docs"
    text = (docs / "inference.md").read_text(encoding="utf-8")
    table = text[text.index("## Web demo"):]
    demo_opts = {o for a in demo_parser()._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
    assert demo_opts and not {o for o in demo_opts if f"`{o}" not in table}
    infer_opts = {o for a in infer_parser()._actions for o in a.option_strings}
    for flag in ("--num-samples", "--rerank-clap", "--rerank-tokenizer"):
        assert flag in infer_opts and flag in text
    for md in ("inference.md", "demo.md"):
        images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", (docs / md).read_text(encoding="utf-8"))
        assert images and all((docs / i).is_file() for i in images), (md, images)


def test_handlers_turn_errors_into_sentences(caplog):
    """A refused request shows its sentence; a bug shows a fixed line and its traceback goes to the log."""
    from megaflamingo.inference.demo import catching

    handler = catching(lambda message: ("shown", message), "request failed", "internal error")

    def refuse():
        raise UploadError("the clip is silent")

    def bug():
        raise KeyError("secret-detail")

    assert handler(lambda x: x + 1)(1) == 2
    assert handler(refuse)() == ("shown", "the clip is silent")
    assert handler(bug)() == ("shown", "internal error")
    assert "secret-detail" in caplog.text and "Traceback" in caplog.text
