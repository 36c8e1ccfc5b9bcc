"""The management API's routes and error handling (Neon's `pageserver/src/http/routes.rs`, spec §9.1, §9.3).

Every error is JSON `{"msg": "..."}` with Neon's status: 400 for bodies, ids and LSNs that do not
parse, 404 for unknown tenants/timelines/routes, 409 for things that already exist, 406 for an
unusable branch point, 412 for a timeline with children, 503 for a tenant or ancestor that is not
active, 500 for anything unexpected. Each response carries `PAGESERVER_LAUNCH_TIMESTAMP` and an
`x-request-id` header. Testing endpoints (checkpoint, compact, break) are always enabled, as in Neon's
testing builds.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError

from neon.pageserver.broker_walreceiver import BrokerWalReceiver
from neon.pageserver.compaction import compact
from neon.pageserver.config import PageServerConf
from neon.pageserver.gc import gc_iteration
from neon.pageserver.tenant import BranchLsnError, Tenant, TenantError, TimelineExists, TimelineNotFound
from neon.pageserver.tenant_config import TenantConfError, TenantConfOverrides
from neon.pageserver.tenant_manager import (
    ShuttingDown,
    TenantExists,
    TenantManager,
    TenantManagerError,
    TenantNotActive,
    TenantNotFound,
)
from neon.pageserver.timeline import PageReconstructError, Timeline, WaitLsnTimeout
from neon.pageserver.walreceiver import WalSource
from neon.postgres.pg_distrib import PG_MAJOR
from neon.utils.failpoints import parse_actions
from neon.utils.id import TenantId, TimelineId
from neon.utils.lsn import Lsn

from .models import LayerMapInfo, TenantInfo, TimelineCreateRequest, TimelineInfo
from .openapi import openapi_handler

__all__ = ["ApiError", "make_app"]

log = structlog.get_logger("http")

MANAGER_KEY: web.AppKey[TenantManager] = web.AppKey("tenant_manager", TenantManager)
CONF_KEY: web.AppKey[PageServerConf] = web.AppKey("pageserver_conf", PageServerConf)
M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An error response: `status` with body `{"msg": msg}` (or `null` when `null_body`)."""

    def __init__(self, status: int, msg: str, *, null_body: bool = False) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg
        self.null_body = null_body


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(data), content_type="application/json")


def _error_response(status: int, msg: str) -> web.Response:
    return _json({"msg": msg}, status)


def _map_exception(e: BaseException) -> ApiError | None:
    # Storage-layer exceptions to Neon's statuses; anything not listed is a 500.
    if isinstance(e, ApiError):
        return e
    if isinstance(e, TenantNotFound | TimelineNotFound):
        return ApiError(404, str(e))
    if isinstance(e, TenantExists):
        return ApiError(409, str(e))
    if isinstance(e, TimelineExists):
        return ApiError(409, str(e), null_body=True)
    if isinstance(e, BranchLsnError):
        return ApiError(406, str(e))
    if isinstance(e, TenantNotActive | ShuttingDown):
        return ApiError(503, str(e))
    if isinstance(e, TenantConfError):
        return ApiError(400, str(e))
    return None


def _middlewares(launch_ts: str) -> list[Any]:
    @web.middleware
    async def headers_and_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = request.headers.get("x-request-id") or str(uuid.uuid4())
        try:
            response = await handler(request)
        except web.HTTPException as e:
            if e.status == 404:
                response = _error_response(404, "page not found")
            elif e.status >= 400:
                response = _error_response(e.status, e.reason)
            else:
                raise
        except Exception as e:
            api = _map_exception(e)
            if api is None:
                log.error("request failed", method=request.method, path=request.path, error=repr(e))
                response = _error_response(500, f"{type(e).__name__}: {e}")
            elif api.null_body:
                response = _json(None, api.status)
            else:
                response = _error_response(api.status, api.msg)
        response.headers["PAGESERVER_LAUNCH_TIMESTAMP"] = launch_ts
        response.headers["x-request-id"] = request_id
        return response

    return [headers_and_errors]


