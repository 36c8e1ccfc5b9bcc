"""What is stored under a key at an LSN (spec pageserver §3.1-3.2): `Value` and its bincode-BE form.

A value is an `Image` (the whole thing: a page, a directory blob, a size) or a `WalRecord`
wrapping one of the record kinds of `neon.walredo.records` (a delta on an older version). This
module owns the on-disk encoding used by layers and the in-memory layer's spill file: an enum is a
u32 BE variant index then its fields, byte buffers and Vecs a u64 BE length then the items,
Option a u8 tag 0/1 then the value, bool a u8 0/1. Decoding is strict (no trailing bytes, no
lengths beyond the buffer) and fails only with `ValueFormatError`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from neon.postgres.errors import PgFormatError
from neon.walredo import records
from neon.walredo.records import (
    ClearVisibilityMapFlags,
    ClogSetAborted,
    ClogSetCommitted,
    MultixactMembersCreate,
    MultixactOffsetCreate,
    PostgresRecord,
)

# Variant indexes of `Value` and of `NeonWalRecord`, in Neon's declaration order.
VALUE_IMAGE = 0
VALUE_WAL_RECORD = 1
REC_POSTGRES = 0
REC_CLEAR_VM_FLAGS = 1
REC_CLOG_SET_COMMITTED = 2
REC_CLOG_SET_ABORTED = 3
REC_MULTIXACT_OFFSET_CREATE = 4
REC_MULTIXACT_MEMBERS_CREATE = 5

_U8 = struct.Struct(">B")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_VARIANT_LEN = struct.Struct(">IQ")  # an enum variant whose first field is a length (Image)
_VARIANT_BOOL = struct.Struct(">IB")  # Postgres: variant, will_init
_OPT_U32 = struct.Struct(">BI")
_U32_PAIR = struct.Struct(">II")


class ValueFormatError(PgFormatError):
    """Bytes that are not a bincode-BE Value, or a Value whose fields do not fit the encoding."""


@dataclass(frozen=True, slots=True)
class Image:
    """The complete value at this LSN; needs nothing older."""

    data: bytes


@dataclass(frozen=True, slots=True)
class WalRecord:
    """A record to apply on top of the previous version of the value."""

    rec: records.WalRecord


Value = Image | WalRecord


def will_init(value: Value) -> bool:
    """True when reconstruction can stop here: any image, or a Postgres record that initialises the page."""
    return isinstance(value, Image) or records.will_init(value.rec)


# --- encoding ------------------------------------------------------------------------------------
def _opt_u32(v: int | None) -> bytes:
    return b"\x00" if v is None else _OPT_U32.pack(1, v)


def _u32_vec(items: tuple[int, ...]) -> bytes:
    return _U64.pack(len(items)) + struct.pack(f">{len(items)}I", *items)


def encode_neon_record(rec: records.WalRecord) -> bytes:
    """One NeonWalRecord (any record kind, Postgres included), bincode BE."""
    try:
        match rec:
            case PostgresRecord(will_init=init, rec=raw):
                # bool is checked here because struct would encode any truthy value as 1.
                if not isinstance(init, bool):
                    raise ValueFormatError(f"Postgres record will_init must be a bool, got {init!r}")
                return _VARIANT_BOOL.pack(REC_POSTGRES, init) + _U64.pack(len(raw)) + bytes(raw)
            case ClearVisibilityMapFlags(new_heap_blkno=new, old_heap_blkno=old, flags=flags):
                return _U32.pack(REC_CLEAR_VM_FLAGS) + _opt_u32(new) + _opt_u32(old) + _U8.pack(flags)
            case ClogSetCommitted(xids=xids, timestamp=ts):
                return _U32.pack(REC_CLOG_SET_COMMITTED) + _u32_vec(xids) + _I64.pack(ts)
            case ClogSetAborted(xids=xids):
                return _U32.pack(REC_CLOG_SET_ABORTED) + _u32_vec(xids)
            case MultixactOffsetCreate(mid=mid, moff=moff):
                return _U32.pack(REC_MULTIXACT_OFFSET_CREATE) + _U32_PAIR.pack(mid, moff)
            case MultixactMembersCreate(moff=moff, members=members):
                parts = [_U32.pack(REC_MULTIXACT_MEMBERS_CREATE), _U32.pack(moff), _U64.pack(len(members))]
                parts.extend(_U32_PAIR.pack(xid, status) for xid, status in members)
                return b"".join(parts)
    except (struct.error, TypeError) as e:  # a field out of range or of the wrong type
        raise ValueFormatError(f"cannot encode {rec!r}: {e}") from None
    raise ValueFormatError(f"not a WAL record: {rec!r}")


def encode_value(value: Value) -> bytes:
    if isinstance(value, Image):
        data = value.data
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ValueFormatError(f"Image data must be bytes, got {type(data).__name__}")
        return _VARIANT_LEN.pack(VALUE_IMAGE, len(data)) + bytes(data)
    if isinstance(value, WalRecord):
        return _U32.pack(VALUE_WAL_RECORD) + encode_neon_record(value.rec)
    raise ValueFormatError(f"not a Value: {value!r}")


_POSTGRES_VALUE = struct.Struct(">IIBQ")  # Value::WalRecord, NeonWalRecord::Postgres, will_init, rec length


def encode_postgres_value(will_init: bool, rec: bytes) -> bytes:
    """`encode_value(WalRecord(PostgresRecord(will_init, rec)))`, without the objects (the ingest hot path)."""
    return _POSTGRES_VALUE.pack(VALUE_WAL_RECORD, REC_POSTGRES, 1 if will_init else 0, len(rec)) + rec


# --- decoding ------------------------------------------------------------------------------------
class _Reader:
    """A cursor over a buffer whose every read is bounds-checked and fails with ValueFormatError."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes | bytearray | memoryview, pos: int = 0) -> None:
        self.buf = buf
        self.pos = pos

    def _need(self, n: int, what: str) -> None:
        if len(self.buf) - self.pos < n:
            raise ValueFormatError(
                f"truncated value: {what} needs {n} bytes at offset {self.pos}, {len(self.buf) - self.pos} left"
            )

    def fixed(self, st: struct.Struct, what: str) -> tuple:
        self._need(st.size, what)
        out = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return out

    def u8(self, what: str) -> int:
        return self.fixed(_U8, what)[0]

    def u32(self, what: str) -> int:
        return self.fixed(_U32, what)[0]

    def bool(self, what: str) -> bool:
        b = self.u8(what)
        if b > 1:
            raise ValueFormatError(f"{what}: invalid bool byte {b:#04x} at offset {self.pos - 1}")
        return b == 1

    def opt_u32(self, what: str) -> int | None:
        tag = self.u8(what)
        if tag == 0:
            return None
        if tag != 1:
            raise ValueFormatError(f"{what}: invalid Option tag {tag:#04x} at offset {self.pos - 1}")
        return self.u32(what)

    def length(self, item_size: int, what: str) -> int:
        """A u64 element count, checked against what is left so garbage cannot ask for huge buffers."""
        (n,) = self.fixed(_U64, f"{what} length")
        self._need(n * item_size, f"{what} ({n} items)")
        return n

    def raw(self, what: str) -> bytes:
        n = self.length(1, what)
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out

    def u32_vec(self, what: str) -> tuple[int, ...]:
        n = self.length(4, what)
        out = struct.unpack_from(f">{n}I", self.buf, self.pos)
        self.pos += 4 * n
        return out

    def u32_pairs(self, what: str) -> tuple[tuple[int, int], ...]:
        n = self.length(_U32_PAIR.size, what)
        out = tuple(_U32_PAIR.unpack_from(self.buf, self.pos + i * _U32_PAIR.size) for i in range(n))
        self.pos += n * _U32_PAIR.size
        return out

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise ValueFormatError(f"{len(self.buf) - self.pos} trailing bytes after value at offset {self.pos}")


