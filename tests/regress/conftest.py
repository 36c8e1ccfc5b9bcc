"""The fixtures Neon's regression tests take: `neon_env_builder` (a private builder to customise)
and `neon_simple_env` (a started environment: one pageserver, one safekeeper, the initial tenant
with branches `main` and `empty`). Both live under the test's `test_root`; at teardown everything
is stopped and the daemons' logs are checked against their `allowed_errors`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.neon_fixtures import NeonEnv, NeonEnvBuilder


@pytest.fixture
def neon_env_builder(test_root: Path) -> Iterator[NeonEnvBuilder]:
    """A builder whose environment lives in `<test_root>/repo`; torn down and log-checked after the test."""
    with NeonEnvBuilder(test_root / "repo", preserve_database_files=bool(os.environ.get("NEON_KEEP_TEST_ROOT"))) as b:
        yield b


@pytest.fixture
def neon_simple_env(neon_env_builder: NeonEnvBuilder) -> NeonEnv:
    """One pageserver, one safekeeper, the initial tenant with `main` and an `empty` branch of it."""
    env = neon_env_builder.init_start()
    env.neon_cli.create_branch("empty", ancestor_branch_name="main")
    return env
