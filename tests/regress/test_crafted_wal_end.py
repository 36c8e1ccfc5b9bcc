"""Neon's `test_crafted_wal_end.py` (spec control-plane §2.11): the pageserver and the safekeeper are
restarted while the timeline's WAL ends in a crafted shape (`neon.postgres.wal_craft`: a record
crossing a segment boundary, an XLOG_SWITCH at the end, …), then twice more with inserts in
between; the sums stay exact (5050 → 20100 → 45150).

The crafted WAL leaves the compute as any other WAL: its walsender streams it to the WAL proposer,
which hands it to the safekeeper, from which the pageserver ingests it. Our compute is stock
Postgres and answers the SELECTs from its own pages, so beyond Neon's asserts the test waits for
the safekeeper and the pageserver to hold the crafted tail before restarting them, and reads the
final sum on a fresh endpoint whose basebackup comes from the pageserver.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from neon.postgres import wal_craft
from neon.postgres.constants import DEFAULT_WAL_SEGMENT_SIZE
from neon.postgres.errors import WalDecodeError
from neon.postgres.walfiles import read_wal_files
from neon.postgres.walformat import parse_wal_file_name, skip_page_header
from neon.utils.id import TenantId, TimelineId
from neon.utils.lsn import Lsn
from tests.fixtures.neon_fixtures import (
    Endpoint,
    NeonEnv,
    NeonEnvBuilder,
    wait_for_last_flush_lsn,
    wait_for_last_record_lsn,
    wait_until,
)

SHAPES = [
    "simple",
    "last_wal_record_xlog_switch",
    "last_wal_record_xlog_switch_ends_on_page_boundary",
    "last_wal_record_crossing_segment",
    "wal_record_crossing_segment_followed_by_small_one",
]


def restart_storage(env: NeonEnv, tenant: TenantId, timeline: TimelineId, wal_end: Lsn) -> None:
    """Neon's order: pageserver down, safekeeper down and up, pageserver up. The restarted
    safekeeper finds the end of its WAL on disk: all of the WAL it had acknowledged, `wal_end`
    (the proposer would make up for a shortfall, hiding the loss from the SELECTs)."""
    env.pageserver.stop()
    env.safekeepers[0].stop()
    env.safekeepers[0].start()
    flush = env.safekeepers[0].http_client().timeline_status(tenant, timeline).flush_lsn
    assert flush >= wal_end, f"the restarted safekeeper lost WAL: flush_lsn {flush} < {wal_end}"
    env.pageserver.start()


def safekeeper_records(env: NeonEnv, tenant: TenantId, timeline: TimelineId, start: Lsn) -> list[tuple[int, int]]:
    """(start, end) of the records in the safekeeper's segment files from `start` (a record
    boundary) to the end of its WAL; `.partial` preferred, as the safekeeper itself reads them."""
    sk = env.safekeepers[0]
    tl_dir = sk.timeline_dir(tenant, timeline)
    by_segno: dict[int, Path] = {}
    for name in sk.list_segments(tenant, timeline):
        segno = parse_wal_file_name(name)[1]
        if segno >= start // DEFAULT_WAL_SEGMENT_SIZE and (segno not in by_segno or name.endswith(".partial")):
            by_segno[segno] = tl_dir / name
    records: list[tuple[int, int]] = []
    try:
        for rec_start, rec_end, _ in read_wal_files([by_segno[n] for n in sorted(by_segno)], start_lsn=start):
            records.append((rec_start, rec_end))
    except WalDecodeError:
        pass  # the zeroed rest of the last segment: the end of the stored WAL
    return records


def sums_around_insert(endpoint: Endpoint, first_key: int) -> tuple[int, int]:
    """(sum before, sum after) inserting keys first_key .. first_key + 99."""
    res = endpoint.safe_psql_many(
        [
            "SELECT sum(key) FROM keys",
            f"INSERT INTO keys SELECT generate_series({first_key}, {first_key + 99})",
            "SELECT sum(key) FROM keys",
        ]
    )
    return res[0][0][0], res[-1][0][0]


@pytest.mark.slow  # ~20 s each on an idle host, up to 50 s on a loaded one (two storage restarts)
@pytest.mark.parametrize("wal_type", SHAPES)
def test_crafted_wal_end(neon_env_builder: NeonEnvBuilder, wal_type: str) -> None:
    env = neon_env_builder.init_start()
    env.neon_cli.create_branch("test_crafted_wal_end")
    tenant = env.initial_tenant
    timeline = env.neon_cli.timeline_of("test_crafted_wal_end")
    endpoint = env.endpoints.create("test_crafted_wal_end", config_lines=wal_craft.required_postgres_config())
    endpoint.start()
    res = endpoint.safe_psql_many(
        [
            "CREATE TABLE keys (key int PRIMARY KEY)",
            "INSERT INTO keys SELECT generate_series(1, 100)",
            "SELECT sum(key) FROM keys",
        ]
    )
    assert res[-1] == [(5050,)]

    with endpoint.connect() as conn:
        crafted = wal_craft.craft(conn, wal_type)

    # The restarts happen with the WAL ending in the crafted shape: the safekeeper has all of it,
    # up to the compute's flush LSN (the crafted end, or a background record Postgres wrote since),
    # and so has the pageserver.
    sk_http = env.safekeepers[0].http_client()

    def safekeeper_caught_up() -> Lsn:
        compute_flush = Lsn(endpoint.safe_psql("SELECT pg_current_wal_flush_lsn()::text")[0][0])
        flush = sk_http.timeline_status(tenant, timeline).flush_lsn
        assert flush == compute_flush >= crafted.end_lsn, f"safekeeper flush_lsn {flush}, compute {compute_flush}"
        return flush

    wait_until(600, 0.1, safekeeper_caught_up)
    # Its segment files hold the crafted records intact, one of them ending at the crafted end.
    stored = safekeeper_records(env, tenant, timeline, skip_page_header(crafted.initial_lsn))
    assert set(crafted.record_lsns) <= {start for start, _ in stored}
    assert crafted.end_lsn in {end for _, end in stored}
    wait_for_last_record_lsn(env.pageserver.http_client(), tenant, timeline, crafted.end_lsn)

    restart_storage(env, tenant, timeline, crafted.end_lsn)
    assert sums_around_insert(endpoint, 101) == (5050, 20100)

    restart_storage(env, tenant, timeline, wait_for_last_flush_lsn(env, endpoint, tenant, timeline))
    assert sums_around_insert(endpoint, 201) == (20100, 45150)

    # The pageserver ingested through the crafted tail and everything after it.
    wait_for_last_flush_lsn(env, endpoint, tenant, timeline)
    endpoint.stop()
    fresh = env.endpoints.create_start("test_crafted_wal_end")
    assert fresh.safe_psql("SELECT sum(key), count(*) FROM keys") == [(45150, 300)]
