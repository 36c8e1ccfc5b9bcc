"""Payloads of the physical streaming-replication sub-protocol, carried inside CopyData.

Server → client: XLogData ('w') and primary keepalive ('k'). Client → server: standby status
update ('r'), hot-standby feedback ('h') and Neon's pageserver feedback ('z', spec pageserver
§10.4 / safekeeper §2.3 and §4.4). All integers are big-endian; times are microseconds since
2000-01-01 00:00:00 UTC (helpers below).

Decoding is strict: fixed-size messages must have exactly their size and booleans must be 0 or 1
(as the safekeeper does); anything else is a `ProtocolViolation`.

Hot-standby feedback is decoded in the protocol's own layout (time, xmin u32, xmin epoch u32,
catalog_xmin u32, catalog_xmin epoch u32). Neon's safekeeper reads the same 24 bytes as three
64-bit values, which swaps xid and epoch; `neon_xmin`/`neon_catalog_xmin` give that reading when
byte compatibility with Neon matters.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import ClassVar, Final

from neon.pq.errors import ProtocolViolation

# --- timestamps ------------------------------------------------------------------------------

PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
# Seconds between the Unix epoch and the Postgres epoch.
PG_EPOCH_UNIX_OFFSET: Final = 946_684_800


def pg_now() -> int:
    """The current time as a Postgres timestamp (µs since 2000-01-01 UTC)."""
    return time.time_ns() // 1000 - PG_EPOCH_UNIX_OFFSET * 1_000_000


def pg_timestamp(dt: datetime) -> int:
    """A timezone-aware datetime as µs since 2000-01-01 UTC."""
    if dt.tzinfo is None:
        raise ValueError("pg_timestamp needs a timezone-aware datetime")
    delta = dt - PG_EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def pg_timestamp_to_datetime(us: int) -> datetime:
    return PG_EPOCH + timedelta(microseconds=us)


def pg_timestamp_from_unix(seconds: float) -> int:
    return round((seconds - PG_EPOCH_UNIX_OFFSET) * 1_000_000)


def pg_timestamp_to_unix(us: int) -> float:
    return us / 1_000_000 + PG_EPOCH_UNIX_OFFSET


# --- server → client -------------------------------------------------------------------------

_W = struct.Struct(">cQQq")
_K = struct.Struct(">cQqB")
_R = struct.Struct(">cQQQqB")
_H = struct.Struct(">cqIIII")
_Z_HDR = struct.Struct(">cQ")


@dataclass(frozen=True, slots=True)
class XLogData:
    """'w': WAL bytes starting at `wal_start`; `wal_end` is the server's current end of WAL."""

    TAG: ClassVar[bytes] = b"w"
    wal_start: int
    wal_end: int
    send_time: int
    data: bytes

    @property
    def data_end(self) -> int:
        """The LSN just past the carried bytes (what a receiver has after this message)."""
        return self.wal_start + len(self.data)

    def encode(self) -> bytes:
        return _W.pack(b"w", self.wal_start, self.wal_end, self.send_time) + self.data


@dataclass(frozen=True, slots=True)
class PrimaryKeepalive:
    """'k': the server's end of WAL, its clock, and whether it wants an immediate reply."""

    TAG: ClassVar[bytes] = b"k"
    wal_end: int
    send_time: int
    reply_requested: bool = False

    def encode(self) -> bytes:
        return _K.pack(b"k", self.wal_end, self.send_time, int(self.reply_requested))


# --- client → server -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StandbyStatusUpdate:
    """'r': positions written, flushed and applied by the receiver (LSN of the last byte + 1)."""

    TAG: ClassVar[bytes] = b"r"
    write_lsn: int
    flush_lsn: int
    apply_lsn: int
    reply_time: int
    reply_requested: bool = False

    def encode(self) -> bytes:
        return _R.pack(b"r", self.write_lsn, self.flush_lsn, self.apply_lsn, self.reply_time, int(self.reply_requested))


