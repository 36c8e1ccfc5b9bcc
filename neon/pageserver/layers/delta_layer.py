"""Delta layers: every value of keys in ``[key_start, key_end)`` with LSN in ``[lsn_start, lsn_end)``.

Index keys are ``key ++ lsn`` (26 bytes, big-endian, so byte order = (key, LSN) order); leaf values
are ``(blob offset << 1) | will_init``.  The caller encodes a Value into bytes; an image value is
stored with ``will_init=True`` (it needs nothing older), exactly as a WAL record that initialises
the page.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from neon.utils.id import TenantId, TimelineId
from neon.utils.lsn import Lsn

from .blob import DEFAULT_ZSTD_LEVEL
from .index import NODE_HEADER_SIZE, VALUE_SIZE
from .layer_file import LayerFileWriter, LayerReader
from .layer_name import KEY_SIZE, LSN_MAX, DeltaLayerName, check_key, delta_temp_file_name
from .summary import LayerKind

DeltaEntry = tuple[int, bool, bytes]  # (lsn, will_init, value)
_INDEX_KEY_SIZE = LayerKind.DELTA.index_key_size


class DeltaGetResult(NamedTuple):
    """`entries` newest first; `complete` when the last one is will_init (older layers not needed)."""

    entries: list[DeltaEntry]
    complete: bool


class DeltaLayerWriter:
    """Writes one delta layer; `put` in strictly increasing (key, LSN) order, then `finish(key_end)`.

    Synchronous and CPU-bound (zstd): run it in an executor thread, not on the event loop."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        tenant_id: TenantId,
        timeline_id: TimelineId,
        key_start: bytes,
        lsn_range: tuple[int, int],
        *,
        zstd_level: int = DEFAULT_ZSTD_LEVEL,
    ) -> None:
        check_key(key_start)
        lsn_start, lsn_end = int(lsn_range[0]), int(lsn_range[1])
        if not 0 <= lsn_start < lsn_end <= LSN_MAX:
            raise ValueError(f"invalid delta layer LSN range {lsn_start:X}..{lsn_end:X}")
        self.key_start = key_start
        self.lsn_start = Lsn(lsn_start)
        self.lsn_end = Lsn(lsn_end)
        self._last = b""
        self._file = LayerFileWriter(
            directory,
            LayerKind.DELTA,
            tenant_id,
            timeline_id,
            key_start,
            lsn_start,
            lsn_end,
            delta_temp_file_name(key_start, lsn_start, lsn_end),
            zstd_level,
        )

    @property
    def temp_path(self) -> Path:
        return self._file.temp_path

    @property
    def bytes_written(self) -> int:
        return self._file.bytes_written

    def put(self, key: bytes, lsn: int, will_init: bool, value: bytes | bytearray | memoryview) -> None:
        if len(key) != KEY_SIZE or not isinstance(key, bytes):
            raise ValueError(f"a key is {KEY_SIZE} bytes, got {key!r}")
        if not self.lsn_start <= lsn < self.lsn_end:
            raise ValueError(f"LSN {Lsn(lsn)} outside the layer's range {self.lsn_start}..{self.lsn_end}")
        index_key = key + lsn.to_bytes(8, "big")
        if index_key <= self._last:
            raise ValueError(
                f"delta layer entries must be strictly increasing: {key.hex()}@{Lsn(lsn)} after an equal or later one"
            )
        if key < self.key_start:
            raise ValueError(f"key {key.hex()} is below the layer's start {self.key_start.hex()}")
        self._file.append(index_key, value, bool(will_init))
        self._last = index_key

    def put_versions(self, key: bytes, versions: list[tuple[int, bool, bytes]]) -> None:
        """Every version of one key, (lsn, will_init, value) with strictly increasing LSNs; keys in
        increasing order across calls. The same checks and bytes as `put` for each."""
        if not versions:
            return
        if len(key) != KEY_SIZE or not isinstance(key, bytes):
            raise ValueError(f"a key is {KEY_SIZE} bytes, got {key!r}")
        if key < self.key_start or (self._last and key <= self._last[:KEY_SIZE]):
            raise ValueError(f"delta layer keys must be increasing and in range: {key.hex()}")
        self._file.append_versions(key, versions, (self.lsn_start, self.lsn_end))
        self._last = key + versions[-1][0].to_bytes(8, "big")

    def finish(self, key_end: bytes) -> Path:
        """Make the layer durable under its final name ``<KS>-<KE>__<LS>-<LE>``; returns its path."""
        check_key(key_end)
        if self._last and self._last[:KEY_SIZE] >= key_end:
            self._file.abort()
            raise ValueError(f"key end {key_end.hex()} is not above the last key {self._last[:KEY_SIZE].hex()}")
        try:
            name = DeltaLayerName(self.key_start, key_end, self.lsn_start, self.lsn_end)
        except ValueError:
            self._file.abort()
            raise
        return self._file.finish(key_end, name)

    def abort(self) -> None:
        self._file.abort()

    def __enter__(self) -> DeltaLayerWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.__exit__(None, None, None)


