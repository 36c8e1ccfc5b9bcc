"""A thin asyncio server speaking the Postgres protocol on top of `codec.ServerConnection`.

It owns connection handling only: the startup dance (SSLRequest and GSSENCRequest are refused
with 'N', then the real startup packet is read), authentication (trust, cleartext password or
md5), the ParameterStatus/BackendKeyData/ReadyForQuery greeting, dispatch of each simple-query
string to a per-connection handler, CancelRequest, and shutdown. What a query *means* is the
handler's business (the page service, the safekeeper's WAL service, test doubles).

Behaviour follows Neon's `postgres_backend` (spec pageserver §7.1):

* A handler error becomes an ErrorResponse followed by ReadyForQuery; the connection stays usable.
  Raise `PgError` to choose the SQLSTATE; any other exception is reported as XX000 and logged.
* Errors before ReadyForQuery (bad startup, failed authentication) are FATAL and end the
  connection, as are protocol violations (SQLSTATE 08P01).
* The extended query protocol is emulated minimally: Parse remembers the text, Bind/Describe/Close
  are acknowledged (Describe answers NoData), Execute runs the remembered text, Sync answers
  ReadyForQuery.
* Every connection runs in its own task; whatever one client does cannot disturb another.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import itertools
import os
import secrets
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from neon.pq.codec import (
    DEFAULT_MAX_MESSAGE_SIZE,
    ConnectionClosed,
    NeedData,
    Paused,
    ServerConnection,
    ServerEvent,
    State,
)
from neon.pq.errors import LocalProtocolError, PgError, ProtocolViolation, SqlState
from neon.pq.messages import (
    TEXT_OID,
    TYPE_SIZES,
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    BackendKeyData,
    BackendMessage,
    Bind,
    BindComplete,
    CancelRequest,
    Close,
    CloseComplete,
    CommandComplete,
    CopyBothResponse,
    CopyData,
    CopyDone,
    CopyFail,
    CopyInResponse,
    CopyOutResponse,
    DataRow,
    Describe,
    EmptyQueryResponse,
    ErrorResponse,
    Execute,
    FieldDescription,
    Flush,
    GSSENCRequest,
    NegotiateProtocolVersion,
    NoData,
    NoticeResponse,
    ParameterDescription,
    ParameterStatus,
    Parse,
    ParseComplete,
    PasswordMessage,
    Query,
    ReadyForQuery,
    RowDescription,
    SSLRequest,
    StartupMessage,
    Sync,
    Terminate,
    md5_password,
    md5_salted,
)
from neon.utils.logging import get_logger

log = get_logger("pq.server")

# Neon's page service greets trust clients with exactly these (spec pageserver §7.1).
DEFAULT_SERVER_PARAMS: dict[str, str] = {
    "client_encoding": "UTF8",
    "integer_datetimes": "on",
    "server_version": "14.1",
}

_SHUTDOWN_MESSAGE = "terminating connection due to administrator command"

PasswordCheck = Callable[[str, str], bool | Awaitable[bool]]
"""(user, cleartext password) → accepted?"""
PasswordLookup = Callable[[str], str | Awaitable[str | None] | None]
"""user → the password, or its stored form 'md5' + md5(password + user); None if unknown."""
AuthSpec = Literal["trust"] | tuple[Literal["password"], PasswordCheck] | tuple[Literal["md5"], PasswordLookup]


class ClientDisconnected(ConnectionError):
    """The client closed the connection or sent Terminate while we were waiting for it."""


class CopyFailed(PgError):
    """The client aborted a COPY with CopyFail."""


class Handler(Protocol):
    """What a server application implements, one instance per connection."""

    async def query(self, sql: str) -> None:
        """Answer one simple-query string through the session (rows, CommandComplete, COPY …)."""
        ...


HandlerFactory = Callable[["Session"], Handler | Awaitable[Handler]]
"""Called once per connection after authentication; raising PgError refuses the connection."""


@dataclass(frozen=True, slots=True)
class Column:
    """A result column for `Session.send_rows`: name and type OID (values are always sent as text)."""

    name: str
    type_oid: int = TEXT_OID


ColumnSpec = str | Column | FieldDescription


def _field(col: ColumnSpec) -> FieldDescription:
    if isinstance(col, FieldDescription):
        return col
    if isinstance(col, str):
        return FieldDescription(col)
    return FieldDescription(col.name, type_oid=col.type_oid, type_size=TYPE_SIZES.get(col.type_oid, -1))


def _text(value: object) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, bool):
        return b"t" if value else b"f"
    return str(value).encode("utf-8")


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class CopyOutStream:
    """Server side of COPY TO STDOUT: `write` CopyData, then `done` (CopyDone)."""

    def __init__(self, session: Session) -> None:
        self._s = session

    async def write(self, data: bytes) -> None:
        s = self._s
        if s.codec.state is State.CLOSED:
            raise ClientDisconnected("client disconnected")
        # Header and payload in one write, without a message object (the pagestream's hot path).
        s._write(s.codec.copy_data_header(len(data)) + data)
        await s._writer.drain()

    async def done(self) -> None:
        await self._s.send(CopyDone())


class CopyInStream:
    """Server side of COPY FROM STDIN: `read` returns each CopyData payload, None at CopyDone.

    A CopyFail from the client raises `CopyFailed` (SQLSTATE 57014, as Postgres reports it).
    """

    def __init__(self, session: Session) -> None:
        self._s = session
        self.finished = False

    async def read(self) -> bytes | None:
        if self.finished:
            return None
        s = self._s
        codec = s.codec
        while True:
            data = codec.next_copy_data()
            if data is None:
                break
            if not isinstance(data, NeedData):
                return data
            codec.receive_data(await s._read_chunk())
        ev = await s._next_client_event()
        if isinstance(ev, CopyData):
            return ev.data
        self.finished = True
        if isinstance(ev, CopyFail):
            raise CopyFailed(f"COPY from stdin failed: {ev.message}", SqlState.QUERY_CANCELED)
        return None

    def __aiter__(self) -> CopyInStream:
        return self

    async def __anext__(self) -> bytes:
        data = await self.read()
        if data is None:
            raise StopAsyncIteration
        return data


class CopyBothStream(CopyInStream, CopyOutStream):
    """Server side of a CopyBoth stream: read the client's CopyData, write ours, each side ends alone."""

    def __init__(self, session: Session) -> None:
        CopyInStream.__init__(self, session)

    @property
    def client_done(self) -> bool:
        return self.finished

    @property
    def server_done(self) -> bool:
        return self._s.codec.state is not State.COPY_BOTH or self._s.codec.copy_server_done


