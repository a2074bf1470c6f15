"""`megaflamingo-demo` in a real browser (headless Debian chromium driven by Playwright) and through
`gradio_client`: one server for the module, started like a user would, on a tiny trained model
with few-shot retrieval and LAION-CLAP re-ranking (random weights).

The page must give the CLI's greedy answer for the same clip and prompt, hold a two-turn chat,
show retrieved examples, re-rank samples, and turn a bad upload into a sentence. Every tab is
screenshotted under the test's tmp dir (and copied to $MEGAFLAMINGO_SCREENSHOT_DIR when set, e.g.
for CI artifacts). The browser never reaches anything but the local server.

`scripts/bootstrap.sh` installs what this needs (Debian's chromium by apt, gradio / gradio_client /
playwright by pip). The module skips only where chromium cannot be installed (not root, no
apt-get, or MEGAFLAMINGO_SKIP_APT=1); a machine that could have it fails, so CI never loses the test.
"""
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from megaflamingo.testing import sounds as synthetic

from .demo_server import serving
from .helpers import infer_dialogue, infer_json

try:
    import gradio  # noqa: F401  (the server's; checked here so a missing extra fails at collection)
    import gradio_client  # noqa: F401
    from playwright import sync_api
except ImportError as e:  # bootstrap installs them: missing means a broken environment, not a skip
    raise ImportError(f"{e}: the demo's browser test needs the 'demo' and 'dev' extras "
                      "(scripts/bootstrap.sh: pip install -e '.[dev,demo]')") from e

pytestmark = [pytest.mark.slow, pytest.mark.browser]
sync_api.expect.set_options(timeout=120_000)  # two shared cores: a generation can take a while under load

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Chromium's fake microphone (a beep) and auto-granted permission: the recording path is tested too.
FAKE_MICROPHONE = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
DS = f"{synthetic.DATASET}-{synthetic.TASK}"
TIMEOUT_MS = 120_000


def _rows(t):
    return [json.loads(l) for l in t["ds"].manifests["test"].read_text().splitlines()]


def chromium_path() -> str:
    """Debian's chromium; a skip (with the reason) only where it cannot be installed."""
    path = shutil.which("chromium")
    if path:
        return path
    if os.environ.get("MEGAFLAMINGO_SKIP_APT") == "1":
        pytest.skip("chromium is not installed and MEGAFLAMINGO_SKIP_APT=1 keeps bootstrap from installing it")
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and cannot be installed here (needs root and apt-get: "
                    "apt-get install chromium)")
    pytest.fail("chromium is not installed although this machine can install it: run scripts/bootstrap.sh "
                "(apt-get install chromium)")


@pytest.fixture(scope="module")
def server(trained, laion_checkpoint, tmp_path_factory):
    chromium_path()  # before starting anything
    work = tmp_path_factory.mktemp("demo")
    cmd = [sys.executable, "-m", "tests.inference.demo_server", "--model", trained["model"],
           "--icl-from", trained["arrow"] / DS / "train", "--icl-audio-root", trained["data"],
           "--rerank-clap", laion_checkpoint["path"], "--rerank-tokenizer", laion_checkpoint["tokenizer_dir"],
           "--max-new-tokens", "8", "--max-seconds", "60"]
    with serving(cmd, work) as url:
        yield {"url": url, "work": work, "log": work / "server.log", "trained": trained}


@pytest.fixture(scope="module")
def browser(server):
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS + FAKE_MICROPHONE)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000}, permissions=["microphone"])
    pg = ctx.new_page()
    outside = []

    def only_local(route):
        u = route.request.url
        if u.startswith((server["url"], "data:", "blob:")):
            route.continue_()
        else:  # fonts, analytics, CDNs: the page must work without them
            outside.append(u)
            route.abort()

    pg.route("**/*", only_local)
    pg.set_default_timeout(TIMEOUT_MS)
    pg.goto(server["url"])
    pg.wait_for_selector("#audio")
    yield pg
    ctx.close()
    assert not outside, f"the page tried to reach {outside[:5]}"


