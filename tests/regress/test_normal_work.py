"""Neon's `test_normal_work.py` (spec control-plane §2.11): the everyday life of a tenant, three
times over with one safekeeper. Each round creates a tenant, writes 100 000 rows through a
compute, restarts the compute, and detaches the tenant; the sum of the keys is right before and
after the restart.

Our compute is stock Postgres and keeps its own data directory across a restart, so the sum is
also read from a fresh compute whose basebackup and pages come from the pageserver. After the
detach the pageserver no longer serves the tenant.
"""

from __future__ import annotations

import pytest

from neon.utils.id import TenantId
from tests.fixtures.neon_fixtures import (
    NeonEnv,
    NeonEnvBuilder,
    PageserverApiException,
    PageserverHttpClient,
    wait_for_last_flush_lsn,
)

ROWS = 100_000
EXPECTED_SUM = ROWS * (ROWS + 1) // 2


def check_tenant(env: NeonEnv, http: PageserverHttpClient) -> TenantId:
    """One round: a new tenant, rows, a compute restart, a detach."""
    tenant_id, timeline_id = env.neon_cli.create_tenant()
    endpoint = env.endpoints.create_start("main", tenant_id=tenant_id)
    # One statement per autocommit transaction.
    res = endpoint.safe_psql_many(
        [
            "CREATE TABLE t (key int PRIMARY KEY, value text)",
            f"INSERT INTO t SELECT generate_series(1, {ROWS}), 'payload'",
            "SELECT sum(key) FROM t",
        ]
    )
    assert res[-1] == [(EXPECTED_SUM,)]

    endpoint.stop()
    endpoint.start()
    assert endpoint.safe_psql("SELECT sum(key) FROM t") == [(EXPECTED_SUM,)]
    wait_for_last_flush_lsn(env, endpoint, tenant_id, timeline_id)
    endpoint.stop()

    # Everything the compute wrote is on the pageserver: a new compute starts from it alone.
    fresh = env.endpoints.create_start("main", tenant_id=tenant_id)
    assert fresh.safe_psql("SELECT sum(key), count(*) FROM t") == [(EXPECTED_SUM, ROWS)]
    fresh.stop()

    http.tenant_detach(tenant_id)
    return tenant_id


@pytest.mark.slow
@pytest.mark.parametrize("num_timelines,num_safekeepers", [(3, 1)])
def test_normal_work(neon_env_builder: NeonEnvBuilder, num_timelines: int, num_safekeepers: int) -> None:
    neon_env_builder.num_safekeepers = num_safekeepers
    env = neon_env_builder.init_start()
    http = env.pageserver.http_client()

    detached = [check_tenant(env, http) for _ in range(num_timelines)]

    attached = {t["id"] for t in http.tenant_list()}
    assert not attached & {str(t) for t in detached}, attached
    assert str(env.initial_tenant) in attached
    for tenant_id in detached:
        with pytest.raises(PageserverApiException) as e:
            http.timeline_list(tenant_id)
        assert e.value.status_code == 404