class Session:
    """One client connection, as seen by its handler."""

    def __init__(
        self,
        server: PqServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn_id: int,
    ) -> None:
        self.server = server
        self.id = conn_id
        self.codec = ServerConnection(max_message_size=server.max_message_size)
        self.peer: Any = writer.get_extra_info("peername")
        self.params: dict[str, str] = {}
        self.encryption_refused = 0  # SSLRequest/GSSENCRequest answered 'N' on this connection
        self.secret = secrets.randbits(31)
        self.handler: Handler | None = None
        self._reader = reader
        self._writer = writer
        self._idle = False
        self._result_done = False
        self._errored = False
        self._query_task: asyncio.Task[None] | None = None
        self._cancel_requested = False
        self._prepared: dict[str, str] = {}
        self._portals: dict[str, str] = {}
        self.task: asyncio.Task[Any] | None = None

    # --- startup parameters -------------------------------------------------------------------
    @property
    def user(self) -> str:
        return self.params.get("user", "")

    @property
    def database(self) -> str:
        return self.params.get("database") or self.user

    @property
    def application_name(self) -> str | None:
        return self.params.get("application_name")

    @property
    def options(self) -> str | None:
        """The raw startup `options` string (e.g. "-c timeline_id=… tenant_id=…")."""
        return self.params.get("options")

    # --- low-level I/O -------------------------------------------------------------------------
    async def send(self, *messages: BackendMessage) -> None:
        """Encode (the codec checks the phase) and write; waits while the socket buffer is full."""
        data = b"".join(self._encode(m) for m in messages)
        self._write(data)
        await self._writer.drain()

    def _write(self, data: bytes) -> None:
        # A socket closed under us (a reset seen by another task's write) is the client leaving:
        # uvloop raises RuntimeError for a write on it and asyncio drops the bytes silently.
        if self._writer.is_closing():
            raise ClientDisconnected("client disconnected")
        self._writer.write(data)

    def _encode(self, msg: BackendMessage) -> bytes:
        if self.codec.state is State.CLOSED:
            # The client left (Terminate or EOF seen by a reader); writers learn it here.
            raise ClientDisconnected("client disconnected")
        data = self.codec.send(msg)
        if isinstance(msg, CommandComplete | EmptyQueryResponse):
            self._result_done = True
        elif isinstance(msg, ErrorResponse):
            self._result_done = self._errored = True
        elif isinstance(msg, CopyInResponse | CopyOutResponse | CopyBothResponse):
            # A COPY needs its own CommandComplete after the data.
            self._result_done = False
        return data

    async def _next_event(self) -> ServerEvent:
        while True:
            ev = self.codec.next_event()
            if not isinstance(ev, NeedData):
                return ev
            self.codec.receive_data(await self._read_chunk())

    async def _read_chunk(self) -> bytes:
        """The next bytes from the socket (b"" at EOF), within the server's idle timeout."""
        idle = self.server.idle_timeout
        if idle is None:
            return await self._reader.read(65536)
        try:
            async with asyncio.timeout(idle):
                return await self._reader.read(65536)
        except TimeoutError:
            # Distinct from a handler's own timeouts, which are ordinary query errors.
            raise ClientDisconnected(f"no message from the client for {idle} s") from None

    async def _next_client_event(self) -> ServerEvent:
        """An event while we expect client data (copy-in/both); disconnects raise ClientDisconnected."""
        ev = await self._next_event()
        if isinstance(ev, ConnectionClosed | Terminate):
            raise ClientDisconnected("client disconnected")
        if isinstance(ev, Paused):
            raise LocalProtocolError(f"not expecting client data in the {self.codec.state.value} phase")
        return ev

    # --- responses for handlers ------------------------------------------------------------------
    async def send_rows(
        self, columns: Sequence[ColumnSpec], rows: Iterable[Sequence[object]], *, tag: str | None = None
    ) -> None:
        """RowDescription, one DataRow per row (values as text, None = NULL), CommandComplete."""
        fields = tuple(_field(c) for c in columns)
        parts = [self._encode(RowDescription(fields))]
        n = 0
        for row in rows:
            if len(row) != len(fields):
                raise ValueError(f"row {n} has {len(row)} values for {len(fields)} columns")
            parts.append(self._encode(DataRow(tuple(_text(v) for v in row))))
            n += 1
            if len(parts) >= 512:
                self._write(b"".join(parts))
                parts = []
                await self._writer.drain()
        parts.append(self._encode(CommandComplete(tag if tag is not None else f"SELECT {n}")))
        self._write(b"".join(parts))
        await self._writer.drain()

    async def send_error(
        self,
        sqlstate: str,
        message: str,
        *,
        severity: str = "ERROR",
        detail: str | None = None,
        hint: str | None = None,
        **fields: str | None,
    ) -> None:
        """Report an error for the current query; ReadyForQuery follows when the handler returns."""
        await self.send(ErrorResponse.make(sqlstate, message, severity=severity, detail=detail, hint=hint, **fields))

    async def send_notice(
        self, message: str, *, sqlstate: str = SqlState.SUCCESSFUL_COMPLETION, severity: str = "NOTICE"
    ) -> None:
        await self.send(NoticeResponse.make(message, sqlstate=sqlstate, severity=severity))

    async def command_complete(self, tag: str) -> None:
        await self.send(CommandComplete(tag))

    async def set_parameter(self, name: str, value: str) -> None:
        await self.send(ParameterStatus(name, value))

    async def copy_out(self, *, binary: bool = False) -> CopyOutStream:
        await self.send(CopyOutResponse(1 if binary else 0))
        return CopyOutStream(self)

    async def copy_in(self, *, binary: bool = False) -> CopyInStream:
        await self.send(CopyInResponse(1 if binary else 0))
        return CopyInStream(self)

    async def copy_both(self, *, binary: bool = False) -> CopyBothStream:
        await self.send(CopyBothResponse(1 if binary else 0))
        return CopyBothStream(self)

    # --- the connection's life --------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            if not await self._startup():
                return
            await self._serve()
        except ProtocolViolation as e:
            log.warning("protocol violation", conn=self.id, peer=str(self.peer), error=str(e))
            await self._send_fatal_quietly(SqlState.PROTOCOL_VIOLATION, str(e))
        except PgError as e:
            # Authentication failures, refusals by the handler factory, FATAL errors from handlers.
            log.info("connection ended by a fatal error", conn=self.id, user=self.user, error=e.message)
            await self._send_fatal_quietly(e.sqlstate, e.message, fields={**e.fields, "S": "FATAL", "V": "FATAL"})
        except TimeoutError:
            log.info("authentication timed out", conn=self.id)
        except (ClientDisconnected, ConnectionError, asyncio.IncompleteReadError) as e:
            log.info("client disconnected", conn=self.id, error=str(e))
        except asyncio.CancelledError:
            await self._send_fatal_quietly(SqlState.ADMIN_SHUTDOWN, _SHUTDOWN_MESSAGE)
            raise
        except Exception:
            log.exception("connection failed", conn=self.id)
            await self._send_fatal_quietly(SqlState.INTERNAL_ERROR, "internal error")
        finally:
            close = getattr(self.handler, "close", None)
            if close is not None:
                try:
                    await _maybe_await(close())
                except Exception:
                    log.exception("handler close failed", conn=self.id)

    async def _send_fatal_quietly(self, sqlstate: str, message: str, fields: dict[str, str] | None = None) -> None:
        if self.codec.state is State.CLOSED or self._writer.is_closing():
            return
        msg = ErrorResponse(fields) if fields else ErrorResponse.make(sqlstate, message, severity="FATAL")
        with contextlib.suppress(Exception):
            self._writer.write(self.codec.send(msg))
            async with asyncio.timeout(1.0):
                await self._writer.drain()

    async def _startup(self) -> bool:
        async with asyncio.timeout(self.server.auth_timeout):
            while True:
                ev = await self._next_event()
                if isinstance(ev, SSLRequest | GSSENCRequest):
                    # No TLS/GSS here: 'N' tells the client to go on unencrypted on this socket.
                    self.encryption_refused += 1
                    self._writer.write(self.codec.refuse_encryption())
                    await self._writer.drain()
                    continue
                if isinstance(ev, CancelRequest):
                    self.server._cancel(ev.pid, ev.secret)
                    return False
                if isinstance(ev, ConnectionClosed):
                    return False
                assert isinstance(ev, StartupMessage)
                break
            await self._negotiate(ev)
            if self.server.max_connections is not None and len(self.server._sessions) > self.server.max_connections:
                raise PgError("sorry, too many clients already", SqlState.TOO_MANY_CONNECTIONS)
            if not self.user:
                raise PgError(
                    "no PostgreSQL user name specified in startup packet", SqlState.INVALID_AUTHORIZATION_SPECIFICATION
                )
            await self._authenticate()
        self.handler = await _maybe_await(self.server.handler_factory(self))
        greeting: list[BackendMessage] = [ParameterStatus(k, v) for k, v in self.server.server_params.items()]
        greeting += [BackendKeyData(self.id, self.secret), ReadyForQuery("I")]
        await self.send(*greeting)
        log.debug("connection ready", conn=self.id, user=self.user, peer=str(self.peer))
        return True

    async def _negotiate(self, startup: StartupMessage) -> None:
        # Protocol options (_pq_.*) and minor versions above 0 are for newer protocols; tell the
        # client we speak 3.0 without them, as Postgres does, and go on.
        unknown = tuple(k for k in startup.params if k.startswith("_pq_."))
        self.params = {k: v for k, v in startup.params.items() if not k.startswith("_pq_.")}
        if (startup.protocol & 0xFFFF) != 0 or unknown:
            await self.send(NegotiateProtocolVersion(0, unknown))

    async def _authenticate(self) -> None:
        auth = self.server.auth
        if auth == "trust":
            await self.send(AuthenticationOk())
            return
        kind, fn = auth
        if kind == "password":
            await self.send(AuthenticationCleartextPassword())
            password = await self._read_password()
            try:
                ok = bool(await _maybe_await(fn(self.user, password)))
            except Exception:
                log.exception("password check failed", conn=self.id)
                ok = False
        elif kind == "md5":
            salt = os.urandom(4)
            await self.send(AuthenticationMD5Password(salt))
            answer = await self._read_password()
            try:
                stored = await _maybe_await(fn(self.user))
            except Exception:
                log.exception("password lookup failed", conn=self.id)
                stored = None
            ok = False
            if stored is not None:
                if len(stored) == 35 and stored.startswith("md5"):
                    expected = "md5" + md5_salted(stored[3:], salt)
                else:
                    expected = md5_password(self.user, stored, salt)
                ok = hmac.compare_digest(expected.encode(), answer.encode())
        else:
            raise ValueError(f"unknown auth method {kind!r}")
        if not ok:
            raise PgError(f'password authentication failed for user "{self.user}"', SqlState.INVALID_PASSWORD)
        await self.send(AuthenticationOk())

    async def _read_password(self) -> str:
        ev = await self._next_event()
        if isinstance(ev, ConnectionClosed | Terminate):
            raise ClientDisconnected("client disconnected during authentication")
        assert isinstance(ev, PasswordMessage)
        return ev.password

    async def _serve(self) -> None:
        while True:
            if self.server._closing:
                await self._send_fatal_quietly(SqlState.ADMIN_SHUTDOWN, _SHUTDOWN_MESSAGE)
                return
            self._idle = self.codec.state is State.READY
            try:
                ev = await self._next_event()
            finally:
                self._idle = False
            if isinstance(ev, Query):
                await self._run_command(ev.sql)
                await self.send(ReadyForQuery("I"))
            elif isinstance(ev, ConnectionClosed | Terminate):
                return
            elif isinstance(ev, Sync):
                await self.send(ReadyForQuery("I"))
            elif isinstance(ev, Parse):
                self._prepared[ev.statement] = ev.query
                await self.send(ParseComplete())
            elif isinstance(ev, Bind):
                if ev.statement not in self._prepared:
                    await self.send(ErrorResponse.make("26000", f'prepared statement "{ev.statement}" does not exist'))
                else:
                    self._portals[ev.portal] = self._prepared[ev.statement]
                    await self.send(BindComplete())
            elif isinstance(ev, Describe):
                # We cannot know a command's columns without running it (as in Neon).
                if ev.kind == "S":
                    await self.send(ParameterDescription(()), NoData())
                else:
                    await self.send(NoData())
            elif isinstance(ev, Execute):
                sql = self._portals.get(ev.portal)
                if sql is None:
                    await self.send(ErrorResponse.make("34000", f'portal "{ev.portal}" does not exist'))
                else:
                    await self._run_command(sql)
            elif isinstance(ev, Close):
                (self._prepared if ev.kind == "S" else self._portals).pop(ev.name, None)
                await self.send(CloseComplete())
            elif isinstance(ev, Flush):
                pass
            elif isinstance(ev, Paused):
                raise LocalProtocolError(f"connection paused in the {self.codec.state.value} phase")
            else:
                raise LocalProtocolError(f"unexpected event {ev!r}")

    async def _run_command(self, sql: str) -> None:
        """Run one command through the handler and complete it (but do not send ReadyForQuery)."""
        self._result_done = self._errored = False
        self._cancel_requested = False
        if not sql.strip():
            await self.send(EmptyQueryResponse())
            return
        assert self.handler is not None
        self._query_task = asyncio.create_task(self.handler.query(sql))
        try:
            await self._query_task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not self._cancel_requested or (current is not None and current.cancelling()):
                raise
            await self._report(PgError("canceling statement due to user request", SqlState.QUERY_CANCELED))
        except PgError as e:
            await self._report(e)
        except (ClientDisconnected, ConnectionError, ProtocolViolation):
            raise
        except Exception as e:
            log.exception("query failed", conn=self.id, query=sql[:200])
            await self._report(PgError(str(e) or type(e).__name__, SqlState.INTERNAL_ERROR))
        finally:
            self._query_task = None
            self._cancel_requested = False
        await self._complete(sql)

    async def _report(self, err: PgError) -> None:
        if self._errored:
            log.warning("error after the query already failed", conn=self.id, error=str(err))
            return
        if err.is_fatal:
            raise err
        await self.send(ErrorResponse(dict(err.fields)))

    async def _complete(self, sql: str) -> None:
        """Close whatever the handler left open, and send CommandComplete if it sent no result."""
        st = self.codec.state
        if st is State.COPY_OUT:
            await self.send(CopyDone())
        elif st is State.COPY_IN:
            stream = CopyInStream(self)
            try:
                while await stream.read() is not None:
                    pass
            except CopyFailed as e:
                await self._report(e)
        elif st is State.COPY_BOTH:
            if not self.codec.copy_server_done:
                await self.send(CopyDone())
            if self.codec.state is State.COPY_BOTH:
                both = CopyBothStream(self)
                while await both.read() is not None:
                    pass
        if not self._result_done:
            words = sql.split(None, 1)
            await self.send(CommandComplete(words[0].upper() if words else "OK"))


