"""Audio files -> window embeddings in-process, through exactly the preprocessing front end.

The encoder is rebuilt from the record preprocessing wrote (``metadata.json``'s ``encoder`` block,
carried into the model directory): same encoder, same checkpoint hash, same settings, same window
layout. A model trained on one encoder's embeddings answers garbage on another's, so any
difference is an error, never a warning.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from megaflamingo.audio.windows import max_span_seconds

# Fields of the encoder record that must match for embeddings to be interchangeable.
_IDENTITY = ("name", "embed_dim", "sample_rate", "checkpoint_sha256", "random_init")


class EncoderMismatch(ValueError):
    pass


def compare_encoders(expected: dict, got: dict, what_expected: str, what_got: str) -> None:
    """Raise naming every field where two encoder records disagree."""
    diffs = []
    for k in _IDENTITY:
        if k in expected and k in got and expected[k] != got[k]:
            diffs.append(f"{k}: {expected[k]!r} vs {got[k]!r}")
    ce, cg = expected.get("config") or {}, got.get("config") or {}
    for k in sorted(set(ce) & set(cg)):
        if ce[k] != cg[k]:
            diffs.append(f"config.{k}: {ce[k]!r} vs {cg[k]!r}")
    if diffs:
        raise EncoderMismatch(f"encoder of {what_got} differs from the one {what_expected} was trained on: "
                              + "; ".join(diffs))


def compare_windows(expected: dict, got: dict, what_expected: str, what_got: str) -> None:
    diffs = [f"{k}: {expected[k]!r} vs {got[k]!r}" for k in ("window_s", "overlap_s", "max_windows")
             if k in expected and k in got and float(expected[k]) != float(got[k])]
    if diffs:
        raise EncoderMismatch(f"window layout of {what_got} differs from {what_expected}: " + "; ".join(diffs))


class AudioEmbedder:
    """``embed(path) -> float32 [num_windows, D]`` with the recorded encoder and window layout."""

    def __init__(self, record: dict, windows: dict, device: str = "cpu", checkpoint: Optional[str] = None,
                 silence_embedding=None):
        from megaflamingo.audio.encoders import build_encoder

        self.record = dict(record)
        self.window_s = float(windows.get("window_s", 7.0))
        self.overlap_s = float(windows.get("overlap_s", 5.25))
        self.max_windows = int(windows.get("max_windows", 16))
        cfg = dict(record.get("config") or {})
        name = record.get("name")
        ckpt = checkpoint or record.get("checkpoint")
        if name != "tiny" and ckpt is None and not record.get("random_init"):
            raise EncoderMismatch(f"the model's {name} encoder needs its checkpoint: pass --encoder-checkpoint")
        if ckpt is not None and name != "tiny" and not os.path.isfile(ckpt):
            raise EncoderMismatch(f"encoder checkpoint {ckpt} not found (pass --encoder-checkpoint)")
        kwargs = dict(random_init=bool(record.get("random_init")), device=device, seed=int(cfg.get("seed", 0)))
        if name == "tiny":
            kwargs["embed_dim"] = int(record["embed_dim"])
        else:
            kwargs["checkpoint"] = ckpt
            if name == "laion-clap" and "fusion" in cfg:
                kwargs["fusion"] = bool(cfg["fusion"])
        self.encoder = build_encoder(name, **kwargs)
        compare_encoders(record, self.encoder.describe(), "the model", "the rebuilt encoder")
        if abs(float(cfg.get("clip_seconds", self.window_s)) - self.window_s) > 1e-9:
            raise EncoderMismatch(f"encoder clip length {cfg.get('clip_seconds')} s != window {self.window_s} s")
        self.silence = self.encoder.silence_embedding().astype(np.float32)
        if silence_embedding is not None:
            ref = np.asarray(silence_embedding, dtype=np.float32)
            # fp16 storage in the dataset -> compare loosely; a different encoder is far off.
            if ref.shape != self.silence.shape or not np.allclose(ref, self.silence, atol=2e-2, rtol=2e-2):
                raise EncoderMismatch("the rebuilt encoder's silence embedding differs from the recorded one "
                                      "(different encoder weights?)")

    @property
    def embed_dim(self) -> int:
        return int(self.encoder.embed_dim)

    def embed(self, path: str | os.PathLike, start: float = 0.0) -> np.ndarray:
        from megaflamingo.audio.decode import load_audio
        from megaflamingo.audio.windows import frame_windows

        sr = self.encoder.sample_rate
        span = max_span_seconds(self.window_s, self.overlap_s, self.max_windows)
        audio = load_audio(path, sr, start_s=float(start), duration_s=span)
        clips = frame_windows(audio, sr, self.window_s, self.overlap_s, self.max_windows)
        return self.encoder.encode(clips).astype(np.float32)


class ClipEmbedder:
    """A query's LAION-CLAP clip embedding, made exactly as preprocessing filled a split's
    ``clip_embedding`` column (the kNN key): the split's ``clip_encoder`` record rebuilt (checkpoint
    sha256 checked), first ``clip_seconds`` at the encoder's rate, int16 round trip, repeat-pad."""

    def __init__(self, record: dict, windows: dict, device: str = "cpu", checkpoint: Optional[str] = None):
        from megaflamingo.audio.encoders import build_encoder

        if not record or record.get("name") != "laion-clap":
            raise EncoderMismatch(f"clip encoder {record and record.get('name')!r}: only laion-clap clip "
                                  "embeddings can be recomputed for a query")
        cfg = dict(record.get("config") or {})
        ckpt = checkpoint or record.get("checkpoint")
        if ckpt is None and not record.get("random_init"):
            raise EncoderMismatch("the split's LAION-CLAP clip encoder needs its checkpoint: pass --clip-checkpoint")
        if ckpt is not None and not os.path.isfile(ckpt):
            raise EncoderMismatch(f"LAION-CLAP checkpoint {ckpt} not found (pass --clip-checkpoint)")
        self.clip_seconds = float(cfg.get("clip_seconds", 10.0))
        self.span = max_span_seconds(float(windows.get("window_s", 7.0)), float(windows.get("overlap_s", 5.25)),
                                     int(windows.get("max_windows", 16)))
        self.encoder = build_encoder("laion-clap", ckpt, bool(record.get("random_init")) and ckpt is None, device,
                                     None, int(cfg.get("seed", 0)), bool(cfg.get("fusion", True)),
                                     window_s=self.clip_seconds)
        got = self.encoder.describe()
        # Same identity (incl. checkpoint sha256) as the encoder that made the split's keys.
        compare_encoders(record, dict(got, config=dict(got["config"], pooling=cfg.get("pooling", "clip"))),
                         "the retrieval split", "the rebuilt LAION-CLAP encoder")

    def embed(self, path: str | os.PathLike, start: float = 0.0) -> np.ndarray:
        from megaflamingo.audio.decode import read_raw, to_target
        from megaflamingo.audio.frontend import repeat_pad_np
        from megaflamingo.audio.windows import quantize_int16

        sr = self.encoder.sample_rate
        raw = read_raw(path, float(start), self.span, min_file_bytes=0)
        clip = repeat_pad_np(quantize_int16(to_target(raw, sr, max_seconds=self.clip_seconds)),
                             int(self.clip_seconds * sr))
        return self.encoder.encode(clip[None].astype(np.float32))[0]


class ModelEmbedder:
    """The audio embedder of a loaded model, built on first use (batch runs over preprocessed splits
    never need it), with the model's encoder record."""

    def __init__(self, loaded, device: str = "cpu", checkpoint: Optional[str] = None):
        self.loaded, self.device, self.checkpoint = loaded, device, checkpoint
        self._embedder: Optional[AudioEmbedder] = None

    def get(self) -> AudioEmbedder:
        if self._embedder is None:
            rec = self.loaded.encoder
            self._embedder = AudioEmbedder(rec["encoder"], rec.get("windows") or {}, self.device, self.checkpoint,
                                           rec.get("silence_embedding"))
        return self._embedder

    def embed(self, path: str | os.PathLike, start: float = 0.0) -> np.ndarray:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"audio file {path} does not exist")
        return self.get().embed(path, start)

    def fill_silence(self) -> None:
        """Give the loaded model the silence embedding that pads its audio slots when its record lacks
        one (a model dir without encoder.json): the rebuilt encoder's embedding of a silent window."""
        if self.loaded.encoder.get("silence_embedding") is None:
            self.loaded.encoder["silence_embedding"] = self.get().silence.tolist()
