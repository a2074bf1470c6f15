"""Prompt formats (must equal the training text up to <SEP>), resumable output files."""
import json

import numpy as np
import pytest

from megaflamingo.inference.batch import read_done
from megaflamingo.inference.prompts import (Example, chat_prompt, decode_answer, fewshot_prompt, multi_audio_prompt,
                                            single_prompt, task_prefix)


def _training_text(tok, ids, shots, interleaved=None, prefix_prob=0.0):
    """The data pipeline's own sample text for the same item (megaflamingo.data.text)."""
    from megaflamingo.data.sources import Item, Shot
    from megaflamingo.data.text import SpecialText, build_text
    from megaflamingo.data.templates import TemplateRegistry

    item = Item(shots=[Shot(path=f"a{i}.wav", prompt=p, output=o, windows=np.zeros((1, 4), np.float32))
                       for i, (p, o) in enumerate(shots)], interleaved=interleaved)
    return build_text(item, SpecialText.from_tokenizer(tok, ids), TemplateRegistry(),
                      flamingo_task="SynthSounds-EventClassification", split="train",
                      augmentations={"do_nothing": 1.0}, prefix_prob=prefix_prob, rng=np.random.default_rng(0))


def test_single_prompt_is_the_training_text_up_to_sep(tiny_tok, tiny_token_ids):
    prompt = "Classify this sound.\nOPTIONS:\n - low tone.\n - high tone."
    train = _training_text(tiny_tok, tiny_token_ids, [(prompt, "Low tone")])
    infer = single_prompt(tiny_tok, prompt)
    assert train.startswith(infer), (train, infer)
    assert train[len(infer):] == "low tone<|endofchunk|></s>"
    # Token level too: the generation prompt is a prefix of the training ids.
    assert tiny_tok(train)["input_ids"][: len(tiny_tok(infer)["input_ids"])] == tiny_tok(infer)["input_ids"]


def test_fewshot_prompt_matches_interleaved_training_text(tiny_tok, tiny_token_ids):
    shots = [("classify this sound.", "pink noise"), ("classify this sound.", "white noise"),
             ("classify this sound.", "low tone")]
    train = _training_text(tiny_tok, tiny_token_ids, shots, interleaved="similar")
    infer = fewshot_prompt(tiny_tok, [Example(p, o) for p, o in shots[:-1]], shots[-1][0])
    assert train.startswith(infer)
    assert infer.startswith("</s>Here are similar examples. <audio>")
    assert infer.count("<audio>") == 3 and infer.endswith("<SEP>")


def test_chat_prompt_layout(tiny_tok):
    text = chat_prompt(tiny_tok, [("what is it?", "a tone"), ("is it loud?", "no")], "how long?")
    assert text == ("</s>The task is dialog. <audio>user: what is it? \nassistant: <SEP>a tone<|endofchunk|></s>\n"
                    "user: is it loud? \nassistant: <SEP>no<|endofchunk|></s>\nuser: how long? \nassistant: <SEP>")
    with pytest.raises(ValueError):
        chat_prompt(tiny_tok, [], "   ")


def test_multi_audio_and_prefix(tiny_tok):
    t = multi_audio_prompt(tiny_tok, "Which is higher?", 2, prefix=task_prefix("EventClassification"))
    assert t == "</s>The task is event classification. <audio><audio>which is higher?\nAnswer:<SEP>"
    assert single_prompt(tiny_tok, "q\nAnswer:").count("Answer:") == 1  # suffix never doubled


def test_decode_answer_stops_at_eoc(tiny_tok, tiny_token_ids):
    ids = tiny_tok("low tone", add_special_tokens=False)["input_ids"]
    new = ids + [tiny_token_ids.eoc] + tiny_tok(" junk", add_special_tokens=False)["input_ids"]
    assert decode_answer(tiny_tok, new) == "low tone"
    assert decode_answer(tiny_tok, ids + [tiny_token_ids.pad] * 3) == "low tone"


def test_read_done_drops_a_torn_tail(tmp_path):
    p = tmp_path / "pred.jsonl"
    good = [json.dumps({"id": str(i), "prediction": "x"}) for i in range(3)]
    p.write_text("\n".join(good) + "\n" + '{"id": "3", "predic')
    assert read_done(p) == {"0", "1", "2"}
    assert p.read_text() == "\n".join(good) + "\n"  # torn record removed, complete ones kept
    p.write_text(good[0] + "\nnot json\n" + good[1] + "\n")
    with pytest.raises(ValueError, match="line 2"):
        read_done(p)


def test_task_prefix_follows_the_data_pipelines_renames():
    assert task_prefix("EventClassification") == "The task is event classification. "
    assert task_prefix("AudioSet-EventClassification") == "The task is event classification. "
    assert task_prefix("Clotho-AQA-AQA") == "The task is audio question answering. "
    assert task_prefix(None) == ""