# --- request parsing -----------------------------------------------------------------------------
def _tenant_id(request: web.Request, value: str | None = None) -> TenantId:
    text = value if value is not None else request.match_info["tenant_id"]
    try:
        return TenantId(text)
    except ValueError as e:
        raise ApiError(400, f"Cannot parse tenant id {text!r}: {e}") from None


def _timeline_id(request: web.Request) -> TimelineId:
    text = request.match_info["timeline_id"]
    try:
        return TimelineId(text)
    except ValueError as e:
        raise ApiError(400, f"Cannot parse timeline id {text!r}: {e}") from None


async def _json_body(request: web.Request, *, allow_empty: bool = False) -> Any:
    raw = await request.read()
    if not raw.strip():
        if allow_empty:
            return {}
        raise ApiError(400, "Failed to parse json request: empty body")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"Failed to parse json request: {e}") from None


def _validation_msg(e: ValidationError) -> str:
    problems = []
    for err in e.errors(include_url=False):
        key = ".".join(str(p) for p in err["loc"]) or "<body>"
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown field `{key}`")
        elif err["type"] == "missing":
            problems.append(f"missing field `{key}`")
        else:
            problems.append(f"{key}: {err['msg'].removeprefix('Value error, ')}")
    return "Failed to parse json request: " + "; ".join(problems)


