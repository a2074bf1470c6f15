"""A guard that makes any attempt to reach the network (the model hub included) fail loudly."""
from __future__ import annotations

import os
import socket
import sys


class HubAccessError(RuntimeError):
    pass


_ALLOWED_HOSTS = ("127.", "localhost", "::1", "0.0.0.0")


def no_hub() -> None:
    """Make any attempt to reach the network (the model hub included) fail loudly.

    Sets the HF offline switches (inherited by subprocesses) and refuses socket connections to
    anything but loopback in this process (gloo / DeepSpeed rendezvous stay on loopback).
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    # huggingface_hub reads the switch once, at import (``import megaflamingo`` imports it)
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    if getattr(socket.socket.connect, "_megaflamingo_guard", False):
        return
    original = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else str(address)
        if self.family in (socket.AF_INET, socket.AF_INET6) and not str(host).startswith(_ALLOWED_HOSTS):
            raise HubAccessError(f"test tried to reach the network ({address!r}); tests must not download")
        return original(self, address)

    guarded._megaflamingo_guard = True
    socket.socket.connect = guarded
