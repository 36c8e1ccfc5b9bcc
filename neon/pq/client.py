"""An asyncio Postgres client on top of `codec.ClientConnection`, with physical replication.

For our own services and tests: simple queries returning text rows, COPY in/out/both, and the
client side of streaming replication (IDENTIFY_SYSTEM, START_REPLICATION, XLogData/keepalive,
standby status 'r', Neon's 'z' feedback). Authentication: trust, cleartext password and md5; a
server that insists on SASL/SCRAM gets a clear refusal. No TLS: we never send SSLRequest.

`host` may be a directory (starting with '/'): the Unix socket `<dir>/.s.PGSQL.<port>`, as libpq.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from neon.pq.codec import DEFAULT_MAX_MESSAGE_SIZE, ClientConnection, ClientEvent, ConnectionClosed, NeedData, State
from neon.pq.errors import LocalProtocolError, PgError, ProtocolViolation
from neon.pq.messages import (
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationRequest,
    AuthenticationSASL,
    CancelRequest,
    CommandComplete,
    CopyBothResponse,
    CopyData,
    CopyDone,
    CopyFail,
    CopyInResponse,
    CopyOutResponse,
    DataRow,
    EmptyQueryResponse,
    ErrorResponse,
    FieldDescription,
    FrontendMessage,
    NegotiateProtocolVersion,
    NoticeResponse,
    NotificationResponse,
    ParameterStatus,
    PasswordMessage,
    Query,
    ReadyForQuery,
    RowDescription,
    StartupMessage,
    Terminate,
    md5_password,
)
from neon.pq.replication import (
    HotStandbyFeedback,
    PageserverFeedback,
    PrimaryKeepalive,
    StandbyStatusUpdate,
    XLogData,
    decode_server_message,
    pg_now,
)
from neon.utils.logging import get_logger
from neon.utils.lsn import Lsn

log = get_logger("pq.client")


class ConnectionLost(ConnectionError):
    """The server closed the connection (or it broke) while we expected a message."""


class AuthenticationFailed(PgError):
    """We cannot authenticate the way the server asks (no password given, SASL requested)."""


Row = tuple[str | bytes | None, ...]


@dataclass(slots=True)
class QueryResult:
    """One statement's result: its columns (empty for commands), rows as text, and command tag."""

    columns: tuple[FieldDescription, ...] = ()
    rows: list[Row] = field(default_factory=list)
    tag: str | None = None


class IdentifySystem(NamedTuple):
    systemid: int
    timeline: int
    xlogpos: Lsn
    dbname: str | None


def _decode_row(desc: tuple[FieldDescription, ...], row: DataRow) -> Row:
    out: list[str | bytes | None] = []
    for i, v in enumerate(row.values):
        binary = i < len(desc) and desc[i].format == 1
        out.append(v if v is None or binary else v.decode("utf-8"))
    return tuple(out)


def _socket_path(host: str, port: int) -> str:
    return f"{host.rstrip('/')}/.s.PGSQL.{port}"


