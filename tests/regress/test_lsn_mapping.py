"""Neon's `test_lsn_mapping.py` scenarios (spec control-plane §2.11): the pageserver's mapping
between commit timestamps and LSNs, both ways. `get_lsn_by_timestamp` binary-searches the LSN
range for the first point where a CLOG page carries a commit timestamp at or after the one asked
for; `get_timestamp_of_lsn` answers the newest commit timestamp visible at an LSN. Both read the
timestamps that the redo of commit records leaves in the CLOG pages' trailers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from neon.pageserver.http.routes import _format_rfc3339
from neon.utils.lsn import Lsn
from tests.fixtures.neon_fixtures import NeonEnv, NeonEnvBuilder, last_record_lsn, wait_for_last_flush_lsn
from tests.fixtures.neon_http import PageserverApiException

ROWS = 1000
STEP = 100


def _rfc3339(ts: datetime) -> str:
    """A timestamp in the form Neon's test sends it: naive UTC ISO text with a `Z`."""
    return ts.astimezone(UTC).replace(tzinfo=None).isoformat() + "Z"


def _insert_rows(env: NeonEnv, branch: str) -> tuple[list[tuple[int, datetime, Lsn]], Any]:
    """`ROWS` single-row transactions committed asynchronously, then one synchronous commit that
    makes them all durable; once the pageserver has everything, returns per row (x, the
    compute's clock just after its commit, the WAL insert position just after its commit)."""
    endpoint = env.endpoints.create_start(branch)
    rows: list[tuple[int, datetime, Lsn]] = []
    with endpoint.cursor() as cur:
        # Asynchronous commits: a thousand transactions without waiting for each to be durable.
        cur.execute("SET synchronous_commit = off")
        cur.execute("CREATE TABLE foo (x integer)")
        for i in range(ROWS):
            cur.execute("INSERT INTO foo VALUES (%s)", (i,))
            cur.execute("SELECT clock_timestamp(), pg_current_wal_insert_lsn()::text")
            row = cur.fetchone()
            assert row is not None
            rows.append((i, row[0], Lsn(row[1])))
        cur.execute("SET synchronous_commit = on")
        cur.execute("INSERT INTO foo VALUES (-1)")
    wait_for_last_flush_lsn(env, endpoint, env.initial_tenant, env.neon_cli.timeline_of(branch))
    return rows, endpoint


@pytest.mark.slow
def test_lsn_mapping(neon_env_builder: NeonEnvBuilder) -> None:
    """A time after the last commit is "future", one 10 h before the first is "past"; for sampled
    post-commit times, a static endpoint at the LSN returned sees exactly the rows committed by
    then (`max(x) == i`)."""
    env = neon_env_builder.init_start()
    timeline = env.neon_cli.create_branch("test_lsn_mapping")
    rows, _ = _insert_rows(env, "test_lsn_mapping")
    http = env.pageserver.http_client()

    after_last = rows[-1][1] + timedelta(hours=1)
    assert http.timeline_get_lsn_by_timestamp(env.initial_tenant, timeline, _rfc3339(after_last)) == "future"
    before_first = rows[0][1] - timedelta(hours=10)
    assert http.timeline_get_lsn_by_timestamp(env.initial_tenant, timeline, _rfc3339(before_first)) == "past"

    for i in range(1, ROWS, STEP):
        lsn = http.timeline_get_lsn_by_timestamp(env.initial_tenant, timeline, _rfc3339(rows[i][1]))
        # Row i committed before its timestamp was taken, row i+1 after: the LSN falls between.
        assert Lsn(lsn) < rows[i + 1][2], (i, lsn)
        here = env.endpoints.create_start("test_lsn_mapping", endpoint_id="ep-lsn_mapping_read", lsn=lsn)
        assert here.safe_psql("SELECT max(x) FROM foo")[0][0] == i, (i, lsn)
        here.stop_and_destroy()


def test_ts_of_lsn_api(neon_env_builder: NeonEnvBuilder) -> None:
    """LSN 0 is a 500 "Invalid LSN"; an LSN before initdb a 500 "could not find data for key…";
    at a sampled row's post-commit LSN the timestamp is before the clock read just after that
    commit and not before the one read just after the previous sample's.

    Neon samples `pg_current_wal_lsn()` (the WAL write position, which with asynchronous commit
    lags the commits, hence a 5 ms pause per row in its test); this one samples the insert
    position, which is past the row's commit record at once, so no pacing is needed and the
    bounds are the same."""
    env = neon_env_builder.init_start()
    timeline = env.neon_cli.create_branch("test_ts_of_lsn_api")
    rows, endpoint = _insert_rows(env, "test_ts_of_lsn_api")
    http = env.pageserver.http_client()
    env.pageserver.allowed_errors.extend([".*Invalid LSN.*", ".*could not find data for key.*"])

    # Beyond the end of the WAL: answered from the latest data, no error.
    last_flush = Lsn(endpoint.safe_psql("SELECT pg_current_wal_flush_lsn()::text")[0][0])
    http.timeline_get_timestamp_of_lsn(env.initial_tenant, timeline, Lsn(int(last_flush) * 20 + 80_000))

    with pytest.raises(PageserverApiException) as e:
        http.timeline_get_timestamp_of_lsn(env.initial_tenant, timeline, Lsn(0))
    assert e.value.status_code == 500
    assert str(e.value) == "Invalid LSN"

    with pytest.raises(PageserverApiException) as e:
        http.timeline_get_timestamp_of_lsn(env.initial_tenant, timeline, Lsn(64))
    assert e.value.status_code == 500
    assert str(e.value).startswith("could not find data for key"), str(e.value)

    # No commit since initdb on `main` (its CLOG pages came from initdb, without timestamps): a
    # 404, as Neon answers when there is no timestamp.
    main_tip = last_record_lsn(http, env.initial_tenant, env.initial_timeline)
    with pytest.raises(PageserverApiException) as e:
        http.timeline_get_timestamp_of_lsn(env.initial_tenant, env.initial_timeline, main_tip)
    assert e.value.status_code == 404

    for i in range(STEP, ROWS, STEP):
        _, after_ts, after_lsn = rows[i]
        text = http.timeline_get_timestamp_of_lsn(env.initial_tenant, timeline, after_lsn)
        # Neon's form: nine fractional digits, the last three zero (Postgres has microseconds).
        ts = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f000Z").replace(tzinfo=UTC)
        assert ts < after_ts, (i, text, after_ts)
        assert ts >= rows[i - STEP][1], (i, text, rows[i - STEP][1])


def test_timestamp_text_form() -> None:
    """The response's text form is humantime's: no fraction for whole seconds, else nine digits;
    Postgres timestamps count microseconds from 2000-01-01 and may be negative."""
    assert _format_rfc3339(0) == "2000-01-01T00:00:00Z"
    assert _format_rfc3339(1_500_000) == "2000-01-01T00:00:01.500000000Z"
    assert _format_rfc3339(-1) == "1999-12-31T23:59:59.999999000Z"
