"""Sans-IO state machines for both ends of a Postgres protocol v3.0 connection (h11 style).

No sockets here. Feed received bytes with `receive_data(data)` (`b""` means the peer closed), pull
events with `next_event()`, and turn messages to send into bytes with `send(message)`. Each
machine tracks the connection's phase and enforces it in both directions:

    startup ──► authentication ──► ready ◄──► query ──► copy-in / copy-out / copy-both
                                      ▲          │
                                      └─ extended-query batch (Parse … Sync) ─┘

* Input that breaks the protocol — a malformed message, a length below 4 or above the limit for
  its type, a message type not allowed in the current phase, EOF in the middle of a message —
  raises `ProtocolViolation` with a message saying what was wrong; the machine then stays in the
  ERROR state (the only thing left to send is a FATAL ErrorResponse).
* Sending something the current phase does not allow raises `LocalProtocolError`.
* `next_event()` returns `NEED_DATA` when it needs more bytes, and `PAUSED` when the peer should
  be waiting for us (e.g. a pipelined Query while we are still answering the last one): data is
  kept buffered until the phase allows it.

The server discards CopyData/CopyDone/CopyFail arriving when idle (a client still streaming after
its COPY failed) and everything up to Sync after an error inside an extended-query batch, as
Postgres does.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from neon.pq.errors import FATAL_SEVERITIES, LocalProtocolError, ProtocolViolation
from neon.pq.messages import (
    BACKEND_TYPES,
    FRONTEND_TYPES,
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationMessage,
    AuthenticationOk,
    AuthenticationRequest,
    AuthenticationSASL,
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
    EncryptionResponse,
    ErrorResponse,
    Execute,
    Flush,
    FrontendMessage,
    GSSENCRequest,
    NegotiateProtocolVersion,
    NoData,
    NoticeResponse,
    NotificationResponse,
    ParameterDescription,
    ParameterStatus,
    Parse,
    ParseComplete,
    PasswordMessage,
    PortalSuspended,
    Query,
    ReadyForQuery,
    RowDescription,
    SSLRequest,
    StartupMessage,
    Sync,
    Terminate,
    backend_name,
    decode_backend,
    decode_frontend,
    decode_startup,
    frontend_name,
)

DEFAULT_MAX_MESSAGE_SIZE: Final = 1 << 30  # 1 GiB, Postgres' PQ_LARGE_MESSAGE_LIMIT (+1)
MAX_STARTUP_PACKET_SIZE: Final = 10_000  # Postgres' MAX_STARTUP_PACKET_LENGTH
SMALL_MESSAGE_LIMIT: Final = 10_000  # Postgres' PQ_SMALL_MESSAGE_LIMIT, for control messages
MAX_AUTH_TOKEN_SIZE: Final = 65_535  # Postgres' PG_MAX_AUTH_TOKEN_LENGTH, for 'p'
CLIENT_SMALL_MESSAGE_LIMIT: Final = 30_000  # libpq's limit for message types that are never long

_HDR = struct.Struct(">ci")
_I32 = struct.Struct(">i")

# Frontend message types that may legitimately be large; every other one is a control message.
_FRONTEND_LONG: Final = frozenset({b"Q", b"d", b"P", b"B"})
_FRONTEND_FIXED: Final = {b"c": 4, b"X": 4, b"S": 4, b"H": 4}
# Backend types libpq accepts above 30000 bytes (VALID_LONG_MESSAGE_TYPE, plus 't').
_BACKEND_LONG: Final = frozenset({b"T", b"D", b"d", b"V", b"E", b"N", b"A", b"t"})
_BACKEND_FIXED: Final = {b"c": 4, b"I": 4, b"1": 4, b"2": 4, b"3": 4, b"n": 4, b"s": 4, b"Z": 5, b"K": 12}


class NeedData:
    """Sentinel: feed more bytes before asking again."""

    def __repr__(self) -> str:
        return "NEED_DATA"


class Paused:
    """Sentinel: the peer should be waiting for us; buffered data waits for the phase to allow it."""

    def __repr__(self) -> str:
        return "PAUSED"


NEED_DATA: Final = NeedData()
PAUSED: Final = Paused()


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the connection at a message boundary."""