class PqServer:
    """Accepts Postgres-protocol connections and runs one `Session` (and handler) per connection."""

    def __init__(
        self,
        handler_factory: HandlerFactory,
        *,
        auth: AuthSpec = "trust",
        server_params: dict[str, str] | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        auth_timeout: float = 60.0,
        idle_timeout: float | None = None,
        max_connections: int | None = None,
    ) -> None:
        if auth != "trust" and not (isinstance(auth, tuple) and len(auth) == 2 and auth[0] in ("password", "md5")):
            raise ValueError(f"auth must be 'trust', ('password', check) or ('md5', lookup), not {auth!r}")
        self.handler_factory = handler_factory
        self.auth = auth
        self.server_params = dict(DEFAULT_SERVER_PARAMS if server_params is None else server_params)
        self.max_message_size = max_message_size
        self.auth_timeout = auth_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self._servers: list[asyncio.Server] = []
        self._sessions: dict[int, Session] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ids = itertools.count(1)
        self._closing = False

    # --- listening -------------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> PqServer:
        """Listen on TCP; port 0 picks a free one (see `port`)."""
        self._servers.append(await asyncio.start_server(self._on_connection, host, port))
        return self

    async def start_unix(self, path: str) -> PqServer:
        self._servers.append(await asyncio.start_unix_server(self._on_connection, path))
        return self

    @property
    def port(self) -> int:
        for srv in self._servers:
            for sock in srv.sockets:
                name = sock.getsockname()
                if isinstance(name, tuple):
                    return int(name[1])
        raise RuntimeError("the server is not listening on TCP")

    @property
    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    async def __aenter__(self) -> PqServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def serve_forever(self) -> None:
        await asyncio.gather(*(srv.serve_forever() for srv in self._servers))

    # --- connections -----------------------------------------------------------------------------
    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        session = Session(self, reader, writer, next(self._ids))
        session.task = task
        if task is not None:
            self._tasks.add(task)
        self._sessions[session.id] = session
        try:
            if self._closing:
                return
            await session._run()
        except asyncio.CancelledError:
            pass  # shutdown; the session already said goodbye
        except Exception:
            # Session._run handles everything it expects; this only guards the other clients.
            log.exception("unhandled error in connection", conn=session.id)
        finally:
            self._sessions.pop(session.id, None)
            writer.close()
            # Never end cancelled: asyncio's start_server callback would log the CancelledError.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
            if task is not None:
                self._tasks.discard(task)

    def _cancel(self, pid: int, secret: int) -> None:
        session = self._sessions.get(pid)
        # A wrong key is ignored silently, as Postgres does, so keys cannot be probed.
        if session is None or not hmac.compare_digest(session.secret.to_bytes(4, "big"), secret.to_bytes(4, "big")):
            return
        if session._query_task is not None and not session._query_task.done():
            session._cancel_requested = True
            session._query_task.cancel()

    async def stop(self, grace: float = 5.0) -> None:
        """Stop listening, end idle connections now, give busy ones `grace` seconds, then cancel."""
        self._closing = True
        for srv in self._servers:
            srv.close()
        for session in list(self._sessions.values()):
            if session._idle and session.task is not None:
                session.task.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=grace)
        for srv in self._servers:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(grace):
                    await srv.wait_closed()
        self._servers.clear()