def _shot(page, server, name):
    path = server["work"] / "screenshots" / f"{name}.png"
    path.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    extra = os.environ.get("MEGAFLAMINGO_SCREENSHOT_DIR")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / path.name)
    return path


def _upload(page, wav, expect="window"):
    clear = page.locator('#audio button[aria-label="Clear"]')
    if clear.count():  # a clip is loaded: the upload area comes back once it is cleared
        clear.first.click()
    page.locator("#audio input[type=file]").set_input_files(str(wav))
    sync_api.expect(page.locator("#audio-info")).to_contain_text(expect)


def _decoding(page, mode):
    page.locator("#decoding-mode").get_by_label(mode, exact=True).check()


def _value(page, selector):
    return page.locator(f"{selector} textarea").input_value()


def _answered(page, status):
    """Wait for a request to finish: its status line says how long it took (or why it failed)."""
    sync_api.expect(page.locator(status)).to_contain_text(re.compile(r"answered in|⚠️"))
    assert "⚠️" not in page.locator(status).inner_text(), page.locator(status).inner_text()


def _prompt_text(page, accordion, selector):
    page.locator(accordion).get_by_text("Prompt sent to the model").click()
    return page.locator(f"{selector} textarea").input_value()


def _table(page, selector):
    """Rows of a Gradio dataframe (a virtual grid: cells carry data-testid cell-<row>-<col>)."""
    rows = page.locator(f"{selector} .virtual-row")
    sync_api.expect(rows.first).to_be_visible()
    n_cols = len(page.locator(f"{selector} th").all())
    return [[page.locator(f'{selector} [data-testid="cell-{r}-{c}"]').inner_text().strip() for c in range(n_cols)]
            for r in range(rows.count())]


def test_page_answer_equals_cli(server, page, capsys):
    t = server["trained"]
    row = next(r for r in _rows(t) if r["label"] == "rising chirp" and r["duration"] > 7)
    wav = t["data"] / row["name"]
    want = infer_json(capsys, "--model", str(t["model"]), "--audio", str(wav), "--prompt", synthetic.CLASSIFY_PROMPT,
                "--max-new-tokens", "8")["answer"]
    _upload(page, wav)
    assert re.search(r"-> [23] windows", page.locator("#audio-info").inner_text())
    sync_api.expect(page.locator("#spectrogram img")).to_be_visible()
    _decoding(page, "greedy")
    page.locator("#preset input").click()
    page.get_by_role("option", name="Custom (no task prefix)").click()
    sync_api.expect(page.locator("#task textarea")).to_have_value("")
    page.locator("#instruction textarea").fill(synthetic.CLASSIFY_PROMPT)
    page.locator("#ask-button").click()
    _answered(page, "#ask-status")
    assert _value(page, "#answer") == want
    assert _prompt_text(page, "#ask-prompt-accordion", "#ask-prompt").endswith("\nAnswer:<SEP>")
    _shot(page, server, "ask")
    # A preset fills task and instruction; the task's prefix then reaches the prompt.
    page.locator("#preset input").click()
    page.get_by_role("option", name="Sound events: a few labels").click()
    sync_api.expect(page.locator("#task textarea")).to_have_value("AudioSet-EventClassification")
    sync_api.expect(page.locator("#instruction textarea")).to_have_value("use a few labels to describe this sound.")
    page.locator("#ask-button").click()
    sync_api.expect(page.locator("#ask-prompt textarea")).to_have_value(
        re.compile(r"The task is event classification\. <audio>use a few labels"))


