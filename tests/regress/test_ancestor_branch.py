"""Neon's `test_ancestor_branch.py` (spec control-plane §2.11, "Branching and history"): a chain of
branches main → branch1 → branch2, each written at its ancestor's tip while frozen-layer flushes
lag behind ingest (a failpoint slows every flush), then a manual compaction of the middle branch.
Every branch sees its own rows and all of its ancestors' rows up to its branch point.

Our compute is stock Postgres with its own pages, so the counts on the running computes (Neon's
asserts) are also taken where they depend on the pageserver: on static endpoints at each branch's
tip, whose basebackups the pageserver builds by reading through the ancestor chain."""

from __future__ import annotations

import pytest

from neon.utils.lsn import Lsn
from tests.fixtures.neon_fixtures import NeonEnvBuilder, query_scalar, wait_for_last_flush_lsn

ROWS = 20_000
CHECKPOINT_DISTANCE = 1024 * 1024
FLUSH_DELAY_MS = 3000


@pytest.mark.slow
def test_ancestor_branch(neon_env_builder: NeonEnvBuilder) -> None:
    """A tenant with no background GC or compaction and `flush-frozen-pausable=sleep(..)`; main,
    branch1 at main's tip, branch2 at branch1's tip, each inserting ROWS rows; compaction of
    branch1. `count(*)` is ROWS / 2·ROWS / 3·ROWS on the three computes (and at the three tips).

    Scaled down from Neon's 100 000 rows per branch, 4 MiB checkpoint distance and 10 s flush delay
    to 20 000 rows, 1 MiB and 3 s: each branch's WAL still spans two frozen layers, and their
    flushes still lag behind ingest while the next branch is created and written (checked below)."""
    env = neon_env_builder.init_start()
    http = env.pageserver.http_client()
    # Background GC and compaction off: only the explicit compaction below runs.
    tenant, _ = env.neon_cli.create_tenant(
        conf={"checkpoint_distance": CHECKPOINT_DISTANCE, "gc_period": "0s", "compaction_period": "0s"}
    )
    http.configure_failpoints(("flush-frozen-pausable", f"sleep({FLUSH_DELAY_MS})"))

    def insert_rows(cur: object, branch: str) -> Lsn:
        cur.execute(  # type: ignore[attr-defined]
            f"INSERT INTO foo SELECT '00112233445566778899AABBCCDDEEFF' || %s || g FROM generate_series(1, {ROWS}) g",
            (f":{branch}:",),
        )
        return Lsn(query_scalar(cur, "SELECT pg_current_wal_insert_lsn()::text"))  # type: ignore[arg-type]

    def assert_flushes_lag(branch: str, endpoint: object) -> None:
        # More than a checkpoint distance ingested but not yet on disk: frozen layers are waiting.
        timeline = env.neon_cli.timeline_of(branch, tenant)
        wait_for_last_flush_lsn(env, endpoint, tenant, timeline)  # type: ignore[arg-type]
        detail = http.timeline_detail(tenant, timeline)
        lag = Lsn(detail["last_record_lsn"]) - Lsn(detail["disk_consistent_lsn"])
        assert lag > CHECKPOINT_DISTANCE, f"{branch}: flushes do not lag ({detail})"

    ep0 = env.endpoints.create_start("main", tenant_id=tenant)
    cur0 = ep0.connect().cursor()
    cur0.execute("CREATE TABLE foo (t text) WITH (autovacuum_enabled = off)")
    lsn_100 = insert_rows(cur0, "branch0")
    assert_flushes_lag("main", ep0)

    env.neon_cli.create_branch("branch1", "main", tenant_id=tenant, ancestor_start_lsn=lsn_100)
    ep1 = env.endpoints.create_start("branch1", tenant_id=tenant)
    cur1 = ep1.connect().cursor()
    lsn_200 = insert_rows(cur1, "branch1")
    assert_flushes_lag("branch1", ep1)

    env.neon_cli.create_branch("branch2", "branch1", tenant_id=tenant, ancestor_start_lsn=lsn_200)
    ep2 = env.endpoints.create_start("branch2", tenant_id=tenant)
    cur2 = ep2.connect().cursor()
    lsn_300 = insert_rows(cur2, "branch2")
    assert_flushes_lag("branch2", ep2)

    http.timeline_compact(tenant, env.neon_cli.timeline_of("branch1", tenant))

    assert query_scalar(cur0, "SELECT count(*) FROM foo") == ROWS
    assert query_scalar(cur1, "SELECT count(*) FROM foo") == 2 * ROWS
    assert query_scalar(cur2, "SELECT count(*) FROM foo") == 3 * ROWS

    # The same through the pageserver, at each tip: branch2's pages come from three timelines.
    for branch, lsn, rows in (("main", lsn_100, ROWS), ("branch1", lsn_200, 2 * ROWS), ("branch2", lsn_300, 3 * ROWS)):
        static = env.endpoints.create_start(branch, tenant_id=tenant, lsn=lsn)
        per_branch = static.safe_psql("SELECT split_part(t, ':', 2), count(*) FROM foo GROUP BY 1 ORDER BY 1")
        assert sum(n for _, n in per_branch) == rows, (branch, per_branch)
        assert all(n == ROWS for _, n in per_branch), (branch, per_branch)
        static.stop()
