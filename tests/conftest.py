"""Suite-wide fixtures: every test runs with the hub guard on and a private HOME-like cache."""
import os

import pytest

# Before anything imports huggingface_hub (``import megaflamingo`` does): it reads the offline switch once.
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")

from megaflamingo.testing import no_hub  # noqa: E402

no_hub()


@pytest.fixture(scope="session")
def tiny_tok():
    from megaflamingo.testing import tiny_tokenizer

    return tiny_tokenizer("opt")


@pytest.fixture(scope="session")
def tiny_token_ids(tiny_tok):
    from megaflamingo.testing import token_ids

    return token_ids(tiny_tok)


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    # Two cores shared by many processes: keep torch from oversubscribing in each test.
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))


@pytest.fixture
def torchvision_stub():
    """LAION-CLAP's htsat imports `torchvision.ops.misc.FrozenBatchNorm2d` (only for freezing,
    never for inference); torchvision cannot be imported on these CPU machines (only CUDA builds exist here),
    so tests (preprocessing and inference) provide that one name."""
    from megaflamingo.testing.clap import torchvision_stub

    with torchvision_stub():
        yield