def _model(model: type[M], body: Any) -> M:
    if not isinstance(body, dict):
        raise ApiError(400, f"Failed to parse json request: expected a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise ApiError(400, _validation_msg(e)) from None


def _overrides(body: dict[str, Any]) -> TenantConfOverrides:
    # Neon's TenantConfig: null means "not set", like an absent key.
    return TenantConfOverrides.from_mapping({k: v for k, v in body.items() if v is not None}, source="request body")


def _bool_query(request: web.Request, name: str) -> bool:
    value = request.query.get(name)
    if value is None:
        return False
    if value not in ("true", "false"):
        raise ApiError(400, f"Failed to parse query parameter {name}: expected true or false, got {value!r}")
    return value == "true"


# --- handlers ------------------------------------------------------------------------------------
def _mgr(request: web.Request) -> TenantManager:
    return request.app[MANAGER_KEY]


def _conf(request: web.Request) -> PageServerConf:
    return request.app[CONF_KEY]


def _active_tenant(request: web.Request) -> Tenant:
    mgr = _mgr(request)
    if not mgr.loaded:
        raise ApiError(503, "Tenant map is not yet initialized")
    return mgr.get_tenant(_tenant_id(request), active=True)


def _active_timeline(request: web.Request) -> Timeline:
    tl = _active_tenant(request).get_timeline(_timeline_id(request))
    if tl.state != "Active":
        raise ApiError(503, f"Timeline {tl.timeline_id} is not active, state: {tl.state}")
    return tl


async def metrics(request: web.Request) -> web.Response:
    body = _mgr(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def status(request: web.Request) -> web.Response:
    return _json({"id": _conf(request).id})


async def tenant_list(request: web.Request) -> web.Response:
    mgr = _mgr(request)
    if not mgr.loaded:
        raise ApiError(503, "Tenant map is not yet initialized")
    infos = [
        TenantInfo(
            id=str(s.tenant_id),
            state=s.state_json(),
            current_physical_size=None,
            attachment_status=s.attachment_status_json(),
        ).model_dump(mode="json")
        for s in mgr.list_tenants()
    ]
    return _json(infos)


async def tenant_create(request: web.Request) -> web.Response:
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise ApiError(400, "Failed to parse json request: expected a JSON object")
    body = dict(body)
    raw_id = body.pop("new_tenant_id", None)
    generation = body.pop("generation", None)
    if generation is not None and (not isinstance(generation, int) or isinstance(generation, bool) or generation < 0):
        raise ApiError(400, f"Failed to parse json request: generation must be a u32, got {generation!r}")
    if raw_id is not None and not isinstance(raw_id, str):
        raise ApiError(400, "Failed to parse json request: new_tenant_id must be a string")
    tenant_id = _tenant_id(request, raw_id) if raw_id is not None else None
    overrides = _overrides(body)
    tenant = _mgr(request).create_tenant(tenant_id, overrides)
    return _json(str(tenant.tenant_id), 201)


async def tenant_status(request: web.Request) -> web.Response:
    slot = _mgr(request).get_slot(_tenant_id(request))
    info = TenantInfo(
        id=str(slot.tenant_id),
        state=slot.state_json(),
        current_physical_size=slot.physical_size(),
        attachment_status=slot.attachment_status_json(),
    )
    return _json(info.model_dump(mode="json"))


async def tenant_delete(request: web.Request) -> web.Response:
    tenant_id = _tenant_id(request)
    try:
        await _mgr(request).delete_tenant(tenant_id)
    except TenantNotFound:
        raise
    except TenantManagerError as e:
        raise ApiError(409, str(e)) from None
    # Neon answers 202 and deletes in the background; ours is done already, so the first poll 404s.
    return _json(None, 202)


async def tenant_detach(request: web.Request) -> web.Response:
    await _mgr(request).detach_tenant(_tenant_id(request), detach_ignored=_bool_query(request, "detach_ignored"))
    return _json(None)


async def tenant_attach(request: web.Request) -> web.Response:
    tenant_id = _tenant_id(request)
    if tenant_id in {s.tenant_id for s in _mgr(request).list_tenants()}:
        raise ApiError(409, f"tenant {tenant_id} already exists")
    # Attaching downloads the tenant from remote storage, which does not exist here yet.
    raise ApiError(400, "attach_tenant is not possible because pageserver was configured without remote storage")


async def tenant_ignore(request: web.Request) -> web.Response:
    await _mgr(request).ignore_tenant(_tenant_id(request))
    return _json(None)


async def tenant_load(request: web.Request) -> web.Response:
    tenant_id = _tenant_id(request)
    try:
        _mgr(request).load_tenant(tenant_id)
    except TenantNotFound as e:
        raise ApiError(400, str(e)) from None
    return _json(None, 202)


async def tenant_break(request: web.Request) -> web.Response:
    try:
        await _mgr(request).break_tenant(_tenant_id(request))
    except TenantNotFound:
        raise
    except TenantManagerError as e:
        raise ApiError(409, str(e)) from None
    return _json(None)


async def tenant_config_get(request: web.Request) -> web.Response:
    tenant = _mgr(request).get_tenant(_tenant_id(request))
    return _json(
        {
            "tenant_specific_overrides": tenant.overrides.to_json_dict(),
            "effective_config": tenant.conf().to_json_dict(),
        }
    )


async def tenant_config_put(request: web.Request) -> web.Response:
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise ApiError(400, "Failed to parse json request: expected a JSON object")
    body = dict(body)
    raw_id = body.pop("tenant_id", None)
    if not isinstance(raw_id, str):
        raise ApiError(400, "Failed to parse json request: missing field `tenant_id`")
    tenant_id = _tenant_id(request, raw_id)
    overrides = _overrides(body)
    _mgr(request).set_tenant_config(tenant_id, overrides)
    return _json(None)


async def timeline_list(request: web.Request) -> web.Response:
    tenant = _active_tenant(request)
    full = _bool_query(request, "include-non-incremental-logical-size")
    infos = [
        TimelineInfo.from_timeline(tl, include_non_incremental=full).model_dump(mode="json")
        for tl in sorted(tenant.timelines.values(), key=lambda t: bytes(t.timeline_id))
    ]
    return _json(infos)


async def timeline_create(request: web.Request) -> web.Response:
    tenant = _active_tenant(request)
    req = _model(TimelineCreateRequest, await _json_body(request))
    conf = _conf(request)
    if req.new_timeline_id in tenant.timelines:
        raise ApiError(409, f"timeline {req.new_timeline_id} already exists", null_body=True)
    if req.ancestor_timeline_id is not None:
        ancestor = tenant.get_timeline(req.ancestor_timeline_id)
        if ancestor.state != "Active":
            raise ApiError(503, f"ancestor timeline {ancestor.timeline_id} is not active, state: {ancestor.state}")
        if req.pg_version is not None and req.pg_version != ancestor.pg_version:
            raise ApiError(
                400, f"pg_version {req.pg_version} does not match the ancestor's pg_version {ancestor.pg_version}"
            )
        try:
            tl = await tenant.branch_timeline(
                req.new_timeline_id,
                req.ancestor_timeline_id,
                req.ancestor_start_lsn,
                timeout=conf.wait_lsn_timeout.total_seconds(),
            )
        except WaitLsnTimeout as e:
            raise ApiError(500, f"error waiting for ancestor LSN: {e}") from None
    else:
        if req.ancestor_start_lsn is not None:
            raise ApiError(400, "ancestor_start_lsn given without ancestor_timeline_id")
        pg_version = req.pg_version if req.pg_version is not None else PG_MAJOR
        if pg_version != PG_MAJOR:
            raise ApiError(400, f"pg_version {pg_version} is not supported (only {PG_MAJOR})")
        tl = await tenant.bootstrap_timeline(req.new_timeline_id, pg_version=pg_version)
    # The answer carries the new timeline's logical size (a bounded calculation that yields);
    # a failure leaves it null, as in a detail GET, rather than failing a create that happened.
    with contextlib.suppress(Exception):
        await tl.logical_size_now()
    return _json(TimelineInfo.from_timeline(tl).model_dump(mode="json"), 201)


async def timeline_detail(request: web.Request) -> web.Response:
    tenant = _mgr(request).get_tenant(_tenant_id(request))
    tl = tenant.get_timeline(_timeline_id(request))
    full = _bool_query(request, "include-non-incremental-logical-size")
    info = TimelineInfo.from_timeline(tl, include_non_incremental=full).model_dump(mode="json")
    receiver = tenant.wal_receivers.get(tl.timeline_id)
    if isinstance(receiver, BrokerWalReceiver):
        report = receiver.status_report()
        for key in ("wal_source_connstr", "last_received_msg_lsn", "last_received_msg_ts", "walreceiver_status"):
            info[key] = report[key]
    return _json(info)


async def timeline_delete(request: web.Request) -> web.Response:
    tenant = _active_tenant(request)
    timeline_id = _timeline_id(request)
    tl = tenant.get_timeline(timeline_id)
    if tl.state == "Stopping":
        raise ApiError(409, f"timeline {timeline_id} deletion is already in progress")
    children = [t.timeline_id for t in tenant.timelines.values() if t.ancestor is tl]
    if children:
        raise ApiError(412, f"timeline {timeline_id} has child timelines: {', '.join(map(str, children))}")
    try:
        await tenant.delete_timeline(timeline_id)
    except TimelineNotFound:
        raise
    except TenantError as e:
        raise ApiError(412, str(e)) from None
    return _json(None, 202)


async def timeline_checkpoint(request: web.Request) -> web.Response:
    tl = _active_timeline(request)
    # Neon's testing checkpoint: freeze and flush the open layer, then one compaction pass.
    await tl.freeze_and_flush()
    await compact(tl)
    return _json(None)


async def timeline_do_gc(request: web.Request) -> web.Response:
    tenant = _active_tenant(request)
    tl = _active_timeline(request)
    body = await _json_body(request, allow_empty=True)
    horizon = body.get("gc_horizon") if isinstance(body, dict) else None
    if horizon is not None and (not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 0):
        raise ApiError(400, "Failed to parse json request: gc_horizon must be a non-negative integer or null")
    result = await gc_iteration(tenant, tl, horizon)
    return _json(result.to_json())


async def timeline_compact(request: web.Request) -> web.Response:
    tl = _active_timeline(request)
    await compact(tl)
    return _json(None)


async def timeline_layers(request: web.Request) -> web.Response:
    tl = _active_timeline(request)
    return _json(LayerMapInfo.from_timeline(tl).to_json())


async def timeline_wal_source_put(request: web.Request) -> web.Response:
    """Our extension (no Neon equivalent: Neon's pageserver learns its sources from the broker):
    {"connstr": "host=... port=... user=..."} makes the timeline stream WAL from that Postgres,
    {"connstr": null} stops it. Persisted with the timeline, resumed after a restart."""
    tenant = _active_tenant(request)
    timeline_id = _timeline_id(request)
    tenant.get_timeline(timeline_id)
    body = await _json_body(request)
    if not isinstance(body, dict) or set(body) != {"connstr"}:
        raise ApiError(400, 'Failed to parse json request: expected {"connstr": <string or null>}')
    connstr = body["connstr"]
    if connstr is not None and not isinstance(connstr, str):
        raise ApiError(400, "Failed to parse json request: connstr must be a string or null")
    try:
        source = None if connstr is None else WalSource.parse(connstr)
    except ValueError as e:
        raise ApiError(400, f"invalid connstr: {e}") from None
    await tenant.set_wal_source(timeline_id, source)
    return _json(None)


async def timeline_wal_source_get(request: web.Request) -> web.Response:
    tenant = _active_tenant(request)
    timeline_id = _timeline_id(request)
    source = tenant.wal_source(timeline_id)
    receiver = tenant.wal_receivers.get(timeline_id)
    st = receiver.status if receiver is not None else None
    return _json(
        {
            "connstr": None if source is None else source.connstr(),
            "connected": bool(st and st.connected),
            "connects": st.connects if st else 0,
            "last_received_lsn": str(Lsn(st.last_received_lsn)) if st else "0/0",
            "last_error": st.last_error if st else None,
            # Following the broker: which safekeeper, the candidates seen, reconnects.
            "manager": receiver.status_report() if isinstance(receiver, BrokerWalReceiver) else None,
        }
    )


async def failpoints_configure(request: web.Request) -> web.Response:
    """Neon's testing `PUT /v1/failpoints`: `[{"name": ..., "actions": ...}]`, answered with `null`.
    Every entry is checked before any is applied (Neon applies them one by one)."""
    body = await _json_body(request)
    if not isinstance(body, list):
        raise ApiError(400, "Failed to parse json request: expected a JSON array of {name, actions}")
    parsed: list[tuple[str, str]] = []
    for i, item in enumerate(body):
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("name"), str)
            or not isinstance(item.get("actions"), str)
        ):
            raise ApiError(400, f'Failed to parse json request: entry {i} must be {{"name": str, "actions": str}}')
        try:
            parse_actions(item["actions"])
        except ValueError as e:
            raise ApiError(400, f"Failed to configure failpoints: {e}") from None
        parsed.append((item["name"], item["actions"]))
    failpoints = _mgr(request).failpoints
    for name, actions in parsed:
        failpoints.configure(name, actions)  # logs "cfg failpoint"
    return _json(None)


