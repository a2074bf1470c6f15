"""The stop request (SIGUSR1 / SIGTERM): a process-wide flag set by a signal handler.

The CLI installs the handler first thing, so a signal that arrives while the run is still starting
(imports, model build, ``deepspeed.initialize``, checkpoint load) is recorded instead of killing the
process with nothing saved; the Trainer reads the same flag before its first step and at every step
boundary. Python runs handlers in the main thread only, so installing elsewhere is a no-op.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_requested: Optional[int] = None  # the signal number that asked us to stop


def _handler(signum, frame) -> None:
    global _requested
    _requested = signum


def install() -> dict:
    """Route SIGUSR1/SIGTERM to the flag; returns the previous handlers (for :func:`restore`)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, _handler) for s in STOP_SIGNALS}


def restore(old: dict) -> None:
    for s, h in old.items():
        signal.signal(s, h)


def requested() -> bool:
    return _requested is not None


def clear() -> None:
    """Forget a request that has been honoured (a later run in this process starts clean)."""
    global _requested
    _requested = None
