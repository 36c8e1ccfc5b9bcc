"""Checked reads over one record's main data: every shortfall becomes a `PayloadError`.

Payload parsers read through a `PayloadReader` instead of calling `struct.unpack_from` on the raw
bytes, so short or malformed input can only ever raise `PayloadError` (never `struct.error` or
`IndexError`), and every message names the record type, the field and the offset.
"""

from __future__ import annotations

import struct

from neon.postgres.constants import maxalign
from neon.postgres.errors import PayloadError

Buffer = bytes | bytearray | memoryview

_I32 = struct.Struct("<i")


class PayloadReader:
    """A cursor over `data` for the record type named `what` (e.g. "XACT COMMIT")."""

    __slots__ = ("_data", "_pos", "what")

    def __init__(self, data: Buffer, what: str) -> None:
        self._data = bytes(data)
        self._pos = 0
        self.what = what

    @property
    def pos(self) -> int:
        return self._pos

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def error(self, msg: str) -> PayloadError:
        return PayloadError(f"{self.what}: {msg} (main data is {len(self._data)} bytes)")

    def _need(self, n: int, field: str) -> None:
        if n > self.remaining:
            raise self.error(f"{field} needs {n} bytes at offset {self._pos}, only {self.remaining} left")

    def unpack(self, st: struct.Struct, field: str) -> tuple:
        self._need(st.size, field)
        values = st.unpack_from(self._data, self._pos)
        self._pos += st.size
        return values

    def take(self, n: int, field: str) -> bytes:
        self._need(n, field)
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def skip(self, n: int, field: str) -> None:
        self._need(n, field)
        self._pos += n

    def count(self, field: str, item_size: int) -> int:
        """An int32 element count, checked against what is left (so garbage cannot ask for 2 GB)."""
        (n,) = self.unpack(_I32, f"{field} count")
        if n < 0:
            raise self.error(f"negative {field} count {n}")
        return self.fits(n, item_size, field)

    def fits(self, n: int, item_size: int, field: str) -> int:
        """Check that `n` items of `item_size` bytes are left; returns `n`."""
        if n * item_size > self.remaining:
            raise self.error(
                f"{n} {field} need {n * item_size} bytes at offset {self._pos}, only {self.remaining} left"
            )
        return n

    def array(self, code: str, n: int, field: str) -> tuple[int, ...]:
        """`n` little-endian integers of struct type `code` ("I", "H", ...)."""
        self._need(n * struct.calcsize(code), field)
        return self.unpack(struct.Struct(f"<{n}{code}"), field)

    def cstring(self, field: str) -> bytes:
        """A NUL-terminated string; returns it without the NUL and moves past the NUL."""
        end = self._data.find(b"\0", self._pos)
        if end < 0:
            raise self.error(f"{field} at offset {self._pos} has no terminating NUL")
        out = self._data[self._pos : end]
        self._pos = end + 1
        return out

    def align(self, field: str) -> None:
        """Move to the next MAXALIGN boundary (relative to the start of the main data)."""
        self.skip(maxalign(self._pos) - self._pos, f"padding after {field}")

    def rest(self) -> bytes:
        out = self._data[self._pos :]
        self._pos = len(self._data)
        return out

    def end(self) -> None:
        """The layout is complete: trailing bytes mean we (or the record) disagree about it."""
        if self.remaining:
            raise self.error(f"{self.remaining} unexpected trailing bytes at offset {self._pos}")


def fixed(data: Buffer, st: struct.Struct, what: str) -> tuple:
    """Unpack a payload that is exactly one struct."""
    if len(data) != st.size:
        raise PayloadError(f"{what}: main data must be {st.size} bytes, got {len(data)}")
    return st.unpack_from(data, 0)


def at_least(data: Buffer, st: struct.Struct, what: str) -> tuple:
    """Unpack a struct at the start of a payload that may carry more data after it."""
    if len(data) < st.size:
        raise PayloadError(f"{what}: main data must be at least {st.size} bytes, got {len(data)}")
    return st.unpack_from(data, 0)


def cstr(raw: bytes) -> str:
    """Decode a C string from WAL; names may be in any server encoding, so never fail."""
    return raw.decode("utf-8", errors="backslashreplace")