class _Discard:
    pass


_DISCARD: Final = _Discard()


class State(enum.Enum):
    STARTUP = "startup"
    ENCRYPTION_RESPONSE = "encryption-response"  # an SSLRequest/GSSENCRequest awaits its 'N'/'S'
    AUTHENTICATING = "authenticating"  # startup received; the server decides
    AWAITING_PASSWORD = "awaiting-password"  # the server asked for a password
    AUTHENTICATED = "authenticated"  # AuthenticationOk sent; parameters until ReadyForQuery
    READY = "ready"
    QUERY = "query"  # the server is answering; ends with ReadyForQuery
    EXTENDED = "extended"  # inside an extended-query batch, before Sync
    COPY_IN = "copy-in"
    COPY_OUT = "copy-out"
    COPY_BOTH = "copy-both"
    CLOSED = "closed"
    ERROR = "error"


ServerEvent = FrontendMessage | ConnectionClosed | NeedData | Paused
ClientEvent = BackendMessage | EncryptionResponse | ConnectionClosed | NeedData | Paused

_COPY_STATES: Final = frozenset({State.COPY_IN, State.COPY_OUT, State.COPY_BOTH})
_RESULT_MESSAGES: Final = (RowDescription, DataRow, CommandComplete, EmptyQueryResponse)
_EXTENDED_ONLY: Final = (ParseComplete, BindComplete, CloseComplete, NoData, ParameterDescription, PortalSuspended)
_AUTH_REQUESTS: Final = (
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationSASL,
    AuthenticationRequest,
)
_ASYNC_BACKEND: Final = (NoticeResponse, ParameterStatus, NotificationResponse)


class _Connection:
    """Byte buffering and framing shared by both ends."""

    def __init__(self, max_message_size: int) -> None:
        if max_message_size < 5:
            raise ValueError("max_message_size must be at least 5")
        self.max_message_size = max_message_size
        self.state = State.STARTUP
        self._buf = bytearray()
        self._eof = False
        self._error: str | None = None
        # Copy bookkeeping: which side has finished (copy-both) and where the copy returns to.
        self._client_copy_done = False
        self._server_copy_done = False
        self._copy_return = State.QUERY
        self._failed = False  # an ErrorResponse ended the current query; only ReadyForQuery remains

    # --- input -------------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; `b""` records that the peer closed the connection."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("received data after the end of the stream")
        self._buf += data

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """Bytes received but not consumed yet, and whether the peer has closed."""
        return bytes(self._buf), self._eof

    def _fail(self, msg: str) -> ProtocolViolation:
        self._error = msg
        self.state = State.ERROR
        return ProtocolViolation(msg)

    def _at_boundary(self) -> ConnectionClosed | NeedData:
        """No complete message is buffered: either wait for more or report the close."""
        if not self._eof:
            return NEED_DATA
        if self._buf:
            raise self._fail(f"connection closed in the middle of a message ({len(self._buf)} bytes left over)")
        self.state = State.CLOSED
        return ConnectionClosed()

    def _header(self) -> tuple[bytes, int] | None:
        if len(self._buf) < 5:
            return None
        t, length = _HDR.unpack_from(self._buf)
        return t, length

    def _check_length(self, length: int, name: str, limit: int, fixed: int | None) -> None:
        if length < 4:
            raise self._fail(f"invalid length {length} in {name} message (must be at least 4)")
        if fixed is not None and length != fixed:
            raise self._fail(f"invalid length {length} in {name} message (must be exactly {fixed})")
        if length > limit:
            raise self._fail(f"{name} message of {length} bytes exceeds the limit of {limit} bytes")

    def _take(self, length: int) -> bytes | None:
        if len(self._buf) < 1 + length:
            return None
        # One copy out of the buffer (a bytearray slice would copy twice); large CopyData matters.
        with memoryview(self._buf) as view:
            payload = bytes(view[5 : 1 + length])
        del self._buf[: 1 + length]
        return payload

    # --- CopyData fast lane ----------------------------------------------------------------
    # A pagestream or replication stream is CopyData after CopyData; these two skip the message
    # objects and the general dispatch for it, and leave everything else to the full path.
    def next_copy_data(self) -> bytes | NeedData | None:
        """The payload of the next buffered CopyData when the peer may send one now.

        `NEED_DATA` when what is buffered (possibly nothing) is only the start of a CopyData and
        the peer has not closed; None means "use `next_event`": another message is next, the
        phase allows no CopyData, or the length is out of bounds (the full path reports it)."""
        buf = self._buf
        if self._eof or not self._peer_may_send_copy_data():
            return None
        n = len(buf)
        if n == 0:
            return NEED_DATA
        if buf[0] != 0x64:
            return None
        if n < 5:
            return NEED_DATA
        length = int.from_bytes(buf[1:5], "big")
        if length < 4 or length > self.max_message_size:
            return None
        if n < 1 + length:
            return NEED_DATA
        with memoryview(buf) as view:
            payload = bytes(view[5 : 1 + length])
        del buf[: 1 + length]
        return payload

    def copy_data_header(self, size: int) -> bytes:
        """The 5-byte header of a CopyData of `size` bytes we may send now (checked as `send` does)."""
        if not self._we_may_send_copy_data():
            raise LocalProtocolError(f"cannot send CopyData in the {self.state.value} phase")
        return _HDR.pack(b"d", 4 + size)

    def _peer_may_send_copy_data(self) -> bool:
        raise NotImplementedError

    def _we_may_send_copy_data(self) -> bool:
        raise NotImplementedError

    def _check_failed(self) -> None:
        if self.state is State.ERROR:
            raise ProtocolViolation(self._error or "connection is in the error state")

    def _send_fatal(self, msg: ErrorResponse) -> bytes:
        self.state = State.CLOSED
        return msg.encode()

    def _end_copy(self) -> None:
        self.state = self._copy_return
        self._client_copy_done = self._server_copy_done = False

    def _start_copy(self, state: State) -> None:
        self._copy_return = self.state
        self.state = state
        self._client_copy_done = self._server_copy_done = False


