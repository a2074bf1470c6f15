import pytest

from .builders import batch, build


@pytest.fixture
def make_model():
    return build


@pytest.fixture
def make_batch():
    return batch
