"""Multi-turn chat about one audio clip (AF1's chat template, see prompts.chat_prompt).

Each new user turn is answered given the whole dialogue so far; the history is kept as the model's
own answers (interactive) or as given (a dialogue file may carry reference answers: they are then
used as the history for the following turns, and the model's answers reported next to them).
When the dialogue no longer fits the model's context, the oldest rounds are dropped (the audio and
the task prefix always stay).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TextIO

import numpy as np

from megaflamingo.io import atomic_write_text

from .prompts import chat_prompt
from .runner import Query, Runner


@dataclass
class ChatSession:
    runner: Runner
    windows: np.ndarray
    history: list[tuple[str, str]] = field(default_factory=list)
    max_context: int = 512

    def prompt_for(self, user: str, history: Optional[list[tuple[str, str]]] = None) -> str:
        history = list(self.history if history is None else history)
        tok = self.runner.tok
        budget = self.max_context - self.runner.settings.max_new_tokens
        text = chat_prompt(tok, history, user)
        while history and len(tok(text)["input_ids"]) > budget:
            history = history[1:]  # forget the oldest round
            text = chat_prompt(tok, history, user)
        if len(tok(text)["input_ids"]) > budget:
            raise ValueError(f"the user turn alone ({len(tok(text)['input_ids'])} tokens) does not fit the "
                             f"model's context of {self.max_context} tokens with {self.runner.settings.max_new_tokens} "
                             "new tokens")
        return text

    def ask(self, user: str, reference: Optional[str] = None) -> str:
        answer = self.runner.answer([Query(self.prompt_for(user), [self.windows])])[0]
        # A reference answer (from a dialogue file) is what the next turn conditions on.
        self.history.append((user, reference if reference is not None else answer))
        return answer


AUDIO_KEYS = ("audio", "path", "name")  # the clip of a dialogue; AF1's chat manifests say "name"


def run_dialogue_file(runner: Runner, windows_for, path: str, out: Optional[str] = None,
                      max_context: int = 512, data_root: Optional[str] = None) -> list[dict]:
    """Answer every user turn of a dialogue file. ``path``: JSON, one dialogue or a list of them::

        {"audio": "clips/dog.wav",            # or "path" / "name"; relative to data_root, else to
         "dialogue": [{"user": "What is this sound?", "assistant": "A dog barking."},   # the file's folder
                      {"user": "Is it indoors?"}]}

    A round's ``assistant`` (optional) is a reference answer: the following turns condition on it
    instead of on the model's answer. ``windows_for(path)`` embeds a clip. Writes ``out`` (or returns)
    the same structure with ``prediction`` added to every round."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    dialogues = data if isinstance(data, list) else [data]
    base = Path(data_root) if data_root else Path(path).parent
    results = []
    for d_i, d in enumerate(dialogues):
        where = f"{path}: dialogue {d_i}"
        if not isinstance(d, dict) or not isinstance(d.get("dialogue"), list) or not d["dialogue"]:
            raise ValueError(f"{where}: needs a non-empty 'dialogue' list of {{user, assistant}} rounds")
        audio = next((d[k] for k in AUDIO_KEYS if isinstance(d.get(k), str)), None)
        if audio is None:
            raise ValueError(f"{where}: needs the clip's path as 'audio' (or 'path', 'name')")
        clip = Path(audio) if os.path.isabs(audio) else base / audio
        if not clip.is_file():
            raise ValueError(f"{where}: audio file {clip} does not exist"
                             + ("" if data_root else " (relative paths are taken from the dialogue file's "
                                                     "folder unless --data-root is given)"))
        session = ChatSession(runner, windows_for(clip), max_context=max_context)
        rounds = []
        for r_i, rnd in enumerate(d["dialogue"]):
            if not isinstance(rnd, dict) or not isinstance(rnd.get("user"), str):
                raise ValueError(f"{where}: round {r_i} needs a string 'user'")
            ref = rnd.get("assistant")
            pred = session.ask(rnd["user"], ref)
            rounds.append({**rnd, "prediction": pred})
        results.append({**d, "dialogue": rounds})
    if out:
        atomic_write_text(out, json.dumps(results if isinstance(data, list) else results[0], indent=2,
                                          ensure_ascii=False) + "\n")
    return results


def interactive(session: ChatSession, stdin: TextIO, stdout: TextIO) -> None:
    """Read user turns line by line until EOF or '/quit'; '/reset' clears the history."""
    stdout.write("chat: type a message, /reset to clear the history, /quit to leave\n")
    while True:
        stdout.write("user> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line == "/quit":
            break
        if line == "/reset":
            session.history.clear()
            continue
        stdout.write(f"assistant> {session.ask(line)}\n")
        stdout.flush()