@dataclass(frozen=True, slots=True)
class HotStandbyFeedback:
    """'h': the standby's xmin and catalog_xmin with their epochs (all zero = feedback off)."""

    TAG: ClassVar[bytes] = b"h"
    reply_time: int
    xmin: int
    xmin_epoch: int
    catalog_xmin: int
    catalog_xmin_epoch: int

    @property
    def full_xmin(self) -> int:
        """xmin as a FullTransactionId (epoch << 32 | xid)."""
        return (self.xmin_epoch << 32) | self.xmin

    @property
    def full_catalog_xmin(self) -> int:
        return (self.catalog_xmin_epoch << 32) | self.catalog_xmin

    @property
    def neon_xmin(self) -> int:
        """What Neon's safekeeper reads from the same bytes as one u64: xid << 32 | epoch."""
        return (self.xmin << 32) | self.xmin_epoch

    @property
    def neon_catalog_xmin(self) -> int:
        return (self.catalog_xmin << 32) | self.catalog_xmin_epoch

    def encode(self) -> bytes:
        return _H.pack(b"h", self.reply_time, self.xmin, self.xmin_epoch, self.catalog_xmin, self.catalog_xmin_epoch)


# Keys Neon writes, in the order it writes them; readers also accept the walproposer's aliases.
_FEEDBACK_KEYS: Final = (
    ("current_timeline_size", "current_timeline_size"),
    ("ps_writelsn", "last_received_lsn"),
    ("ps_flushlsn", "disk_consistent_lsn"),
    ("ps_applylsn", "remote_consistent_lsn"),
    ("ps_replytime", "replytime"),
)
_FEEDBACK_ALIASES: Final = {
    "current_timeline_size": "current_timeline_size",
    "ps_writelsn": "last_received_lsn",
    "last_received_lsn": "last_received_lsn",
    "ps_flushlsn": "disk_consistent_lsn",
    "disk_consistent_lsn": "disk_consistent_lsn",
    "ps_applylsn": "remote_consistent_lsn",
    "remote_consistent_lsn": "remote_consistent_lsn",
    "ps_replytime": "replytime",
    "replytime": "replytime",
}
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_I32 = struct.Struct(">i")


@dataclass(frozen=True, slots=True)
class PageserverFeedback:
    """Neon's pageserver progress report (spec pageserver §10.4); `replytime` in Postgres µs.

    The body is a self-describing key/value block: u8 count, then per pair a NUL-terminated key,
    an i32 value length (8 for every key Neon knows) and the value. Wrapped for the replication
    stream as 'z' · u64 length of the body · body.
    """

    TAG: ClassVar[bytes] = b"z"
    current_timeline_size: int = 0
    last_received_lsn: int = 0
    disk_consistent_lsn: int = 0
    remote_consistent_lsn: int = 0
    replytime: int = 0

    def encode_body(self) -> bytes:
        parts = [bytes([len(_FEEDBACK_KEYS)])]
        for key, attr in _FEEDBACK_KEYS:
            value = getattr(self, attr)
            packed = _I64.pack(value) if attr == "replytime" else _U64.pack(value)
            parts.append(key.encode("ascii") + b"\0" + _I32.pack(8) + packed)
        return b"".join(parts)

    def encode(self) -> bytes:
        body = self.encode_body()
        return _Z_HDR.pack(b"z", len(body)) + body

    @classmethod
    def decode_body(cls, body: bytes) -> PageserverFeedback:
        """Parse the key/value block; unknown keys are skipped by their length, absent keys are 0."""
        if not body:
            raise ProtocolViolation("PageserverFeedback: empty body")
        values: dict[str, int] = {}
        pos = 1
        for i in range(body[0]):
            nul = body.find(b"\0", pos)
            if nul < 0:
                raise ProtocolViolation(f"PageserverFeedback: key {i} is missing its NUL terminator")
            key = body[pos:nul].decode("ascii", errors="replace")
            pos = nul + 1
            if pos + 4 > len(body):
                raise ProtocolViolation(f"PageserverFeedback: value length of {key!r} is truncated")
            (length,) = _I32.unpack_from(body, pos)
            pos += 4
            if length < 0 or pos + length > len(body):
                raise ProtocolViolation(f"PageserverFeedback: value of {key!r} has invalid length {length}")
            attr = _FEEDBACK_ALIASES.get(key)
            if attr is not None:
                if length != 8:
                    raise ProtocolViolation(f"PageserverFeedback: value of {key!r} is {length} bytes, expected 8")
                fmt = _I64 if attr == "replytime" else _U64
                values[attr] = fmt.unpack_from(body, pos)[0]
            pos += length
        if pos != len(body):
            raise ProtocolViolation(f"PageserverFeedback: {len(body) - pos} unexpected trailing bytes")
        return cls(**values)


