import pytest

from megaflamingo.testing import sounds as synthetic


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
