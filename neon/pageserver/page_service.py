"""The page service (spec pageserver §7.2-7.3, §8): what the pageserver's libpq commands mean.

`neon.pq.server.PqServer` owns connections, authentication and the wire protocol; this module
owns the commands a compute (or an operator) sends as simple queries:

* `pagestream <tenant_id> <timeline_id>`: a CopyBoth stream of GetPage@LSN-style requests
  (codec in `pagestream`), answered one by one, in order, each flushed before the next is read.
  A request that cannot be served (unknown relation, LSN wait timeout, GC'd LSN …) gets the
  pagestream error response and the stream goes on; a message that is not a request at all
  (malformed, CopyDone) ends the stream with an ErrorResponse, as in Neon.
* `basebackup <tenant_id> <timeline_id> [<lsn> [<prev_lsn>]] [--gzip]` and
  `fullbackup <tenant_id> <timeline_id> [<lsn> [<prev_lsn>]]`: the timeline's data directory as a
  tar in a CopyOut (`basebackup.write_basebackup`).
* `get_last_record_rlsn <tenant_id> <timeline_id>`, `set …` (ignored, for psycopg's SET datestyle).

Where to find a timeline is the caller's business (`TimelineLookup`), so the service runs on a
tenant manager, a plain mapping of tenants, or test doubles.

Deviations from Neon, on purpose:

* `basebackup` writes the *full* backup (every relation fork), like `fullbackup`. Neon's
  basebackup leaves relation data out because its patched compute fetches every page through
  pagestream; our computes are stock PostgreSQL 15 (DESIGN §2.3), which must find the relation
  files on disk.
* `basebackup` also accepts a prev LSN (the issue's form `[lsn] [prev_lsn] [--gzip]`): as Neon,
  `--gzip` in 4th position needs an explicit LSN; in addition a 4th token that is an LSN is the
  prev LSN and `--gzip` may then follow as the 5th. Neon rejects any 4th token but `--gzip`.
* Bad arguments (ids, LSN strings, parameter counts) are reported with SQLSTATE 22023
  (invalid_parameter_value) so a client can tell its own mistake from a server fault; Neon reports
  every command error as XX000, and its clients look only at the message text, which we keep.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Protocol

from neon.pageserver import pagestream as ps
from neon.pageserver.basebackup import BasebackupError, write_basebackup
from neon.pageserver.metrics import PageserverMetrics
from neon.pageserver.tenant import TimelineNotFound
from neon.pq.errors import PgError, SqlState
from neon.pq.server import Column, CopyOutStream, Session
from neon.utils.id import TenantId, TimelineId
from neon.utils.logging import get_logger
from neon.utils.lsn import Lsn

if TYPE_CHECKING:
    from neon.pageserver.tenant import Tenant
    from neon.pageserver.timeline import Timeline

log = get_logger("page_service")

DEFAULT_WAIT_LSN_TIMEOUT = 60.0
"""Seconds a request waits for its LSN to be ingested (Neon's `wait_lsn_timeout`)."""

DEFAULTTABLESPACE_OID = 1663


class TenantNotFound(KeyError):
    """No tenant with that id (raised by a `TimelineLookup`)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "tenant not found"


class TimelineLookup(Protocol):
    """Finds a timeline for a command; raises `TenantNotFound` / `tenant.TimelineNotFound`
    (or any other KeyError) for unknown ids."""

    def get_timeline(self, tenant_id: TenantId, timeline_id: TimelineId) -> Timeline: ...


class TenantMapLookup:
    """A `TimelineLookup` over a mapping of tenants (a tenant manager's dict, or a test's)."""

    def __init__(self, tenants: Mapping[TenantId, Tenant]) -> None:
        self.tenants = tenants

    def get_timeline(self, tenant_id: TenantId, timeline_id: TimelineId) -> Timeline:
        tenant = self.tenants.get(tenant_id)
        if tenant is None:
            raise TenantNotFound(f"Tenant {tenant_id} not found")
        if tenant.state != "Active":
            raise TenantNotFound(f"Tenant {tenant_id} is not active. Current state: {tenant.state}")
        return tenant.get_timeline(timeline_id)


def _bad_argument(message: str) -> PgError:
    return PgError(message, SqlState.INVALID_PARAMETER_VALUE)


def parse_tenant_id(text: str) -> TenantId:
    try:
        return TenantId(text)
    except ValueError as e:
        raise _bad_argument(f"Failed to parse tenant id from {text!r}: {e}") from None


def parse_timeline_id(text: str) -> TimelineId:
    try:
        return TimelineId(text)
    except ValueError as e:
        raise _bad_argument(f"Failed to parse timeline id from {text!r}: {e}") from None


def parse_lsn(text: str, what: str = "Lsn") -> Lsn:
    try:
        return Lsn.parse(text)
    except ValueError as e:
        raise _bad_argument(f"Failed to parse {what} from {text!r}: {e}") from None


class _CopyOutSink:
    """A basebackup sink that starts the CopyOut only when the first bytes come, so that a request
    `write_basebackup` rejects up front (bad LSN) is a plain ErrorResponse, not a failed COPY."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self.stream: CopyOutStream | None = None

    async def start(self) -> CopyOutStream:
        if self.stream is None:
            self.stream = await self._session.copy_out()
        return self.stream

    def write(self, data: bytes, /) -> Coroutine[object, object, None]:
        return self._write(bytes(data))

    async def _write(self, data: bytes) -> None:
        stream = await self.start()
        await stream.write(data)


class PageServiceHandler:
    """The page service as a `PqServer` handler factory: `PqServer(PageServiceHandler(lookup))`.

    `wait_lsn_timeout` (seconds) bounds every wait for an LSN (pagestream requests, basebackup
    at an explicit LSN)."""

    def __init__(
        self,
        lookup: TimelineLookup,
        *,
        wait_lsn_timeout: float = DEFAULT_WAIT_LSN_TIMEOUT,
        metrics: PageserverMetrics | None = None,
    ) -> None:
        if wait_lsn_timeout <= 0:
            raise ValueError(f"wait_lsn_timeout must be positive, not {wait_lsn_timeout}")
        self.lookup = lookup
        self.wait_lsn_timeout = wait_lsn_timeout
        self.metrics = metrics

    def __call__(self, session: Session) -> PageServiceConnection:
        return PageServiceConnection(self, session)


class PageServiceConnection:
    """One client connection of the page service (the per-connection `Handler`)."""

    def __init__(self, service: PageServiceHandler, session: Session) -> None:
        self.service = service
        self.session = session
        self.log = log.bind(conn=session.id)
        self._commands: dict[str, Callable[[str], Awaitable[None]]] = {
            "pagestream": self._pagestream,
            "basebackup": self._basebackup,
            "fullbackup": self._fullbackup,
            "get_last_record_rlsn": self._get_last_record_rlsn,
        }

    async def query(self, sql: str) -> None:
        query = sql.strip().rstrip(";").rstrip()
        if query[:4].lower() == "set " or query.lower() == "set":
            await self.session.command_complete("SELECT 1")
            return
        word, _, rest = query.partition(" ")
        command = self._commands.get(word)
        if command is None:
            raise PgError(f"unknown command {sql[:200]}", SqlState.INTERNAL_ERROR)
        self.log.debug("page service command", command=word)
        await command(rest)

    # --- helpers -------------------------------------------------------------------------------
    def _timeline(self, tenant_text: str, timeline_text: str) -> Timeline:
        tenant_id = parse_tenant_id(tenant_text)
        timeline_id = parse_timeline_id(timeline_text)
        try:
            tl = self.service.lookup.get_timeline(tenant_id, timeline_id)
        except (TenantNotFound, TimelineNotFound) as e:
            raise PgError(str(e), SqlState.INTERNAL_ERROR) from None
        except KeyError:
            raise PgError(f"timeline {tenant_id}/{timeline_id} not found", SqlState.INTERNAL_ERROR) from None
        if tl.state != "Active":
            raise PgError(
                f"Timeline {tenant_id}/{timeline_id} is not active, state: {tl.state}", SqlState.INTERNAL_ERROR
            )
        return tl

    async def _read_lsn(self, tl: Timeline, latest: bool, lsn: int) -> Lsn:
        """Neon's wait_or_get_last_lsn: the LSN to serve a request at, after waiting for it."""
        read_lsn, wait = ps.resolve_request_lsn(latest, lsn, tl.last_record_lsn)
        if wait:
            if tl.state != "Active":
                raise ps.PagestreamRequestError(f"Timeline is not active, state: {tl.state}")
            await tl.wait_lsn(read_lsn, self.service.wait_lsn_timeout)
        ps.check_gc_cutoff(read_lsn, tl.latest_gc_cutoff_lsn)
        return read_lsn

    # --- pagestream ----------------------------------------------------------------------------
    async def _pagestream(self, rest: str) -> None:
        # Neon splits on single spaces here (not on any whitespace as for the backups).
        params = rest.split(" ") if rest else []
        if len(params) != 2:
            raise _bad_argument("invalid param number for pagestream command")
        tl = self._timeline(params[0], params[1])
        stream = await self.session.copy_both()
        served = 0
        try:
            while True:
                # Terminate or EOF raise ClientDisconnected: the server ends the connection quietly.
                data = await stream.read()
                if data is None:
                    raise PgError("unexpected message: CopyDone during COPY", SqlState.PROTOCOL_VIOLATION)
                try:
                    req = ps.decode_request(data)
                except ps.PagestreamError as e:
                    raise PgError(str(e), SqlState.PROTOCOL_VIOLATION) from None
                resp = await self.handle_request(tl, req)
                await stream.write(ps.encode_response(resp))
                served += 1
        finally:
            self.log.debug("pagestream ended", requests=served)

    async def handle_request(self, tl: Timeline, req: ps.PagestreamRequest) -> ps.PagestreamResponse:
        """Serve one request; any failure is the pagestream error response (the stream goes on)."""
        started = time.monotonic()
        try:
            lsn = await self._read_lsn(tl, req.latest, req.lsn)
            if isinstance(req, ps.GetPageRequest):
                page = await tl.get_rel_page_at_lsn(req.rel, req.blkno, lsn, req.latest)
                metrics = self.service.metrics
                if metrics is not None:
                    metrics.getpage_seconds.observe(time.monotonic() - started)
                return ps.GetPageResponse(page)
            if isinstance(req, ps.NblocksRequest):
                return ps.NblocksResponse(tl.get_rel_size(req.rel, lsn, req.latest))
            if isinstance(req, ps.ExistsRequest):
                return ps.ExistsResponse(tl.get_rel_exists(req.rel, lsn))
            return ps.DbSizeResponse(tl.get_db_size(DEFAULTTABLESPACE_OID, req.dbnode, lsn))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # Neon answers every request error this way, bugs included: the compute turns the
            # message into an ERROR of the backend that asked, and the other backends go on.
            message = str(e) or type(e).__name__
            if self.service.metrics is not None:
                self.service.metrics.pagestream_errors.inc()
            self.log.error(
                "error reading relation or page version",
                request=ps.request_name(req),
                error=message,
                seconds=round(time.monotonic() - started, 6),
            )
            return ps.ErrorResponse(message)

    # --- backups -------------------------------------------------------------------------------
    async def _basebackup(self, rest: str) -> None:
        params = rest.split()
        if len(params) < 2:
            raise _bad_argument("invalid param number for basebackup command")
        lsn = parse_lsn(params[2]) if len(params) >= 3 else None
        prev_lsn: Lsn | None = None
        gzip = False
        extra = params[3:]
        if extra and extra[0] != "--gzip":
            try:
                prev_lsn = Lsn.parse(extra[0])
            except ValueError:
                raise _bad_argument(f"Parameter in position 3 unknown {extra[0]}") from None
            extra = extra[1:]
        if extra:
            if extra[0] != "--gzip":
                raise _bad_argument(f"Parameter in position {len(params) - len(extra)} unknown {extra[0]}")
            gzip = True
            extra = extra[1:]
        if extra:
            raise _bad_argument("invalid param number for basebackup command")
        tl = self._timeline(params[0], params[1])
        await self._send_backup(tl, lsn, prev_lsn, gzip=gzip)

    async def _fullbackup(self, rest: str) -> None:
        params = rest.split()
        if not 2 <= len(params) <= 4:
            raise _bad_argument("invalid param number for fullbackup command")
        lsn = parse_lsn(params[2]) if len(params) >= 3 else None
        prev_lsn = parse_lsn(params[3], "prev Lsn") if len(params) >= 4 else None
        tl = self._timeline(params[0], params[1])
        await self._send_backup(tl, lsn, prev_lsn, gzip=False)

    async def _send_backup(self, tl: Timeline, lsn: Lsn | None, prev_lsn: Lsn | None, *, gzip: bool) -> None:
        sink = _CopyOutSink(self.session)
        try:
            # full=True for both commands: see the module docstring.
            await write_basebackup(
                tl, sink, lsn=lsn, prev_lsn=prev_lsn, full=True, gzip=gzip, wait_timeout=self.service.wait_lsn_timeout
            )
        except BasebackupError as e:
            raise PgError(str(e), SqlState.INTERNAL_ERROR) from None
        stream = await sink.start()
        await stream.done()
        await self.session.command_complete("SELECT 1")

    # --- small commands ------------------------------------------------------------------------
    async def _get_last_record_rlsn(self, rest: str) -> None:
        params = rest.split()
        if len(params) != 2:
            raise _bad_argument("invalid param number for get_last_record_rlsn command")
        tl = self._timeline(params[0], params[1])
        last, prev = Lsn(tl.last_record_lsn), Lsn(tl.prev_record_lsn)
        await self.session.send_rows([Column("prev_lsn"), Column("last_lsn")], [(str(prev), str(last))])


__all__ = [
    "DEFAULT_WAIT_LSN_TIMEOUT",
    "PageServiceConnection",
    "PageServiceHandler",
    "TenantMapLookup",
    "TenantNotFound",
    "TimelineLookup",
    "parse_lsn",
    "parse_tenant_id",
    "parse_timeline_id",
]
