"""Value blobs: a length header, then the value, zstd-compressed when that pays.

Header (big-endian), read by peeking the first byte:

* ``0xxxxxxx`` — 1 byte: raw value of length ``x`` (< 128 bytes; never compressed);
* ``1cxxxxxx xxxxxxxx xxxxxxxx xxxxxxxx`` — 4 bytes: ``c`` = 1 if the stored bytes are one zstd
  frame (with its content size), ``x`` = stored length (< 2**30).

Each value is compressed on its own (see docs/layer-format.md, "Why per-value compression").
"""

from __future__ import annotations

import threading

import zstandard

SHORT_MAX = 0x7F
LONG_FLAG = 0x80000000
ZSTD_FLAG = 0x40000000
LENGTH_MASK = 0x3FFFFFFF
MAX_VALUE_SIZE = LENGTH_MASK
LONG_HEADER_SIZE = 4
# Values shorter than this are stored raw: zstd wins little on them alone, and compressing costs
# about 1.5 µs a value, which would dominate the flush of small WAL records (a bulk INSERT).
MIN_COMPRESS_SIZE = 512
DEFAULT_ZSTD_LEVEL = 3


class BlobEncoder:
    """Encodes values into blobs (not thread-safe: one per writer)."""

    def __init__(self, zstd_level: int = DEFAULT_ZSTD_LEVEL) -> None:
        self.zstd_level = zstd_level
        self._compressor = (
            zstandard.ZstdCompressor(
                level=zstd_level, write_content_size=True, write_checksum=False, write_dict_id=False
            )
            if zstd_level > 0
            else None
        )

    @property
    def raw_below(self) -> int:
        """Values shorter than this are stored raw under their length header, never compressed."""
        return MIN_COMPRESS_SIZE

    def encode(self, value: bytes | bytearray | memoryview) -> tuple[bytes, bytes]:
        """(header, stored bytes) for `value`."""
        n = len(value)
        if n <= SHORT_MAX:
            return bytes((n,)), bytes(value)
        if n > MAX_VALUE_SIZE:
            raise ValueError(f"value of {n} bytes exceeds the layer limit of {MAX_VALUE_SIZE} bytes")
        if self._compressor is not None and n >= MIN_COMPRESS_SIZE:
            packed = self._compressor.compress(value)
            # Keep the compressed form only if it saves at least 1/16 of the value.
            if len(packed) <= n - (n >> 4):
                return (LONG_FLAG | ZSTD_FLAG | len(packed)).to_bytes(4, "big"), packed
        return (LONG_FLAG | n).to_bytes(4, "big"), bytes(value)


_local = threading.local()


def decompress(data: bytes) -> bytes:
    """Decompress one zstd frame (a per-thread decompressor: zstandard objects are not thread-safe)."""
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d.decompress(data)
