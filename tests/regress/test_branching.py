"""Neon's `test_branching.py` / `test_branch_behind.py` scenarios (spec control-plane §2.11,
"Branching and history"): branches taken at recorded LSNs see exactly the rows committed before
them, bad branch points are refused with 406, and a branch may start at an LSN that is not a
record boundary."""

from __future__ import annotations

import pytest

from neon.utils.lsn import Lsn
from tests.fixtures.neon_fixtures import NeonEnv, NeonEnvBuilder, query_scalar, wait_for_last_flush_lsn
from tests.fixtures.neon_http import TimelineCreate406


def test_branch_behind(neon_env_builder: NeonEnvBuilder) -> None:
    """Insert 100, then 10 000, then 10 000 more rows recording LSNs; branch at the first two
    LSNs. Row counts per branch; bad branch points (before initdb, before a child's branch point,
    below the GC cutoff) refused with 406; the branches' data survives a GC with horizon 0."""
    # PITR off: nothing keeps history but the branch points themselves.
    neon_env_builder.pageserver_config_override = "tenant_config={pitr_interval = '0 sec'}"
    env = neon_env_builder.init_start()
    env.neon_cli.create_branch("test_branch_behind")
    main = env.endpoints.create_start("test_branch_behind")
    timeline = env.neon_cli.timeline_of("test_branch_behind")

    with main.cursor() as cur:
        cur.execute("CREATE TABLE foo (t text)")
        cur.execute("INSERT INTO foo SELECT 'long string to consume some space' || g FROM generate_series(1, 100) g")
        lsn_a = Lsn(query_scalar(cur, "SELECT pg_current_wal_insert_lsn()::text"))
        cur.execute("INSERT INTO foo SELECT 'long string to consume some space' || g FROM generate_series(1, 10000) g")
        lsn_b = Lsn(query_scalar(cur, "SELECT pg_current_wal_insert_lsn()::text"))
        cur.execute("INSERT INTO foo SELECT 'long string to consume some space' || g FROM generate_series(1, 10000) g")
        assert query_scalar(cur, "SELECT count(*) FROM foo") == 20100
    wait_for_last_flush_lsn(env, main, env.initial_tenant, timeline)

    env.neon_cli.create_branch("test_branch_behind_hundred", "test_branch_behind", ancestor_start_lsn=lsn_a)
    env.neon_cli.create_branch("test_branch_behind_more", "test_branch_behind", ancestor_start_lsn=lsn_b)
    hundred = env.endpoints.create_start("test_branch_behind_hundred")
    more = env.endpoints.create_start("test_branch_behind_more")
    assert hundred.safe_psql("SELECT count(*) FROM foo") == [(100,)]
    assert more.safe_psql("SELECT count(*) FROM foo") == [(10100,)]
    assert main.safe_psql("SELECT count(*) FROM foo") == [(20100,)]
    # A branch is writable and independent of its ancestor.
    hundred.safe_psql("INSERT INTO foo VALUES ('only on the hundred branch')")
    assert hundred.safe_psql("SELECT count(*) FROM foo") == [(101,)]
    assert main.safe_psql("SELECT count(*) FROM foo") == [(20100,)]

    http = env.pageserver.http_client()
    new_tl = env.neon_cli.timeline_of("test_branch_behind_more")
    # Before initdb on main; before the branch point on a child: both refused with 406.
    for ancestor in (timeline, new_tl):
        with pytest.raises(TimelineCreate406):
            http.timeline_create(
                env.pg_version, env.initial_tenant, "ab" * 16, ancestor_timeline_id=ancestor, ancestor_start_lsn="0/42"
            )
    # A static endpoint at a recorded LSN reads that history back from the pageserver.
    static = env.endpoints.create_start("test_branch_behind", lsn=lsn_a)
    assert static.safe_psql("SELECT count(*) FROM foo") == [(100,)]
    static.stop()

    # A GC with horizon 0 keeps what the branches need; branching below its cutoff is refused.
    http.timeline_checkpoint(env.initial_tenant, timeline)
    gc = http.timeline_gc(env.initial_tenant, timeline, gc_horizon=0)
    assert gc["layers_total"] >= gc["layers_removed"]
    with pytest.raises(TimelineCreate406):
        http.timeline_create(
            env.pg_version, env.initial_tenant, "cd" * 16, ancestor_timeline_id=timeline, ancestor_start_lsn=lsn_a
        )
    more.stop()
    assert hundred.safe_psql("SELECT count(*) FROM foo") == [(101,)]
    # A new compute on the branch reads its basebackup through the ancestor at the branch point.
    assert env.endpoints.create_start("test_branch_behind_more").safe_psql("SELECT count(*) FROM foo") == [(10100,)]
    assert main.safe_psql("SELECT count(*) FROM foo") == [(20100,)]


def test_branching_unnormalized_start_lsn(neon_simple_env: NeonEnv) -> None:
    """Branch at an LSN that is a multiple of 8 KiB but not a record boundary, just before the
    current flush LSN: branch creation, the compute's start and work on it succeed."""
    env = neon_simple_env
    env.neon_cli.create_branch("b0", "empty")
    endpoint0 = env.endpoints.create_start("b0")
    endpoint0.safe_psql("CREATE TABLE t AS SELECT g, repeat('x', 100) AS pad FROM generate_series(1, 20000) g")
    flush = wait_for_last_flush_lsn(env, endpoint0, env.initial_tenant, env.neon_cli.timeline_of("b0"))
    start_lsn = Lsn((int(flush) - 8192) // 8192 * 8192)
    env.neon_cli.create_branch("b1", "b0", ancestor_start_lsn=start_lsn)
    endpoint1 = env.endpoints.create_start("b1")
    endpoint1.safe_psql("CREATE TABLE u AS SELECT g FROM generate_series(1, 1000) g")
    assert endpoint1.safe_psql("SELECT count(*) FROM u") == [(1000,)]