class ServerConnection(_Connection):
    """The server end: decodes what a client sends and checks what we answer."""

    def __init__(
        self, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE, max_startup_size: int = MAX_STARTUP_PACKET_SIZE
    ) -> None:
        super().__init__(max_message_size)
        self.max_startup_size = max_startup_size
        self.startup: StartupMessage | None = None
        self._encryption_seen: set[type] = set()
        self._discard_until_sync = False

    # --- receiving ---------------------------------------------------------------------------
    def next_event(self) -> ServerEvent:
        self._check_failed()
        while True:
            event = self._next()
            if event is not _DISCARD:
                return event  # type: ignore[return-value]

    def _next(self) -> ServerEvent | _Discard:
        st = self.state
        if st is State.STARTUP:
            return self._next_startup()
        if st is State.CLOSED:
            return ConnectionClosed() if self._eof else PAUSED
        if st is State.COPY_BOTH and self._client_copy_done:
            return PAUSED
        if st not in (State.AWAITING_PASSWORD, State.READY, State.EXTENDED, State.COPY_IN, State.COPY_BOTH):
            return PAUSED
        hdr = self._header()
        if hdr is None:
            return self._at_boundary()
        t, length = hdr
        name = frontend_name(t)
        if t not in FRONTEND_TYPES:
            raise self._fail(f"invalid frontend message type {t!r}")
        if not self._allowed(t):
            raise self._fail(f"unexpected {name} message in the {self.state.value} phase")
        limit = self.max_message_size
        if t not in _FRONTEND_LONG:
            limit = min(limit, MAX_AUTH_TOKEN_SIZE if t == b"p" else SMALL_MESSAGE_LIMIT)
        self._check_length(length, name, limit, _FRONTEND_FIXED.get(t))
        payload = self._take(length)
        if payload is None:
            return self._at_boundary()
        try:
            msg = decode_frontend(t, payload)
        except ProtocolViolation as e:
            raise self._fail(str(e)) from None
        return self._on_message(msg)

    def _allowed(self, t: bytes) -> bool:
        st = self.state
        if st is State.AWAITING_PASSWORD:
            return t in (b"p", b"X")
        if st is State.READY or st is State.EXTENDED:
            return t in (b"Q", b"X", b"d", b"c", b"f", b"P", b"B", b"D", b"E", b"C", b"H", b"S")
        # copy-in and copy-both: Flush and Sync are allowed and ignored, as Postgres does.
        return t in (b"d", b"c", b"f", b"H", b"S", b"X")

    def _on_message(self, msg: FrontendMessage) -> ServerEvent | _Discard:
        st = self.state
        if isinstance(msg, Terminate):
            self.state = State.CLOSED
            return msg
        if st is State.AWAITING_PASSWORD:
            self.state = State.AUTHENTICATING
            return msg
        if st is State.READY or st is State.EXTENDED:
            if isinstance(msg, CopyData | CopyDone | CopyFail):
                # Leftovers of a COPY that already failed on our side.
                return _DISCARD
            if isinstance(msg, Sync):
                self.state = State.QUERY
                self._discard_until_sync = False
                return msg
            if self._discard_until_sync:
                return _DISCARD
            if isinstance(msg, Query):
                # Postgres accepts a simple Query even in the middle of an unsynced batch.
                self.state = State.QUERY
                self._failed = False
                return msg
            self.state = State.EXTENDED
            return msg
        # copy-in / copy-both
        if isinstance(msg, Flush | Sync):
            return _DISCARD
        if isinstance(msg, CopyData):
            return msg
        if isinstance(msg, CopyFail):
            self._end_copy()
            return msg
        # CopyDone
        if st is State.COPY_IN:
            self._end_copy()
        else:
            self._client_copy_done = True
            if self._server_copy_done:
                self._end_copy()
        return msg

    def _next_startup(self) -> ServerEvent:
        if len(self._buf) < 4:
            return self._at_boundary()
        (length,) = _I32.unpack_from(self._buf)
        if length < 8:
            raise self._fail(f"invalid startup packet length {length} (must be at least 8)")
        if length > self.max_startup_size:
            raise self._fail(f"startup packet of {length} bytes exceeds the limit of {self.max_startup_size} bytes")
        if len(self._buf) < length:
            return self._at_boundary()
        packet = bytes(self._buf[4:length])
        del self._buf[:length]
        try:
            msg = decode_startup(packet)
        except ProtocolViolation as e:
            raise self._fail(str(e)) from None
        if isinstance(msg, SSLRequest | GSSENCRequest):
            if type(msg) in self._encryption_seen:
                raise self._fail(f"{type(msg).__name__} sent twice")
            self._encryption_seen.add(type(msg))
            self.state = State.ENCRYPTION_RESPONSE
        elif isinstance(msg, CancelRequest):
            self.state = State.CLOSED
        else:
            self.startup = msg
            self.state = State.AUTHENTICATING
        return msg

    # --- sending -----------------------------------------------------------------------------
    def refuse_encryption(self) -> bytes:
        """Answer a pending SSLRequest/GSSENCRequest with 'N'; the client then sends its startup."""
        return self.send(EncryptionResponse(b"N"))

    def send(self, msg: BackendMessage | EncryptionResponse) -> bytes:
        st = self.state
        if st is State.CLOSED:
            raise LocalProtocolError(f"cannot send {type(msg).__name__}: the connection is closed")
        if isinstance(msg, ErrorResponse) and (msg.severity in FATAL_SEVERITIES or st is State.ERROR):
            return self._send_fatal(msg)
        if st is State.ERROR:
            raise LocalProtocolError("after a protocol violation only a FATAL ErrorResponse can be sent")
        if st is State.ENCRYPTION_RESPONSE:
            if isinstance(msg, EncryptionResponse):
                self.state = State.STARTUP
                return msg.encode()
        elif st is State.STARTUP:
            pass
        elif st is State.AUTHENTICATING:
            if isinstance(msg, AuthenticationOk):
                self.state = State.AUTHENTICATED
                return msg.encode()
            if isinstance(msg, _AUTH_REQUESTS):
                self.state = State.AWAITING_PASSWORD
                return msg.encode()
            if isinstance(msg, NegotiateProtocolVersion | NoticeResponse):
                return msg.encode()
            if isinstance(msg, ErrorResponse):
                return self._send_fatal(msg)
        elif st is State.AWAITING_PASSWORD:
            if isinstance(msg, ErrorResponse):
                return self._send_fatal(msg)
        elif st is State.AUTHENTICATED:
            if isinstance(msg, ParameterStatus | BackendKeyData | NoticeResponse):
                return msg.encode()
            if isinstance(msg, ReadyForQuery):
                self.state = State.READY
                return msg.encode()
            if isinstance(msg, ErrorResponse):
                return self._send_fatal(msg)
        elif isinstance(msg, _ASYNC_BACKEND):
            return msg.encode()
        elif st is State.READY:
            if isinstance(msg, ErrorResponse):
                # An error while idle is never answering anything; Postgres only does that when dying.
                return self._send_fatal(msg)
        elif st is State.QUERY:
            if isinstance(msg, ReadyForQuery):
                self.state = State.READY
                self._failed = False
                return msg.encode()
            if self._failed:
                raise LocalProtocolError(
                    f"cannot send {type(msg).__name__} after ErrorResponse: only ReadyForQuery may follow"
                )
            if isinstance(msg, ErrorResponse):
                self._failed = True
                return msg.encode()
            # Extended-query replies are allowed here too: a server may have read up to Sync first.
            if isinstance(msg, _RESULT_MESSAGES + _EXTENDED_ONLY):
                return msg.encode()
            if isinstance(msg, CopyInResponse | CopyOutResponse | CopyBothResponse):
                return self._copy_response(msg)
        elif st is State.EXTENDED:
            if isinstance(msg, ErrorResponse):
                self._discard_until_sync = True
                return msg.encode()
            if isinstance(msg, _RESULT_MESSAGES + _EXTENDED_ONLY):
                return msg.encode()
            if isinstance(msg, CopyInResponse | CopyOutResponse | CopyBothResponse):
                return self._copy_response(msg)
        elif st in _COPY_STATES:
            if isinstance(msg, ErrorResponse):
                self._end_copy()
                if self.state is State.EXTENDED:
                    self._discard_until_sync = True
                else:
                    self._failed = True
                return msg.encode()
            if st is not State.COPY_IN and not self._server_copy_done:
                if isinstance(msg, CopyData):
                    return msg.encode()
                if isinstance(msg, CopyDone):
                    if st is State.COPY_OUT or self._client_copy_done:
                        self._end_copy()
                    else:
                        self._server_copy_done = True
                    return msg.encode()
        raise LocalProtocolError(f"cannot send {type(msg).__name__} in the {st.value} phase")

    def _copy_response(self, msg: CopyInResponse | CopyOutResponse | CopyBothResponse) -> bytes:
        if isinstance(msg, CopyInResponse):
            self._start_copy(State.COPY_IN)
        elif isinstance(msg, CopyOutResponse):
            self._start_copy(State.COPY_OUT)
        else:
            self._start_copy(State.COPY_BOTH)
        return msg.encode()

    def _peer_may_send_copy_data(self) -> bool:
        return (self.state is State.COPY_BOTH or self.state is State.COPY_IN) and not self._client_copy_done

    def _we_may_send_copy_data(self) -> bool:
        return (self.state is State.COPY_BOTH or self.state is State.COPY_OUT) and not self._server_copy_done

    @property
    def copy_client_done(self) -> bool:
        """In copy-both: the client has sent CopyDone."""
        return self._client_copy_done

    @property
    def copy_server_done(self) -> bool:
        """In copy-both: we have sent CopyDone."""
        return self._server_copy_done