def test_page_reranks_samples(server, page):
    t = server["trained"]
    wav = t["data"] / next(r for r in _rows(t) if r["label"] == "white noise")["name"]
    _upload(page, wav)
    _decoding(page, "sample + CLAP re-rank")
    page.locator("#preset input").click()
    page.get_by_role("option", name="Custom (no task prefix)").click()
    page.locator("#instruction textarea").fill(synthetic.CLASSIFY_PROMPT)
    page.locator("#ask-button").click()
    _answered(page, "#ask-status")
    sync_api.expect(page.locator("#ask-status")).to_contain_text("LAION-CLAP score")
    page.locator("#candidates-accordion").get_by_text("Other candidates").click()
    table = _table(page, "#candidates")
    scores = [float(r[2]) for r in table]
    assert [r[0] for r in table] == [str(i + 1) for i in range(len(table))]
    assert scores == sorted(scores, reverse=True) and sum(int(r[3]) for r in table) == 10
    assert table[0][1] == _value(page, "#answer").strip()
    assert f"{scores[0]:.3f}" in page.locator("#ask-status").inner_text()
    _shot(page, server, "ask-rerank")


def test_page_chat_two_turns(server, page, tmp_path):
    from megaflamingo.inference.demo import chat_messages

    t = server["trained"]
    wav = t["data"] / next(r for r in _rows(t) if r["label"] == "click train")["name"]
    turns = ["what do you hear?", "is it loud?"]
    want = infer_dialogue(t["model"], wav, turns, tmp_path)
    shown = [m["content"] for m in chat_messages(list(zip(turns, want)))]

    _upload(page, wav)
    _decoding(page, "greedy")
    page.get_by_role("tab", name="Chat").click()
    bubbles = page.locator("#chatbot .message-content")
    for i, u in enumerate(turns):
        page.locator("#chat-message textarea").fill(u)
        page.locator("#chat-send").click()
        sync_api.expect(bubbles).to_have_count(2 * (i + 1))
        _answered(page, "#chat-status")
    got = [b.strip() for b in bubbles.all_inner_texts()]
    assert got == [s.strip("*") for s in shown], got
    sync_api.expect(page.locator("#chat-message textarea")).to_have_value("")
    _shot(page, server, "chat")
    page.locator("#chat-clear").click()
    sync_api.expect(bubbles).to_have_count(0)


def test_page_fewshot_shows_neighbours(server, page, capsys):
    t = server["trained"]
    row = next(r for r in _rows(t) if r["label"] == "low tone")
    wav = t["data"] / row["name"]
    cli = infer_json(capsys, "--model", str(t["model"]), "--audio", str(wav), "--prompt", row["prompt"],
               "--icl-from", str(t["arrow"] / DS / "train"), "--k", "4", "--max-new-tokens", "8")
    _upload(page, wav)
    _decoding(page, "greedy")
    page.get_by_role("tab", name="Few-shot").click()
    sync_api.expect(page.locator("#fewshot-instruction textarea")).to_have_value(row["prompt"])
    page.locator("#fewshot-button").click()
    _answered(page, "#fewshot-status")
    assert _value(page, "#fewshot-answer") == cli["answer"]
    for i, ex in enumerate(reversed(cli["examples"])):  # prompt order: the nearest last
        card = page.locator(f"#example-{i}-text")
        sync_api.expect(card).to_contain_text(ex["id"])
        sync_api.expect(card).to_contain_text(ex["output"])
        # the example's audio was delivered to a player (its file is downloadable from the page)
        sync_api.expect(page.locator(f"#example-{i}-audio a[download]")).to_have_attribute(
            "href", re.compile(r"/gradio_api/file="))
    assert _prompt_text(page, "#fewshot-prompt-accordion", "#fewshot-prompt").count("<audio>") == 4
    _shot(page, server, "fewshot")
    # k = 2: one example (the nearest), the other cards hidden.
    page.locator("#fewshot-k input[type=number]").fill("2")
    page.locator("#fewshot-k input[type=number]").press("Enter")
    page.locator("#fewshot-button").click()
    sync_api.expect(page.locator("#example-1-text")).to_be_hidden()
    sync_api.expect(page.locator("#example-0-text")).to_contain_text(cli["examples"][0]["id"])
    sync_api.expect(page.locator("#fewshot-prompt textarea")).to_have_value(re.compile(r"^(?:(?!<audio>).)*"
                                                                                     r"<audio>(?:(?!<audio>).)*"
                                                                                     r"<audio>(?:(?!<audio>).)*$",
                                                                                     re.S))