def _postgres(r: _Reader) -> PostgresRecord:
    init = r.bool("Postgres.will_init")
    return PostgresRecord(init, r.raw("Postgres.rec"))


def _clear_vm_flags(r: _Reader) -> ClearVisibilityMapFlags:
    new = r.opt_u32("ClearVisibilityMapFlags.new_heap_blkno")
    old = r.opt_u32("ClearVisibilityMapFlags.old_heap_blkno")
    return ClearVisibilityMapFlags(new, old, r.u8("ClearVisibilityMapFlags.flags"))


def _clog_set_committed(r: _Reader) -> ClogSetCommitted:
    xids = r.u32_vec("ClogSetCommitted.xids")
    return ClogSetCommitted(xids, r.fixed(_I64, "ClogSetCommitted.timestamp")[0])


def _clog_set_aborted(r: _Reader) -> ClogSetAborted:
    return ClogSetAborted(r.u32_vec("ClogSetAborted.xids"))


def _multixact_offset_create(r: _Reader) -> MultixactOffsetCreate:
    return MultixactOffsetCreate(*r.fixed(_U32_PAIR, "MultixactOffsetCreate"))


def _multixact_members_create(r: _Reader) -> MultixactMembersCreate:
    moff = r.u32("MultixactMembersCreate.moff")
    return MultixactMembersCreate(moff, r.u32_pairs("MultixactMembersCreate.members"))


_RECORD_DECODERS: dict[int, Callable[[_Reader], records.WalRecord]] = {
    REC_POSTGRES: _postgres,
    REC_CLEAR_VM_FLAGS: _clear_vm_flags,
    REC_CLOG_SET_COMMITTED: _clog_set_committed,
    REC_CLOG_SET_ABORTED: _clog_set_aborted,
    REC_MULTIXACT_OFFSET_CREATE: _multixact_offset_create,
    REC_MULTIXACT_MEMBERS_CREATE: _multixact_members_create,
}


def _record(r: _Reader) -> records.WalRecord:
    variant = r.u32("NeonWalRecord variant")
    decoder = _RECORD_DECODERS.get(variant)
    if decoder is None:
        raise ValueFormatError(f"unknown NeonWalRecord variant {variant}")
    return decoder(r)


def decode_neon_record(buf: bytes | bytearray | memoryview) -> records.WalRecord:
    """The inverse of `encode_neon_record`; the whole buffer must be one record."""
    r = _Reader(buf)
    rec = _record(r)
    r.end()
    return rec


def decode_value(buf: bytes | bytearray | memoryview) -> Value:
    """The inverse of `encode_value`; the whole buffer must be one value."""
    r = _Reader(buf)
    variant = r.u32("Value variant")
    if variant == VALUE_IMAGE:
        value: Value = Image(r.raw("Image"))
    elif variant == VALUE_WAL_RECORD:
        value = WalRecord(_record(r))
    else:
        raise ValueFormatError(f"unknown Value variant {variant}")
    r.end()
    return value
