"""Neon's `test_subxacts.py` (spec control-plane §2.11): transactions with many subtransactions —
far more than the 64 a backend's subxid cache holds, so they overflow into `pg_subtrans` — are
committed; their subtransactions' commits must reach the CLOG the pageserver serves. Our compute
keeps its own data directory, so the check is made on new endpoints, whose basebackups come from
the pageserver: all rows of committed subtransactions are there, none of rolled-back ones."""

from __future__ import annotations

from tests.fixtures.neon_fixtures import NeonEnv, query_scalar, wait_for_last_flush_lsn

N_XACTS = 4
N_SUBXACTS = 300  # > PGPROC_MAX_CACHED_SUBXIDS (64)


def test_subxacts(neon_simple_env: NeonEnv) -> None:
    env = neon_simple_env
    endpoint = env.endpoints.create_start("main")
    timeline = env.neon_cli.timeline_of("main")

    with endpoint.connect(autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE t1 (i int, j int)")
        cur.execute("SELECT pg_switch_wal()")
        for i in range(N_XACTS):
            cur.execute("BEGIN")
            for j in range(N_SUBXACTS):
                cur.execute(f"SAVEPOINT sp{j}")
                cur.execute(f"INSERT INTO t1 VALUES ({i}, {j})")
            assert query_scalar(cur, f"SELECT count(*) FROM t1 WHERE i = {i}") == N_SUBXACTS
            cur.execute("COMMIT")
        # One more with every third subtransaction rolled back: those rows must stay invisible.
        cur.execute("BEGIN")
        for j in range(N_SUBXACTS):
            cur.execute(f"SAVEPOINT sp{j}")
            cur.execute(f"INSERT INTO t1 VALUES ({N_XACTS}, {j})")
            if j % 3 == 0:
                cur.execute(f"ROLLBACK TO SAVEPOINT sp{j}")
        cur.execute("COMMIT")
        # And a whole transaction of subtransactions aborted at the top.
        cur.execute("BEGIN")
        for j in range(100):
            cur.execute(f"SAVEPOINT sp{j}")
            cur.execute(f"INSERT INTO t1 VALUES (-1, {j})")
        cur.execute("ROLLBACK")

    expected_kept = N_SUBXACTS - len(range(0, N_SUBXACTS, 3))
    expected = [(i, N_SUBXACTS, sum(range(N_SUBXACTS))) for i in range(N_XACTS)] + [
        (N_XACTS, expected_kept, sum(j for j in range(N_SUBXACTS) if j % 3))
    ]
    query = "SELECT i, count(*), sum(j) FROM t1 GROUP BY i ORDER BY i"
    assert endpoint.safe_psql(query) == expected

    # A branch at the tip, read through the pageserver, before the compute's shutdown checkpoint.
    wait_for_last_flush_lsn(env, endpoint, env.initial_tenant, timeline)
    env.neon_cli.create_branch("subxacts_branch", "main")
    branch_ep = env.endpoints.create_start("subxacts_branch")
    assert branch_ep.safe_psql(query) == expected
    # The branch is writable and its transactions get fresh xids.
    branch_ep.safe_psql("INSERT INTO t1 VALUES (100, 0)")
    assert branch_ep.safe_psql("SELECT count(*) FROM t1 WHERE i = 100") == [(1,)]

    # A new endpoint on main after the old one is stopped.
    endpoint.stop()
    fresh = env.endpoints.create_start("main")
    assert fresh.safe_psql(query) == expected
