"""Neon's `test_pageserver_restart.py` (spec control-plane §2.11): the pageserver is restarted,
gracefully and by a kill, while the safekeepers and the compute keep running; nothing committed
is lost. Our compute is stock Postgres, which keeps its own pages, so "survives" is also checked
where it matters here: on a fresh endpoint, whose basebackup comes from the restarted pageserver."""

from __future__ import annotations

from tests.fixtures.neon_fixtures import NeonEnvBuilder, wait_for_last_flush_lsn

# Neon's computes run with 1 MB of shared_buffers, so the table outgrows them.
SMALL_BUFFERS = ["shared_buffers = 1MB"]


def test_pageserver_restart(neon_env_builder: NeonEnvBuilder) -> None:
    env = neon_env_builder.init_start()
    env.neon_cli.create_branch("test_pageserver_restart")
    endpoint = env.endpoints.create_start("test_pageserver_restart", config_lines=SMALL_BUFFERS)
    timeline = env.neon_cli.timeline_of("test_pageserver_restart")

    with endpoint.cursor() as cur:
        cur.execute("CREATE TABLE foo (t text)")
        cur.execute("INSERT INTO foo SELECT 'long string to consume some space' || g FROM generate_series(1, 30000) g")
        # The table is larger than shared_buffers.
        cur.execute(
            "SELECT setting::int * pg_size_bytes(unit), pg_relation_size('foo')"
            " FROM pg_settings WHERE name = 'shared_buffers'"
        )
        row = cur.fetchone()
        assert row is not None and int(row[0]) < int(row[1]), row

    # Graceful restart; the compute keeps running and is reachable on a new connection.
    env.pageserver.stop()
    # Commits go on without a pageserver: the safekeepers hold the WAL.
    endpoint.safe_psql("INSERT INTO foo SELECT 'while the pageserver is down' || g FROM generate_series(1, 1000) g")
    env.pageserver.start()
    assert endpoint.safe_psql("SELECT count(*) FROM foo") == [(31000,)]
    wait_for_last_flush_lsn(env, endpoint, env.initial_tenant, timeline)

    # A kill and a restart: the pageserver re-reads the WAL it lost from the safekeepers.
    endpoint.safe_psql("INSERT INTO foo SELECT 'before the kill' || g FROM generate_series(1, 1000) g")
    env.pageserver.stop(immediate=True)
    env.pageserver.start()
    wait_for_last_flush_lsn(env, endpoint, env.initial_tenant, timeline)
    endpoint.stop()
    again = env.endpoints.create_start("test_pageserver_restart")
    assert again.safe_psql("SELECT count(*) FROM foo") == [(32000,)]


def test_pageserver_chaos(neon_env_builder: NeonEnvBuilder) -> None:
    """Rounds of "update every row" each followed by a kill and restart of the pageserver: after
    each round the sum of updates is exact (acknowledged WAL is re-streamed from the safekeepers
    from disk_consistent_lsn)."""
    env = neon_env_builder.init_start()
    # Expected after an abrupt stop (Neon allows the same).
    env.pageserver.allowed_errors.append(".*found future (image|delta) layer.*")
    # A small checkpoint distance: layers are flushed often.
    tenant, _ = env.neon_cli.create_tenant(conf={"checkpoint_distance": 1000000})
    env.neon_cli.create_timeline("test_pageserver_chaos", tenant_id=tenant)
    endpoint = env.endpoints.create_start("test_pageserver_chaos", tenant_id=tenant, config_lines=SMALL_BUFFERS)
    timeline = env.neon_cli.timeline_of("test_pageserver_chaos", tenant)
    with endpoint.cursor() as cur:
        cur.execute("CREATE TABLE foo (id int, t text, updates int)")
        cur.execute("CREATE INDEX ON foo (id)")
        cur.execute(
            "INSERT INTO foo SELECT g, 'long string to consume some space' || g, 0 FROM generate_series(1, 5000) g"
        )

    rounds = 3
    for i in range(1, rounds + 1):
        endpoint.safe_psql("UPDATE foo SET updates = updates + 1")
        # A crash.
        env.pageserver.stop(immediate=True)
        env.pageserver.start()
        assert endpoint.safe_psql("SELECT sum(updates) FROM foo") == [(i * 5000,)]
    wait_for_last_flush_lsn(env, endpoint, tenant, timeline)
    endpoint.stop()
    check = env.endpoints.create_start("test_pageserver_chaos", tenant_id=tenant)
    assert check.safe_psql("SELECT sum(updates), count(*) FROM foo") == [(rounds * 5000, 5000)]
