"""The real Slurm cluster (tests/cluster/up.sh), once per node count, torn down afterwards."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.launcher import cluster as slurm_cluster


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}nodes")
def cluster(request: pytest.FixtureRequest) -> Iterator[slurm_cluster.Cluster]:
    reason = slurm_cluster.missing_prerequisites()
    if reason:
        pytest.skip(reason)
    try:
        yield slurm_cluster.up(request.param)
    finally:
        slurm_cluster.down()
