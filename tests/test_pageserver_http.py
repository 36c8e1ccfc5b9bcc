"""The tenant manager and the management HTTP API (spec pageserver §1.7, §9), over a real workdir.

Timeline creation runs initdb as the unprivileged Postgres user; tenant-only tests need no Postgres.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from neon.pageserver.config import PageServerConf, init_workdir, load_config
from neon.pageserver.http import make_app
from neon.pageserver.tenant_config import TenantConfOverrides
from neon.pageserver.tenant_manager import TenantExists, TenantManager, TenantNotActive, TenantNotFound
from neon.utils.id import TenantId, TimelineId
from neon.utils.lsn import Lsn
from tests.fixtures.vanilla import make_test_root

TIMELINE_INFO_KEYS = {
    "tenant_id",
    "timeline_id",
    "ancestor_timeline_id",
    "ancestor_lsn",
    "last_record_lsn",
    "prev_record_lsn",
    "latest_gc_cutoff_lsn",
    "disk_consistent_lsn",
    "remote_consistent_lsn",
    "remote_consistent_lsn_visible",
    "current_logical_size",
    "current_physical_size",
    "current_logical_size_non_incremental",
    "timeline_dir_layer_file_size_sum",
    "wal_source_connstr",
    "last_received_msg_lsn",
    "last_received_msg_ts",
    "pg_version",
    "state",
    "walreceiver_status",
}


@pytest.fixture
def workdir() -> Iterator[Path]:
    root = make_test_root(prefix="neon-ps-http-")
    wd = root / "pageserver"
    init_workdir(wd, ["id=42", "tenant_config.gc_period='1h'"])
    yield wd
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def manager(workdir: Path) -> AsyncIterator[TenantManager]:
    mgr = TenantManager(load_config(workdir), workdir)
    await mgr.load_all()
    yield mgr
    await mgr.shutdown()


@pytest.fixture
async def client(manager: TenantManager) -> AsyncIterator[TestClient]:
    c = TestClient(TestServer(make_app(manager, manager.conf)))
    await c.start_server()
    yield c
    await c.close()


async def call(client: TestClient, method: str, path: str, body: Any = None, *, raw: str | None = None) -> tuple:
    kwargs: dict[str, Any] = {}
    if raw is not None:
        kwargs["data"] = raw
    elif body is not None:
        kwargs["json"] = body
    resp = await client.request(method, path, **kwargs)
    return resp.status, await resp.json()


# --- tenant manager ------------------------------------------------------------------------------
async def test_manager_restart_keeps_tenants_timelines_and_lsns(workdir: Path) -> None:
    conf = load_config(workdir)
    mgr = TenantManager(conf, workdir)
    await mgr.load_all()
    empty = mgr.create_tenant(None, TenantConfOverrides(checkpoint_distance=1 << 20))
    t = mgr.create_tenant(TenantId.generate())
    with pytest.raises(TenantExists):
        mgr.create_tenant(t.tenant_id)
    assert t.conf().gc_period.total_seconds() == 3600  # from the pageserver's [tenant_config]
    main = await t.bootstrap_timeline(TimelineId.generate())
    branch = await t.branch_timeline(TimelineId.generate(), main.timeline_id)
    before = {
        tl.timeline_id: (tl.last_record_lsn, tl.prev_record_lsn, tl.disk_consistent_lsn, tl.ancestor_lsn)
        for tl in (main, branch)
    }
    await mgr.shutdown()

    mgr2 = TenantManager(conf, workdir)
    await mgr2.load_all()
    try:
        assert {s.tenant_id for s in mgr2.list_tenants()} == {empty.tenant_id, t.tenant_id}
        assert all(s.state_json() == {"slug": "Active"} for s in mgr2.list_tenants())
        assert mgr2.get_tenant(empty.tenant_id).conf().checkpoint_distance == 1 << 20
        t2 = mgr2.get_tenant(t.tenant_id, active=True)
        after = {
            tl.timeline_id: (tl.last_record_lsn, tl.prev_record_lsn, tl.disk_consistent_lsn, tl.ancestor_lsn)
            for tl in t2.timelines.values()
        }
        assert after == before
        assert t2.get_timeline(branch.timeline_id).ancestor is t2.get_timeline(main.timeline_id)
        # Reads work on the reloaded timeline (shared page cache, the tenant's redo manager).
        tl = t2.get_timeline(main.timeline_id)
        assert await tl.logical_size_now() > 20 * 1024 * 1024
        await mgr2.delete_tenant(empty.tenant_id)
        with pytest.raises(TenantNotFound):
            mgr2.get_tenant(empty.tenant_id)
        assert not (workdir / "tenants" / str(empty.tenant_id)).exists()
    finally:
        await mgr2.shutdown()


async def test_broken_tenant_and_leftovers_at_load(workdir: Path) -> None:
    conf = load_config(workdir)
    mgr = TenantManager(conf, workdir)
    await mgr.load_all()
    good = mgr.create_tenant()
    bad = mgr.create_tenant()
    await mgr.shutdown()
    (workdir / "tenants" / str(bad.tenant_id) / "config").write_text("[tenant_config]\nno_such_key = 1\n")
    leftover = workdir / "tenants" / f"{TenantId.generate()}.___temp"
    leftover.mkdir()
    ignored = workdir / "tenants" / str(TenantId.generate())
    ignored.mkdir()
    (ignored / "___ignored_tenant").touch()

    mgr2 = TenantManager(conf, workdir)
    await mgr2.load_all()
    try:
        assert mgr2.get_slot(good.tenant_id).state == "Active"
        slot = mgr2.get_slot(bad.tenant_id)
        assert slot.state == "Broken" and "no_such_key" in (slot.broken_reason or "")
        assert slot.state_json()["slug"] == "Broken" and "no_such_key" in slot.state_json()["data"]["reason"]
        assert slot.attachment_status_json()["slug"] == "failed"
        with pytest.raises(TenantNotActive):
            mgr2.get_tenant(bad.tenant_id, active=True)
        assert not leftover.exists()
        assert len(mgr2.list_tenants()) == 2  # the ignored tenant is not loaded
        c = TestClient(TestServer(make_app(mgr2, conf)))
        await c.start_server()
        try:
            status, body = await call(c, "GET", f"/v1/tenant/{bad.tenant_id}")
            assert status == 200 and body["state"]["slug"] == "Broken"
            status, body = await call(c, "GET", f"/v1/tenant/{bad.tenant_id}/timeline")
            assert status == 503 and "not active" in body["msg"]
        finally:
            await c.close()
    finally:
        await mgr2.shutdown()


# --- HTTP: general and tenants -------------------------------------------------------------------
async def test_status_headers_and_unknown_routes(client: TestClient) -> None:
    resp = await client.get("/v1/status", headers={"x-request-id": "abc"})
    assert resp.status == 200 and await resp.json() == {"id": 42}
    assert resp.headers["x-request-id"] == "abc" and resp.headers["PAGESERVER_LAUNCH_TIMESTAMP"]
    resp = await client.get("/v1/status")
    assert len(resp.headers["x-request-id"]) == 36  # a fresh UUID
    assert await call(client, "GET", "/v1/nothing") == (404, {"msg": "page not found"})
    status, body = await call(client, "PATCH", "/v1/status")
    assert status == 405 and "msg" in body


def test_neon_jwt_refused(manager: TenantManager) -> None:
    with pytest.raises(ValueError, match="not supported"):
        make_app(manager, PageServerConf(id=1, http_auth_type="NeonJWT"))


async def test_tenant_endpoints(client: TestClient) -> None:
    status, tid = await call(client, "POST", "/v1/tenant", {})
    assert status == 201 and TenantId(tid)
    wanted = str(TenantId.generate())
    status, body = await call(client, "POST", "/v1/tenant", {"new_tenant_id": wanted, "checkpoint_distance": 4096})
    assert (status, body) == (201, wanted)
    status, body = await call(client, "POST", "/v1/tenant", {"new_tenant_id": wanted})
    assert status == 409 and "already exists" in body["msg"]

    status, body = await call(client, "GET", "/v1/tenant")
    assert status == 200 and {t["id"] for t in body} == {tid, wanted}
    assert all(t["current_physical_size"] is None for t in body)
    status, body = await call(client, "GET", f"/v1/tenant/{wanted}")
    assert status == 200
    assert body == {
        "id": wanted,
        "state": {"slug": "Active"},
        "current_physical_size": 0,
        "attachment_status": {"slug": "attached"},
    }

    status, body = await call(client, "GET", f"/v1/tenant/{wanted}/config")
    assert status == 200 and body["tenant_specific_overrides"] == {"checkpoint_distance": 4096}
    assert body["effective_config"]["checkpoint_distance"] == 4096
    assert body["effective_config"]["gc_period"] == "1h" and body["effective_config"]["pitr_interval"] == "7days"
    # PUT replaces all overrides.
    status, body = await call(client, "PUT", "/v1/tenant/config", {"tenant_id": wanted, "gc_horizon": 1024})
    assert (status, body) == (200, None)
    status, body = await call(client, "GET", f"/v1/tenant/{wanted}/config")
    assert body["tenant_specific_overrides"] == {"gc_horizon": 1024}
    assert body["effective_config"]["checkpoint_distance"] == 256 * 1024 * 1024

    status, body = await call(client, "DELETE", f"/v1/tenant/{wanted}")
    assert (status, body) == (202, None)
    assert (await call(client, "GET", f"/v1/tenant/{wanted}"))[0] == 404
    assert (await call(client, "DELETE", f"/v1/tenant/{wanted}"))[0] == 404


@pytest.mark.parametrize(
    ("method", "path", "body", "raw", "status", "match"),
    [
        ("POST", "/v1/tenant", None, "{not json", 400, "Failed to parse json"),
        ("POST", "/v1/tenant", None, "", 400, "empty body"),
        ("POST", "/v1/tenant", [], None, 400, "JSON object"),
        ("POST", "/v1/tenant", {"new_tenant_id": "xyz"}, None, 400, "Cannot parse tenant id"),
        ("POST", "/v1/tenant", {"checkpoint_distanse": 1}, None, 400, "checkpoint_distanse"),
        ("POST", "/v1/tenant", {"gc_period": "often"}, None, 400, "gc_period"),
        ("POST", "/v1/tenant", {"max_lsn_wal_lag": 0}, None, 400, "max_lsn_wal_lag"),
        ("GET", "/v1/tenant/zz", None, None, 400, "Cannot parse tenant id"),
        ("GET", f"/v1/tenant/{'ab' * 16}", None, None, 404, "not found"),
        ("GET", f"/v1/tenant/{'ab' * 16}/config", None, None, 404, "not found"),
        ("PUT", "/v1/tenant/config", {"gc_horizon": 1}, None, 400, "tenant_id"),
        ("PUT", "/v1/tenant/config", {"tenant_id": "ab" * 16}, None, 404, "not found"),
        ("GET", f"/v1/tenant/{'ab' * 16}/timeline", None, None, 404, "not found"),
        ("GET", f"/v1/tenant/{'ab' * 16}/timeline/{'cd' * 16}", None, None, 404, "not found"),
        ("POST", f"/v1/tenant/{'ab' * 16}/timeline", {"new_timeline_id": "cd" * 16}, None, 404, "not found"),
    ],
)
async def test_error_responses(
    client: TestClient, method: str, path: str, body: Any, raw: str | None, status: int, match: str
) -> None:
    got_status, got = await call(client, method, path, body, raw=raw)
    assert got_status == status and set(got) == {"msg"} and match in got["msg"], (got_status, got)


# --- HTTP: timelines (real Postgres) ------------------------------------------------------------
async def test_timeline_endpoints(client: TestClient) -> None:
    _, tid = await call(client, "POST", "/v1/tenant", {})
    base = f"/v1/tenant/{tid}/timeline"
    main_id = str(TimelineId.generate())

    status, info = await call(client, "POST", base, {"new_timeline_id": main_id, "pg_version": 15})
    assert status == 201, info
    assert set(info) == TIMELINE_INFO_KEYS
    assert info["tenant_id"] == tid and info["timeline_id"] == main_id and info["pg_version"] == 15
    assert info["ancestor_timeline_id"] is None and info["ancestor_lsn"] is None
    assert info["state"] == "Active" and info["remote_consistent_lsn"] == "0/0"
    last = Lsn.parse(info["last_record_lsn"])
    # Spec §1.8: after bootstrap prev_record_lsn is the shutdown checkpoint's start, = initdb_lsn = GC cutoff.
    assert info["prev_record_lsn"] == info["latest_gc_cutoff_lsn"]
    assert Lsn.parse(info["disk_consistent_lsn"]) == last > Lsn.parse(info["latest_gc_cutoff_lsn"])
    assert info["current_logical_size"] > 20 * 1024 * 1024 and info["current_physical_size"] > 0
    assert info["current_logical_size_non_incremental"] is None

    # Creating it again: 409 with a null body, as Neon answers.
    assert await call(client, "POST", base, {"new_timeline_id": main_id}) == (409, None)

    status, detail = await call(client, "GET", f"{base}/{main_id}?include-non-incremental-logical-size=true")
    assert status == 200 and detail["current_logical_size_non_incremental"] == detail["current_logical_size"]
    assert {k: v for k, v in detail.items() if k != "current_logical_size_non_incremental"} == {
        k: v for k, v in info.items() if k != "current_logical_size_non_incremental"
    }

    # Branches: at the ancestor's last record (explicit LSN), and by default.
    br_id = str(TimelineId.generate())
    status, br = await call(
        client,
        "POST",
        base,
        {"new_timeline_id": br_id, "ancestor_timeline_id": main_id, "ancestor_start_lsn": str(last)},
    )
    assert status == 201, br
    assert br["ancestor_timeline_id"] == main_id and br["ancestor_lsn"] == str(last)
    assert br["last_record_lsn"] == str(last) and br["prev_record_lsn"] == info["prev_record_lsn"]
    assert br["current_physical_size"] == 0 and br["current_logical_size"] == info["current_logical_size"]
    br2_id = str(TimelineId.generate())
    status, br2 = await call(client, "POST", base, {"new_timeline_id": br2_id, "ancestor_timeline_id": br_id})
    assert status == 201 and br2["ancestor_lsn"] == str(last)

    # Unusable branch points and bad input.
    status, body = await call(
        client, "POST", base, {"new_timeline_id": str(TimelineId.generate()), "ancestor_timeline_id": main_id,
                               "ancestor_start_lsn": "0/8"}
    )  # fmt: skip
    assert status == 406 and "GC cutoff" in body["msg"]
    status, body = await call(
        client, "POST", base, {"new_timeline_id": str(TimelineId.generate()), "ancestor_timeline_id": br_id,
                               "ancestor_start_lsn": str(Lsn(last - 8))}
    )  # fmt: skip
    assert status == 406 and "ancestor lsn" in body["msg"]
    for bad, match in [
        ({"new_timeline_id": br_id[:-2], "pg_version": 15}, "new_timeline_id"),
        ({"new_timeline_id": str(TimelineId.generate()), "ancestor_timeline_id": main_id, "ancestor_start_lsn": "x"},
         "ancestor_start_lsn"),
        ({"new_timeline_id": str(TimelineId.generate()), "pg_version": 14}, "not supported"),
        ({"new_timeline_id": str(TimelineId.generate()), "bogus": 1}, "unknown field `bogus`"),
        ({}, "missing field `new_timeline_id`"),
    ]:  # fmt: skip
        status, body = await call(client, "POST", base, bad)
        assert status == 400 and match in body["msg"], body
    status, body = await call(
        client, "POST", base, {"new_timeline_id": str(TimelineId.generate()), "ancestor_timeline_id": "ee" * 16}
    )
    assert status == 404

    status, listing = await call(client, "GET", base)
    assert status == 200 and {t["timeline_id"] for t in listing} == {main_id, br_id, br2_id}

    # Testing endpoints and the layer map.
    assert await call(client, "PUT", f"{base}/{main_id}/checkpoint") == (200, None)
    assert await call(client, "PUT", f"{base}/{main_id}/compact") == (200, None)
    status, layers = await call(client, "GET", f"{base}/{main_id}/layer")
    assert status == 200 and layers["in_memory_layers"] == [] and layers["historic_layers"]
    total = 0
    for layer in layers["historic_layers"]:
        assert layer["kind"] in ("Delta", "Image") and layer["remote"] is False
        assert ("lsn_end" in layer) == (layer["kind"] == "Delta") and Lsn.parse(layer["lsn_start"]) is not None
        total += layer["layer_file_size"]
    assert total == (await call(client, "GET", f"{base}/{main_id}"))[1]["current_physical_size"]
    status, body = await call(client, "GET", f"/v1/tenant/{tid}")
    assert body["current_physical_size"] == total
    assert (await call(client, "PUT", f"{base}/{'cd' * 16}/checkpoint"))[0] == 404
    assert (await call(client, "GET", f"{base}/nothex/layer"))[0] == 400

    # Deletion: not while children exist; children first.
    status, body = await call(client, "DELETE", f"{base}/{br_id}")
    assert status == 412 and br2_id in body["msg"]
    assert await call(client, "DELETE", f"{base}/{br2_id}") == (202, None)
    assert (await call(client, "GET", f"{base}/{br2_id}"))[0] == 404
    assert (await call(client, "DELETE", f"{base}/{br2_id}"))[0] == 404
    assert await call(client, "DELETE", f"{base}/{br_id}") == (202, None)
    status, listing = await call(client, "GET", base)
    assert [t["timeline_id"] for t in listing] == [main_id]


async def test_detach_ignore_load_break_attach(client: TestClient, manager: TenantManager) -> None:
    _, a = await call(client, "POST", "/v1/tenant", {"gc_horizon": 77})
    _, b = await call(client, "POST", "/v1/tenant", {})
    # ignore keeps the directory but takes the tenant out of the map; load brings it back.
    assert await call(client, "POST", f"/v1/tenant/{a}/ignore") == (200, None)
    assert (await call(client, "GET", f"/v1/tenant/{a}"))[0] == 404
    assert (manager.tenants_dir / a / "___ignored_tenant").exists()
    assert await call(client, "POST", f"/v1/tenant/{a}/load") == (202, None)
    status, body = await call(client, "GET", f"/v1/tenant/{a}/config")
    assert status == 200 and body["tenant_specific_overrides"] == {"gc_horizon": 77}
    assert (await call(client, "POST", f"/v1/tenant/{a}/load"))[0] == 409
    # detach removes it; an ignored tenant needs detach_ignored=true.
    assert await call(client, "POST", f"/v1/tenant/{a}/detach") == (200, None)
    assert not (manager.tenants_dir / a).exists()
    assert (await call(client, "POST", f"/v1/tenant/{a}/detach"))[0] == 404
    await call(client, "POST", f"/v1/tenant/{b}/ignore")
    assert (await call(client, "POST", f"/v1/tenant/{b}/detach"))[0] == 404
    assert await call(client, "POST", f"/v1/tenant/{b}/detach?detach_ignored=true") == (200, None)
    assert not (manager.tenants_dir / b).exists()
    # break (testing): the tenant stays listed as Broken and stops serving timeline requests.
    _, c = await call(client, "POST", "/v1/tenant", {})
    assert await call(client, "PUT", f"/v1/tenant/{c}/break") == (200, None)
    status, body = await call(client, "GET", f"/v1/tenant/{c}")
    assert body["state"]["slug"] == "Broken" and body["attachment_status"]["slug"] == "failed"
    assert (await call(client, "PUT", f"/v1/tenant/{c}/break"))[0] == 409
    assert (await call(client, "POST", f"/v1/tenant/{c}/timeline", {"new_timeline_id": "ab" * 16}))[0] == 503
    # attach needs remote storage.
    status, body = await call(client, "POST", f"/v1/tenant/{TenantId.generate()}/attach")
    assert status == 400 and "remote storage" in body["msg"]
    assert (await call(client, "POST", f"/v1/tenant/{c}/attach"))[0] == 409


# --- failpoints (Neon's testing API) ------------------------------------------------------------
async def test_http_configure_failpoints(client: TestClient, manager: TenantManager) -> None:
    body = [{"name": "a", "actions": "return(7)"}, {"name": "b", "actions": "pause"}]
    resp = await client.put("/v1/failpoints", json=body)
    assert resp.status == 200 and await resp.json() is None
    assert manager.failpoints.configured() == {"a": "return(7)", "b": "pause"}
    # Tenants (and so their timelines) share the manager's registry.
    tenant = manager.create_tenant()
    assert tenant.failpoints is manager.failpoints
    assert await tenant.failpoints.hit("a") == "7"

    resp = await client.put("/v1/failpoints", json=[{"name": "b", "actions": "off"}, {"name": "c", "actions": "bogus"}])
    assert resp.status == 400
    msg = (await resp.json())["msg"]
    assert "Failed to configure failpoints" in msg and "unrecognized command 'bogus'" in msg
    assert manager.failpoints.configured() == {"a": "return(7)", "b": "pause"}  # nothing applied

    for bad in ({"name": "a", "actions": "off"}, [{"name": "a"}], [{"name": 1, "actions": "off"}], ["a=off"]):
        resp = await client.put("/v1/failpoints", json=bad)
        assert resp.status == 400, bad
        assert "Failed to parse json request" in (await resp.json())["msg"]
    resp = await client.put("/v1/failpoints", data="[{")
    assert resp.status == 400 and "Failed to parse json request" in (await resp.json())["msg"]
