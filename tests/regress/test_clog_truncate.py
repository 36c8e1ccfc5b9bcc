"""Neon's `test_clog_truncate.py` (spec control-plane §2.11): after autovacuum has frozen every
database past CLOG segment 0000 and Postgres has removed `pg_xact/0000`, a branch taken later
must not bring that segment back. The pageserver learns of the removal only from the
`CLOG_TRUNCATE` WAL record, so this checks that ingest replays it and that the basebackup of the
new branch leaves the segment out.

Neon consumes 10 M XIDs; 1.2 M are enough here: one CLOG segment holds 32 pages x 32 768 XIDs
= 1 048 576 transactions, and segment 0000 can go once every database's `datfrozenxid` lies
beyond that.
"""

from __future__ import annotations

from pathlib import Path

from neon.utils.lsn import Lsn
from tests.fixtures.neon_fixtures import NeonEnvBuilder, query_scalar, wait_for_last_flush_lsn, wait_until
from tests.fixtures.neon_test_utils import install_test_utils

XIDS_TO_CONSUME = 1_200_000
CLOG_XACTS_PER_SEGMENT = 32 * 32768

# Autovacuum as eager as Postgres allows: every table of every database (template0 included, as it
# is not frozen against such a low limit) gets an anti-wraparound vacuum within seconds, and
# each vacuum advances the database's datfrozenxid, which is what lets Postgres truncate pg_xact.
AGGRESSIVE_AUTOVACUUM = [
    # One worker per database: postgres, template0, template1.
    "autovacuum_max_workers = 3",
    "autovacuum_naptime = 1s",
    "autovacuum_freeze_max_age = 100000",
    "autovacuum_vacuum_threshold = 0",
    "autovacuum_vacuum_insert_threshold = 0",
    "autovacuum_vacuum_cost_delay = 0",
    "autovacuum_vacuum_cost_limit = 10000",
]


def test_clog_truncate(neon_env_builder: NeonEnvBuilder) -> None:
    env = neon_env_builder.init_start()
    endpoint = env.endpoints.create_start("main", config_lines=AGGRESSIVE_AUTOVACUUM)
    install_test_utils(endpoint)
    pg_xact_0000 = endpoint.pgdata_dir / "pg_xact" / "0000"
    assert pg_xact_0000.exists()

    with endpoint.cursor() as cur:
        cur.execute(f"SELECT test_consume_xids({XIDS_TO_CONSUME})")
        next_xid = int(query_scalar(cur, "SELECT txid_current()"))
    assert next_xid > CLOG_XACTS_PER_SEGMENT, next_xid

    def segment_0000_removed(path: Path = pg_xact_0000) -> None:
        assert not path.exists(), f"{path} still exists"

    # Autovacuum freezes three databases' catalogs; on a loaded 2-core host this takes a while.
    wait_until(600, 0.5, segment_0000_removed)
    with endpoint.cursor() as cur:
        oldest = int(query_scalar(cur, "SELECT min(datfrozenxid::text::bigint) FROM pg_database"))
        assert oldest >= CLOG_XACTS_PER_SEGMENT, f"pg_xact/0000 is gone but datfrozenxid is {oldest}"
        # A checkpoint after the truncation, as Neon's test: the branch point lies past both.
        cur.execute("CHECKPOINT")
        lsn_after_truncation = Lsn(query_scalar(cur, "SELECT pg_current_wal_insert_lsn()::text"))
    wait_for_last_flush_lsn(env, endpoint, env.initial_tenant, env.initial_timeline)

    env.neon_cli.create_branch("test_clog_truncate_new", "main", ancestor_start_lsn=lsn_after_truncation)
    endpoint2 = env.endpoints.create_start("test_clog_truncate_new")
    new_pg_xact = endpoint2.pgdata_dir / "pg_xact"
    segments = sorted(p.name for p in new_pg_xact.iterdir())
    assert "0000" not in segments, f"the branch's basebackup brought back truncated pg_xact/0000: {segments}"
    # The segment holding the current XIDs is there, and the branch works on it.
    assert f"{next_xid // CLOG_XACTS_PER_SEGMENT:04X}" in segments, segments
    assert int(endpoint2.safe_psql("SELECT txid_current()")[0][0]) > next_xid
