"""Neon's `test_fsm_truncate.py` (spec control-plane §2.11): TRUNCATE of small or empty tables,
which have no free-space map yet. When the table was created in the same transaction, Postgres
truncates it in place and WAL-logs an SMGR truncate of every fork, the FSM included, although no
FSM fork exists: the pageserver must take that record without an error.

Besides the statements succeeding, a new compute (its basebackup and pages from the pageserver)
sees the tables empty and usable.
"""

from __future__ import annotations

from tests.fixtures.neon_fixtures import NeonEnv, wait_for_last_flush_lsn


def test_fsm_truncate(neon_simple_env: NeonEnv) -> None:
    env = neon_simple_env
    env.neon_cli.create_branch("test_fsm_truncate")
    endpoint = env.endpoints.create_start("test_fsm_truncate")
    timeline = env.neon_cli.timeline_of("test_fsm_truncate")

    # Neon's statements: two empty tables, truncated (a new relfilenode each).
    endpoint.safe_psql_many(
        ["CREATE TABLE t1 (key int)", "CREATE TABLE t2 (key int)", "TRUNCATE TABLE t1", "TRUNCATE TABLE t2"]
    )
    # Created, filled and truncated in one transaction: truncated in place, with an SMGR truncate
    # record that names the (absent) FSM and VM forks.
    with endpoint.connect(autocommit=False) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE t3 (key int)")
        cur.execute("INSERT INTO t3 SELECT generate_series(1, 1000)")
        cur.execute("CREATE TABLE t4 (key int)")
        cur.execute("TRUNCATE TABLE t3, t4")
        conn.commit()
    endpoint.safe_psql("INSERT INTO t1 VALUES (1)")
    wait_for_last_flush_lsn(env, endpoint, env.initial_tenant, timeline)
    endpoint.stop()

    again = env.endpoints.create_start("test_fsm_truncate")
    assert again.safe_psql(
        "SELECT (SELECT count(*) FROM t1), (SELECT count(*) FROM t2), (SELECT count(*) FROM t3)"
    ) == [(1, 0, 0)]
    again.safe_psql_many(["INSERT INTO t3 VALUES (3)", "INSERT INTO t4 VALUES (4)", "TRUNCATE TABLE t1, t2"])
    assert again.safe_psql(
        "SELECT (SELECT count(*) FROM t1), (SELECT sum(key) FROM t3), (SELECT sum(key) FROM t4)"
    ) == [(0, 3, 4)]
