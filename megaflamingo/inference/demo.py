"""`megaflamingo-demo`: a web page (Gradio) over one loaded model, plus a scriptable API.

    megaflamingo-demo --model runs/quickstart/export
    megaflamingo-demo --model DIR --icl-from ARROW/<ds>-<task>/train --icl-audio-root DATA --rerank-clap 630k-audioset-fusion-best.pt

The page: one clip (upload or microphone; playback, waveform, and the log-mel with the model's 7 s
windows), then three tabs over it: **Ask** (instruction -> answer, with the task presets AF1
trained on), **Chat** (multi-turn, the chat model's format) and **Few-shot** (k-1 neighbours
retrieved from ``--icl-from`` shown next to the answer), and the decoding controls (greedy, beam
search, sampling, and with ``--rerank-clap`` AF1's sample-and-re-rank by LAION-CLAP similarity).

The API (``gradio_client``): ``/answer`` (audio file, instruction) -> answer text, greedy;
``/chat`` (audio file, message, history) -> reply, greedy; ``history`` is a list of
``[user, assistant]`` pairs (or chat messages ``{"role", "content"}``).

Everything the page does goes through :class:`.service.InferenceService` (the CLI's code path:
same front end, windows, prompts and generation). Gradio is imported only when the app is built,
so the package never needs it.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

from .rerank import AF1_RERANK_SAMPLES, AF1_RERANK_TOP_K, AF1_RERANK_TOP_P, RerankError
from .runner import GenerationSettings
from .uploads import DEFAULT_MAX_SECONDS, UploadError

log = logging.getLogger("megaflamingo.demo")

GREEDY, BEAM, SAMPLE, RERANK = "greedy", "beam search", "sampling", "sample + CLAP re-rank"
CUSTOM = "Custom (no task prefix)"

# AF1's training prompts (its dataset-preparation notes), with a task whose name sets the prefix
# ("The task is audio captioning. ") the way its training data did.
AF1_PRESETS: tuple[tuple[str, str, str], ...] = (
    ("Caption: one sentence", "audiocaps-AudioCaptioning", "describe the sound in a sentence."),
    ("Caption: at length", "audiocaps-AudioCaptioning", "describe the sound at length."),
    ("Caption: a paragraph", "Clotho-v2-AudioCaptioning", "describe the sound in a paragraph."),
    ("Sound events: a few labels", "AudioSet-EventClassification", "use a few labels to describe this sound."),
    ("Sound events: specific to general", "FSD50k-EventClassification",
     "describe this sound in the order from specific to general."),
    ("Acoustic scene", "CochlScene-SceneClassification", "classify this sound."),
    ("Speech emotion", "ravdess-EmotionClassification", "what is the emotion of this speech?"),
    ("Speech sentiment", "MELD-SentimentClassification", "what is the sentiment of this speech?"),
    ("Question answering", "Clotho-AQA-AQA", "please answer this question: what is making the sound?"),
    ("Music: caption", "MusicCaps-AudioCaptioning", "describe the music in a sentence."),
    ("Music: genre", "GTZAN-GenreClassification", "what is the genre of this music?"),
    ("Music: instrument", "NSynth-InstrClassification", "what is the instrument of this music?"),
    ("Music: tags", "mtg-jamendo-MusicTagging", "what are the genres, instruments, and mood/theme of the music?"),
)

THEME_FONTS = (["ui-sans-serif", "system-ui", "sans-serif"], ["ui-monospace", "monospace"])
CSS = """
#answer textarea, #fewshot-answer textarea { font-size: 1.15em; }
.mf-status { min-height: 1.5em; }
.mf-status p { margin: 0; }
"""


@dataclass
class DemoOptions:
    model: str
    icl_from: Optional[str] = None
    icl_audio_root: Optional[str] = None
    rerank_clap: Optional[str] = None
    rerank_tokenizer: Optional[str] = None
    host: str = "127.0.0.1"
    port: Optional[int] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    config: Optional[str] = None
    encoder_checkpoint: Optional[str] = None
    encoder_from: Optional[str] = None
    cache_dir: Optional[str] = None
    clip_checkpoint: Optional[str] = None
    max_queue: int = 16
    max_seconds: float = DEFAULT_MAX_SECONDS
    max_file_size: str = "64mb"
    max_new_tokens: int = 64


# --------------------------------------------------------------------------------------------
# gradio-free helpers (unit-testable)


def decoding_settings(mode: str, max_new_tokens, num_beams=3, temperature=1.0, top_k=AF1_RERANK_TOP_K,
                      top_p=AF1_RERANK_TOP_P, seed=0) -> tuple[GenerationSettings, bool]:
    """The page's decoding controls -> (settings, re-rank?). Raises ValueError naming the control."""
    if mode not in (GREEDY, BEAM, SAMPLE, RERANK):
        raise ValueError(f"unknown decoding mode {mode!r}")
    s = GenerationSettings(max_new_tokens=int(max_new_tokens))
    if mode == BEAM:
        s.num_beams = int(num_beams)
    elif mode in (SAMPLE, RERANK):
        s.do_sample = True
        s.temperature, s.top_k, s.top_p = float(temperature), int(top_k), float(top_p)
        s.seed = None if seed is None or (isinstance(seed, float) and math.isnan(seed)) else int(seed)
    s.validate()
    return s, mode == RERANK