def test_microphone_recording(server, page, capsys):
    """Record ~3 s from the (fake) microphone: the server gets a file, embeds it like an upload and
    answers as the CLI does on that very file."""
    from urllib.parse import unquote

    page.locator('#audio button[aria-label="Record audio"]').click()
    sync_api.expect(page.locator("#audio select.mic-select")).to_be_enabled()
    page.locator("#audio button.record-button").click()
    time.sleep(3.0)
    page.locator("#audio button.stop-button").first.click()
    sync_api.expect(page.locator("#audio-info")).to_contain_text("-> 1 window")
    assert re.match(r"[23]\.\d\d s, ", page.locator("#audio-info").inner_text())
    href = page.locator('#audio a[download]').first.get_attribute("href")
    recorded = Path(unquote(href.split("/gradio_api/file=", 1)[1]))
    assert recorded.is_file() and str(recorded).startswith(str(server["work"] / "uploads"))
    _decoding(page, "greedy")
    page.locator("#instruction textarea").fill("what do you hear?")
    page.locator("#ask-button").click()
    _answered(page, "#ask-status")
    task = page.locator("#task textarea").input_value()
    want = infer_json(capsys, "--model", str(server["trained"]["model"]), "--audio", str(recorded), "--prompt",
                "what do you hear?", "--task", task, "--max-new-tokens", "8")["answer"]
    assert _value(page, "#answer") == want
    _shot(page, server, "microphone")


def test_bad_uploads_show_a_message(server, page, tmp_path):
    from megaflamingo.testing import write_audio

    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"definitely not a RIFF file " * 1000)
    _upload(page, junk, expect="could not be decoded")
    page.locator("#ask-button").click()
    sync_api.expect(page.locator("#ask-status")).to_contain_text("could not be decoded")
    _shot(page, server, "bad-upload")
    _upload(page, write_audio(tmp_path / "silent.wav", "silence", 3.0), expect="silent")
    page.locator("#ask-button").click()
    sync_api.expect(page.locator("#ask-status")).to_contain_text("silent")
    _upload(page, write_audio(tmp_path / "long.wav", "tone", 61.0, 8000), expect="up to 60 s")
    text = page.locator("body").inner_text()
    assert "Traceback" not in text and "Error:" not in text
    assert "Traceback" not in server["log"].read_text()  # refusals are not server errors either


def test_gradio_client_api(server, capsys, tmp_path):
    from gradio_client import Client, handle_file

    t = server["trained"]
    row = next(r for r in _rows(t) if r["label"] == "high tone")
    wav = t["data"] / row["name"]
    client = Client(server["url"], verbose=False)
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {"/answer", "/chat"}
    want = infer_json(capsys, "--model", str(t["model"]), "--audio", str(wav), "--prompt", synthetic.CLASSIFY_PROMPT,
                "--max-new-tokens", "8")["answer"]
    assert client.predict(handle_file(str(wav)), synthetic.CLASSIFY_PROMPT, api_name="/answer") == want
    # Chat: greedy, history as [user, assistant] pairs or as chat messages.
    turns = ["what do you hear?", "is it loud?"]
    want = infer_dialogue(t["model"], wav, turns, tmp_path)
    first = client.predict(handle_file(str(wav)), turns[0], [], api_name="/chat")
    assert first == want[0]
    assert client.predict(handle_file(str(wav)), turns[1], [[turns[0], first]], api_name="/chat") == want[1]
    msgs = [{"role": "user", "content": turns[0]}, {"role": "assistant", "content": first}]
    assert client.predict(handle_file(str(wav)), turns[1], msgs, api_name="/chat") == want[1]
    # Refusals reach the script as errors carrying the sentence, not a traceback.
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"definitely not a RIFF file " * 1000)
    with pytest.raises(Exception, match="could not be decoded"):
        client.predict(handle_file(str(junk)), "what is it?", api_name="/answer")
    with pytest.raises(Exception, match="history"):
        client.predict(handle_file(str(wav)), "hi", "not a list", api_name="/chat")
