"""Neon's `test_multixact.py` (spec control-plane §2.11): concurrent transactions share-lock the
same rows (`FOR KEY SHARE`), which makes multixacts; after a `CHECKPOINT`, a branch at the current
LSN must get a `pg_control` whose `next_multixact_id` equals the original's, and — our compute
keeping a full data directory from its basebackup — rows whose xmax is a multixact must show the
same xmax, with the same members, read back from the `pg_multixact` SLRUs the pageserver serves."""

from __future__ import annotations

import random
import threading

from neon.utils.lsn import Lsn
from tests.fixtures.neon_fixtures import Endpoint, NeonEnv, query_scalar

N_RECORDS = 100
N_THREADS = 5
N_ITERS = 60
N_RESTARTS = 2


def _do_updates(endpoint: Endpoint, seed: int, errors: list[BaseException]) -> None:
    rng = random.Random(seed)
    try:
        with endpoint.connect(autocommit=False) as conn:
            for _ in range(N_ITERS):
                pk = rng.randrange(1, N_RECORDS)
                with conn.cursor() as cur:
                    cur.execute(f"UPDATE t1 SET val = val + 1 WHERE pk = {pk}")
                    cur.execute("SELECT * FROM t1 FOR KEY SHARE")
                conn.commit()
    except BaseException as e:  # reported by the main thread
        errors.append(e)


def _locked_rows(endpoint: Endpoint) -> list[tuple[object, ...]]:
    """The rows locked by the held multixact, with its members (sorted)."""
    return endpoint.safe_psql(
        "SELECT pk, xmax::text::bigint,"
        " (SELECT array_agg(m.xid::text::bigint ORDER BY m.xid::text::bigint)"
        "  FROM pg_get_multixact_members(t1.xmax) m),"
        " (SELECT array_agg(DISTINCT m.mode) FROM pg_get_multixact_members(t1.xmax) m)"
        " FROM t1 WHERE pk <= 10 ORDER BY pk"
    )


def test_multixact(neon_simple_env: NeonEnv) -> None:
    env = neon_simple_env
    env.neon_cli.create_branch("test_multixact", "empty")
    endpoint = env.endpoints.create_start("test_multixact")

    with endpoint.cursor() as cur:
        cur.execute("CREATE TABLE t1 (pk int PRIMARY KEY, val integer)")
        cur.execute(f"INSERT INTO t1 VALUES (generate_series(1, {N_RECORDS}), 0)")
        next_multixact_id_old = query_scalar(cur, "SELECT next_multixact_id FROM pg_control_checkpoint()")

    # Lock rows from parallel connections; restart the compute between rounds.
    for round_ in range(N_RESTARTS):
        errors: list[BaseException] = []
        threads = [
            threading.Thread(target=_do_updates, args=(endpoint, round_ * N_THREADS + i, errors))
            for i in range(N_THREADS)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        endpoint.stop()
        endpoint.start()
        assert endpoint.safe_psql("SELECT count(*) FROM t1") == [(N_RECORDS,)]
    total_updates = endpoint.safe_psql("SELECT sum(val) FROM t1")[0][0]
    assert total_updates == N_RESTARTS * N_THREADS * N_ITERS

    # A last multixact, left on rows 1..10 by three transactions committed together; nothing
    # updates those rows afterwards, so their xmax stays that multixact.
    lockers = [endpoint.connect(autocommit=False) for _ in range(3)]
    try:
        for conn in lockers:
            conn.execute("SELECT * FROM t1 WHERE pk <= 10 FOR KEY SHARE")
        for conn in lockers:
            conn.commit()
    finally:
        for conn in lockers:
            conn.close()
    locked = _locked_rows(endpoint)
    assert len(locked) == 10
    multi = locked[0][1]
    assert all(row[1] == multi and len(row[2]) == 3 and row[3] == ["keysh"] for row in locked), locked

    with endpoint.cursor() as cur:
        cur.execute("CHECKPOINT")
        cur.execute("SELECT next_multixact_id, pg_current_wal_insert_lsn()::text FROM pg_control_checkpoint()")
        row = cur.fetchone()
        assert row is not None
        next_multixact_id, lsn = int(row[0]), Lsn(row[1])
    # Some tuples were share-locked by several transactions at once.
    assert next_multixact_id > int(next_multixact_id_old)
    assert int(multi) < next_multixact_id

    env.neon_cli.create_branch("test_multixact_new", "test_multixact", ancestor_start_lsn=lsn)
    endpoint_new = env.endpoints.create_start("test_multixact_new")
    # The pageserver regenerated pg_control correctly…
    assert int(endpoint_new.safe_psql("SELECT next_multixact_id FROM pg_control_checkpoint()")[0][0]) == (
        next_multixact_id
    )
    # …and the multixact SLRUs: same xmax, same members.
    assert _locked_rows(endpoint_new) == locked
    # New multixacts on the branch get ids past the old ones.
    lockers = [endpoint_new.connect(autocommit=False) for _ in range(2)]
    try:
        for conn in lockers:
            conn.execute("SELECT * FROM t1 WHERE pk = 50 FOR KEY SHARE")
        for conn in lockers:
            conn.commit()
    finally:
        for conn in lockers:
            conn.close()
    new_multi = endpoint_new.safe_psql("SELECT xmax::text::bigint FROM t1 WHERE pk = 50")[0][0]
    assert new_multi >= next_multixact_id
