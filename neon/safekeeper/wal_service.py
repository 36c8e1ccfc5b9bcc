"""The safekeeper's libpq WAL service (spec safekeeper-and-broker §2.1, §4.1): what each command
on the `--listen-pg` port means. `neon.pq.server.PqServer` owns the wire protocol; this module
owns startup-option parsing and command dispatch:

* `START_WAL_PUSH` — the proposer protocol (`receive_wal`);
* `START_REPLICATION [SLOT s] [PHYSICAL] X/X [TIMELINE n] [(term='N')]` — a walsender (`send_wal`);
* `IDENTIFY_SYSTEM`, `TIMELINE_STATUS`;
* `set datestyle to ...` — answered `SELECT 1` (psycopg2 sends it on connect).

Every command except the last needs `tenant_id` and `timeline_id` in the startup `options`
(`-c timeline_id=<hex> tenant_id=<hex>`; the legacy names `ztenantid` / `ztimelineid` work too).
Errors are ErrorResponses with SQLSTATE XX000 that end the command, never the other connections.
`JSON_CTRL` (a test-only hook in Neon) is not implemented.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from neon.pq.errors import PgError, SqlState
from neon.pq.messages import INT4_OID
from neon.pq.server import Column, Session
from neon.safekeeper.receive_wal import handle_wal_push
from neon.safekeeper.send_wal import handle_start_replication, is_recovery_client
from neon.safekeeper.timeline import TimelineError, Timelines
from neon.utils.id import TenantId, TimelineId
from neon.utils.logging import get_logger

log = get_logger("safekeeper.wal_service")

QUERY_KINDS = ("START_WAL_PUSH", "START_REPLICATION", "IDENTIFY_SYSTEM", "TIMELINE_STATUS", "JSON_CTRL")

# Startup-option keys naming the timeline, with their legacy aliases.
_TENANT_KEYS = ("tenant_id", "ztenantid")
_TIMELINE_KEYS = ("timeline_id", "ztimelineid")


def split_options(options: str) -> list[str]:
    """Split a startup `options` string on unescaped whitespace (Postgres' pg_split_opts)."""
    tokens: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in options:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if current:
                tokens.append("".join(current))
                current = []
        else:
            current.append(ch)
    if current:
        tokens.append("".join(current))
    return tokens


@dataclass(frozen=True, slots=True)
class ConnectionOptions:
    tenant_id: TenantId | None = None
    timeline_id: TimelineId | None = None
    availability_zone: str | None = None


def parse_connection_options(options: str | None) -> ConnectionOptions:
    """tenant/timeline ids (and availability_zone) from `key=value` tokens; `-c` and unknown keys
    are ignored. Malformed ids raise PgError."""
    tenant: TenantId | None = None
    timeline: TimelineId | None = None
    az: str | None = None
    for token in split_options(options or ""):
        key, sep, value = token.partition("=")
        if not sep:
            continue
        try:
            if key in _TENANT_KEYS:
                tenant = TenantId(value)
            elif key in _TIMELINE_KEYS:
                timeline = TimelineId(value)
        except ValueError:
            raise PgError(f"invalid {key} in startup options: {value!r}") from None
        if key == "availability_zone":
            az = value
    return ConnectionOptions(tenant, timeline, az)


@dataclass(slots=True)
class WalServiceStats:
    """Per-command counters for /metrics (`safekeeper_pg_queries_*_total{query=...}`)."""

    received: Counter[str] = field(default_factory=Counter)
    finished: Counter[str] = field(default_factory=Counter)


class WalServiceHandler:
    """The PqServer handler factory: one `WalServiceConnection` per client."""

    def __init__(self, timelines: Timelines, *, node_id: int, stats: WalServiceStats | None = None) -> None:
        self.timelines = timelines
        self.node_id = node_id
        self.stats = stats or WalServiceStats()

    def __call__(self, session: Session) -> WalServiceConnection:
        return WalServiceConnection(self, session)


class WalServiceConnection:
    def __init__(self, service: WalServiceHandler, session: Session) -> None:
        self.service = service
        self.session = session
        self._options: ConnectionOptions | None = None
        self._options_error: PgError | None = None
        try:
            self._options = parse_connection_options(session.options)
        except PgError as e:
            self._options_error = e  # reported by the first command, as Neon does

    def _ids(self) -> tuple[TenantId, TimelineId]:
        if self._options_error is not None:
            raise self._options_error
        opts = self._options
        if opts is None or opts.tenant_id is None:
            raise PgError("tenant_id is required in the startup options (-c tenant_id=<hex>)")
        if opts.timeline_id is None:
            raise PgError("timeline_id is required in the startup options (-c timeline_id=<hex>)")
        return opts.tenant_id, opts.timeline_id

    async def query(self, sql: str) -> None:
        text = sql.strip().rstrip(";").strip()
        upper = text.upper()
        if upper.startswith("SET DATESTYLE TO"):
            await self.session.command_complete("SELECT 1")
            return
        kind = next((k for k in QUERY_KINDS if upper.startswith(k)), None)
        if kind is None:
            raise PgError(f"unsupported command {text[:100]!r}", SqlState.INTERNAL_ERROR)
        stats = self.service.stats
        stats.received[kind] += 1
        try:
            tenant_id, timeline_id = self._ids()
            try:
                await self._run(kind, text, tenant_id, timeline_id)
            except TimelineError as e:
                raise PgError(str(e)) from None
        finally:
            stats.finished[kind] += 1

    async def _run(self, kind: str, text: str, tenant_id: TenantId, timeline_id: TimelineId) -> None:
        timelines = self.service.timelines
        session = self.session
        if kind == "START_WAL_PUSH":
            await handle_wal_push(session, timelines, tenant_id, timeline_id)
        elif kind == "START_REPLICATION":
            await handle_start_replication(session, timelines, tenant_id, timeline_id, text)
        elif kind == "IDENTIFY_SYSTEM":
            tl = timelines.get(tenant_id, timeline_id)
            lsn = tl.flush_lsn if is_recovery_client(session.application_name) else tl.commit_lsn
            await session.send_rows(
                [Column("systemid"), Column("timeline", INT4_OID), Column("xlogpos"), Column("dbname")],
                [(str(tl.state.server.system_id), 1, str(lsn), None)],
                tag="IDENTIFY_SYSTEM",
            )
        elif kind == "TIMELINE_STATUS":
            found = timelines.find(tenant_id, timeline_id)
            rows = [] if found is None or found.cancelled else [(str(found.flush_lsn), str(found.commit_lsn))]
            await session.send_rows([Column("flush_lsn"), Column("commit_lsn")], rows, tag="TIMELINE_STATUS")
        else:  # JSON_CTRL
            raise PgError("JSON_CTRL is not supported by this safekeeper", SqlState.INTERNAL_ERROR)
