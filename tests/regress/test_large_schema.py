"""Neon's `test_large_schema.py` (spec control-plane §2.11): a schema of two partitioned tables
with 1000 partitions each, built across compute restarts with a `VACUUM FULL` of the database
after each table. Every new relation rewrites the database's relation directory, one key, and
`VACUUM FULL` rewrites every catalog: the pageserver must still split what it writes into layers
of bounded size (Neon once wrote multi-gigabyte layers filled by that one key).

Asserted: the row counts, an index-ordered scan of the grown `pg_depend`, both on the working
compute and on a fresh one whose basebackup and pages come from the pageserver, and every layer
file in the timeline directory under 512 MB.
"""

from __future__ import annotations

import pytest

from neon.pageserver.layers.layer_name import try_parse_layer_file_name
from tests.fixtures.neon_fixtures import Endpoint, NeonEnvBuilder, wait_for_last_flush_lsn

TABLES = 2
PARTITIONS = 1000
PARTITIONS_PER_COMMIT = 50
MAX_LAYER_FILE_SIZE = 512_000_000


def check_schema(endpoint: Endpoint) -> None:
    """Each partitioned table has one row per partition; `pg_depend` reads back in index order."""
    with endpoint.cursor() as cur:
        for i in range(1, TABLES + 1):
            cur.execute(f"SELECT count(*), count(DISTINCT tableoid) FROM t_{i}")
            assert cur.fetchone() == (PARTITIONS, PARTITIONS)
        cur.execute("SELECT count(*) FROM pg_depend")
        row = cur.fetchone()
        assert row is not None
        expected = row[0]
        # Every partition adds dependencies: the catalog is large, not merely readable.
        assert expected > TABLES * PARTITIONS, expected
        # No sort: the ordered scan has to go through pg_depend's index.
        cur.execute("SET enable_sort = off")
        cur.execute("SELECT * FROM pg_depend ORDER BY refclassid, refobjid, refobjsubid")
        assert len(cur.fetchall()) == expected


@pytest.mark.slow
def test_large_schema(neon_env_builder: NeonEnvBuilder) -> None:
    env = neon_env_builder.init_start()
    endpoint = env.endpoints.create_start("main")

    for i in range(1, TABLES + 1):
        # A restart per table, as Neon's test (modelled on a customer's workload) does.
        endpoint.stop()
        endpoint.start()
        with endpoint.cursor() as cur:
            cur.execute(f"CREATE TABLE t_{i} (pk integer) PARTITION BY RANGE (pk)")
            # Neon commits each CREATE; batches keep the commits (a safekeeper round trip each)
            # few. The pageserver sees the same relation creations either way.
            for first in range(1, PARTITIONS + 1, PARTITIONS_PER_COMMIT):
                last = min(first + PARTITIONS_PER_COMMIT, PARTITIONS + 1)
                cur.execute(
                    "BEGIN;"
                    + "".join(
                        f"CREATE TABLE p_{i}_{j} PARTITION OF t_{i} FOR VALUES FROM ({j}) TO ({j + 1});"
                        for j in range(first, last)
                    )
                    + "COMMIT"
                )
            cur.execute(f"INSERT INTO t_{i} SELECT generate_series(1, {PARTITIONS})")
            # VACUUM FULL commits once per relation, some 2000 times here: without waiting for the
            # safekeepers at each commit. The pageserver gets the same WAL.
            cur.execute("SET synchronous_commit = off")
            cur.execute("VACUUM FULL")

    check_schema(endpoint)
    wait_for_last_flush_lsn(env, endpoint, env.initial_tenant, env.initial_timeline)
    endpoint.stop()
    check_schema(env.endpoints.create_start("main"))

    # Everything ingested goes to layer files, so that all of it is measured.
    env.pageserver.http_client().timeline_checkpoint(env.initial_tenant, env.initial_timeline)
    timeline_dir = env.pageserver.timeline_dir(env.initial_tenant, env.initial_timeline)
    sizes = {p.name: p.stat().st_size for p in timeline_dir.iterdir() if try_parse_layer_file_name(p.name)}
    assert sizes, f"no layer files in {timeline_dir}"
    too_big = {name: size for name, size in sizes.items() if size >= MAX_LAYER_FILE_SIZE}
    assert not too_big, f"layer files of 512 MB or more: {too_big}"
