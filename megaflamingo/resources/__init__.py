"""Files shipped inside the package: the DeepSpeed JSONs (``ds_configs/``) and the stage configs
(``configs/``), read through importlib.resources so an installed (non-editable) package finds them
from any working directory. In a checkout they are the repository's top-level folders."""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Optional

KINDS = ("ds_configs", "configs")


def packaged(kind: str, name: str) -> Optional[Path]:
    """The path of a shipped file (``packaged("configs", "tiny_cpu.yaml")``), or None."""
    if kind not in KINDS:
        raise ValueError(f"unknown resource kind {kind!r} (one of {', '.join(KINDS)})")
    ref = resources.files(__name__) / kind / name
    if not ref.is_file():
        return None
    # Installed packages are plain directories (not zips): the traversable is a real path.
    return Path(str(ref))


def names(kind: str) -> list[str]:
    """The shipped files of one kind, sorted."""
    root = resources.files(__name__) / kind
    return sorted(p.name for p in root.iterdir() if p.is_file()) if root.is_dir() else []