class PgConnection:
    """One connection; methods must not be used concurrently, except a copy stream's read/write."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, codec: ClientConnection) -> None:
        self._reader = reader
        self._writer = writer
        self.codec = codec
        self.notices: collections.deque[NoticeResponse] = collections.deque(maxlen=100)
        self.notifications: collections.deque[NotificationResponse] = collections.deque(maxlen=100)
        self._address: tuple[str, int] = ("", 0)

    # --- properties ---------------------------------------------------------------------------
    @property
    def parameters(self) -> dict[str, str]:
        """Server parameters announced by ParameterStatus (server_version, client_encoding …)."""
        return self.codec.parameters

    @property
    def backend_pid(self) -> int | None:
        return self.codec.backend_key.pid if self.codec.backend_key else None

    @property
    def closed(self) -> bool:
        return self.codec.state in (State.CLOSED, State.ERROR)

    # --- I/O ----------------------------------------------------------------------------------
    async def _send(self, *messages: FrontendMessage) -> None:
        self._write(b"".join(self.codec.send(m) for m in messages))
        await self._writer.drain()

    def _write(self, data: bytes) -> None:
        # A socket closed under us is a lost connection (uvloop would raise RuntimeError).
        if self._writer.is_closing():
            raise ConnectionLost("the server closed the connection")
        self._writer.write(data)

    async def _read_chunk(self) -> bytes:
        try:
            return await self._reader.read(65536)
        except ConnectionError as e:
            raise ConnectionLost(f"connection to server lost: {e}") from e

    async def _next(self) -> ClientEvent:
        """The next server message; notices and notifications are recorded and skipped."""
        while True:
            ev = self.codec.next_event()
            if isinstance(ev, NeedData):
                self.codec.receive_data(await self._read_chunk())
                continue
            if isinstance(ev, ConnectionClosed):
                raise ConnectionLost("server closed the connection unexpectedly")
            if isinstance(ev, NoticeResponse):
                self.notices.append(ev)
                log.debug("server notice", severity=ev.severity, message=ev.message)
                continue
            if isinstance(ev, NotificationResponse):
                self.notifications.append(ev)
                continue
            if isinstance(ev, ParameterStatus):
                continue
            return ev

    def _check_ready(self) -> None:
        if self.codec.state is not State.READY:
            raise LocalProtocolError(f"connection is busy or closed ({self.codec.state.value})")

    # --- startup ------------------------------------------------------------------------------
    async def _startup(self, params: dict[str, str], password: str | None) -> None:
        user = params["user"]
        await self._send(StartupMessage(params))
        while True:
            ev = await self._next()
            if isinstance(ev, AuthenticationOk):
                break
            if isinstance(ev, ErrorResponse):
                raise PgError.from_fields(ev.fields)
            if isinstance(ev, NegotiateProtocolVersion):
                continue
            if isinstance(ev, AuthenticationCleartextPassword | AuthenticationMD5Password):
                if password is None:
                    raise AuthenticationFailed("the server requested a password but none was given", "28P01")
                answer = password if isinstance(ev, AuthenticationCleartextPassword) else None
                if isinstance(ev, AuthenticationMD5Password):
                    answer = md5_password(user, password, ev.salt)
                assert answer is not None
                await self._send(PasswordMessage(answer))
                continue
            if isinstance(ev, AuthenticationSASL):
                raise AuthenticationFailed(
                    f"the server requested SASL authentication ({', '.join(ev.mechanisms)}), which this client "
                    "does not support; configure password or md5 authentication for this user",
                    "28000",
                )
            if isinstance(ev, AuthenticationRequest):
                raise AuthenticationFailed(f"unsupported authentication request (code {ev.code})", "28000")
            raise ProtocolViolation(f"unexpected {type(ev).__name__} during authentication")
        while True:
            ev = await self._next()
            if isinstance(ev, ReadyForQuery):
                return
            if isinstance(ev, ErrorResponse):
                raise PgError.from_fields(ev.fields)

    # --- queries --------------------------------------------------------------------------------
    async def query_results(self, sql: str) -> list[QueryResult]:
        """Run a simple query (possibly several statements); raise PgError if the server reports one."""
        self._check_ready()
        await self._send(Query(sql))
        return await self._collect_results()

    async def _collect_results(self) -> list[QueryResult]:
        results: list[QueryResult] = []
        current: QueryResult | None = None
        error: PgError | None = None
        while True:
            ev = await self._next()
            if isinstance(ev, RowDescription):
                current = QueryResult(ev.fields)
            elif isinstance(ev, DataRow):
                if current is None:
                    current = QueryResult()
                current.rows.append(_decode_row(current.columns, ev))
            elif isinstance(ev, CommandComplete):
                (current or (current := QueryResult())).tag = ev.tag
                results.append(current)
                current = None
            elif isinstance(ev, EmptyQueryResponse):
                results.append(QueryResult())
            elif isinstance(ev, ErrorResponse):
                error = PgError.from_fields(ev.fields)
                if self.closed:
                    raise error
            elif isinstance(ev, CopyInResponse):
                # Plain queries have no data to send; abort the COPY so the server reports it.
                await self._send(CopyFail("COPY FROM STDIN is not supported by query(); use copy_in()"))
            elif isinstance(ev, CopyOutResponse | CopyBothResponse):
                await self._abandon_copy()
            elif isinstance(ev, ReadyForQuery):
                break
            elif isinstance(ev, CopyData | CopyDone):
                continue
        if error is not None:
            raise error
        return results

    async def _abandon_copy(self) -> None:
        if self.codec.state is State.COPY_BOTH:
            await self._send(CopyDone())
        while self.codec.state in (State.COPY_OUT, State.COPY_BOTH):
            ev = await self._next()
            if isinstance(ev, ErrorResponse):
                raise PgError.from_fields(ev.fields)

    async def query(self, sql: str) -> list[Row]:
        """The rows (text, None for NULL) of the last statement in `sql`."""
        results = await self.query_results(sql)
        return results[-1].rows if results else []

    async def execute(self, sql: str) -> str | None:
        """Run `sql`, returning the last command tag."""
        results = await self.query_results(sql)
        return results[-1].tag if results else None

    # --- COPY -----------------------------------------------------------------------------------
    async def _start_copy(self, sql: str, kind: type) -> CopyStream:
        self._check_ready()
        await self._send(Query(sql))
        while True:
            ev = await self._next()
            if isinstance(ev, kind):
                return CopyStream(self, ev)  # type: ignore[arg-type]
            if isinstance(ev, ErrorResponse):
                err = PgError.from_fields(ev.fields)
                if not self.closed:
                    await self._collect_results()
                raise err
            if isinstance(ev, ReadyForQuery):
                raise LocalProtocolError(f"{sql[:60]!r} completed without starting a COPY")
            if isinstance(ev, CopyInResponse | CopyOutResponse | CopyBothResponse):
                stream = CopyStream(self, ev)
                await stream.abort(f"expected {kind.__name__}, got {type(ev).__name__}")
                raise LocalProtocolError(f"expected {kind.__name__}, got {type(ev).__name__}")

    async def copy_out(self, sql: str) -> CopyStream:
        """Start `COPY … TO STDOUT` (or any command answering CopyOutResponse); read until None."""
        return await self._start_copy(sql, CopyOutResponse)

    async def copy_in(self, sql: str, chunks: Iterable[bytes] | AsyncIterable[bytes]) -> str | None:
        """Run `COPY … FROM STDIN` with the given data; returns the command tag."""
        stream = await self._start_copy(sql, CopyInResponse)
        if isinstance(chunks, AsyncIterable):
            async for chunk in chunks:
                await stream.write(chunk)
        else:
            for chunk in chunks:
                await stream.write(chunk)
        results = await stream.finish()
        return results[-1].tag if results else None

    async def copy_both(self, sql: str) -> CopyStream:
        """Start a command answering CopyBothResponse (START_REPLICATION, pagestream …)."""
        return await self._start_copy(sql, CopyBothResponse)

    # --- replication ----------------------------------------------------------------------------
    async def identify_system(self) -> IdentifySystem:
        """IDENTIFY_SYSTEM on a replication connection: (systemid, timeline, xlogpos, dbname)."""
        rows = await self.query("IDENTIFY_SYSTEM")
        if len(rows) != 1 or len(rows[0]) < 4:
            raise ProtocolViolation(f"IDENTIFY_SYSTEM returned {rows!r}, expected one row of 4 columns")
        systemid, timeline, xlogpos, dbname = rows[0][:4]
        if not isinstance(systemid, str) or not isinstance(timeline, str) or not isinstance(xlogpos, str):
            raise ProtocolViolation(f"IDENTIFY_SYSTEM returned NULL or binary values: {rows[0]!r}")
        return IdentifySystem(int(systemid), int(timeline), Lsn.parse(xlogpos), dbname)  # type: ignore[arg-type]

    async def start_replication(
        self, lsn: int | str, *, slot: str | None = None, timeline: int | None = None
    ) -> ReplicationStream:
        """START_REPLICATION [SLOT s] PHYSICAL X/X [TIMELINE t]; iterate the stream for messages."""
        start = Lsn.parse(lsn) if isinstance(lsn, str) else Lsn(lsn)
        cmd = "START_REPLICATION"
        if slot is not None:
            cmd += f' SLOT "{slot}"'
        cmd += f" PHYSICAL {start}"
        if timeline is not None:
            cmd += f" TIMELINE {timeline}"
        return ReplicationStream(await self.copy_both(cmd), start)

    # --- lifecycle ------------------------------------------------------------------------------
    async def cancel(self) -> None:
        """Ask the server to cancel the running query (a CancelRequest on a new connection)."""
        key = self.codec.backend_key
        if key is None:
            raise LocalProtocolError("the server sent no BackendKeyData; cannot cancel")
        reader, writer = await _open(*self._address)
        try:
            writer.write(CancelRequest(key.pid, key.secret).encode())
            await writer.drain()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                self._writer.write(self.codec.send(Terminate()))
                await self._writer.drain()
        self._writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self._writer.wait_closed()

    async def __aenter__(self) -> PgConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class CopyStream:
    """Client side of a COPY: `read` the server's CopyData (None once it sent CopyDone), `write`
    ours, `done` to send CopyDone, and `finish` to end the copy and collect the command's results.

    An ErrorResponse during the copy is raised as PgError (by `read` or `finish`), after the
    connection has been brought back to idle.
    """

    def __init__(self, conn: PgConnection, response: CopyInResponse | CopyOutResponse | CopyBothResponse) -> None:
        self.conn = conn
        self.response = response
        self._server_done = isinstance(response, CopyInResponse)
        self._results: list[QueryResult] | None = None
        self._complete: CommandComplete | None = None  # the copy's CommandComplete, if read() saw it

    @property
    def active(self) -> bool:
        return self.conn.codec.state in (State.COPY_IN, State.COPY_OUT, State.COPY_BOTH)

    async def read(self) -> bytes | None:
        if self._server_done or not self.active:
            return None
        conn = self.conn
        codec = conn.codec
        while True:
            # Fast lane for CopyData after CopyData (replication, pagestream); anything else below.
            data = codec.next_copy_data()
            if data is None:
                break
            if not isinstance(data, NeedData):
                return data
            codec.receive_data(await conn._read_chunk())
        while True:
            ev = await conn._next()
            if isinstance(ev, CopyData):
                return ev.data
            if isinstance(ev, CopyDone):
                self._server_done = True
                return None
            if isinstance(ev, CommandComplete):
                # The server ended the copy without CopyDone (a walsender at shutdown).
                self._server_done = True
                self._complete = ev
                return None
            if isinstance(ev, ErrorResponse):
                await self._fail(ev)
            raise ProtocolViolation(f"unexpected {type(ev).__name__} during COPY")

    async def _fail(self, ev: ErrorResponse) -> None:
        self._server_done = True
        err = PgError.from_fields(ev.fields)
        if not self.conn.closed:
            # Bring the connection back to idle so it stays usable.
            with contextlib.suppress(PgError):
                self._results = await self.conn._collect_results()
        raise err

    async def write(self, data: bytes) -> None:
        codec = self.conn.codec
        if codec.state not in (State.COPY_IN, State.COPY_BOTH):
            raise LocalProtocolError("the COPY is over (the server may have reported an error)")
        self.conn._write(codec.copy_data_header(len(data)) + data)
        await self.conn._writer.drain()

    def write_nowait(self, data: bytes) -> None:
        """Queue a CopyData without waiting for the socket to drain: for small messages sent from
        a callback (a standby status update); bulk data goes through `write`."""
        codec = self.conn.codec
        if codec.state not in (State.COPY_IN, State.COPY_BOTH):
            raise LocalProtocolError("the COPY is over (the server may have reported an error)")
        self.conn._write(codec.copy_data_header(len(data)) + data)

    def write_buffer_size(self) -> int:
        """Bytes queued by `write_nowait` that the socket has not taken yet."""
        return self.conn._writer.transport.get_write_buffer_size()

    async def drain(self) -> None:
        """Wait until the socket takes what `write_nowait` queued (flow control)."""
        await self.conn._writer.drain()

    async def done(self) -> None:
        """Send CopyDone (our side finished)."""
        codec = self.conn.codec
        if codec.state is State.COPY_IN or (codec.state is State.COPY_BOTH and not codec.copy_client_done):
            await self.conn._send(CopyDone())

    async def abort(self, message: str = "aborted by the client") -> None:
        """Give up on the copy: CopyFail for copy-in, CopyDone otherwise; then drain to idle."""
        codec = self.conn.codec
        if codec.state is State.COPY_IN:
            await self.conn._send(CopyFail(message))
        with contextlib.suppress(PgError):
            await self.finish()

    async def finish(self) -> list[QueryResult]:
        """End our side, skip what the server still sends, and return the command's results."""
        if self._results is not None:
            return self._results
        await self.done()
        while self.active and not self._server_done:
            if await self.read() is None:
                break
        if self.conn.codec.state is State.COPY_BOTH:
            await self.done()
        if self._results is None:
            results = await self.conn._collect_results()
            if self._complete is not None:
                results.insert(0, QueryResult(tag=self._complete.tag))
            self._results = results
        return self._results

    def __aiter__(self) -> CopyStream:
        return self

    async def __anext__(self) -> bytes:
        data = await self.read()
        if data is None:
            raise StopAsyncIteration
        return data


