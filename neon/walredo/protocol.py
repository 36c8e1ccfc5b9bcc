"""Sans-IO encoding of the WAL-redo helper's pipe protocol (spec pageserver §6.2).

Every message is a type byte, a big-endian int32 length that counts itself and the payload,
then the payload. 'B' BeginRedoForBlock, 'P' PushPage, 'A' ApplyRecord and 'G' GetPage are
Neon's; 'M' (mask a page with its rmgr's mask function) is ours, for tests. 'G' and 'M' are
answered with exactly one 8192-byte page on the helper's stdout; nothing else is ever written.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from neon.walredo.records import BufferTag

PAGE_SIZE = 8192
_TAG = struct.Struct(">BIIII")
_HDR = struct.Struct(">cI")
_LSN = struct.Struct(">Q")
_MASK = struct.Struct(">BI")


class RedoProtocolError(ValueError):
    pass


def encode_tag(tag: BufferTag) -> bytes:
    return _TAG.pack(tag.fork, tag.spc, tag.db, tag.rel, tag.blk)


def decode_tag(buf: bytes) -> BufferTag:
    fork, spc, db, rel, blk = _TAG.unpack(buf)
    return BufferTag(spc, db, rel, fork, blk)


def message(kind: bytes, payload: bytes) -> bytes:
    return _HDR.pack(kind, 4 + len(payload)) + payload


def begin_redo_for_block(tag: BufferTag) -> bytes:
    return message(b"B", encode_tag(tag))


def push_page(tag: BufferTag, page: bytes) -> bytes:
    if len(page) != PAGE_SIZE:
        raise RedoProtocolError(f"base image is {len(page)} bytes, expected {PAGE_SIZE}")
    return message(b"P", encode_tag(tag) + page)


def apply_record(end_lsn: int, record: bytes) -> bytes:
    return message(b"A", _LSN.pack(end_lsn) + record)


def get_page(tag: BufferTag) -> bytes:
    return message(b"G", encode_tag(tag))


def mask_page(rmid: int, blkno: int, page: bytes) -> bytes:
    if len(page) != PAGE_SIZE:
        raise RedoProtocolError(f"page is {len(page)} bytes, expected {PAGE_SIZE}")
    return message(b"M", _MASK.pack(rmid, blkno) + page)


_B = struct.Struct(">cIBIIII")
_P_HDR = struct.Struct(">cIBIIII")
_A_HDR = struct.Struct(">cIQ")


def redo_request(tag: BufferTag, base_image: bytes | None, records: Iterable[tuple[int, bytes]]) -> bytes:
    """One whole request: B, P if there is a base image, one A per (end LSN, record), G."""
    t = (tag.fork, tag.spc, tag.db, tag.rel, tag.blk)
    parts = [_B.pack(b"B", 21, *t)]
    if base_image is not None:
        if len(base_image) != PAGE_SIZE:
            raise RedoProtocolError(f"base image is {len(base_image)} bytes, expected {PAGE_SIZE}")
        parts.append(_P_HDR.pack(b"P", 21 + PAGE_SIZE, *t))
        parts.append(base_image)
    a_hdr = _A_HDR.pack
    for lsn, rec in records:
        parts.append(a_hdr(b"A", 12 + len(rec), lsn))
        parts.append(rec)
    parts.append(_B.pack(b"G", 21, *t))
    return b"".join(parts)


class MessageReader:
    """Incremental parser of the request stream (used by the stub helper in tests)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_message(self) -> tuple[bytes, bytes] | None:
        if len(self._buf) < 5:
            return None
        kind, length = _HDR.unpack_from(self._buf)
        if length < 4:
            raise RedoProtocolError(f"invalid message length {length}")
        if len(self._buf) < 1 + length:
            return None
        payload = bytes(self._buf[5 : 1 + length])
        del self._buf[: 1 + length]
        return kind, payload
