"""Benchmark evaluation: registry (AF1's suite as data), library-backed metrics, distributed runs.

    from megaflamingo.eval import EvalOptions, evaluate, load_registry
"""
from .evaluate import EvalOptions, evaluate
from .metrics import accuracy, accuracy_any, bleu4, caption_scores, macro_f1, multilabel_scores, score
from .registry import Benchmark, Registry, RegistryError, load_registry

__all__ = ["EvalOptions", "evaluate", "load_registry", "Registry", "Benchmark", "RegistryError", "caption_scores",
           "bleu4", "accuracy", "accuracy_any", "macro_f1", "multilabel_scores", "score"]
