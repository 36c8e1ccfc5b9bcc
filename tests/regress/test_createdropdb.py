"""Neon's `test_createdropdb.py` (spec control-plane §2.11): CREATE DATABASE after a relmapper
change, with both strategies, seen on a branch taken after it with the pageserver's database
size; DROP DATABASE, with branches before and after it."""

from __future__ import annotations

import pytest

from neon.utils.lsn import Lsn
from tests.fixtures.neon_fixtures import NeonEnv, query_scalar, wait_for_last_flush_lsn

REL_SIZES = """
    SELECT sum(pg_relation_size(oid, 'main')) + sum(pg_relation_size(oid, 'vm')) + sum(pg_relation_size(oid, 'fsm'))
    FROM pg_class WHERE relisshared IS false
"""


@pytest.mark.parametrize("strategy", ["file_copy", "wal_log"])
def test_createdb(neon_simple_env: NeonEnv, strategy: str) -> None:
    env = neon_simple_env
    env.neon_cli.create_branch("test_createdb", "empty")
    endpoint = env.endpoints.create_start("test_createdb")
    with endpoint.cursor() as cur:
        # A relmapper change in the original branch.
        cur.execute("VACUUM FULL pg_class")
        cur.execute(f"CREATE DATABASE foodb STRATEGY={strategy}")
        lsn = Lsn(query_scalar(cur, "SELECT pg_current_wal_insert_lsn()::text"))
        dboid = query_scalar(cur, "SELECT oid FROM pg_database WHERE datname = 'foodb'")

    env.neon_cli.create_branch("test_createdb2", "test_createdb", ancestor_start_lsn=lsn)
    endpoint2 = env.endpoints.create_start("test_createdb2")
    wait_for_last_flush_lsn(env, endpoint, env.initial_tenant, endpoint.timeline_id)  # type: ignore[arg-type]

    # The new database is there on both branches, and its size (as the pageserver defines it —
    # what Neon's compute answers for pg_database_size) is the sum of its non-shared relations.
    for ep in (endpoint, endpoint2):
        with ep.cursor(dbname="foodb") as cur:
            rel_sizes = int(query_scalar(cur, REL_SIZES))
        assert ep.tenant_id is not None and ep.timeline_id is not None
        assert env.pageserver.db_size(ep.tenant_id, ep.timeline_id, dboid) == rel_sizes, ep


def test_dropdb(neon_simple_env: NeonEnv) -> None:
    env = neon_simple_env
    env.neon_cli.create_branch("test_dropdb", "empty")
    endpoint = env.endpoints.create_start("test_dropdb")
    with endpoint.cursor() as cur:
        cur.execute("CREATE DATABASE foodb")
        lsn_before_drop = Lsn(query_scalar(cur, "SELECT pg_current_wal_insert_lsn()::text"))
        dboid = query_scalar(cur, "SELECT oid FROM pg_database WHERE datname = 'foodb'")
    with endpoint.cursor() as cur:
        cur.execute("DROP DATABASE foodb")
        cur.execute("CHECKPOINT")
        lsn_after_drop = Lsn(query_scalar(cur, "SELECT pg_current_wal_insert_lsn()::text"))

    env.neon_cli.create_branch("test_before_dropdb", "test_dropdb", ancestor_start_lsn=lsn_before_drop)
    endpoint_before = env.endpoints.create_start("test_before_dropdb")
    env.neon_cli.create_branch("test_after_dropdb", "test_dropdb", ancestor_start_lsn=lsn_after_drop)
    endpoint_after = env.endpoints.create_start("test_after_dropdb")

    # The database exists on the branch before the drop, with its directory...
    endpoint_before.connect(dbname="foodb").close()
    assert (endpoint_before.pgdata_dir / "base" / str(dboid)).is_dir()
    # ... and has no directory on the branch after it.
    assert not (endpoint_after.pgdata_dir / "base" / str(dboid)).exists()