def _text_of(content) -> str:
    """A chat message's text: a string, a {"text"} / {"type": "text", ...} part, or a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", content.get("content", "")) or "")
    if isinstance(content, (list, tuple)):
        return "".join(_text_of(c) for c in content)
    return str(content)


def history_pairs(history) -> list[tuple[str, str]]:
    """Chat history as finished (user, assistant) rounds, from ``[[u, a], ...]`` or from chat
    messages ``[{"role": "user"|"assistant", "content": ...}, ...]``; an unanswered user turn at
    the end is dropped. Raises ValueError on anything else."""
    if not history:
        return []
    if not isinstance(history, (list, tuple)):
        raise ValueError("history must be a list of [user, assistant] pairs or of chat messages")
    if all(isinstance(h, dict) for h in history):
        pairs, user = [], None
        for m in history:
            role = m.get("role")
            if role == "user":
                user = _text_of(m.get("content"))
            elif role == "assistant" and user is not None:
                pairs.append((user, _text_of(m.get("content"))))
                user = None
            elif role not in ("user", "assistant", "system"):
                raise ValueError(f"chat message with role {role!r}")
        return pairs
    pairs = []
    for i, h in enumerate(history):
        if not isinstance(h, (list, tuple)) or len(h) != 2:
            raise ValueError(f"history[{i}] is not a [user, assistant] pair")
        pairs.append((_text_of(h[0]), _text_of(h[1])))
    return pairs


def trained_presets(config) -> list[tuple[str, str, str]]:
    """(label, task, prompt) for each task the model was trained on whose preprocessed split is
    still readable under the config's data root (its first row's prompt); others are skipped."""
    from megaflamingo.data.arrow_format import open_shards
    from megaflamingo.data.reader import inside_root, parse_blend_name

    data = getattr(config, "data", None)
    root = getattr(data, "data_root", None)
    out, seen = [], set()
    for name in list(getattr(data, "blend", None) or {}):
        try:
            b = parse_blend_name(name)
        except ValueError:
            continue
        task = b.flamingo_task
        if task in seen or not root:
            continue
        try:
            tables = open_shards(inside_root(root, b.split_dir, bool(getattr(data, "allow_outside_root", False)),
                                             "the training split"))
            prompt = next((p for t in tables for p in t.column("prompt").to_pylist()[:1] if p), None)
        except Exception:  # moved/missing training data: no preset for it
            continue
        if prompt:
            seen.add(task)
            out.append((f"{task} (trained)", task, prompt))
    return out


def catching(reply, what: str, internal: str):
    """Decorator for request handlers: a user mistake (bad upload, refused setting) becomes
    ``reply(sentence)``; anything else is logged with its traceback as ``what`` and the user gets
    ``reply(internal)``, never the traceback."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args):
            try:
                return fn(*args)
            except (UploadError, RerankError, ValueError) as e:
                return reply(str(e))
            except Exception:
                log.exception(what)
                return reply(internal)
        return run
    return wrap


def _md_escape(s: str) -> str:
    return "".join("\\" + c if c in "\\`*_{}[]<>()#+-.!|" else c for c in str(s))


def error_md(message: str) -> str:
    return f"⚠️ **{_md_escape(message)}**"


def _candidates_rows(cands) -> list[list]:
    return [[i + 1, c.text, round(c.score, 4), c.count] for i, c in enumerate(cands)]


EMPTY_ANSWER = "(the model answered nothing: it ended its answer at once)"


