"""Neon's `test_fullbackup.py` (spec control-plane §2.11): a `fullbackup <tenant> <timeline> <lsn>`
taken over the pageserver's libpq port, untarred into a fresh directory, starts as a vanilla
PostgreSQL 15 which sees the same rows as the endpoint at that LSN: the full backup holds all
relation data, not just what a lazily-fetching compute would need."""

from __future__ import annotations

import asyncio
import io
import tarfile
from pathlib import Path

import psycopg

from neon.postgres.pg_distrib import PgDistrib, PostgresUser
from neon.pq.client import connect
from neon.utils.lsn import Lsn
from tests.fixtures.neon_fixtures import PORT_DISTRIBUTOR, NeonEnvBuilder, query_scalar, wait_for_last_record_lsn

NUM_ROWS = 1000


async def _fetch_fullbackup(port: int, command: str) -> bytes:
    async with await connect(port=port, user="cloud_admin") as conn:
        stream = await conn.copy_out(command)
        chunks = [chunk async for chunk in stream]
        await stream.finish()
        return b"".join(chunks)


def test_fullbackup(neon_env_builder: NeonEnvBuilder, test_root: Path) -> None:
    env = neon_env_builder.init_start()
    # The endpoint stays up until the fullbackup is taken (Neon: so that the pageserver knows a
    # prev_record_lsn for the LSN).
    endpoint = env.endpoints.create_start("main")
    with endpoint.cursor() as cur:
        cur.execute(
            f"CREATE TABLE tbl AS SELECT g AS id, 'long string to consume some space' || g AS s"
            f" FROM generate_series(1, {NUM_ROWS}) g"
        )
        cur.execute("CREATE INDEX ON tbl (id)")
        cur.execute("CHECKPOINT")
        lsn = Lsn(query_scalar(cur, "SELECT pg_current_wal_insert_lsn()::text"))
    wait_for_last_record_lsn(env.pageserver.http_client(), env.initial_tenant, env.initial_timeline, lsn)
    # Rows after the LSN must not be in the backup.
    endpoint.safe_psql("INSERT INTO tbl VALUES (-1, 'after the backup LSN')")
    expected = endpoint.safe_psql("SELECT count(*), sum(id), md5(string_agg(s, ',' ORDER BY id)) FROM tbl WHERE id > 0")
    assert expected[0][0] == NUM_ROWS

    data = asyncio.run(
        _fetch_fullbackup(
            env.pageserver.daemon.pg_port, f"fullbackup {env.initial_tenant} {env.initial_timeline} {lsn}"
        )
    )

    user = PostgresUser.resolve()
    distrib = PgDistrib.default()
    restored = user.make_dir(test_root / "restored_datadir", 0o700)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        tar.extractall(restored, filter="fully_trusted")
    for p in [restored, *restored.rglob("*")]:
        user.own(p)
    pg_ctl = distrib.bin("pg_ctl")
    log = test_root / "restored.log"
    log.touch()
    user.own(log, 0o644)
    port = PORT_DISTRIBUTOR.get_port()
    opts = f"-p {port} -c listen_addresses='' -c unix_socket_directories={restored} -c fsync=off"
    user.run([pg_ctl, "-D", restored, "-l", log, "-o", opts, "-w", "-t", "60", "start"])
    try:
        with psycopg.connect(f"host={restored} port={port} user=cloud_admin dbname=postgres") as conn:
            got = conn.execute(
                "SELECT count(*), sum(id), md5(string_agg(s, ',' ORDER BY id)) FROM tbl WHERE id > 0"
            ).fetchall()
            assert got == expected
            # The row inserted after the backup LSN is absent; the index agrees with the heap.
            assert conn.execute("SELECT count(*) FROM tbl WHERE id = -1").fetchone() == (0,)
            conn.execute("SET enable_seqscan = off")
            assert conn.execute("SELECT s FROM tbl WHERE id = 500").fetchall() == [
                ("long string to consume some space500",)
            ]
            # It runs read-write: the backup's WAL start and pg_control let it take new writes.
            conn.execute("INSERT INTO tbl VALUES (0, 'written on the restored cluster')")
            conn.commit()
            conn.execute("CHECKPOINT")
            assert conn.execute("SELECT count(*) FROM tbl").fetchone() == (NUM_ROWS + 1,)
    finally:
        user.run([pg_ctl, "-D", restored, "-m", "fast", "-w", "-t", "60", "stop"], check=False)
