"""The newest WAL of one timeline, kept in memory for walsenders.

A caught-up reader (the pageserver, a peer safekeeper) asks for the few hundred bytes the last
commit added; reading them back from the segment file means a worker-thread hop and an
open/pread/close per message, which on the commit path cost more than the write itself. The
writer records every piece it writes here; a walsender whose range is still held sends from
memory and falls back to the files otherwise.

Threading: the writer (any thread, under `WalStorage`'s lock) publishes a snapshot (entries that
never change) with one attribute assignment; readers (the event loop) take one reference and never see a
half-updated state. Readers must bound their ranges by `flush_lsn`/`commit_lsn`, as for files.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

from neon.utils.lsn import Lsn

DEFAULT_CAPACITY = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class _Snapshot:
    # Lists shared with the writer, which only ever appends to them: entries [0, count) are this
    # snapshot's. A trim or truncation starts new lists, so published entries never change.
    starts: list[int]  # LSN of each piece, ascending and contiguous
    pieces: list[bytes]
    count: int
    end: int  # LSN just past the last piece

    @property
    def start(self) -> int:
        return self.starts[0] if self.count else self.end


_EMPTY = _Snapshot([], [], 0, 0)


class RecentWal:
    """The last `capacity` (up to twice that between trims) bytes written, as written pieces."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._snap = _EMPTY

    @property
    def start_lsn(self) -> Lsn:
        return Lsn(self._snap.start)

    @property
    def end_lsn(self) -> Lsn:
        return Lsn(self._snap.end)

    def written(self, lsn: int, data: bytes | bytearray | memoryview) -> None:
        """`data` was written at `lsn`. A write that does not continue the held range restarts it."""
        if not data:
            return
        piece = data if isinstance(data, bytes) else bytes(data)
        snap = self._snap
        end = lsn + len(piece)
        if not snap.count or snap.end != lsn:
            self._snap = _Snapshot([lsn], [piece], 1, end)
            return
        starts, pieces, count = snap.starts, snap.pieces, snap.count
        if len(starts) != count:  # not the lists' newest snapshot (cannot happen with one writer)
            starts, pieces = starts[:count], pieces[:count]
        if end - starts[0] > 2 * self.capacity:
            # Keep the newest `capacity` in new lists: O(pieces) once per `capacity` bytes.
            keep = max(bisect_right(starts, end - self.capacity) - 1, 0)
            starts, pieces = starts[keep:], pieces[keep:]
        starts.append(lsn)
        pieces.append(piece)
        self._snap = _Snapshot(starts, pieces, len(starts), end)

    def truncate(self, end_lsn: int) -> None:
        """WAL after `end_lsn` is gone: hold nothing beyond it."""
        snap = self._snap
        if end_lsn >= snap.end:
            return
        if not snap.count or end_lsn <= snap.start:
            self._snap = _EMPTY
            return
        i = bisect_right(snap.starts, end_lsn, 0, snap.count) - 1
        starts, pieces = snap.starts[: i + 1], snap.pieces[: i + 1]
        pieces[-1] = pieces[-1][: end_lsn - starts[-1]]
        if not pieces[-1]:
            starts.pop()
            pieces.pop()
        self._snap = _Snapshot(starts, pieces, len(starts), end_lsn) if pieces else _EMPTY

    def clear(self) -> None:
        self._snap = _EMPTY

    def read(self, start_lsn: int, end_lsn: int) -> bytes | None:
        """Exactly [start_lsn, end_lsn) if all of it is held, else None."""
        snap = self._snap
        if not snap.count or start_lsn < snap.start or end_lsn > snap.end or end_lsn < start_lsn:
            return None
        i = bisect_right(snap.starts, start_lsn, 0, snap.count) - 1
        first_start, first = snap.starts[i], snap.pieces[i]
        if end_lsn <= first_start + len(first):
            return first[start_lsn - first_start : end_lsn - first_start]
        out = [memoryview(first)[start_lsn - first_start :]]
        pos = first_start + len(first)
        for j in range(i + 1, snap.count):
            piece = snap.pieces[j]
            if end_lsn <= pos + len(piece):
                out.append(memoryview(piece)[: end_lsn - pos])
                break
            out.append(memoryview(piece))
            pos += len(piece)
        return b"".join(out)