ServerReplicationMessage = XLogData | PrimaryKeepalive
ClientReplicationMessage = StandbyStatusUpdate | HotStandbyFeedback | PageserverFeedback


def _exact(data: bytes, s: struct.Struct, name: str) -> tuple[object, ...]:
    if len(data) != s.size:
        raise ProtocolViolation(f"{name}: expected {s.size} bytes, got {len(data)}")
    return s.unpack(data)


def _bool(value: object, name: str) -> bool:
    if value not in (0, 1):
        raise ProtocolViolation(f"{name}: reply-requested flag must be 0 or 1, got {value}")
    return bool(value)


def decode_server_message(data: bytes) -> ServerReplicationMessage:
    """Decode a CopyData payload sent by a walsender."""
    if not data:
        raise ProtocolViolation("replication message: empty CopyData")
    tag = data[:1]
    if tag == b"w":
        if len(data) < _W.size:
            raise ProtocolViolation(f"XLogData: header needs {_W.size} bytes, got {len(data)}")
        _, start, end, ts = _W.unpack_from(data)
        return XLogData(start, end, ts, data[_W.size :])
    if tag == b"k":
        _, end, ts, reply = _exact(data, _K, "PrimaryKeepalive")
        return PrimaryKeepalive(end, ts, _bool(reply, "PrimaryKeepalive"))  # type: ignore[arg-type]
    raise ProtocolViolation(f"unknown replication message tag {tag!r} from the server")


def decode_client_message(data: bytes) -> ClientReplicationMessage:
    """Decode a CopyData payload sent by a replication client to the walsender."""
    if not data:
        raise ProtocolViolation("replication message: empty CopyData")
    tag = data[:1]
    if tag == b"r":
        _, w, f, a, ts, reply = _exact(data, _R, "StandbyStatusUpdate")
        return StandbyStatusUpdate(w, f, a, ts, _bool(reply, "StandbyStatusUpdate"))  # type: ignore[arg-type]
    if tag == b"h":
        _, ts, xmin, xmin_epoch, cxmin, cxmin_epoch = _exact(data, _H, "HotStandbyFeedback")
        return HotStandbyFeedback(ts, xmin, xmin_epoch, cxmin, cxmin_epoch)  # type: ignore[arg-type]
    if tag == b"z":
        if len(data) < _Z_HDR.size:
            raise ProtocolViolation(f"PageserverFeedback: header needs {_Z_HDR.size} bytes, got {len(data)}")
        (_, length) = _Z_HDR.unpack_from(data)
        body = data[_Z_HDR.size :]
        # Neon's safekeeper does not check this length; we do, since every writer sets it exactly.
        if length != len(body):
            raise ProtocolViolation(f"PageserverFeedback: length field says {length}, body is {len(body)} bytes")
        return PageserverFeedback.decode_body(body)
    raise ProtocolViolation(f"unknown replication message tag {tag!r} from the client")
