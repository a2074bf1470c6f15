import pytest

from megaflamingo import synthetic


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny model trained (in-process, ~30 s) on the synthetic 8-class set, exported to a dir."""
    from .helpers import embed_splits, train_and_export

    root = tmp_path_factory.mktemp("infer")
    data = root / "data"
    ds = synthetic.generate(data, synthetic.SplitSizes(train=12, val=0, test=3), max_s=10.0)
    embed_splits(data, root / "arrow", ("train", "test"), embed_dim=64)
    model = train_and_export(root / "arrow", root / "model", embed_dim=64, fewshot=4, steps=160)
    return {"root": root, "data": data, "arrow": root / "arrow", "model": model, "ds": ds}


@pytest.fixture
def torchvision_stub(monkeypatch):
    """As tests/preprocess: LAION-CLAP's htsat imports `torchvision.ops.misc.FrozenBatchNorm2d` (only
    for freezing); torchvision cannot be imported on these CPU machines, so tests provide that name."""
    import importlib.machinery
    import sys
    import types

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
        sys.modules.pop(alias, None)
