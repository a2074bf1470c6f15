"""Data pipeline: Arrow datasets -> blended, templated, tokenised, masked batches.

Exports are resolved lazily so that light users (e.g. preprocessing importing
``megaflamingo.data.arrow_format``) do not import torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "build_train_loader": "megaflamingo.data.loader",
    "build_valid_loaders": "megaflamingo.data.loader",
    "TrainLoader": "megaflamingo.data.loader",
    "ValidLoader": "megaflamingo.data.loader",
    "build_labels": "megaflamingo.data.labels",
    "ArrowDataset": "megaflamingo.data.reader",
    "KnnManifest": "megaflamingo.data.reader",
    "DataError": "megaflamingo.data.reader",
    "TemplateRegistry": "megaflamingo.data.templates",
    "Collator": "megaflamingo.data.collate",
    "Source": "megaflamingo.data.sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megaflamingo.data' has no attribute {name!r}")