class DeltaLayer(LayerReader):
    """A delta layer file opened for reading (thread-safe; `close` when done)."""

    KIND = LayerKind.DELTA

    name: DeltaLayerName

    @property
    def is_l0(self) -> bool:
        return self.name.is_l0

    def get(self, key: bytes, lsn_floor: int, lsn_end: int) -> DeltaGetResult:
        """Entries of `key` with ``lsn_floor ≤ LSN < lsn_end``, newest first, up to the first will_init.

        ``complete`` is True when that will_init entry was reached (nothing older is needed)."""
        if len(key) != KEY_SIZE:
            raise ValueError(f"a key is {KEY_SIZE} bytes, got {key!r}")
        if lsn_end > LSN_MAX + 1:
            lsn_end = LSN_MAX + 1
        if lsn_floor < 0:
            lsn_floor = 0
        entries: list[DeltaEntry] = []
        if lsn_end <= lsn_floor:
            return DeltaGetResult(entries, False)
        low = key + lsn_floor.to_bytes(8, "big")
        found = self._find_le(key + (lsn_end - 1).to_bytes(8, "big"))
        if found is None:
            return DeltaGetResult(entries, False)
        rel, pos, leaf = found
        read_blob = self._read_blob
        while True:
            # An index key ≤ key ++ (lsn_end - 1) that is ≥ key ++ lsn_floor has this key and an LSN in range.
            o = NODE_HEADER_SIZE + pos * _INDEX_KEY_SIZE
            payload = leaf.payload
            if payload[o : o + _INDEX_KEY_SIZE] < low:
                return DeltaGetResult(entries, False)
            v = leaf.values_at + pos * VALUE_SIZE
            ref = int.from_bytes(payload[v : v + VALUE_SIZE], "big")
            will_init = bool(ref & 1)
            entries.append(
                (int.from_bytes(payload[o + KEY_SIZE : o + _INDEX_KEY_SIZE], "big"), will_init, read_blob(ref >> 1))
            )
            if will_init:
                return DeltaGetResult(entries, True)
            pos -= 1
            if pos < 0:
                if rel == 0:
                    return DeltaGetResult(entries, False)
                rel -= 1
                leaf = self._leaf(rel)
                pos = leaf.count - 1

    def iter_index(self) -> Iterator[tuple[bytes, int, bool]]:
        """(key, LSN, will_init) of every entry in (key, LSN) order, without reading values."""
        for index_key, ref in self._file.index.iter_entries():
            yield index_key[:KEY_SIZE], int.from_bytes(index_key[KEY_SIZE:], "big"), bool(ref & 1)

    def iter_entries(self) -> Iterator[tuple[bytes, int, bool, bytes]]:
        """(key, LSN, will_init, value) of every entry in (key, LSN) order; values read sequentially."""
        for (index_key, ref), value in self._file.scan_entries():
            yield index_key[:KEY_SIZE], int.from_bytes(index_key[KEY_SIZE:], "big"), bool(ref & 1), value

    def __iter__(self) -> Iterator[tuple[bytes, int, bool, bytes]]:
        return self.iter_entries()
