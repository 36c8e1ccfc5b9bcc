"""Neon's `test_readonly_node.py` scenarios (spec control-plane §2.11): static, read-only endpoints
anchored at historical LSNs of a branch (no new branch, no WAL proposer), served by the
pageserver's basebackup at that LSN and its page versions at that LSN; an LSN before initdb is
refused; history written as separate layers and read back after a pageserver restart."""

from __future__ import annotations

import pytest

from neon.utils.lsn import Lsn
from tests.fixtures.neon_fixtures import NeonEnv, query_scalar, wait_for_last_flush_lsn, wait_for_last_record_lsn

ROW = "'long string to consume some space' || g"


@pytest.mark.slow
def test_readonly_node(neon_simple_env: NeonEnv) -> None:
    """Static endpoints at the LSNs after 100, 200 100 and (main only) 400 100 rows see exactly
    those counts; one at the segment boundary 0/3000000 answers `SELECT 1`; one at 0/42 (before
    initdb) fails to start with "invalid basebackup lsn"."""
    env = neon_simple_env
    env.neon_cli.create_branch("test_readonly_node", "empty")
    main = env.endpoints.create_start("test_readonly_node")
    timeline = env.neon_cli.timeline_of("test_readonly_node")
    env.pageserver.allowed_errors.append(".*basebackup .* failed: invalid basebackup lsn.*")

    with main.cursor() as cur:
        cur.execute("CREATE TABLE foo (t text)")
        cur.execute(f"INSERT INTO foo SELECT {ROW} FROM generate_series(1, 100) g")
        lsn_a = Lsn(query_scalar(cur, "SELECT pg_current_wal_insert_lsn()::text"))
        # Enough WAL for a few 16 MB segments: the history spans segment boundaries.
        cur.execute(f"INSERT INTO foo SELECT {ROW} FROM generate_series(1, 200000) g")
        lsn_b = Lsn(query_scalar(cur, "SELECT pg_current_wal_insert_lsn()::text"))
        cur.execute(f"INSERT INTO foo SELECT {ROW} FROM generate_series(1, 200000) g")
        lsn_c = Lsn(query_scalar(cur, "SELECT pg_current_wal_insert_lsn()::text"))
    assert lsn_a < Lsn("0/3000000") < lsn_c, (lsn_a, lsn_c)
    # A static endpoint's basebackup waits for its LSN; waiting here keeps that wait short.
    wait_for_last_flush_lsn(env, main, env.initial_tenant, timeline)

    hundred = env.endpoints.create_start("test_readonly_node", endpoint_id="ep-readonly_node_hundred", lsn=lsn_a)
    more = env.endpoints.create_start("test_readonly_node", endpoint_id="ep-readonly_node_more", lsn=lsn_b)
    assert hundred.safe_psql("SELECT count(*) FROM foo") == [(100,)]
    assert more.safe_psql("SELECT count(*) FROM foo") == [(200100,)]
    assert main.safe_psql("SELECT count(*) FROM foo") == [(400100,)]
    # Read-only: a static endpoint has no WAL to write to.
    assert hundred.safe_psql("SHOW transaction_read_only") == [("on",)]

    boundary = env.endpoints.create_start(
        "test_readonly_node", endpoint_id="ep-branch_segment_boundary", lsn=Lsn("0/3000000")
    )
    assert boundary.safe_psql("SELECT 1") == [(1,)]

    with pytest.raises(Exception, match="invalid basebackup lsn"):
        env.endpoints.create_start("test_readonly_node", endpoint_id="ep-readonly_node_preinitdb", lsn=Lsn("0/42"))


@pytest.mark.slow
def test_timetravel(neon_simple_env: NeonEnv) -> None:
    """A table written at iteration 0 and rewritten 4 times, a pageserver checkpoint (a new layer)
    after each; after a pageserver restart a static endpoint at each recorded LSN sees every row
    at that iteration and none at another. Neon's table has 100 000 rows; 20 000 here (about
    110 heap pages per version, each version in layers of its own) keep the property while the
    test stays within its time budget on a shared 2-core host (100 000 took 43-86 s)."""
    env = neon_simple_env
    http = env.pageserver.http_client()
    env.neon_cli.create_branch("test_timetravel", "empty")
    endpoint = env.endpoints.create_start("test_timetravel")
    tenant = env.initial_tenant
    timeline = env.neon_cli.timeline_of("test_timetravel")
    rows = 20_000

    lsns: list[tuple[int, Lsn]] = []
    with endpoint.cursor() as cur:
        cur.execute("CREATE TABLE testtab (id serial PRIMARY KEY, iteration int, data text)")
        cur.execute(f"INSERT INTO testtab (iteration, data) SELECT 0, 'data' FROM generate_series(1, {rows})")
        lsns.append((0, Lsn(query_scalar(cur, "SELECT pg_current_wal_flush_lsn()::text"))))
    for i in range(1, 5):
        with endpoint.cursor() as cur:
            cur.execute(f"UPDATE testtab SET iteration = {i}")
            lsn = Lsn(query_scalar(cur, "SELECT pg_current_wal_flush_lsn()::text"))
        lsns.append((i, lsn))
        wait_for_last_record_lsn(http, tenant, timeline, lsn)
        # Flush the open layer: each version ends up in a layer file of its own.
        http.timeline_checkpoint(tenant, timeline)

    env.endpoints.stop_all()
    env.pageserver.stop()
    env.pageserver.start()

    for i, lsn in lsns:
        old = env.endpoints.create_start("test_timetravel", endpoint_id=f"ep-old_lsn_{i}", lsn=lsn)
        with old.cursor() as cur:
            assert query_scalar(cur, f"SELECT count(*) FROM testtab WHERE iteration = {i}") == rows
            assert query_scalar(cur, f"SELECT count(*) FROM testtab WHERE iteration <> {i}") == 0
        old.stop()
