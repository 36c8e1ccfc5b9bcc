from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.vanilla import VanillaPostgres, make_test_root
from tests.storage_oracle import WorkloadRun, run_storage_workload


@pytest.fixture
def test_root(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A per-test scratch directory the unprivileged Postgres user can use."""
    root = make_test_root(prefix=f"neon-{request.node.name[:40]}-")
    yield root
    if os.environ.get("NEON_KEEP_TEST_ROOT"):
        print(f"kept test root {root}")  # for reading the daemons' logs after a failure
        return
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def vanilla_pg(test_root: Path) -> Iterator[VanillaPostgres]:
    """An initialised (not started) stock PG15 cluster; stopped at teardown."""
    pg = VanillaPostgres(test_root / "vanilla").init()
    yield pg
    pg.cleanup()


@pytest.fixture(scope="session")
def storage_workload() -> Iterator[WorkloadRun]:
    """One run of the storage oracle workload (snapshots A and B and the WAL), shared by the session."""
    root = make_test_root(prefix="neon-storage-oracle-")
    try:
        yield run_storage_workload(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
