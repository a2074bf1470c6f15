"""Fixtures for the launcher tests: a real throw-away Slurm cluster, the SynthTiny data, and the
environment a launched job needs (the virtualenv's scripts on PATH, no hub, one thread per rank)."""
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.launch.slurm_cluster import SlurmCluster, unavailable_reason


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """``<root>/SynthTiny-EventClassification/{train,val}``, the data of configs/tiny_cpu.yaml."""
    from megaflamingo.testing.tiny_task import write_tiny_dataset

    root = tmp_path_factory.mktemp("synth_tiny")
    write_tiny_dataset(root)
    return root


@pytest.fixture(scope="module")
def slurm_cluster():
    """munge + slurmctld + slurmd node1/node2, up until the module's tests are done; torn down by PID."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    # Not under pytest's 0700 tmp tree: munged runs as the 'munge' user and must reach its directory.
    # Short, too: the daemons' sockets live under it (sun_path is limited to 108 bytes).
    root = tempfile.mkdtemp(prefix="mf-slurm-")
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
