"""Fixtures for the preprocessing tests."""
from __future__ import annotations

import pytest
from tests.audio.audio_fixtures import make_folder


@pytest.fixture(scope="session")
def audio_folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("audio"))
