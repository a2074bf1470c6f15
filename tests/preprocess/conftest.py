"""Fixtures for the preprocessing tests."""
from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
from audio_fixtures import make_folder


@pytest.fixture(scope="session")
def audio_folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("audio"))


@pytest.fixture
def torchvision_stub(monkeypatch):
    """LAION-CLAP's htsat imports `torchvision.ops.misc.FrozenBatchNorm2d` (only for freezing,
    never for inference); torchvision cannot be imported on these CPU machines (DESIGN.md §5),
    so tests provide that one name."""
    import torch
    import transformers  # noqa: F401  (it probes torchvision at import; do that before stubbing)

    def stub(name, **attrs):
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)
        m.__dict__.update(attrs)
        return m

    misc = stub("torchvision.ops.misc", FrozenBatchNorm2d=type("FrozenBatchNorm2d", (torch.nn.Module,), {}))
    ops = stub("torchvision.ops", misc=misc)
    for name, mod in (("torchvision", stub("torchvision", ops=ops)), ("torchvision.ops", ops),
                      ("torchvision.ops.misc", misc)):
        monkeypatch.setitem(sys.modules, name, mod)
    yield
    for alias in [k for k in sys.modules if k.startswith("_megaflamingo_isolated_laion_clap")]:
        sys.modules.pop(alias, None)  # the isolated modules hold the stub; do not leak them
