"""A small labelled synthetic audio dataset: the data of the CPU quickstart and of the inference tests.

Eight sound classes that a tiny log-mel encoder can tell apart even when it pools over time
(each class has its own spectral signature, not only a temporal one), several seconds each; a
part of every class is longer than one 7 s window so multi-window samples are exercised.
Clips are seeded, so the whole dataset is a pure function of ``(seed, sizes)``.

Captions describe what varies from clip to clip, not only the class: how loud it is (its peak
level, quiet below 0.6) and how long (short up to one 7 s encoder window), in five paraphrases per
clip (different templates and wordings), so a captioning score rewards hearing the clip, and every
clip has several references as in Clotho/AudioCaps.

Layout written under ``out``::

    audio/<split>/<label>_<n>.wav                        16-bit mono clips
    manifests/<dataset>-<task>/<split>.jsonl              one JSON object per clip (AF1 fields:
                                                           name, prompt, output; plus id, label,
                                                           caption, duration)
    manifests/<dataset>-AudioCaptioning/<split>.jsonl     the same clips, one row per reference
                                                           caption (ids <clip>#k; 5 per clip, in
                                                           train ``train_references``)
    classes.json                                          labels, caption vocabulary, prompts

Manifest ``name`` paths are relative to ``out`` (pass ``--data-root out`` to preprocessing).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from megaflamingo.io import atomic_write_text

from .audio import synth_audio

DATASET = "SynthSounds"
TASK = "EventClassification"
CAPTION_TASK = "AudioCaptioning"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SoundClass:
    label: str
    kind: str  # how the clip is made (see `render_clip`)
    subjects: tuple[str, ...]  # caption noun phrases (no article)
    verb: str  # what the subject does in a caption
    lo: float = 0.0  # frequency range of the class (Hz), where it has one
    hi: float = 0.0


# Caption words are the tiny tokenizer's own (megaflamingo.tokens), so a caption is a few tokens long.
CLASSES: tuple[SoundClass, ...] = (
    SoundClass("low tone", "tone", ("low pitched tone", "low tone", "low hum"), "hums", 180.0, 320.0),
    SoundClass("high tone", "tone", ("high pitched tone", "high tone", "high beep"), "beeps", 1800.0, 2600.0),
    SoundClass("rising chirp", "chirp", ("rising chirp", "rising sweep", "upward sweep"), "rises", 300.0, 1000.0),
    SoundClass("falling chirp", "chirp", ("falling chirp", "falling sweep", "downward sweep"), "falls",
               5000.0, 3000.0),
    SoundClass("white noise", "white_noise", ("white noise", "bright hiss", "bright white noise"), "hisses"),
    SoundClass("pink noise", "pink_noise", ("pink noise", "dark noise", "dark pink noise"), "rumbles"),
    SoundClass("click train", "clicks", ("click train", "train of clicks", "clicking sound"), "repeats"),
    SoundClass("modulated tone", "am_tone", ("modulated tone", "pulsing tone", "amplitude modulated tone"), "pulses",
               1100.0, 1500.0),
)
LABELS = tuple(c.label for c in CLASSES)

# AF1's single-label classification prompt with all options listed (its `provide_all_labels`
# augmentation: sorted labels, one per line). The quickstart trains and evaluates with it.
CLASSIFY_PROMPT = "classify this sound." + "\nOPTIONS:\n - {}.".format(".\n - ".join(sorted(LABELS)))
CAPTION_PROMPT = "describe this sound in detail."

LOUD_FROM = 0.6  # peak level: clips are drawn in [0.3, 0.9]
LONG_FROM_S = 7.0  # longer than one encoder window
_LEVEL = {False: "quiet", True: "loud"}
_LENGTH = {False: "short", True: "long"}
_TEMPLATES = (
    "a {len} {lvl} {subj}",
    "a {lvl} {subj}, {len}",
    "a {subj} that {verb}, {lvl} and {len}",
    "the sound is a {len} {lvl} {subj}",
    "a {lvl} {subj} {verb}, {len}",
)
N_REFERENCES = len(_TEMPLATES)


def captions(cls: SoundClass, level: float, seconds: float, rng: np.random.Generator) -> list[str]:
    """The clip's reference captions: one per template, the class's wording drawn from ``rng``."""
    lvl, length = _LEVEL[level >= LOUD_FROM], _LENGTH[seconds > LONG_FROM_S]
    return [t.format(subj=cls.subjects[int(rng.integers(len(cls.subjects)))], verb=cls.verb, lvl=lvl, len=length)
            for t in _TEMPLATES]


@dataclass
class SplitSizes:
    """Clips per class and split."""

    train: int = 24
    val: int = 3
    test: int = 6

    def get(self, split: str) -> int:
        return int(getattr(self, split))


@dataclass
class SyntheticDataset:
    root: Path
    manifests: dict[str, Path]  # split -> classification JSONL
    caption_manifests: dict[str, Path]  # split -> captioning JSONL
    labels: tuple[str, ...] = LABELS
    prompt: str = CLASSIFY_PROMPT
    counts: dict[str, int] = field(default_factory=dict)


def render_clip(cls: SoundClass, seconds: float, sr: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """One float32 clip of class ``cls`` in [-1, 1], with per-clip variation (pitch, level, noise),
    and its peak level."""
    seed = int(rng.integers(0, 2**31 - 1))
    n = int(round(seconds * sr))
    t = np.arange(n, dtype=np.float64) / sr
    if cls.kind == "tone":
        x = synth_audio("tone", seconds, sr, seed=seed, freq=float(rng.uniform(cls.lo, cls.hi)))
    elif cls.kind == "am_tone":
        x = synth_audio("am_tone", seconds, sr, seed=seed, freq=float(rng.uniform(cls.lo, cls.hi)))
    elif cls.kind == "chirp":
        # Own sweep (testing's chirps share one band): each direction gets its own band, with
        # +-10% jitter, so the classes differ in spectrum as well as in time.
        a = cls.lo * float(rng.uniform(0.9, 1.1))
        b = cls.hi * float(rng.uniform(0.9, 1.1))
        x = np.sin(2 * np.pi * (a * t + (b - a) * t**2 / (2 * max(seconds, 1e-9))))
    elif cls.kind in ("white_noise", "pink_noise", "clicks"):
        x = synth_audio(cls.kind, seconds, sr, seed=seed)
    else:  # pragma: no cover - CLASSES is fixed
        raise ValueError(f"unknown class kind {cls.kind!r}")
    x = np.asarray(x, dtype=np.float64)
    # A little background noise and a random level keep clips of one class from being identical.
    x = x / (np.abs(x).max() + 1e-9) + rng.standard_normal(n) * float(rng.uniform(0.0, 0.02))
    level = float(rng.uniform(0.3, 0.9))
    x = x / (np.abs(x).max() + 1e-9) * level
    return x.astype(np.float32), level


def clip_seconds(i: int, n: int, rng: np.random.Generator, min_s: float, max_s: float) -> float:
    """Durations spread over [min_s, max_s]: about half the clips are longer than one 7 s window."""
    frac = (i + float(rng.uniform(0, 1))) / max(n, 1)
    return round(min_s + (max_s - min_s) * frac, 2)


def generate(
    out: str | os.PathLike,
    sizes: Optional[SplitSizes] = None,
    seed: int = 0,
    sample_rate: int = 16000,
    min_s: float = 3.0,
    max_s: float = 12.0,
    classes: tuple[SoundClass, ...] = CLASSES,
    train_references: int = 1,
) -> SyntheticDataset:
    """Write the dataset under ``out`` (idempotent: same arguments -> same files).

    ``train_references``: captioning rows per clip in the train split (each row is embedded on its
    own, so 5 would embed every training clip 5 times); clip i shows references i, i+1, ... (mod 5),
    so the split still covers every template. Validation and test splits list all five."""
    import soundfile as sf

    if not 1 <= train_references <= N_REFERENCES:
        raise ValueError(f"train_references must be in 1..{N_REFERENCES}, got {train_references}")
    if min_s <= 0.5 or max_s < min_s:
        raise ValueError(f"need 0.5 < min_s <= max_s, got min_s={min_s}, max_s={max_s}")
    sizes = sizes or SplitSizes()
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    manifests, cap_manifests, counts = {}, {}, {}
    for s_i, split in enumerate(SPLITS):
        n = sizes.get(split)
        if n <= 0:
            continue
        rows = []
        for c_i, cls in enumerate(classes):
            rng = np.random.default_rng([seed, s_i, c_i])
            slug = cls.label.replace(" ", "_")
            for i in range(n):
                seconds = clip_seconds(i, n, rng, min_s, max_s)
                rel = f"audio/{split}/{slug}_{i:03d}.wav"
                x, level = render_clip(cls, seconds, sample_rate, rng)
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                sf.write(str(path), x, sample_rate, subtype="PCM_16")
                # Own stream: the audio of every clip stays what it was before captions existed.
                refs = captions(cls, level, seconds, np.random.default_rng([seed, s_i, c_i, i, 1]))
                rows.append({"id": f"{split}/{slug}_{i:03d}", "name": rel, "label": cls.label,
                             "caption": refs[0], "references": refs, "level": round(level, 4),
                             "duration": seconds})
        # Interleave classes so any prefix of the manifest is balanced-ish.
        order = np.random.default_rng([seed, s_i, 99]).permutation(len(rows))
        rows = [rows[j] for j in order]
        manifests[split] = _write_jsonl(
            root / "manifests" / f"{DATASET}-{TASK}" / f"{split}.jsonl",
            [{**_clip(r), "prompt": CLASSIFY_PROMPT, "output": r["label"], "dataset": DATASET, "task": TASK,
              "split": split} for r in rows])
        # AF1's captioning layout (Clotho, AudioCaps): one row per reference caption of a clip.
        n_refs = train_references if split == "train" else N_REFERENCES
        cap_manifests[split] = _write_jsonl(
            root / "manifests" / f"{DATASET}-{CAPTION_TASK}" / f"{split}.jsonl",
            [{**_clip(r), "id": f"{r['id']}#{k}", "prompt": CAPTION_PROMPT, "output": r["references"][k],
              "dataset": DATASET, "task": CAPTION_TASK, "split": split}
             for j, r in enumerate(rows) for k in _reference_ids(j, n_refs)])
        counts[split] = len(rows)
    info = {"dataset": DATASET, "task": TASK, "labels": list(LABELS), "prompt": CLASSIFY_PROMPT,
            "caption_prompt": CAPTION_PROMPT, "classes": [asdict(c) for c in classes],
            "caption_templates": list(_TEMPLATES), "loud_from": LOUD_FROM, "long_from_s": LONG_FROM_S,
            "sample_rate": sample_rate, "seed": seed, "counts": counts}
    (root / "classes.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return SyntheticDataset(root=root, manifests=manifests, caption_manifests=cap_manifests,
                            counts=counts)


def _reference_ids(j: int, n: int) -> list[int]:
    return sorted((j + t) % N_REFERENCES for t in range(n))


def _clip(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "references"}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return path


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m megaflamingo.testing.sounds",
                                description="Write the labelled synthetic audio dataset.")
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=24, help="clips per class in train")
    p.add_argument("--val", type=int, default=3)
    p.add_argument("--test", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-rate", type=int, default=16000)
    a = p.parse_args(argv)
    ds = generate(a.out, SplitSizes(a.train, a.val, a.test), seed=a.seed, sample_rate=a.sample_rate)
    for split, m in ds.manifests.items():
        print(f"{split}: {ds.counts[split]} clips -> {m}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