_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


async def timeline_lsn_by_timestamp(request: web.Request) -> web.Response:
    tl = _active_timeline(request)
    text = request.query.get("timestamp")
    if text is None:
        raise ApiError(400, "Missing query parameter 'timestamp'")
    try:
        when = datetime.fromisoformat(text)
    except ValueError as e:
        raise ApiError(400, f"Invalid timestamp {text!r}: {e}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = when - _PG_EPOCH
    ts = (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
    kind, lsn = await tl.find_lsn_for_timestamp(ts, tl.latest_gc_cutoff_lsn, tl.last_record_lsn)
    return _json(str(Lsn(lsn)) if kind == "present" else kind)


def _format_rfc3339(pg_ts: int) -> str:
    """A Postgres timestamp (µs since 2000) as Neon prints it (humantime's smart RFC 3339): UTC,
    'Z', no fraction when it is whole seconds, else nine fractional digits."""
    secs, micros = divmod(pg_ts, 1_000_000)
    text = (_PG_EPOCH + timedelta(seconds=secs)).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}Z" if micros == 0 else f"{text}.{micros * 1000:09d}Z"


async def timeline_timestamp_of_lsn(request: web.Request) -> web.Response:
    """The newest commit timestamp visible at `lsn` (404 with a null body when there is none).
    Read errors are 500s carrying the read's own message, as Neon's ("Invalid LSN" for 0/0,
    "could not find data for key ..." before initdb)."""
    tl = _active_timeline(request)
    text = request.query.get("lsn")
    if text is None:
        raise ApiError(400, "Missing query parameter 'lsn'")
    try:
        lsn = Lsn(text)
    except ValueError:
        raise ApiError(400, f"Invalid LSN: {text!r}") from None
    try:
        ts = await tl.get_timestamp_for_lsn(lsn)
    except PageReconstructError as e:
        raise ApiError(500, str(e)) from None
    if ts is None:
        return _json(None, 404)
    return _json(_format_rfc3339(ts))


def make_app(manager: TenantManager, conf: PageServerConf) -> web.Application:
    """The management API over `manager`. Refuses settings this implementation cannot honour."""
    conf.refuse_unsupported()
    app = web.Application(middlewares=_middlewares(datetime.now(UTC).isoformat()))
    app[MANAGER_KEY] = manager
    app[CONF_KEY] = conf
    r = app.router
    r.add_get("/v1/status", status)
    r.add_get("/metrics", metrics)
    r.add_get("/v1/tenant", tenant_list)
    r.add_post("/v1/tenant", tenant_create)
    r.add_put("/v1/tenant/config", tenant_config_put)
    r.add_get("/v1/tenant/{tenant_id}", tenant_status)
    r.add_delete("/v1/tenant/{tenant_id}", tenant_delete)
    r.add_get("/v1/tenant/{tenant_id}/config", tenant_config_get)
    r.add_post("/v1/tenant/{tenant_id}/detach", tenant_detach)
    r.add_post("/v1/tenant/{tenant_id}/attach", tenant_attach)
    r.add_post("/v1/tenant/{tenant_id}/ignore", tenant_ignore)
    r.add_post("/v1/tenant/{tenant_id}/load", tenant_load)
    r.add_put("/v1/tenant/{tenant_id}/break", tenant_break)
    r.add_get("/v1/tenant/{tenant_id}/timeline", timeline_list)
    r.add_post("/v1/tenant/{tenant_id}/timeline", timeline_create)
    tl = "/v1/tenant/{tenant_id}/timeline/{timeline_id}"
    r.add_get(tl, timeline_detail)
    r.add_delete(tl, timeline_delete)
    r.add_put(tl + "/checkpoint", timeline_checkpoint)
    r.add_put(tl + "/compact", timeline_compact)
    r.add_put(tl + "/do_gc", timeline_do_gc)
    r.add_get(tl + "/layer", timeline_layers)
    r.add_put(tl + "/wal_source", timeline_wal_source_put)
    r.add_get(tl + "/get_lsn_by_timestamp", timeline_lsn_by_timestamp)
    r.add_get(tl + "/get_timestamp_of_lsn", timeline_timestamp_of_lsn)
    r.add_get("/v1/doc", openapi_handler)
    r.add_get("/swagger.yml", openapi_handler)
    r.add_get(tl + "/wal_source", timeline_wal_source_get)
    r.add_put("/v1/failpoints", failpoints_configure)
    return app
