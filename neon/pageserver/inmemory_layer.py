"""The in-memory layer (spec pageserver §5.1): the newest WAL of a timeline, before it is flushed.

Values are kept in memory as the encoded bytes that the delta layer will store, indexed by
key then LSN. Neon spills them to an "ephemeral" file through its page cache; we keep them in
RAM (a layer is at most `checkpoint_distance` bytes of WAL, 256 MiB by default), which the
machine affords, and which means there is nothing to clean up after a crash: the WAL is
re-streamed from `disk_consistent_lsn` anyway.

A layer is *open* while ingest appends to it and *frozen* once its end LSN is set; a frozen
layer never changes, so the flush thread can write it out while the event loop keeps reading it.
"""

from __future__ import annotations

import os
from pathlib import Path

from neon.utils.id import TenantId, TimelineId
from neon.utils.lsn import Lsn

from .layers import KEY_MAX, KEY_MIN, DeltaGetResult, DeltaLayerWriter

# Per key: LSNs ascending, and for each the will_init flag and the encoded value.
_Versions = list[tuple[int, bool, bytes]]


class InMemoryLayer:
    """Values of every key with LSN in ``[start_lsn, end_lsn)``; ``end_lsn`` is None while open."""

    def __init__(self, start_lsn: int) -> None:
        self.start_lsn = Lsn(start_lsn)
        self.end_lsn: Lsn | None = None
        self._index: dict[bytes, _Versions] = {}
        self.size = 0  # bytes of values, the measure `checkpoint_distance` is compared with
        self.entry_count = 0
        self.max_lsn = 0

    # --- writing -------------------------------------------------------------------------------
    def put(self, key: bytes, lsn: int, will_init: bool, value: bytes) -> None:
        """Store `value` for `key` at `lsn` (≥ every LSN already stored for the key)."""
        if self.end_lsn is not None:
            raise RuntimeError(f"in-memory layer {self} is frozen")
        versions = self._index.get(key)
        if versions is None:
            self._index[key] = [(lsn, will_init, value)]
        else:
            last = versions[-1][0]
            if lsn == last:  # the same record put twice for a key: the last one wins
                self.size -= len(versions[-1][2])
                self.entry_count -= 1
                versions[-1] = (lsn, will_init, value)
            elif lsn > last:
                versions.append((lsn, will_init, value))
            else:
                raise ValueError(f"in-memory layer: LSN {Lsn(lsn)} for key {key.hex()} is below {Lsn(last)}")
        self.size += len(value)
        self.entry_count += 1
        if lsn > self.max_lsn:
            self.max_lsn = lsn

    def bulk_index(self) -> dict[bytes, _Versions]:
        """The index itself, for the ingest fast lane, which appends like `put` (then calls `account`)."""
        if self.end_lsn is not None:
            raise RuntimeError(f"in-memory layer {self} is frozen")
        return self._index

    def account(self, value_bytes: int, n_values: int, max_lsn: int) -> None:
        self.size += value_bytes
        self.entry_count += n_values
        if n_values and max_lsn > self.max_lsn:
            self.max_lsn = max_lsn

    def freeze(self, end_lsn: int) -> None:
        if end_lsn <= self.start_lsn:
            raise ValueError(f"cannot freeze {self} at {Lsn(end_lsn)}")
        self.end_lsn = Lsn(end_lsn)

    @property
    def is_frozen(self) -> bool:
        return self.end_lsn is not None

    # --- reading -------------------------------------------------------------------------------
    def get(self, key: bytes, lsn_floor: int, lsn_end: int) -> DeltaGetResult:
        """As `DeltaLayer.get`: entries with ``lsn_floor ≤ LSN < lsn_end``, newest first, to the first will_init."""
        versions = self._index.get(key)
        entries: list[tuple[int, bool, bytes]] = []
        if not versions:
            return DeltaGetResult(entries, False)
        i = len(versions) - 1
        while i >= 0 and versions[i][0] >= lsn_end:
            i -= 1
        while i >= 0:
            entry = versions[i]
            if entry[0] < lsn_floor:
                break
            entries.append(entry)
            if entry[1]:
                return DeltaGetResult(entries, True)
            i -= 1
        return DeltaGetResult(entries, False)

    def keys(self) -> list[bytes]:
        return list(self._index)

    def iter_sorted(self) -> list[tuple[bytes, int, bool, bytes]]:
        """Every (key, LSN, will_init, value) in (key, LSN) order."""
        out: list[tuple[bytes, int, bool, bytes]] = []
        for key in sorted(self._index):
            out.extend((key, lsn, init, value) for lsn, init, value in self._index[key])
        return out

    # --- flushing ------------------------------------------------------------------------------
    def write_delta_layer(
        self, directory: str | os.PathLike[str], tenant_id: TenantId, timeline_id: TimelineId
    ) -> Path:
        """Write this frozen layer as one L0 delta layer file (fsynced, under its final name).

        CPU- and IO-bound: called from a worker thread."""
        if self.end_lsn is None:
            raise RuntimeError(f"cannot flush open in-memory layer {self}")
        writer = DeltaLayerWriter(directory, tenant_id, timeline_id, KEY_MIN, (self.start_lsn, self.end_lsn))
        with writer:
            put_versions = writer.put_versions
            index = self._index
            for key in sorted(index):
                put_versions(key, index[key])
            return writer.finish(KEY_MAX)

    def __repr__(self) -> str:
        end = "open" if self.end_lsn is None else str(self.end_lsn)
        return f"InMemoryLayer({self.start_lsn}-{end}, {self.entry_count} values, {self.size} bytes)"