class ReplicationStream:
    """A physical replication stream: iterate for XLogData / PrimaryKeepalive, report progress back.

    Iteration ends when the server finishes streaming (CopyDone, e.g. at a timeline switch); an
    ErrorResponse is raised as PgError (Neon's safekeeper ends a caught-up stream with SQLSTATE
    00000 "ending streaming …").
    """

    def __init__(self, copy: CopyStream, start_lsn: Lsn) -> None:
        self.copy = copy
        self.start_lsn = start_lsn
        self.last_received = start_lsn
        self.server_wal_end = Lsn(0)

    def __aiter__(self) -> ReplicationStream:
        return self

    async def __anext__(self) -> XLogData | PrimaryKeepalive:
        data = await self.copy.read()
        if data is None:
            raise StopAsyncIteration
        msg = decode_server_message(data)
        if isinstance(msg, XLogData):
            self.last_received = Lsn(max(self.last_received, msg.data_end))
        self.server_wal_end = Lsn(max(self.server_wal_end, msg.wal_end))
        return msg

    async def send_status(
        self, write: int, flush: int, apply: int, reply: bool = False, *, time: int | None = None
    ) -> None:
        """A standby status update ('r'); positions are the LSN after the last byte."""
        msg = StandbyStatusUpdate(write, flush, apply, pg_now() if time is None else time, reply)
        await self.copy.write(msg.encode())

    def send_status_nowait(self, write: int, flush: int, apply: int, reply: bool = False) -> None:
        """`send_status` without waiting for the socket to drain (34 bytes)."""
        self.copy.write_nowait(StandbyStatusUpdate(write, flush, apply, pg_now(), reply).encode())

    async def send_hot_standby_feedback(self, feedback: HotStandbyFeedback) -> None:
        await self.copy.write(feedback.encode())

    async def send_neon_feedback(self, feedback: PageserverFeedback) -> None:
        """Neon's 'z' pageserver feedback (only Neon safekeepers understand it; stock PG disconnects)."""
        await self.copy.write(feedback.encode())

    async def stop(self) -> list[QueryResult]:
        """End the stream from our side (CopyDone) and return what the server sends afterwards."""
        return await self.copy.finish()