def _form(blend):
    from megaflamingo.config import DatasetEntry
    from megaflamingo.inference.prompts import TrainingForm, templates_of

    return TrainingForm(templates_of(None), {k: DatasetEntry(**v) for k, v in blend.items()})


def test_batch_items_take_the_form_training_gave_their_task():
    from megaflamingo.inference.batch import Item, eval_text

    jam = Item(id="1", path="a.wav", prompt="What genre?", output="Rock; Pop", task="mtg-jamendo-MusicTagging")
    # Trained with the default rewrite and the prefix: the fixed question, the trained answer spelling.
    form = _form({"mtg-jamendo-MusicTagging/train": {"prefix_prob": 1.0, "augmentations": {"default": 1.0}}})
    pre, prompt, ref, rendered = eval_text(jam, form)
    assert rendered and pre == "The task is music tagging. "
    assert prompt == "what are the genres, instruments, and mood/theme of the music?\nAnswer:"
    assert ref == "rock. pop"
    # --prefix replaces the task's; --prompt is kept as typed while the reference stays trained.
    assert eval_text(jam, form, prefix="") == ("", prompt, ref, True)
    assert eval_text(jam, form, prompt_override="Tags?") == (pre, "Tags?", ref, False)
    # Trained as given without prefix (the quickstart's blend): prompted exactly so.
    plain = _form({"mtg-jamendo-MusicTagging/train": {"prefix_prob": 0.0, "augmentations": {"do_nothing": 1.0}}})
    assert eval_text(jam, plain) == ("", "what genre?\nAnswer:", "rock; pop", True)
    # A task the blend never saw (zero-shot): its prefix, the prompt as given.
    other = Item(id="2", path="b.wav", prompt="Is it a dog?", output="Yes", task="Clotho-AQA-AQA")
    assert eval_text(other, form) == ("The task is audio question answering. ", "is it a dog?\nAnswer:", "yes", True)
    # No form / no task: untouched.
    assert eval_text(jam, None) == ("", "What genre?", "Rock; Pop", False)


def test_batch_prompt_is_the_training_text_of_an_option_list_task(tiny_tok, tiny_token_ids):
    """A task trained with AF1's provide_all_labels: training appends ``\nOPTIONS:`` after lower-casing
    the prompt, so the generation prompt must carry it upper-case, exactly as the training sample
    does up to its <SEP> (a prompt re-lower-cased after rendering asked ``options:`` instead)."""
    from megaflamingo.data.sources import Item as DataItem
    from megaflamingo.data.sources import Shot
    from megaflamingo.data.text import SpecialText, build_text, prompt_text
    from megaflamingo.inference.batch import Item, query_text

    task = "CochlScene-SceneClassification"
    blend = {"prefix_prob": 1.0, "augmentations": {"provide_all_labels": 1.0}}
    form = _form({f"{task}/train": blend})
    it = Item(id="1", path="a.wav", prompt="Classify this acoustic scene.", output="Bus", task=task)
    text, ref = query_text(tiny_tok, it, form)
    sp = SpecialText.from_tokenizer(tiny_tok, tiny_token_ids)
    sample = DataItem(shots=[Shot(path=it.path, prompt=it.prompt, output=it.output, windows=np.zeros((1, 4)))])
    train = build_text(sample, sp, form.registry, flamingo_task=task, split="train", rng=np.random.default_rng(0),
                       **blend)
    assert text == prompt_text(train, sp), (text, train)
    assert "\nOPTIONS:\n - bus.\n" in text and ref == "bus"
    # --prompt: the user's question as typed gets the raw-prompt normalisation (lower case + suffix).
    typed, _ = query_text(tiny_tok, it, form, prompt_override="Which SCENE?")
    assert typed.endswith("<audio>which scene?\nAnswer:<SEP>")


def test_icl_examples_take_their_trained_form_farthest_first():
    from megaflamingo.inference.prompts import Example
    from megaflamingo.inference.retrieval import Neighbour, build_examples

    form = _form({"mtg-jamendo-MusicTagging/train": {"prefix_prob": 1.0, "augmentations": {"default": 1.0}}})
    neigh = [Neighbour(row=i, distance=float(i), id=f"n{i}", path=f"n{i}.wav", prompt="Tags?", output=f"Rock; T{i}",
                       windows=np.full((1, 4), i, np.float32)) for i in range(3)]

    def render(n):
        return Example(*form.render("mtg-jamendo-MusicTagging", n.path, n.prompt, n.output, no_options=True)[1:],
                       rendered=True)

    examples, windows = build_examples(neigh, render)
    q = "what are the genres, instruments, and mood/theme of the music?\nAnswer:"
    assert examples == [Example(q, "rock. t2", True), Example(q, "rock. t1", True), Example(q, "rock. t0", True)]
    assert [int(w[0, 0]) for w in windows] == [2, 1, 0]
    assert build_examples(neigh)[0][0] == Example("Tags?", "Rock; T2")  # stored text without a renderer
