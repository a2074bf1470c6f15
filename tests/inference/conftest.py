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


@pytest.fixture(scope="session")
def laion_checkpoint(tmp_path_factory):
    """What --rerank-clap / --rerank-tokenizer take, offline: a LAION-layout checkpoint with random
    weights (HTSAT-tiny audio tower without fusion, ~130 MB; a tiny RoBERTa text branch, ``text``)
    and the run-time RoBERTa-style tokenizer saved to a directory."""
    from megaflamingo.testing.clap import (LaionTextBranch, roberta_config, tiny_roberta_tokenizer, torchvision_stub,
                                           write_laion_checkpoint)

    work = tmp_path_factory.mktemp("laion")
    tok = tiny_roberta_tokenizer()
    tok.save_pretrained(str(work / "tokenizer"))
    text = LaionTextBranch(roberta_config(len(tok)), seed=3)
    with torchvision_stub():
        path = write_laion_checkpoint(work / "laion-random.pt", text, fusion=False, seed=5)
    return {"path": path, "tokenizer_dir": work / "tokenizer", "tokenizer": tok, "text": text}
