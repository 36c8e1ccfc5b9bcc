"""Every PostgreSQL protocol v3.0 message we send or receive, as dataclasses with exact codecs.

All integers are big-endian. A regular message is a type byte, an Int32 length that counts itself
and the payload (not the type byte), then the payload. The packets of the startup phase
(StartupMessage, SSLRequest, GSSENCRequest, CancelRequest) have no type byte: an Int32 length, then
an Int32 code (the protocol version or a magic request code), then the body.

Several type bytes mean different things in each direction ('D' is DataRow from the server but
Describe from the client, 'S' ParameterStatus vs Sync, 'E' ErrorResponse vs Execute, 'C'
CommandComplete vs Close, 'H' CopyOutResponse vs Flush), so there are two decoder tables:
`decode_frontend` (what a server receives) and `decode_backend` (what a client receives). 'p' is
decoded as PasswordMessage; the codec only accepts it while waiting for a password.

Decoders check the layout strictly (every string NUL-terminated, nothing left over, counts that
match) and raise `ProtocolViolation` naming the message; they never raise anything else. Text is
UTF-8: our servers announce client_encoding=UTF8 and refuse anything else.

This module owns the byte layouts only; which message may appear when is `codec.py`'s business.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Final

from neon.pq.errors import FIELD_CODES, ProtocolViolation, SqlState

PROTOCOL_VERSION_3_0: Final = 3 << 16  # 196608
SSL_REQUEST_CODE: Final = (1234 << 16) | 5679  # 80877103
GSSENC_REQUEST_CODE: Final = (1234 << 16) | 5680  # 80877104
CANCEL_REQUEST_CODE: Final = (1234 << 16) | 5678  # 80877102

_I16 = struct.Struct(">h")
_U16 = struct.Struct(">H")
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_HDR = struct.Struct(">cI")
_II = struct.Struct(">II")
_III = struct.Struct(">III")

# Type OIDs (pg_type.dat) for RowDescription; text is what every simple-query column is sent as.
BOOL_OID: Final = 16
BYTEA_OID: Final = 17
INT8_OID: Final = 20
INT2_OID: Final = 21
INT4_OID: Final = 23
TEXT_OID: Final = 25
OID_OID: Final = 26
JSON_OID: Final = 114
FLOAT8_OID: Final = 701
VARCHAR_OID: Final = 1043
PG_LSN_OID: Final = 3220

# pg_type.typlen of the types above; -1 is varlena.
TYPE_SIZES: Final[dict[int, int]] = {
    BOOL_OID: 1,
    BYTEA_OID: -1,
    INT8_OID: 8,
    INT2_OID: 2,
    INT4_OID: 4,
    TEXT_OID: -1,
    OID_OID: 4,
    JSON_OID: -1,
    FLOAT8_OID: 8,
    VARCHAR_OID: -1,
    PG_LSN_OID: 8,
}


# --- helpers ---------------------------------------------------------------------------------


class _Reader:
    """Cursor over one message payload; every shortfall becomes a ProtocolViolation naming `what`."""

    __slots__ = ("buf", "pos", "what")

    def __init__(self, buf: bytes, what: str) -> None:
        self.buf = buf
        self.pos = 0
        self.what = what

    def _take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise ProtocolViolation(f"{self.what}: message too short (needs {end} bytes, has {len(self.buf)})")
        out = self.buf[self.pos : end]
        self.pos = end
        return out

    def u8(self) -> int:
        return self._take(1)[0]

    def i16(self) -> int:
        return int(_I16.unpack(self._take(2))[0])

    def u16(self) -> int:
        return int(_U16.unpack(self._take(2))[0])

    def i32(self) -> int:
        return int(_I32.unpack(self._take(4))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self._take(4))[0])

    def raw(self, n: int) -> bytes:
        return self._take(n)

    def count(self, item_size: int, name: str) -> int:
        """An Int16 element count that must be non-negative and fit in what is left."""
        n = self.i16()
        if n < 0:
            raise ProtocolViolation(f"{self.what}: negative {name} count {n}")
        if n * item_size > len(self.buf) - self.pos:
            raise ProtocolViolation(f"{self.what}: {name} count {n} exceeds the message length")
        return n

    def cstr(self) -> str:
        end = self.buf.find(b"\0", self.pos)
        if end < 0:
            raise ProtocolViolation(f"{self.what}: string is missing its NUL terminator")
        raw = self.buf[self.pos : end]
        self.pos = end + 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolViolation(f"{self.what}: string is not valid UTF-8") from None

    def rest(self) -> bytes:
        out = self.buf[self.pos :]
        self.pos = len(self.buf)
        return out

    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise ProtocolViolation(f"{self.what}: {len(self.buf) - self.pos} unexpected trailing bytes")


def _cstr(s: str) -> bytes:
    raw = s.encode("utf-8")
    if b"\0" in raw:
        raise ValueError(f"string {s[:40]!r} contains a NUL byte and cannot be sent")
    return raw + b"\0"


def frame(type_byte: bytes, payload: bytes = b"") -> bytes:
    """A regular message: type byte, Int32 length (self-inclusive), payload."""
    return _HDR.pack(type_byte, 4 + len(payload)) + payload


def md5_password(user: str, password: str, salt: bytes) -> str:
    """The answer to AuthenticationMD5Password: 'md5' + md5(md5(password + user) + salt)."""
    inner = hashlib.md5((password + user).encode("utf-8")).hexdigest()
    return "md5" + md5_salted(inner, salt)


def md5_salted(inner_hex: str, salt: bytes) -> str:
    """The salted half of the md5 scheme, for servers that store md5(password + user) only."""
    return hashlib.md5(inner_hex.encode("ascii") + salt).hexdigest()


# --- startup-phase packets (no type byte) ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """The real startup packet: protocol version and name/value parameters (user, database, ...)."""

    params: dict[str, str] = field(default_factory=dict)
    protocol: int = PROTOCOL_VERSION_3_0

    @property
    def user(self) -> str | None:
        return self.params.get("user")

    @property
    def database(self) -> str | None:
        # Postgres defaults the database to the user name.
        return self.params.get("database") or self.params.get("user")

    def encode(self) -> bytes:
        body = b"".join(_cstr(k) + _cstr(v) for k, v in self.params.items()) + b"\0"
        return _II.pack(8 + len(body), self.protocol) + body


@dataclass(frozen=True, slots=True)
class SSLRequest:
    def encode(self) -> bytes:
        return _II.pack(8, SSL_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    def encode(self) -> bytes:
        return _II.pack(8, GSSENC_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class CancelRequest:
    pid: int
    secret: int

    def encode(self) -> bytes:
        return _II.pack(16, CANCEL_REQUEST_CODE) + _II.pack(self.pid & 0xFFFFFFFF, self.secret & 0xFFFFFFFF)


@dataclass(frozen=True, slots=True)
class EncryptionResponse:
    """The single byte a server answers SSLRequest/GSSENCRequest with: 'N' (no), 'S' or 'G' (yes)."""

    answer: bytes = b"N"

    @property
    def accepted(self) -> bool:
        return self.answer != b"N"

    def encode(self) -> bytes:
        return self.answer


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


def decode_startup(packet: bytes) -> StartupPacket:
    """Decode one startup-phase packet given *without* its Int32 length prefix."""
    r = _Reader(packet, "startup packet")
    code = r.u32()
    if code == SSL_REQUEST_CODE:
        r.what = "SSLRequest"
        r.end()
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        r.what = "GSSENCRequest"
        r.end()
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        r.what = "CancelRequest"
        pid, secret = r.u32(), r.u32()
        r.end()
        return CancelRequest(pid, secret)
    if code >> 16 != 3:
        raise ProtocolViolation(f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: server supports 3.0 only")
    r.what = "StartupMessage"
    params: dict[str, str] = {}
    while True:
        if r.remaining() == 0:
            raise ProtocolViolation("StartupMessage: missing the terminating NUL after the parameters")
        name = r.cstr()
        if name == "":
            break
        if name in params:
            raise ProtocolViolation(f"StartupMessage: parameter {name!r} given twice")
        params[name] = r.cstr()
    r.end()
    return StartupMessage(params, code)


# --- messages sent by both sides -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CopyData:
    TYPE: ClassVar[bytes] = b"d"
    data: bytes

    def encode(self) -> bytes:
        return _HDR.pack(b"d", 4 + len(self.data)) + self.data


@dataclass(frozen=True, slots=True)
class CopyDone:
    TYPE: ClassVar[bytes] = b"c"

    def encode(self) -> bytes:
        return b"c\0\0\0\x04"


# --- frontend (client → server) messages ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class PasswordMessage:
    """'p' during password authentication: the cleartext password or 'md5…' hash."""

    TYPE: ClassVar[bytes] = b"p"
    password: str

    def encode(self) -> bytes:
        return frame(b"p", _cstr(self.password))


@dataclass(frozen=True, slots=True)
class Query:
    TYPE: ClassVar[bytes] = b"Q"
    sql: str

    def encode(self) -> bytes:
        return frame(b"Q", _cstr(self.sql))


@dataclass(frozen=True, slots=True)
class CopyFail:
    TYPE: ClassVar[bytes] = b"f"
    message: str

    def encode(self) -> bytes:
        return frame(b"f", _cstr(self.message))


@dataclass(frozen=True, slots=True)
class Terminate:
    TYPE: ClassVar[bytes] = b"X"

    def encode(self) -> bytes:
        return b"X\0\0\0\x04"


@dataclass(frozen=True, slots=True)
class Sync:
    TYPE: ClassVar[bytes] = b"S"

    def encode(self) -> bytes:
        return b"S\0\0\0\x04"


@dataclass(frozen=True, slots=True)
class Flush:
    TYPE: ClassVar[bytes] = b"H"

    def encode(self) -> bytes:
        return b"H\0\0\0\x04"


@dataclass(frozen=True, slots=True)
class Parse:
    TYPE: ClassVar[bytes] = b"P"
    statement: str
    query: str
    param_types: tuple[int, ...] = ()

    def encode(self) -> bytes:
        types = b"".join(_U32.pack(t) for t in self.param_types)
        return frame(b"P", _cstr(self.statement) + _cstr(self.query) + _U16.pack(len(self.param_types)) + types)


@dataclass(frozen=True, slots=True)
class Bind:
    TYPE: ClassVar[bytes] = b"B"
    portal: str
    statement: str
    param_formats: tuple[int, ...] = ()
    params: tuple[bytes | None, ...] = ()
    result_formats: tuple[int, ...] = ()

    def encode(self) -> bytes:
        parts = [_cstr(self.portal), _cstr(self.statement), _U16.pack(len(self.param_formats))]
        parts += [_I16.pack(f) for f in self.param_formats]
        parts.append(_U16.pack(len(self.params)))
        for p in self.params:
            parts.append(_I32.pack(-1) if p is None else _I32.pack(len(p)) + p)
        parts.append(_U16.pack(len(self.result_formats)))
        parts += [_I16.pack(f) for f in self.result_formats]
        return frame(b"B", b"".join(parts))


@dataclass(frozen=True, slots=True)
class Describe:
    """Describe a prepared statement (kind 'S') or a portal (kind 'P')."""

    TYPE: ClassVar[bytes] = b"D"
    kind: str
    name: str

    def encode(self) -> bytes:
        return frame(b"D", self.kind.encode("ascii") + _cstr(self.name))


@dataclass(frozen=True, slots=True)
class Execute:
    TYPE: ClassVar[bytes] = b"E"
    portal: str
    max_rows: int = 0

    def encode(self) -> bytes:
        return frame(b"E", _cstr(self.portal) + _I32.pack(self.max_rows))


@dataclass(frozen=True, slots=True)
class Close:
    TYPE: ClassVar[bytes] = b"C"
    kind: str
    name: str

    def encode(self) -> bytes:
        return frame(b"C", self.kind.encode("ascii") + _cstr(self.name))


FrontendMessage = (
    StartupMessage
    | SSLRequest
    | GSSENCRequest
    | CancelRequest
    | PasswordMessage
    | Query
    | CopyData
    | CopyDone
    | CopyFail
    | Terminate
    | Sync
    | Flush
    | Parse
    | Bind
    | Describe
    | Execute
    | Close
)


def _decode_password(r: _Reader) -> PasswordMessage:
    pw = r.cstr()
    r.end()
    return PasswordMessage(pw)


def _decode_query(r: _Reader) -> Query:
    sql = r.cstr()
    r.end()
    return Query(sql)


def _decode_copy_fail(r: _Reader) -> CopyFail:
    msg = r.cstr()
    r.end()
    return CopyFail(msg)


def _decode_parse(r: _Reader) -> Parse:
    name, query = r.cstr(), r.cstr()
    n = r.count(4, "parameter type")
    types = tuple(r.u32() for _ in range(n))
    r.end()
    return Parse(name, query, types)


def _decode_bind(r: _Reader) -> Bind:
    portal, statement = r.cstr(), r.cstr()
    formats = tuple(r.i16() for _ in range(r.count(2, "parameter format")))
    params: list[bytes | None] = []
    for _ in range(r.count(4, "parameter")):
        n = r.i32()
        if n < -1:
            raise ProtocolViolation(f"Bind: invalid parameter length {n}")
        params.append(None if n == -1 else r.raw(n))
    results = tuple(r.i16() for _ in range(r.count(2, "result format")))
    r.end()
    return Bind(portal, statement, formats, tuple(params), results)


def _decode_kind_name(r: _Reader, cls: type[Describe] | type[Close]) -> Describe | Close:
    kind = chr(r.u8())
    if kind not in ("S", "P"):
        raise ProtocolViolation(f"{r.what}: invalid object kind {kind!r} (expected 'S' or 'P')")
    name = r.cstr()
    r.end()
    return cls(kind, name)


def _decode_execute(r: _Reader) -> Execute:
    portal = r.cstr()
    max_rows = r.i32()
    r.end()
    return Execute(portal, max_rows)


def _empty(cls: Callable[[], object]) -> Callable[[_Reader], object]:
    def decode(r: _Reader) -> object:
        r.end()
        return cls()

    return decode


def _decode_copy_data(r: _Reader) -> CopyData:
    return CopyData(r.rest())


_FRONTEND: Final[dict[bytes, tuple[str, Callable[[_Reader], object]]]] = {
    b"p": ("PasswordMessage", _decode_password),
    b"Q": ("Query", _decode_query),
    b"d": ("CopyData", _decode_copy_data),
    b"c": ("CopyDone", _empty(CopyDone)),
    b"f": ("CopyFail", _decode_copy_fail),
    b"X": ("Terminate", _empty(Terminate)),
    b"S": ("Sync", _empty(Sync)),
    b"H": ("Flush", _empty(Flush)),
    b"P": ("Parse", _decode_parse),
    b"B": ("Bind", _decode_bind),
    b"D": ("Describe", lambda r: _decode_kind_name(r, Describe)),
    b"E": ("Execute", _decode_execute),
    b"C": ("Close", lambda r: _decode_kind_name(r, Close)),
}

FRONTEND_TYPES: Final = frozenset(_FRONTEND)


def frontend_name(type_byte: bytes) -> str:
    entry = _FRONTEND.get(type_byte)
    return entry[0] if entry else f"unknown message type {type_byte!r}"


def decode_frontend(type_byte: bytes, payload: bytes) -> FrontendMessage:
    """Decode a regular message sent by a client (type byte and payload, length already stripped)."""
    entry = _FRONTEND.get(type_byte)
    if entry is None:
        raise ProtocolViolation(f"invalid frontend message type {type_byte!r}")
    name, decode = entry
    return decode(_Reader(payload, name))  # type: ignore[return-value]


# --- backend (server → client) messages -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthenticationOk:
    TYPE: ClassVar[bytes] = b"R"

    def encode(self) -> bytes:
        return frame(b"R", _I32.pack(0))


@dataclass(frozen=True, slots=True)
class AuthenticationCleartextPassword:
    TYPE: ClassVar[bytes] = b"R"

    def encode(self) -> bytes:
        return frame(b"R", _I32.pack(3))


@dataclass(frozen=True, slots=True)
class AuthenticationMD5Password:
    TYPE: ClassVar[bytes] = b"R"
    salt: bytes

    def encode(self) -> bytes:
        if len(self.salt) != 4:
            raise ValueError(f"MD5 salt must be 4 bytes, got {len(self.salt)}")
        return frame(b"R", _I32.pack(5) + self.salt)


@dataclass(frozen=True, slots=True)
class AuthenticationSASL:
    """The server offers SASL (SCRAM); we decode it only to tell the user we cannot do it."""

    TYPE: ClassVar[bytes] = b"R"
    mechanisms: tuple[str, ...]

    def encode(self) -> bytes:
        return frame(b"R", _I32.pack(10) + b"".join(_cstr(m) for m in self.mechanisms) + b"\0")


@dataclass(frozen=True, slots=True)
class AuthenticationRequest:
    """Any other authentication request (Kerberos 2, SCM 6, GSS 7/8, SSPI 9, SASL continue 11/12)."""

    TYPE: ClassVar[bytes] = b"R"
    code: int
    data: bytes = b""

    def encode(self) -> bytes:
        return frame(b"R", _I32.pack(self.code) + self.data)


@dataclass(frozen=True, slots=True)
class ParameterStatus:
    TYPE: ClassVar[bytes] = b"S"
    name: str
    value: str

    def encode(self) -> bytes:
        return frame(b"S", _cstr(self.name) + _cstr(self.value))


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    TYPE: ClassVar[bytes] = b"K"
    pid: int
    secret: int

    def encode(self) -> bytes:
        return frame(b"K", _II.pack(self.pid & 0xFFFFFFFF, self.secret & 0xFFFFFFFF))


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion:
    TYPE: ClassVar[bytes] = b"v"
    newest_minor: int
    unrecognized: tuple[str, ...] = ()

    def encode(self) -> bytes:
        body = _II.pack(self.newest_minor, len(self.unrecognized)) + b"".join(_cstr(o) for o in self.unrecognized)
        return frame(b"v", body)


@dataclass(frozen=True, slots=True)
class ReadyForQuery:
    """Status: 'I' idle, 'T' in a transaction block, 'E' in a failed transaction block."""

    TYPE: ClassVar[bytes] = b"Z"
    status: str = "I"

    def encode(self) -> bytes:
        return frame(b"Z", self.status.encode("ascii"))


@dataclass(frozen=True, slots=True)
class FieldDescription:
    name: str
    table_oid: int = 0
    column_attr: int = 0
    type_oid: int = TEXT_OID
    type_size: int = -1
    type_modifier: int = -1
    format: int = 0

    _TAIL: ClassVar[struct.Struct] = struct.Struct(">IhIhih")

    def encode(self) -> bytes:
        return _cstr(self.name) + self._TAIL.pack(
            self.table_oid, self.column_attr, self.type_oid, self.type_size, self.type_modifier, self.format
        )


@dataclass(frozen=True, slots=True)
class RowDescription:
    TYPE: ClassVar[bytes] = b"T"
    fields: tuple[FieldDescription, ...]

    def encode(self) -> bytes:
        return frame(b"T", _U16.pack(len(self.fields)) + b"".join(f.encode() for f in self.fields))


@dataclass(frozen=True, slots=True)
class DataRow:
    TYPE: ClassVar[bytes] = b"D"
    values: tuple[bytes | None, ...]

    def encode(self) -> bytes:
        parts = [_U16.pack(len(self.values))]
        for v in self.values:
            parts.append(b"\xff\xff\xff\xff" if v is None else _I32.pack(len(v)) + v)
        return frame(b"D", b"".join(parts))


@dataclass(frozen=True, slots=True)
class CommandComplete:
    TYPE: ClassVar[bytes] = b"C"
    tag: str

    def encode(self) -> bytes:
        return frame(b"C", _cstr(self.tag))


@dataclass(frozen=True, slots=True)
class EmptyQueryResponse:
    TYPE: ClassVar[bytes] = b"I"

    def encode(self) -> bytes:
        return b"I\0\0\0\x04"


def _encode_fields(type_byte: bytes, fields: Mapping[str, str]) -> bytes:
    parts = []
    for code, value in fields.items():
        if len(code) != 1 or code == "\0":
            raise ValueError(f"invalid error field code {code!r}")
        parts.append(code.encode("ascii") + _cstr(value))
    return frame(type_byte, b"".join(parts) + b"\0")


class _FieldsMixin:
    """Accessors shared by ErrorResponse and NoticeResponse (fields keyed by one-letter code)."""

    __slots__ = ()
    fields: dict[str, str]

    @property
    def severity(self) -> str:
        return self.fields.get("V") or self.fields.get("S") or ""

    @property
    def sqlstate(self) -> str:
        return self.fields.get("C", "")

    @property
    def message(self) -> str:
        return self.fields.get("M", "")

    @property
    def detail(self) -> str | None:
        return self.fields.get("D")

    @property
    def hint(self) -> str | None:
        return self.fields.get("H")


def _make_fields(severity: str, sqlstate: str, message: str, extra: Mapping[str, str | None]) -> dict[str, str]:
    fields = {"S": severity, "V": severity, "C": sqlstate, "M": message}
    for name, value in extra.items():
        if value is None:
            continue
        code = FIELD_CODES.get(name, name)
        if len(code) != 1:
            raise ValueError(f"unknown error field {name!r}")
        fields[code] = value
    return fields


@dataclass(frozen=True, slots=True)
class ErrorResponse(_FieldsMixin):
    TYPE: ClassVar[bytes] = b"E"
    fields: dict[str, str]

    @classmethod
    def make(cls, sqlstate: str, message: str, *, severity: str = "ERROR", **extra: str | None) -> ErrorResponse:
        """Build from names: `make("42601", "syntax error", detail=..., hint=...)`."""
        return cls(_make_fields(severity, sqlstate, message, extra))

    def encode(self) -> bytes:
        return _encode_fields(b"E", self.fields)


@dataclass(frozen=True, slots=True)
class NoticeResponse(_FieldsMixin):
    TYPE: ClassVar[bytes] = b"N"
    fields: dict[str, str]

    @classmethod
    def make(
        cls,
        message: str,
        *,
        sqlstate: str = SqlState.SUCCESSFUL_COMPLETION,
        severity: str = "NOTICE",
        **extra: str | None,
    ) -> NoticeResponse:
        return cls(_make_fields(severity, sqlstate, message, extra))

    def encode(self) -> bytes:
        return _encode_fields(b"N", self.fields)


def _encode_copy_response(type_byte: bytes, fmt: int, column_formats: tuple[int, ...]) -> bytes:
    body = bytes([fmt]) + _U16.pack(len(column_formats)) + b"".join(_I16.pack(f) for f in column_formats)
    return frame(type_byte, body)


@dataclass(frozen=True, slots=True)
class CopyInResponse:
    TYPE: ClassVar[bytes] = b"G"
    format: int = 0
    column_formats: tuple[int, ...] = ()

    def encode(self) -> bytes:
        return _encode_copy_response(b"G", self.format, self.column_formats)


@dataclass(frozen=True, slots=True)
class CopyOutResponse:
    TYPE: ClassVar[bytes] = b"H"
    format: int = 0
    column_formats: tuple[int, ...] = ()

    def encode(self) -> bytes:
        return _encode_copy_response(b"H", self.format, self.column_formats)


@dataclass(frozen=True, slots=True)
class CopyBothResponse:
    TYPE: ClassVar[bytes] = b"W"
    format: int = 0
    column_formats: tuple[int, ...] = ()

    def encode(self) -> bytes:
        return _encode_copy_response(b"W", self.format, self.column_formats)


@dataclass(frozen=True, slots=True)
class ParseComplete:
    TYPE: ClassVar[bytes] = b"1"

    def encode(self) -> bytes:
        return b"1\0\0\0\x04"


@dataclass(frozen=True, slots=True)
class BindComplete:
    TYPE: ClassVar[bytes] = b"2"

    def encode(self) -> bytes:
        return b"2\0\0\0\x04"


@dataclass(frozen=True, slots=True)
class CloseComplete:
    TYPE: ClassVar[bytes] = b"3"

    def encode(self) -> bytes:
        return b"3\0\0\0\x04"


@dataclass(frozen=True, slots=True)
class NoData:
    TYPE: ClassVar[bytes] = b"n"

    def encode(self) -> bytes:
        return b"n\0\0\0\x04"


@dataclass(frozen=True, slots=True)
class PortalSuspended:
    TYPE: ClassVar[bytes] = b"s"

    def encode(self) -> bytes:
        return b"s\0\0\0\x04"


@dataclass(frozen=True, slots=True)
class ParameterDescription:
    TYPE: ClassVar[bytes] = b"t"
    type_oids: tuple[int, ...] = ()

    def encode(self) -> bytes:
        return frame(b"t", _U16.pack(len(self.type_oids)) + b"".join(_U32.pack(t) for t in self.type_oids))


@dataclass(frozen=True, slots=True)
class NotificationResponse:
    TYPE: ClassVar[bytes] = b"A"
    pid: int
    channel: str
    payload: str

    def encode(self) -> bytes:
        return frame(b"A", _U32.pack(self.pid) + _cstr(self.channel) + _cstr(self.payload))


BackendMessage = (
    AuthenticationOk
    | AuthenticationCleartextPassword
    | AuthenticationMD5Password
    | AuthenticationSASL
    | AuthenticationRequest
    | ParameterStatus
    | BackendKeyData
    | NegotiateProtocolVersion
    | ReadyForQuery
    | RowDescription
    | DataRow
    | CommandComplete
    | EmptyQueryResponse
    | ErrorResponse
    | NoticeResponse
    | CopyInResponse
    | CopyOutResponse
    | CopyBothResponse
    | CopyData
    | CopyDone
    | ParseComplete
    | BindComplete
    | CloseComplete
    | NoData
    | PortalSuspended
    | ParameterDescription
    | NotificationResponse
)

AuthenticationMessage = (
    AuthenticationOk
    | AuthenticationCleartextPassword
    | AuthenticationMD5Password
    | AuthenticationSASL
    | AuthenticationRequest
)


def _decode_auth(r: _Reader) -> AuthenticationMessage:
    code = r.i32()
    if code == 0:
        r.end()
        return AuthenticationOk()
    if code == 3:
        r.end()
        return AuthenticationCleartextPassword()
    if code == 5:
        salt = r.raw(4)
        r.end()
        return AuthenticationMD5Password(salt)
    if code == 10:
        mechanisms = []
        while True:
            m = r.cstr()
            if m == "":
                break
            mechanisms.append(m)
        r.end()
        return AuthenticationSASL(tuple(mechanisms))
    return AuthenticationRequest(code, r.rest())


def _decode_parameter_status(r: _Reader) -> ParameterStatus:
    name, value = r.cstr(), r.cstr()
    r.end()
    return ParameterStatus(name, value)


def _decode_key_data(r: _Reader) -> BackendKeyData:
    pid, secret = r.u32(), r.u32()
    r.end()
    return BackendKeyData(pid, secret)


def _decode_negotiate(r: _Reader) -> NegotiateProtocolVersion:
    minor, n = r.u32(), r.u32()
    if n > r.remaining():
        raise ProtocolViolation(f"NegotiateProtocolVersion: option count {n} exceeds the message length")
    options = tuple(r.cstr() for _ in range(n))
    r.end()
    return NegotiateProtocolVersion(minor, options)


def _decode_ready(r: _Reader) -> ReadyForQuery:
    status = chr(r.u8())
    r.end()
    if status not in ("I", "T", "E"):
        raise ProtocolViolation(f"ReadyForQuery: invalid transaction status {status!r}")
    return ReadyForQuery(status)


def _decode_row_description(r: _Reader) -> RowDescription:
    n = r.count(19, "field")  # the smallest field: empty name NUL + 18 fixed bytes
    fields = []
    tail = FieldDescription._TAIL
    for _ in range(n):
        name = r.cstr()
        fields.append(FieldDescription(name, *tail.unpack(r.raw(tail.size))))
    r.end()
    return RowDescription(tuple(fields))


def _decode_data_row(r: _Reader) -> DataRow:
    values: list[bytes | None] = []
    for _ in range(r.count(4, "column")):
        n = r.i32()
        if n < -1:
            raise ProtocolViolation(f"DataRow: invalid column length {n}")
        values.append(None if n == -1 else r.raw(n))
    r.end()
    return DataRow(tuple(values))


def _decode_command_complete(r: _Reader) -> CommandComplete:
    tag = r.cstr()
    r.end()
    return CommandComplete(tag)


def _decode_fields(r: _Reader) -> dict[str, str]:
    fields: dict[str, str] = {}
    while True:
        code = r.u8()
        if code == 0:
            break
        fields[chr(code)] = r.cstr()
    r.end()
    return fields


def _decode_copy_response(
    cls: type[CopyInResponse] | type[CopyOutResponse] | type[CopyBothResponse],
) -> Callable[[_Reader], object]:
    def decode(r: _Reader) -> object:
        fmt = r.u8()
        if fmt not in (0, 1):
            raise ProtocolViolation(f"{r.what}: invalid overall format {fmt}")
        formats = tuple(r.i16() for _ in range(r.count(2, "column format")))
        r.end()
        return cls(fmt, formats)

    return decode


def _decode_parameter_description(r: _Reader) -> ParameterDescription:
    oids = tuple(r.u32() for _ in range(r.count(4, "parameter")))
    r.end()
    return ParameterDescription(oids)


def _decode_notification(r: _Reader) -> NotificationResponse:
    pid = r.u32()
    channel, payload = r.cstr(), r.cstr()
    r.end()
    return NotificationResponse(pid, channel, payload)


def _decode_error(r: _Reader) -> ErrorResponse:
    return ErrorResponse(_decode_fields(r))


def _decode_notice(r: _Reader) -> NoticeResponse:
    return NoticeResponse(_decode_fields(r))


_BACKEND: Final[dict[bytes, tuple[str, Callable[[_Reader], object]]]] = {
    b"R": ("Authentication", _decode_auth),
    b"S": ("ParameterStatus", _decode_parameter_status),
    b"K": ("BackendKeyData", _decode_key_data),
    b"v": ("NegotiateProtocolVersion", _decode_negotiate),
    b"Z": ("ReadyForQuery", _decode_ready),
    b"T": ("RowDescription", _decode_row_description),
    b"D": ("DataRow", _decode_data_row),
    b"C": ("CommandComplete", _decode_command_complete),
    b"I": ("EmptyQueryResponse", _empty(EmptyQueryResponse)),
    b"E": ("ErrorResponse", _decode_error),
    b"N": ("NoticeResponse", _decode_notice),
    b"G": ("CopyInResponse", _decode_copy_response(CopyInResponse)),
    b"H": ("CopyOutResponse", _decode_copy_response(CopyOutResponse)),
    b"W": ("CopyBothResponse", _decode_copy_response(CopyBothResponse)),
    b"d": ("CopyData", _decode_copy_data),
    b"c": ("CopyDone", _empty(CopyDone)),
    b"1": ("ParseComplete", _empty(ParseComplete)),
    b"2": ("BindComplete", _empty(BindComplete)),
    b"3": ("CloseComplete", _empty(CloseComplete)),
    b"n": ("NoData", _empty(NoData)),
    b"s": ("PortalSuspended", _empty(PortalSuspended)),
    b"t": ("ParameterDescription", _decode_parameter_description),
    b"A": ("NotificationResponse", _decode_notification),
}

BACKEND_TYPES: Final = frozenset(_BACKEND)


def backend_name(type_byte: bytes) -> str:
    entry = _BACKEND.get(type_byte)
    return entry[0] if entry else f"unknown message type {type_byte!r}"


def decode_backend(type_byte: bytes, payload: bytes) -> BackendMessage:
    """Decode a regular message sent by a server (type byte and payload, length already stripped)."""
    entry = _BACKEND.get(type_byte)
    if entry is None:
        raise ProtocolViolation(f"invalid backend message type {type_byte!r}")
    name, decode = entry
    return decode(_Reader(payload, name))  # type: ignore[return-value]


def encode_all(messages: Iterable[FrontendMessage | BackendMessage | EncryptionResponse]) -> bytes:
    return b"".join(m.encode() for m in messages)
