"""Console scripts: parse arguments, call the library, print. Nothing in the library imports these.

``megaflamingo-preprocess`` (:mod:`.preprocess`), ``megaflamingo-train`` (:mod:`.train`),
``megaflamingo-convert`` (:mod:`.convert`), ``megaflamingo-infer`` (:mod:`.infer`),
``megaflamingo-eval`` (:mod:`.eval`), ``megaflamingo-demo`` (:mod:`.demo`, needs the ``demo`` extra); each
also runs as ``python -m megaflamingo.cli.<name>`` (torchrun / deepspeed launch ``-m megaflamingo.cli.train``;
torchrun ``-m megaflamingo.cli.eval``).
"""
import contextlib
import logging
import sys


def results_only_on_stdout() -> None:
    """Keep stdout for the command's results (one JSON document with ``--json``): DeepSpeed logs to
    stdout through a handler bound to ``sys.stdout`` when it is first imported, and warns "Setting
    accelerator to CPU" right then. Importing it with stdout pointed at stderr binds that handler to
    stderr for good; if it was imported already, its handlers are re-pointed."""
    if "deepspeed" not in sys.modules:
        with contextlib.redirect_stdout(sys.stderr):
            try:
                import deepspeed  # noqa: F401
            except ImportError:
                return
    for handler in logging.getLogger("DeepSpeed").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.__stdout__):
            handler.setStream(sys.stderr)