async def _open(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if host.startswith("/"):
        return await asyncio.open_unix_connection(_socket_path(host, port))
    return await asyncio.open_connection(host, port)


async def connect(
    host: str = "127.0.0.1",
    port: int = 5432,
    user: str = "postgres",
    dbname: str | None = None,
    password: str | None = None,
    *,
    application_name: str | None = None,
    options: str | None = None,
    replication: str | bool | None = None,
    params: dict[str, str] | None = None,
    connect_timeout: float | None = 30.0,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> PgConnection:
    """Connect and authenticate; `replication=True` opens a physical walsender connection.

    `params` adds raw startup parameters (e.g. {"application_name": …}); `options` is the
    startup `options` string ("-c name=value …").
    """
    startup: dict[str, Any] = {"user": user}
    if dbname is not None:
        startup["database"] = dbname
    if application_name is not None:
        startup["application_name"] = application_name
    if options is not None:
        startup["options"] = options
    if replication is not None:
        startup["replication"] = ("true" if replication else "false") if isinstance(replication, bool) else replication
    startup.update(params or {})

    async def run() -> PgConnection:
        reader, writer = await _open(host, port)
        conn = PgConnection(reader, writer, ClientConnection(max_message_size=max_message_size))
        conn._address = (host, port)
        try:
            await conn._startup({k: str(v) for k, v in startup.items()}, password)
        except BaseException:
            writer.close()
            raise
        return conn

    if connect_timeout is None:
        return await run()
    async with asyncio.timeout(connect_timeout):
        return await run()


__all__ = [
    "AuthenticationFailed",
    "ConnectionLost",
    "CopyStream",
    "IdentifySystem",
    "PgConnection",
    "QueryResult",
    "ReplicationStream",
    "Row",
    "connect",
]
