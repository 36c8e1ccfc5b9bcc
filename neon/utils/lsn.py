"""`Lsn`: a WAL position, with Postgres' text form and the segment/page arithmetic around it."""

from __future__ import annotations

WAL_PAGE_SIZE = 8192
DEFAULT_WAL_SEGMENT_SIZE = 16 * 1024 * 1024
_MAX = (1 << 64) - 1


class Lsn(int):
    """A 64-bit byte position in the WAL stream; formats as Postgres does (`0/16B3748`)."""

    __slots__ = ()

    def __new__(cls, value: int | str = 0) -> Lsn:
        if isinstance(value, str):
            return cls.parse(value)
        if not 0 <= value <= _MAX:
            raise ValueError(f"LSN out of range: {value}")
        return super().__new__(cls, value)

    @classmethod
    def parse(cls, text: str) -> Lsn:
        hi, sep, lo = text.strip().partition("/")
        if not sep or not hi or not lo or len(hi) > 8 or len(lo) > 8:
            raise ValueError(f"invalid LSN {text!r}: expected X/X in hex")
        try:
            return cls((int(hi, 16) << 32) | int(lo, 16))
        except ValueError:
            raise ValueError(f"invalid LSN {text!r}: expected X/X in hex") from None

    def __str__(self) -> str:
        return f"{int(self) >> 32:X}/{int(self) & 0xFFFFFFFF:X}"

    def __repr__(self) -> str:
        return f"Lsn({self})"

    def __add__(self, other: int) -> Lsn:
        return Lsn(int(self) + int(other))

    def __sub__(self, other: int) -> int:  # type: ignore[override]
        # The difference of two LSNs is a byte count, not a position.
        return int(self) - int(other)

    def widened(self, other: int) -> Lsn:
        return Lsn(max(int(self), int(other)))

    def align(self, alignment: int = 8) -> Lsn:
        """Round up to a multiple of `alignment` (MAXALIGN by default)."""
        return Lsn((int(self) + alignment - 1) & ~(alignment - 1))

    def is_aligned(self, alignment: int = 8) -> bool:
        return int(self) % alignment == 0

    def segment_number(self, seg_size: int = DEFAULT_WAL_SEGMENT_SIZE) -> int:
        return int(self) // seg_size

    def segment_offset(self, seg_size: int = DEFAULT_WAL_SEGMENT_SIZE) -> int:
        return int(self) % seg_size

    def segment_start(self, seg_size: int = DEFAULT_WAL_SEGMENT_SIZE) -> Lsn:
        return Lsn(int(self) - int(self) % seg_size)

    def page_offset(self) -> int:
        return int(self) % WAL_PAGE_SIZE

    def page_start(self) -> Lsn:
        return Lsn(int(self) - int(self) % WAL_PAGE_SIZE)

    def block_offset(self) -> int:
        return self.page_offset()

    @classmethod
    def from_segment(cls, segno: int, offset: int = 0, seg_size: int = DEFAULT_WAL_SEGMENT_SIZE) -> Lsn:
        return cls(segno * seg_size + offset)


INVALID_LSN = Lsn(0)