def _status(g, n: int, seconds: float) -> str:
    """The line under an answer: time taken, its re-ranking score, a note for an empty answer."""
    parts = [f"answered in {seconds:.2f} s"]
    if g.score is not None:
        parts.append(f"LAION-CLAP score {g.score:.3f} (best of {n} samples; all of them under *Other candidates*)")
    if not g.text.strip():
        parts.append(EMPTY_ANSWER)
    return " · ".join(parts)


def chat_messages(pairs) -> list[dict]:
    """Chat rounds -> the chat widget's messages (an empty reply shown as a note, kept as '' in
    the history the model conditions on)."""
    out = []
    for u, a in pairs:
        out.append({"role": "user", "content": u})
        out.append({"role": "assistant", "content": a if a.strip() else f"*{EMPTY_ANSWER}*"})
    return out


def example_md(nb, ex, audio_missing: bool = False) -> str:
    """A retrieved example's card: the answer shown to the model, the first line of its question
    (the whole text is under "Prompt sent to the model"), where it comes from."""
    lines = [line for line in ex.prompt.splitlines() if line.strip()] or [""]
    q = _md_escape(lines[0]) + (f" *(+{len(lines) - 1} more lines)*" if len(lines) > 1 else "")
    where = f"{_md_escape(nb.id)} · distance {nb.distance:.3f}"
    if audio_missing:
        where += " · audio not playable (give --icl-audio-root, the split's audio folder)"
    return f"**{_md_escape(ex.output)}**  \n{q}  \n<sub>{where}</sub>"


def model_summary(service, opts: DemoOptions) -> str:
    lm = service.loaded
    enc = lm.encoder.get("encoder") or {}
    mc = lm.model_config
    parts = [f"**model** `{os.path.basename(os.path.normpath(str(opts.model)))}`",
             f"encoder `{enc.get('name')}` ({enc.get('embed_dim')}-d, {enc.get('sample_rate')} Hz)",
             f"{mc.max_num_fewshot} audio slots × {mc.max_num_window} windows"]
    if service.index is not None:
        parts.append(f"few-shot from `{os.path.basename(os.path.normpath(str(service.index.dir)))}` "
                     f"({service.index.table.num_rows} clips)")
    if service.reranker is not None:
        parts.append(f"re-ranking with LAION-CLAP `{os.path.basename(str(opts.rerank_clap))}`")
    return " · ".join(parts)


# --------------------------------------------------------------------------------------------
# the app


