"""Where Hugging Face files live: the cache folder a config names, and what is missing offline.

transformers' ``cache_dir`` is the *hub cache* itself (the folder holding ``models--org--name/``, by
default ``$HF_HOME/hub``). Configs and users often name ``HF_HOME`` instead; :func:`hf_cache_dir`
accepts both, so a cache filled on a login node (``huggingface-cli download``) is found on an
offline compute node.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

_TRUE = ("1", "true", "yes", "on")


def hf_cache_dir(cache_dir: Optional[str | os.PathLike]) -> Optional[str]:
    """The hub cache to pass to transformers. None: transformers' default (``HF_HUB_CACHE``, else
    ``$HF_HOME/hub``). A path that is ``$HF_HOME``, or holds a ``hub/`` folder and no ``models--*``
    of its own, means its ``hub/``; any other path is the hub cache."""
    if cache_dir in (None, ""):
        return None
    p = Path(os.path.expanduser(str(cache_dir)))
    home = os.environ.get("HF_HOME")
    if home and p.resolve() == Path(os.path.expanduser(home)).resolve():
        return str(p / "hub")
    if (p / "hub").is_dir() and not any(p.glob("models--*")):
        return str(p / "hub")
    return str(p)


def offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def missing_offline(name: str, cache_dir: Optional[str | os.PathLike], file: str = "config.json") -> Optional[str]:
    """Offline (``HF_HUB_OFFLINE``), a hub name whose ``file`` is not in the cache: a message saying
    where it was looked for. None when online, for a local directory, or when the file is cached."""
    if not offline() or not name or Path(os.path.expanduser(name)).is_dir():
        return None
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE

    cache = hf_cache_dir(cache_dir) or HF_HUB_CACHE
    try:
        found = try_to_load_from_cache(name, file, cache_dir=cache)
    except ValueError as e:  # not a valid repo id: transformers will say so itself
        return None if "repo" in str(e).lower() else str(e)
    if isinstance(found, str):
        return None
    return (f"{name!r} is not in the Hugging Face cache {cache} (no {file}) and HF_HUB_OFFLINE is set: "
            f"download it where the hub is reachable (huggingface-cli download {name} --cache-dir {cache}), "
            f"or give a local directory")
