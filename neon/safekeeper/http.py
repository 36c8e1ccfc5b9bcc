"""The safekeeper management API (spec safekeeper-and-broker §7), an aiohttp application.

Routes: `GET /v1/status`, `GET /metrics`, `POST /v1/tenant/timeline` (explicit creation),
`GET|DELETE /v1/tenant/{tenant_id}/timeline/{timeline_id}`, `DELETE /v1/tenant/{tenant_id}`.
Errors are `{"msg": ...}` with 400 (bad request), 404 (timeline not loaded), 409 (a deleted
timeline cannot be re-created before a restart) and 500 (everything else). Every response
carries `x-request-id`. JWT auth is not implemented.

Metrics are built at scrape time from the timelines (per-timeline LSN gauges) and the counters of
the acceptors and the WAL service.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from neon.safekeeper import control_file
from neon.safekeeper.control_file import ServerInfo
from neon.safekeeper.timeline import (
    TimelineCancelled,
    TimelineDirExists,
    TimelineNotFound,
    Timelines,
    disk_usage,
)
from neon.safekeeper.wal_service import QUERY_KINDS, WalServiceStats
from neon.utils.id import TenantId, TimelineId
from neon.utils.logging import get_logger
from neon.utils.lsn import Lsn

log = get_logger("safekeeper.http")

DEFAULT_WAL_SEG_SIZE = 16 * 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg


@dataclass
class HttpContext:
    node_id: int
    timelines: Timelines
    wal_service_stats: WalServiceStats
    broker_pushed: Callable[[], int] = lambda: 0


_CTX = web.AppKey("safekeeper", HttpContext)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(data), content_type="application/json")


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request.headers.get("x-request-id") or str(uuid.uuid4())
    try:
        response = await handler(request)
    except ApiError as e:
        response = _json({"msg": e.msg}, e.status)
    except TimelineNotFound as e:
        response = _json({"msg": str(e)}, 404)
    except TimelineCancelled as e:
        response = _json({"msg": str(e)}, 409)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        response = _json({"msg": "page not found" if e.status == 404 else e.reason}, e.status)
    except Exception as e:
        log.error("request failed", method=request.method, path=request.path, error=repr(e))
        response = _json({"msg": f"{type(e).__name__}: {e}" if not isinstance(e, TimelineDirExists) else str(e)}, 500)
    response.headers["x-request-id"] = request_id
    return response


def _ctx(request: web.Request) -> HttpContext:
    return request.app[_CTX]


def _tenant(text: str) -> TenantId:
    try:
        return TenantId(text)
    except ValueError:
        raise ApiError(400, f"invalid tenant id {text!r}") from None


def _timeline(text: str) -> TimelineId:
    try:
        return TimelineId(text)
    except ValueError:
        raise ApiError(400, f"invalid timeline id {text!r}") from None


def _path_ids(request: web.Request) -> tuple[TenantId, TimelineId]:
    return _tenant(request.match_info["tenant_id"]), _timeline(request.match_info["timeline_id"])


async def _no_body(request: web.Request) -> None:
    if request.can_read_body and await request.read():
        raise ApiError(400, "request body is not allowed for this method")


# --- routes ------------------------------------------------------------------------------------


async def status(request: web.Request) -> web.Response:
    return _json({"id": _ctx(request).node_id})


async def timeline_status(request: web.Request) -> web.Response:
    tenant_id, timeline_id = _path_ids(request)
    return _json(_ctx(request).timelines.get(tenant_id, timeline_id).status_json())


def _lsn_field(body: dict[str, Any], name: str, *, as_int: bool = False, required: bool = False) -> Lsn | None:
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(400, f"missing field `{name}`")
        return None
    try:
        if as_int:
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError
            return Lsn(value)
        if not isinstance(value, str):
            raise ValueError
        return Lsn.parse(value)
    except ValueError:
        kind = "an integer" if as_int else "an LSN string X/X"
        raise ApiError(400, f"invalid `{name}`: expected {kind}, got {value!r}") from None


def _int_field(body: dict[str, Any], name: str, default: int | None = None) -> int:
    value = body.get(name, default)
    if value is None:
        raise ApiError(400, f"missing field `{name}`")
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ApiError(400, f"invalid `{name}`: expected a non-negative integer, got {value!r}")
    return value


async def timeline_create(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    for name in ("tenant_id", "timeline_id"):
        if not isinstance(body.get(name), str):
            raise ApiError(400, f"missing field `{name}`")
    tenant_id = _tenant(body["tenant_id"])
    timeline_id = _timeline(body["timeline_id"])
    commit_lsn = _lsn_field(body, "commit_lsn", required=True)
    local_start_lsn = _lsn_field(body, "local_start_lsn", as_int=True)
    server = ServerInfo(
        pg_version=_int_field(body, "pg_version"),
        system_id=_int_field(body, "system_id", 0),
        wal_seg_size=_int_field(body, "wal_seg_size", DEFAULT_WAL_SEG_SIZE),
    )
    assert commit_lsn is not None
    try:
        state = control_file.initial(
            tenant_id, timeline_id, server, commit_lsn=commit_lsn, local_start_lsn=local_start_lsn
        )
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    await _ctx(request).timelines.create(state)
    return _json(None)


async def timeline_delete(request: web.Request) -> web.Response:
    tenant_id, timeline_id = _path_ids(request)
    await _no_body(request)
    return _json(await _ctx(request).timelines.delete(tenant_id, timeline_id))


async def tenant_delete(request: web.Request) -> web.Response:
    tenant_id = _tenant(request.match_info["tenant_id"])
    await _no_body(request)
    return _json(await _ctx(request).timelines.delete_tenant(tenant_id))


async def metrics(request: web.Request) -> web.Response:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(_ctx(request)))  # type: ignore[arg-type]
    return web.Response(body=generate_latest(registry), content_type="text/plain", charset="utf-8")


class _Collector:
    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[Metric]:
        labels = ["tenant_id", "timeline_id"]
        gauges = {
            name: GaugeMetricFamily(name, help_text, labels=labels)
            for name, help_text in (
                ("safekeeper_commit_lsn", "Current commit_lsn (not necessarily persisted)"),
                ("safekeeper_flush_lsn", "Current flush_lsn, the end of WAL fsynced to disk"),
                ("safekeeper_backup_lsn", "Current backup_lsn"),
                ("safekeeper_epoch_start_lsn", "Start LSN of the current term"),
                ("safekeeper_peer_horizon_lsn", "Current peer_horizon_lsn"),
                ("safekeeper_remote_consistent_lsn", "Pageserver remote_consistent_lsn"),
                ("safekeeper_ps_last_received_lsn", "Pageserver last_received_lsn"),
                ("safekeeper_timeline_active", "Whether the timeline is active"),
                ("safekeeper_connected_computes", "Number of connected proposer connections"),
                ("safekeeper_disk_usage_bytes", "Bytes of files in the timeline directory"),
                ("safekeeper_acceptor_term", "Current acceptor term"),
            )
        }
        fsyncs = writes = fsync_seconds = 0.0
        for tl in self.ctx.timelines.live():
            values = [str(tl.tenant_id), str(tl.timeline_id)]
            a = tl.acceptor
            active = tl.is_active()
            g = gauges
            g["safekeeper_commit_lsn"].add_metric(values, int(a.inmem.commit_lsn))
            g["safekeeper_flush_lsn"].add_metric(values, int(a.flush_lsn))
            g["safekeeper_backup_lsn"].add_metric(values, int(a.inmem.backup_lsn))
            g["safekeeper_epoch_start_lsn"].add_metric(values, int(a.epoch_start_lsn))
            g["safekeeper_peer_horizon_lsn"].add_metric(values, int(a.inmem.peer_horizon_lsn))
            g["safekeeper_remote_consistent_lsn"].add_metric(values, int(a.inmem.remote_consistent_lsn))
            g["safekeeper_ps_last_received_lsn"].add_metric(values, tl.aggregated_ps_feedback().last_received_lsn)
            g["safekeeper_timeline_active"].add_metric(values, int(active))
            g["safekeeper_connected_computes"].add_metric(values, tl.connected_computes)
            g["safekeeper_disk_usage_bytes"].add_metric(values, disk_usage(tl.directory))
            if active:
                g["safekeeper_acceptor_term"].add_metric(values, a.term)
            fsyncs += a.wal.metrics.fdatasyncs
            writes += a.stats.bytes_written
            fsync_seconds += a.stats.flush_seconds
        yield from gauges.values()
        for name, help_text, value in (
            ("safekeeper_wal_fsyncs", "fdatasync calls on WAL segments", fsyncs),
            ("safekeeper_flush_wal_seconds", "Seconds spent flushing WAL", fsync_seconds),
            ("safekeeper_write_wal_bytes", "WAL bytes written", writes),
            ("safekeeper_broker_pushed_updates", "Timeline infos published to the broker", self.ctx.broker_pushed()),
            (
                "safekeeper_wal_flushes_on_event_loop",
                "WAL fdatasyncs run on the event loop (one timeline receiving WAL)",
                self.ctx.timelines.sync_placement.flushes_on_loop,
            ),
            (
                "safekeeper_wal_flushes_in_worker_thread",
                "WAL fdatasyncs of the open segment run in a worker thread (several timelines receiving WAL)",
                self.ctx.timelines.sync_placement.flushes_in_thread,
            ),
        ):
            c = CounterMetricFamily(name, help_text)
            c.add_metric([], value)
            yield c
        stats = self.ctx.wal_service_stats
        for name, counter in (
            ("safekeeper_pg_queries_received", stats.received),
            ("safekeeper_pg_queries_finished", stats.finished),
        ):
            c = CounterMetricFamily(name, "WAL service commands by kind", labels=["query"])
            for kind in QUERY_KINDS:
                c.add_metric([kind], counter[kind])
            yield c


def make_app(ctx: HttpContext) -> web.Application:
    app = web.Application(middlewares=[_errors])
    app[_CTX] = ctx
    r = app.router
    r.add_get("/v1/status", status)
    r.add_get("/metrics", metrics)
    r.add_post("/v1/tenant/timeline", timeline_create)
    r.add_get("/v1/tenant/{tenant_id}/timeline/{timeline_id}", timeline_status)
    r.add_delete("/v1/tenant/{tenant_id}/timeline/{timeline_id}", timeline_delete)
    r.add_delete("/v1/tenant/{tenant_id}", tenant_delete)
    return app
