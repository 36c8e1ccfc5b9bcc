"""CRC-32C as Postgres computes it (pg_crc32c): the standard Castagnoli CRC, finalised."""

from __future__ import annotations

import crc32c as _crc32c


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """CRC-32C of `data`; pass a previous result as `value` to continue over more bytes."""
    return _crc32c.crc32c(data, value)


def wal_record_crc(record: bytes | bytearray | memoryview) -> int:
    """`xl_crc` of a reassembled record: body first, then the 20 header bytes before xl_crc."""
    view = memoryview(record)
    return _crc32c.crc32c(view[0:20], _crc32c.crc32c(view[24:]))
