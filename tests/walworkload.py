"""A varied PG15 workload whose WAL exercises every record shape the decoder must handle."""

from __future__ import annotations

import threading

from neon.utils.lsn import Lsn
from tests.fixtures.vanilla import VanillaPostgres

WAL_SEGMENT_SIZE = 16 * 1024 * 1024

# Keep every segment: the tests read the whole WAL after a clean stop.
WORKLOAD_CONFIG = [
    "wal_keep_size = '4GB'",
    "max_wal_size = '4GB'",
    "max_prepared_transactions = 5",
    "autovacuum = off",
]


def run_varied_workload(pg: VanillaPostgres, *, pgbench_scale: int = 1, pgbench_txns: int = 300) -> None:
    sql = pg.safe_psql
    pg.pgbench(["-i", "-s", str(pgbench_scale), "-q"])
    sql("CHECKPOINT")  # the run below then starts with full-page images
    pg.pgbench(["-c", "2", "-t", str(pgbench_txns), "-n"])

    sql("CREATE DATABASE db_wal_log STRATEGY WAL_LOG")
    sql("CREATE DATABASE db_file_copy STRATEGY FILE_COPY")
    sql("CREATE TABLE t_in_db (x int); INSERT INTO t_in_db VALUES (1)", dbname="db_wal_log")
    sql("DROP DATABASE db_file_copy")

    statements = (
        "CREATE TABLE docs (id serial PRIMARY KEY, body text, tags text[], pos point, ts tsvector);"
        "INSERT INTO docs (body, tags, pos, ts) SELECT md5(g::text), ARRAY[md5(g::text), 'x' || g % 7],"
        " point(g % 100, g / 100), to_tsvector('simple', md5(g::text)) FROM generate_series(1, 3000) g;"
        "CREATE INDEX docs_gin ON docs USING gin (tags);"
        "CREATE INDEX docs_gist ON docs USING gist (pos);"
        "CREATE INDEX docs_brin ON docs USING brin (id);"
        "CREATE INDEX docs_hash ON docs USING hash (body);"
        "CREATE INDEX docs_spgist ON docs USING spgist (pos);"
        "CREATE INDEX docs_ts ON docs USING gin (ts);"
        "UPDATE docs SET body = body || 'u' WHERE id % 5 = 0;"
        "DELETE FROM docs WHERE id % 7 = 0;"
        "VACUUM docs;"
        "CREATE SEQUENCE s1; SELECT nextval('s1') FROM generate_series(1, 100);"
        "CREATE TABLE big (id int, payload text);"
        "ALTER TABLE big ALTER COLUMN payload SET STORAGE EXTERNAL;"
        "INSERT INTO big SELECT g, repeat(md5(g::text), 300) FROM generate_series(1, 20) g;"
        "CREATE TABLE trunc_me AS SELECT g FROM generate_series(1, 1000) g;"
        "TRUNCATE trunc_me;"
        "DROP TABLE trunc_me"
    )
    for stmt in statements.split(";"):
        sql(stmt)
    # Two-phase commit, and one rolled back.
    sql("BEGIN; INSERT INTO big VALUES (-1, 'prepared'); PREPARE TRANSACTION 'p1'")
    sql("COMMIT PREPARED 'p1'")
    sql("BEGIN; INSERT INTO big VALUES (-2, 'prepared'); PREPARE TRANSACTION 'p2'")
    sql("ROLLBACK PREPARED 'p2'")
    # Many subtransactions (more than 64 → XACT_ASSIGNMENT), and a rolled-back savepoint.
    with pg.connect(autocommit=False) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE subx (i int)")
        for i in range(200):
            cur.execute(f"SAVEPOINT s{i}")
            cur.execute("INSERT INTO subx VALUES (%s)", (i,))
        cur.execute("SAVEPOINT last; INSERT INTO subx VALUES (-1); ROLLBACK TO SAVEPOINT last")
        conn.commit()
    _make_multixacts(pg)
    # A record much larger than a WAL page, then one crossing a segment boundary.
    sql("SELECT pg_logical_emit_message(false, 'big', repeat('x', 100000))")
    cur_lsn = Lsn(pg.current_wal_lsn())
    to_boundary = WAL_SEGMENT_SIZE - cur_lsn % WAL_SEGMENT_SIZE
    sql(f"SELECT pg_logical_emit_message(false, 'cross', repeat('y', {to_boundary + 5000}))")
    sql("SELECT pg_switch_wal()")
    for stmt in ("INSERT INTO big VALUES (-3, 'after switch')", "VACUUM FULL pg_class", "CHECKPOINT"):
        sql(stmt)


def _make_multixacts(pg: VanillaPostgres) -> None:
    pg.safe_psql(
        "CREATE TABLE mx (id int PRIMARY KEY, v int); INSERT INTO mx SELECT g, g FROM generate_series(1, 10) g"
    )
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def locker() -> None:
        try:
            with pg.connect(autocommit=False) as conn, conn.cursor() as cur:
                cur.execute("SELECT * FROM mx FOR SHARE")
                barrier.wait(timeout=30)  # both hold the share locks at once
                barrier.wait(timeout=30)
                conn.commit()
        except BaseException as e:  # surfaced below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=locker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
