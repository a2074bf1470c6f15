import pytest


@pytest.fixture
def data_root(tmp_path):
    return tmp_path / "data"
