"""Neon's `test_recovery.py` (spec control-plane §2.11): the pageserver crashes in the middle of a
layer flush (failpoints) while updates run, and after a restart its local state is consistent:
nothing committed is lost or doubled.

Our compute is stock Postgres with its own pages, so it keeps answering while the pageserver is
down (Neon's compute errors out, which is how Neon's update loop ends). The loop here ends when the
pageserver process has exited, and the data is checked where it depends on the pageserver: on a
fresh endpoint, whose basebackup comes from the restarted pageserver."""

from __future__ import annotations

from tests.fixtures.neon_fixtures import NeonEnvBuilder, wait_for_last_flush_lsn

ROWS = 20_000


def test_pageserver_recovery(neon_env_builder: NeonEnvBuilder) -> None:
    """1 MiB checkpoint distance; a table of rows; `flush-frozen-pausable=sleep(..)` and
    `flush-frozen-exit=exit` make the pageserver exit during a layer flush (its delta file written,
    the metadata not) while `UPDATE`s run. After a restart, `count(*)` is intact (and the sum
    reflects every committed update exactly once).

    Scaled down from Neon's 100 000 rows and a 2 s flush delay to 20 000 rows and 0.5 s: every
    update round is still a few MiB of WAL (several flushes), and the crash still comes in the
    middle of a flush with updates running; but far less WAL is written before the process exits,
    which the fresh endpoint's basebackup must replay through WAL redo (~30 s more at Neon's size).
    """
    # Layers are frozen and flushed every MiB of WAL: each update round flushes several.
    neon_env_builder.pageserver_config_override = "tenant_config={checkpoint_distance = 1048576}"
    env = neon_env_builder.init_start()
    env.neon_cli.create_branch("test_pageserver_recovery", "main")
    timeline = env.neon_cli.timeline_of("test_pageserver_recovery")
    endpoint = env.endpoints.create_start("test_pageserver_recovery")
    http = env.pageserver.http_client()

    with endpoint.cursor() as cur:
        cur.execute("CREATE TABLE foo (x bigint)")
        cur.execute(f"INSERT INTO foo SELECT g FROM generate_series(1, {ROWS}) g")
    # Neon sleeps here to let layers be written; what matters is that the pageserver has the rows.
    wait_for_last_flush_lsn(env, endpoint, env.initial_tenant, timeline)

    http.configure_failpoints([("flush-frozen-pausable", "sleep(500)"), ("flush-frozen-exit", "exit")])

    proc = env.pageserver.daemon.proc
    assert proc is not None
    updates = 0
    with endpoint.cursor() as cur:
        # Each round is several MiB of WAL; the first flush after the failpoints ends the process.
        while proc.poll() is None:
            assert updates < 30, "the pageserver did not exit at the flush failpoint"
            cur.execute("UPDATE foo SET x = x + 1")
            updates += 1
    assert proc.wait() == 1  # `exit`: status 1, as Rust's process::exit(1)
    assert env.pageserver.log_contains("Exit requested by failpoint")
    # The crash left a delta layer that the metadata does not cover: set aside at the next start.
    env.pageserver.stop()
    env.pageserver.start()
    # (Tenants load before the management API answers, so the line is there once start() returns.)
    assert env.pageserver.log_contains("layer from beyond disk_consistent_lsn, set aside")
    wait_for_last_flush_lsn(env, endpoint, env.initial_tenant, timeline)

    endpoint.stop()
    fresh = env.endpoints.create_start("test_pageserver_recovery")
    expected_sum = ROWS * (ROWS + 1) // 2 + updates * ROWS
    assert fresh.safe_psql("SELECT count(*), sum(x) FROM foo") == [(ROWS, expected_sum)]
