"""Errors raised by the format code. Every decoder failure is a `WalDecodeError` naming the LSN."""

from __future__ import annotations


class PgFormatError(ValueError):
    """Bytes that do not follow a Postgres on-disk or WAL format."""


class WalDecodeError(PgFormatError):
    """Invalid WAL at `lsn` (a record or page start; None when not known)."""

    def __init__(self, msg: str, lsn: int | None = None, source: str | None = None) -> None:
        self.msg = msg
        self.lsn = lsn
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.lsn is not None:
            where.append(f"at {self.lsn >> 32:X}/{self.lsn & 0xFFFFFFFF:X}")
        if self.source:
            where.append(f"in {self.source}")
        return f"{self.msg} ({', '.join(where)})" if where else self.msg


class PayloadError(PgFormatError):
    """A record's main data does not match the layout of its rmgr/opcode."""
