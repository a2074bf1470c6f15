"""Offline preprocessing, the library side of ``megaflamingo-preprocess``: :mod:`.embed` (manifest ->
Arrow shards of window embeddings, sharded and resumable; the merge), :mod:`.manifest` (JSONL manifests
from folders and metadata tables), :mod:`.tables` (metadata tables as publishers ship them),
:mod:`.audio_index` (the audio files under a dataset root) and :mod:`.recipes` (one module per public
dataset: its published layout -> AF1-style manifests). kNN few-shot manifests are built by
:mod:`megaflamingo.data.knn`."""