class ClientConnection(_Connection):
    """The client end: decodes what a server sends and checks what we send."""

    def __init__(self, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        super().__init__(max_message_size)
        self.parameters: dict[str, str] = {}
        self.backend_key: BackendKeyData | None = None
        self.transaction_status = "I"
        self._encryption_request: type | None = None

    # --- sending -----------------------------------------------------------------------------
    def send(self, msg: FrontendMessage) -> bytes:
        st = self.state
        if st in (State.CLOSED, State.ERROR):
            raise LocalProtocolError(f"cannot send {type(msg).__name__}: the connection is {st.value}")
        if isinstance(msg, Terminate) and st not in (State.STARTUP, State.ENCRYPTION_RESPONSE):
            self.state = State.CLOSED
            return msg.encode()
        if st is State.STARTUP:
            if isinstance(msg, StartupMessage):
                self.state = State.AUTHENTICATING
                return msg.encode()
            if isinstance(msg, SSLRequest | GSSENCRequest):
                self._encryption_request = type(msg)
                self.state = State.ENCRYPTION_RESPONSE
                return msg.encode()
            if isinstance(msg, CancelRequest):
                self.state = State.CLOSED
                return msg.encode()
        elif st is State.AWAITING_PASSWORD:
            if isinstance(msg, PasswordMessage):
                self.state = State.AUTHENTICATING
                return msg.encode()
        elif st is State.READY or st is State.EXTENDED:
            if isinstance(msg, Query) and st is State.READY:
                self.state = State.QUERY
                return msg.encode()
            if isinstance(msg, Parse | Bind | Describe | Execute | Close | Flush):
                self.state = State.EXTENDED
                return msg.encode()
            if isinstance(msg, Sync):
                self.state = State.QUERY
                return msg.encode()
        elif st in _COPY_STATES and isinstance(msg, Flush | Sync):
            # Allowed and ignored by the server during COPY (libpq sends them in pipelines).
            return msg.encode()
        elif st is State.COPY_IN:
            if isinstance(msg, CopyData):
                return msg.encode()
            if isinstance(msg, CopyDone | CopyFail):
                self._end_copy()
                return msg.encode()
        elif st is State.COPY_BOTH and not self._client_copy_done:
            if isinstance(msg, CopyData):
                return msg.encode()
            if isinstance(msg, CopyDone):
                if self._server_copy_done:
                    self._end_copy()
                else:
                    self._client_copy_done = True
                return msg.encode()
        raise LocalProtocolError(f"cannot send {type(msg).__name__} in the {st.value} phase")

    # --- receiving ---------------------------------------------------------------------------
    def next_event(self) -> ClientEvent:
        self._check_failed()
        st = self.state
        if st is State.ENCRYPTION_RESPONSE:
            return self._next_encryption_response()
        if st is State.STARTUP:
            return PAUSED
        if st is State.CLOSED:
            return ConnectionClosed() if self._eof else PAUSED
        hdr = self._header()
        if hdr is None:
            return self._at_boundary()
        t, length = hdr
        name = backend_name(t)
        if t not in BACKEND_TYPES:
            raise self._fail(f"invalid backend message type {t!r}")
        if not self._allowed(t):
            raise self._fail(f"unexpected {name} message from the server in the {st.value} phase")
        limit = self.max_message_size if t in _BACKEND_LONG else min(self.max_message_size, CLIENT_SMALL_MESSAGE_LIMIT)
        self._check_length(length, name, limit, _BACKEND_FIXED.get(t))
        payload = self._take(length)
        if payload is None:
            return self._at_boundary()
        try:
            msg = decode_backend(t, payload)
        except ProtocolViolation as e:
            raise self._fail(str(e)) from None
        return self._on_message(msg)

    def _next_encryption_response(self) -> ClientEvent:
        if not self._buf:
            return self._at_boundary()
        answer = bytes(self._buf[:1])
        expected_yes = b"S" if self._encryption_request is SSLRequest else b"G"
        if answer not in (b"N", expected_yes):
            raise self._fail(f"invalid response {answer!r} to {getattr(self._encryption_request, '__name__', '?')}")
        del self._buf[:1]
        self.state = State.STARTUP
        return EncryptionResponse(answer)

    def _allowed(self, t: bytes) -> bool:
        st = self.state
        if t in (b"N", b"E"):
            return True
        if st is State.AUTHENTICATING:
            return t in (b"R", b"v")
        if st is State.AWAITING_PASSWORD:
            return False
        if st is State.AUTHENTICATED:
            return t in (b"S", b"K", b"Z")
        if t in (b"S", b"A"):
            return True
        if st is State.QUERY:
            return t in (b"T", b"D", b"C", b"I", b"G", b"H", b"W", b"Z", b"1", b"2", b"3", b"n", b"t", b"s")
        if st is State.EXTENDED:
            return t in (b"T", b"D", b"C", b"I", b"G", b"H", b"W", b"1", b"2", b"3", b"n", b"t", b"s")
        # CommandComplete may end a copy without CopyDone: Postgres' walsender does that when it
        # finishes streaming at shutdown (WalSndDone), and libpq accepts it.
        if st is State.COPY_OUT:
            return t in (b"d", b"c", b"C")
        if st is State.COPY_BOTH:
            return t == b"C" or (not self._server_copy_done and t in (b"d", b"c"))
        return False

    def _on_message(self, msg: BackendMessage) -> ClientEvent:
        st = self.state
        if isinstance(msg, NoticeResponse | NotificationResponse):
            return msg
        if isinstance(msg, ParameterStatus):
            self.parameters[msg.name] = msg.value
            return msg
        if isinstance(msg, ErrorResponse):
            if st in (State.AUTHENTICATING, State.AWAITING_PASSWORD, State.AUTHENTICATED, State.READY):
                # Errors before ReadyForQuery, and any error while idle, end the connection.
                self.state = State.CLOSED
            elif msg.severity in FATAL_SEVERITIES:
                self.state = State.CLOSED
            elif st in _COPY_STATES:
                self._end_copy()
            return msg
        if st is State.AUTHENTICATING:
            auth: AuthenticationMessage | NegotiateProtocolVersion = msg  # type: ignore[assignment]
            if isinstance(auth, AuthenticationOk):
                self.state = State.AUTHENTICATED
            elif not isinstance(auth, NegotiateProtocolVersion):
                self.state = State.AWAITING_PASSWORD
            return msg
        if st is State.AUTHENTICATED:
            if isinstance(msg, BackendKeyData):
                self.backend_key = msg
            elif isinstance(msg, ReadyForQuery):
                self.state = State.READY
                self.transaction_status = msg.status
            return msg
        if isinstance(msg, ReadyForQuery):
            self.state = State.READY
            self.transaction_status = msg.status
            return msg
        if isinstance(msg, CopyInResponse):
            self._start_copy(State.COPY_IN)
        elif isinstance(msg, CopyOutResponse):
            self._start_copy(State.COPY_OUT)
        elif isinstance(msg, CopyBothResponse):
            self._start_copy(State.COPY_BOTH)
        elif isinstance(msg, CopyDone):
            if st is State.COPY_OUT or self._client_copy_done:
                self._end_copy()
            else:
                self._server_copy_done = True
        elif isinstance(msg, CommandComplete) and st in _COPY_STATES:
            self._end_copy()
        return msg

    def _peer_may_send_copy_data(self) -> bool:
        return (self.state is State.COPY_BOTH or self.state is State.COPY_OUT) and not self._server_copy_done

    def _we_may_send_copy_data(self) -> bool:
        return (self.state is State.COPY_BOTH or self.state is State.COPY_IN) and not self._client_copy_done

    @property
    def copy_client_done(self) -> bool:
        return self._client_copy_done

    @property
    def copy_server_done(self) -> bool:
        return self._server_copy_done


__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "MAX_STARTUP_PACKET_SIZE",
    "NEED_DATA",
    "PAUSED",
    "ClientConnection",
    "ClientEvent",
    "ConnectionClosed",
    "NeedData",
    "Paused",
    "ServerConnection",
    "ServerEvent",
    "State",
]
