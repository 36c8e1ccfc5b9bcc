"""The proposer's copy of the WAL it may still have to send (spec safekeeper-and-broker §10.6).

A contiguous byte range [start_lsn, end_lsn) in memory: WAL recovered from the donor after an
election, then everything streamed from the compute. Safekeepers read from it at their own
positions; it is trimmed from the front as `truncateLsn` advances (every configured safekeeper has
flushed up to there). A safekeeper that is down keeps `truncateLsn` still, so the spool keeps
growing until it is back: the same retention Neon gets from its replication slot.
"""

from __future__ import annotations

from neon.utils.lsn import Lsn


class WalNotInSpool(Exception):
    """The requested WAL is below the spool's start (trimmed, or never fetched)."""


class WalSpool:
    def __init__(self, start_lsn: int) -> None:
        self.start_lsn = Lsn(start_lsn)
        self._buf = bytearray()

    @property
    def end_lsn(self) -> Lsn:
        return Lsn(self.start_lsn + len(self._buf))

    def append(self, lsn: int, data: bytes) -> None:
        """Add WAL at `lsn`; bytes already held are skipped (a stream may resend), a gap is an error."""
        end = self.end_lsn
        if lsn > end:
            raise ValueError(f"WAL at {Lsn(lsn)} leaves a gap after the spool's end {end}")
        skip = end - lsn
        if skip < len(data):
            self._buf += memoryview(data)[skip:]

    def read(self, lsn: int, max_bytes: int) -> bytes:
        """Up to `max_bytes` of WAL from `lsn` (empty at the end)."""
        if lsn < self.start_lsn:
            raise WalNotInSpool(f"WAL at {Lsn(lsn)} is below the spool's start {self.start_lsn}")
        off = lsn - self.start_lsn
        return bytes(self._buf[off : off + max_bytes])

    def trim(self, upto: int) -> None:
        """Forget WAL below `upto` (never beyond the end)."""
        upto = min(upto, self.end_lsn)
        if upto > self.start_lsn:
            del self._buf[: upto - self.start_lsn]
            self.start_lsn = Lsn(upto)

    def __len__(self) -> int:
        return len(self._buf)