def build_app(service, opts: DemoOptions):
    """The Blocks app over a ready :class:`.service.InferenceService` (not launched)."""
    try:
        import gradio as gr
    except ImportError as e:  # an optional extra
        raise RuntimeError("the demo needs gradio: pip install 'megaflamingo[demo]'") from e

    from .views import clip_view

    has_rerank = service.reranker is not None
    has_index = service.index is not None
    mc = service.loaded.model_config
    presets = trained_presets(service.loaded.config) + list(AF1_PRESETS)
    preset_task = {label: task for label, task, _ in presets}
    preset_prompt = {label: prompt for label, _, prompt in presets}
    preset_task[CUSTOM], preset_prompt[CUSTOM] = "", ""
    first = presets[0][0]
    max_examples = max(int(mc.max_num_fewshot) - 1, 0)
    win_s = float(service.windows_layout.get("window_s", 7.0))
    overlap_s = float(service.windows_layout.get("overlap_s", 5.25))
    icl_prompt = ""
    if has_index:
        icl_prompt = next((p for p in service.index.table.column("prompt").to_pylist()[:1] if p), "")

    def guard(status):
        """User mistakes become a sentence in ``status``; anything else is logged, never shown."""
        return catching(lambda message: {status: error_md(message)}, "request failed",
                        "internal error while answering (details are in the server log)")

    def api_error(message):
        raise gr.Error(message, print_exception=False) from None

    # The API's caller gets the sentence as the client's error.
    api_guard = catching(api_error, "API request failed", "internal error (details are in the server log)")

    theme = gr.themes.Soft(font=THEME_FONTS[0], font_mono=THEME_FONTS[1])
    with gr.Blocks(title="megaflamingo demo", analytics_enabled=False) as app:
        gr.Markdown("## megaflamingo · audio demo\n" + model_summary(service, opts), elem_id="model-info")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Audio (upload or record)",
                                 elem_id="audio", buttons=["download"],
                                 waveform_options=gr.WaveformOptions(show_recording_waveform=True))
                audio_info = gr.Markdown("Upload a clip or record one.", elem_id="audio-info",
                                         elem_classes=["mf-status"])
            with gr.Column(scale=3):
                gr.Markdown(f"**What the model hears**: the log-mel (50 Hz - 8 kHz) of the audio it reads, "
                            f"and below it the model's windows ({win_s:g} s, {win_s - overlap_s:g} s apart)",
                            elem_id="spectrogram-caption")
                spectrogram = gr.Image(show_label=False, type="numpy", interactive=False, elem_id="spectrogram",
                                       buttons=[], height=200)
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                with gr.Tabs(elem_id="tabs"):
                    with gr.Tab("Ask", id="ask", elem_id="tab-ask"):
                        with gr.Row():
                            preset = gr.Dropdown([label for label, _, _ in presets] + [CUSTOM], value=first,
                                                 label="Task preset", elem_id="preset", scale=2)
                            task = gr.Textbox(preset_task[first], label="Task (sets the prompt prefix)",
                                              placeholder="none: no prefix", elem_id="task", scale=1)
                        instruction = gr.Textbox(preset_prompt[first], lines=3, label="Instruction",
                                                 elem_id="instruction")
                        ask_btn = gr.Button("Answer", variant="primary", elem_id="ask-button")
                        answer = gr.Textbox(label="Answer", interactive=False, lines=2, elem_id="answer")
                        ask_status = gr.Markdown("", elem_id="ask-status", elem_classes=["mf-status"])
                        with gr.Accordion("Other candidates (CLAP re-ranking)", open=False, visible=has_rerank,
                                          elem_id="candidates-accordion"):
                            candidates = gr.Dataframe(headers=["rank", "answer", "LAION-CLAP score", "samples"],
                                                      datatype=["number", "str", "number", "number"],
                                                      interactive=False, elem_id="candidates", wrap=True,
                                                      column_widths=["9%", "61%", "18%", "12%"])
                        with gr.Accordion("Prompt sent to the model", open=False, elem_id="ask-prompt-accordion"):
                            ask_prompt = gr.Textbox(label="prompt text", interactive=False, lines=3,
                                                    elem_id="ask-prompt")
                    with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                        gr.Markdown("Chat about the clip in the chat model's format (*The task is dialog.*); "
                                    "a new clip starts a new chat.")
                        chatbot = gr.Chatbot(show_label=False, height=340, elem_id="chatbot", feedback_options=None,
                                             buttons=[], placeholder="no messages yet")
                        with gr.Row():
                            message = gr.Textbox(placeholder="ask something about the clip", show_label=False,
                                                 elem_id="chat-message", scale=4, submit_btn=False)
                            send_btn = gr.Button("Send", variant="primary", elem_id="chat-send", scale=1)
                            clear_btn = gr.Button("Clear", elem_id="chat-clear", scale=1)
                        chat_status = gr.Markdown("", elem_id="chat-status", elem_classes=["mf-status"])
                    with gr.Tab("Few-shot", id="fewshot", elem_id="tab-fewshot"):
                        if not has_index:
                            gr.Markdown("Few-shot answers need a train split to retrieve examples from: start the "
                                        "demo with `--icl-from ARROW/<dataset>-<task>/train`.", elem_id="fewshot-off")
                        with gr.Row(equal_height=False):
                            with gr.Column(scale=1):
                                k = gr.Slider(1, max(int(mc.max_num_fewshot), 1),
                                              value=min(8, int(mc.max_num_fewshot)), step=1,
                                              label="k: audios in the prompt (k-1 retrieved examples + yours)",
                                              elem_id="fewshot-k", interactive=has_index)
                                fs_instruction = gr.Textbox(icl_prompt, lines=3, label="Instruction",
                                                            elem_id="fewshot-instruction", interactive=has_index)
                                fs_btn = gr.Button("Retrieve and answer", variant="primary", elem_id="fewshot-button",
                                                   interactive=has_index)
                                fs_answer = gr.Textbox(label="Answer", interactive=False, lines=2,
                                                       elem_id="fewshot-answer")
                                fs_status = gr.Markdown("", elem_id="fewshot-status", elem_classes=["mf-status"])
                                with gr.Accordion("Prompt sent to the model", open=False,
                                                  elem_id="fewshot-prompt-accordion"):
                                    fs_prompt = gr.Textbox(label="prompt text", interactive=False, lines=4,
                                                           elem_id="fewshot-prompt")
                            with gr.Column(scale=1):
                                gr.Markdown("**Retrieved examples**, in prompt order (the nearest sits right "
                                            "before your clip)")
                                ex_boxes, ex_audio, ex_text = [], [], []
                                for i in range(max_examples):
                                    with gr.Group(visible=False, elem_id=f"example-{i}") as box:
                                        ex_audio.append(gr.Audio(label=f"example {i + 1}", interactive=False,
                                                                 type="numpy", elem_id=f"example-{i}-audio",
                                                                 buttons=["download"]))
                                        ex_text.append(gr.Markdown(elem_id=f"example-{i}-text"))
                                    ex_boxes.append(box)
            with gr.Column(scale=1, min_width=260):
                with gr.Group(elem_id="decoding"):
                    modes = [GREEDY, BEAM, SAMPLE] + ([RERANK] if has_rerank else [])
                    mode = gr.Radio(modes, value=RERANK if has_rerank else GREEDY, label="Decoding",
                                    elem_id="decoding-mode")
                    max_new = gr.Slider(1, 256, value=int(opts.max_new_tokens), step=1, label="Max new tokens",
                                        elem_id="max-new-tokens")
                    beams = gr.Slider(2, 8, value=3, step=1, label="Beams (beam search)", elem_id="beams")
                    temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="Temperature (sampling)",
                                            elem_id="temperature")
                    top_k = gr.Slider(0, 200, value=AF1_RERANK_TOP_K, step=1, label="Top-k (sampling; 0 = off)",
                                      elem_id="top-k")
                    top_p = gr.Slider(0.05, 1.0, value=AF1_RERANK_TOP_P, step=0.01, label="Top-p (sampling)",
                                      elem_id="top-p")
                    seed = gr.Number(0, precision=0, label="Seed (sampling; empty = random)", elem_id="seed")
                    n_samples = gr.Slider(2, 20, value=AF1_RERANK_SAMPLES, step=1, visible=has_rerank,
                                          label="Samples to re-rank (LAION-CLAP)", elem_id="num-samples")
        decoding = [mode, max_new, beams, temperature, top_k, top_p, seed, n_samples]
        history = gr.State([])  # finished (user, assistant) rounds of the chat tab

        # -------------------------------------------------------------- page events
        def on_audio(path):
            if not path:
                return {audio_info: "Upload a clip or record one.", spectrogram: None, chatbot: [], history: []}
            try:
                info = service.inspect(path)
                img = clip_view(path, service.sample_rate, service.windows_layout)
            except (UploadError, ValueError) as e:
                return {audio_info: error_md(str(e)), spectrogram: None, chatbot: [], history: []}
            except Exception:
                log.exception("inspecting an upload failed")
                return {audio_info: error_md("this audio could not be read"), spectrogram: None, chatbot: [],
                        history: []}
            return {audio_info: info.summary(), spectrogram: img, chatbot: [], history: []}

        def settings_of(mode_v, max_new_v, beams_v, temp_v, top_k_v, top_p_v, seed_v, n_v):
            s, rr = decoding_settings(mode_v, max_new_v, beams_v, temp_v, top_k_v, top_p_v, seed_v)
            return s, rr, int(n_v) if rr else 1  # the samples control belongs to re-ranking

        @guard(ask_status)
        def on_ask(path, task_v, instruction_v, *dec):
            t0 = time.perf_counter()
            s, rr, n = settings_of(*dec)
            g = service.answer(path, instruction_v, s, task=(task_v or "").strip() or None, num_samples=n, rerank=rr)
            return {answer: g.text, ask_status: _status(g, n, time.perf_counter() - t0), ask_prompt: g.prompt,
                    candidates: _candidates_rows(g.candidates)}

        @guard(chat_status)
        def on_send(path, msg, hist, *dec):
            t0 = time.perf_counter()
            s, rr, n = settings_of(*dec)
            hist = list(hist or [])
            g = service.chat(path, msg, hist, s, num_samples=n, rerank=rr)
            hist.append((msg, g.text))
            return {chatbot: chat_messages(hist), history: hist, message: "", chat_status: _status(g, n, time.perf_counter() - t0)}

        def on_clear():
            return [], [], "", ""

        @guard(fs_status)
        def on_fewshot(path, k_v, instruction_v, *dec):
            t0 = time.perf_counter()
            s, rr, n = settings_of(*dec)
            g, fs = service.fewshot(path, instruction_v, int(k_v), s, num_samples=n, rerank=rr)
            out = {fs_answer: g.text, fs_prompt: g.prompt, fs_status: _status(g, n, time.perf_counter() - t0)}
            for i in range(max_examples):
                if i < len(fs.examples):
                    nb, ex = fs.examples[i]
                    out[ex_boxes[i]] = gr.update(visible=True)
                    out[ex_audio[i]] = service.neighbour_audio(nb, opts.icl_audio_root)
                    out[ex_text[i]] = example_md(nb, ex, audio_missing=out[ex_audio[i]] is None)
                else:
                    out[ex_boxes[i]] = gr.update(visible=False)
                    out[ex_audio[i]] = None
                    out[ex_text[i]] = ""
            return out

        def on_preset(label):
            return preset_task.get(label, ""), preset_prompt.get(label, "")

        private = dict(api_visibility="private", concurrency_id="model")
        audio.change(on_audio, [audio], [audio_info, spectrogram, chatbot, history], api_visibility="private")
        preset.change(on_preset, [preset], [task, instruction], api_visibility="private", queue=False)
        ask_btn.click(on_ask, [audio, task, instruction] + decoding,
                      [answer, ask_status, ask_prompt, candidates], **private)
        send = dict(fn=on_send, inputs=[audio, message, history] + decoding,
                    outputs=[chatbot, history, message, chat_status], **private)
        send_btn.click(**send)
        message.submit(**send)
        clear_btn.click(on_clear, None, [chatbot, history, message, chat_status], api_visibility="private",
                        queue=False)
        fs_outputs = [fs_answer, fs_prompt, fs_status] + ex_boxes + ex_audio + ex_text
        fs_btn.click(on_fewshot, [audio, k, fs_instruction] + decoding, fs_outputs, **private)

        # -------------------------------------------------------------- the API
        with gr.Column(visible=False):
            api_audio = gr.Audio(type="filepath", sources=["upload"])
            api_text = gr.Textbox()
            api_history = gr.JSON()
            api_out = gr.Textbox()
            api_answer_btn = gr.Button()
            api_chat_btn = gr.Button()

        @api_guard
        def api_answer(path: str, instruction_v: str) -> str:
            """Greedy answer to an instruction about an audio file."""
            s = GenerationSettings(max_new_tokens=int(opts.max_new_tokens))
            return service.answer(path, instruction_v, s).text

        @api_guard
        def api_chat(path: str, msg: str, hist) -> str:
            """Greedy chat reply given the previous rounds ([[user, assistant], ...])."""
            s = GenerationSettings(max_new_tokens=int(opts.max_new_tokens))
            return service.chat(path, msg, history_pairs(hist), s).text

        api_answer_btn.click(api_answer, [api_audio, api_text], api_out, api_name="answer", concurrency_id="model")
        api_chat_btn.click(api_chat, [api_audio, api_text, api_history], api_out, api_name="chat",
                           concurrency_id="model")
    app.megaflamingo_theme = theme  # launch() takes theme/css in Gradio 6
    return app


def serve(opts: DemoOptions) -> None:
    """Load the model once, build the page, queue requests, serve until interrupted."""
    import importlib.util

    from .service import InferenceService

    if importlib.util.find_spec("gradio") is None:  # before minutes of model loading
        raise RuntimeError("the demo needs gradio: pip install 'megaflamingo[demo]'")
    # Never phone home (version checks, analytics) and never fetch web fonts: the page works offline.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    device = opts.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    service = InferenceService.from_paths(
        opts.model, device=device, dtype=opts.dtype, config=opts.config, encoder_checkpoint=opts.encoder_checkpoint,
        encoder_from=opts.encoder_from, cache_dir=opts.cache_dir, icl_from=opts.icl_from,
        clip_checkpoint=opts.clip_checkpoint, rerank_clap=opts.rerank_clap, rerank_tokenizer=opts.rerank_tokenizer,
        max_seconds=opts.max_seconds)
    app = build_app(service, opts)
    app.queue(max_size=int(opts.max_queue), default_concurrency_limit=1)
    app.launch(server_name=opts.host, server_port=opts.port, max_file_size=opts.max_file_size, show_error=False,
               share=False, ssr_mode=False, theme=app.megaflamingo_theme, css=CSS, footer_links=["api"],
               quiet=False)
