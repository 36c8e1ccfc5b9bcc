"""Image layers: the value of every key in ``[key_start, key_end)`` as of one LSN.

Index keys are the 18-byte keys; leaf values are blob offsets.  A key that is absent is Missing
(spec §5.4): `get` returns None.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from neon.utils.id import TenantId, TimelineId
from neon.utils.lsn import Lsn

from .blob import DEFAULT_ZSTD_LEVEL
from .layer_file import LayerFileWriter, LayerReader
from .layer_name import KEY_SIZE, ImageLayerName, check_key, image_temp_file_name
from .summary import LayerKind


class ImageLayerWriter:
    """Writes one image layer; `put` in strictly increasing key order, then `finish()`.

    Synchronous and CPU-bound (zstd): run it in an executor thread, not on the event loop."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        tenant_id: TenantId,
        timeline_id: TimelineId,
        key_range: tuple[bytes, bytes],
        lsn: int,
        *,
        zstd_level: int = DEFAULT_ZSTD_LEVEL,
    ) -> None:
        self.name = ImageLayerName(key_range[0], key_range[1], Lsn(lsn))
        self._last = b""
        self._file = LayerFileWriter(
            directory,
            LayerKind.IMAGE,
            tenant_id,
            timeline_id,
            self.name.key_start,
            int(self.name.lsn),
            int(self.name.lsn) + 1,
            image_temp_file_name(self.name),
            zstd_level,
        )

    @property
    def temp_path(self) -> Path:
        return self._file.temp_path

    @property
    def bytes_written(self) -> int:
        return self._file.bytes_written

    def put(self, key: bytes, value: bytes | bytearray | memoryview) -> None:
        if len(key) != KEY_SIZE or not isinstance(key, bytes):
            raise ValueError(f"a key is {KEY_SIZE} bytes, got {key!r}")
        if key <= self._last:
            raise ValueError(f"image layer keys must be strictly increasing: {key.hex()} after {self._last.hex()}")
        if not self.name.key_start <= key < self.name.key_end:
            raise ValueError(f"key {key.hex()} is outside the layer's key range")
        self._file.append(key, value, None)
        self._last = key

    def finish(self) -> Path:
        """Make the layer durable under its final name ``<KS>-<KE>__<LSN>``; returns its path."""
        return self._file.finish(self.name.key_end, self.name)

    def abort(self) -> None:
        self._file.abort()

    def __enter__(self) -> ImageLayerWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.__exit__(None, None, None)


class ImageLayer(LayerReader):
    """An image layer file opened for reading (thread-safe; `close` when done)."""

    KIND = LayerKind.IMAGE

    name: ImageLayerName

    @property
    def lsn(self) -> Lsn:
        return self.name.lsn

    def get(self, key: bytes) -> bytes | None:
        """The key's value as of the layer LSN, or None when the layer has no such key."""
        check_key(key)
        found = self._find_le(key)
        if found is None:
            return None
        _, pos, leaf = found
        if leaf.key(pos) != key:
            return None
        return self._read_blob(leaf.value(pos))

    def iter_keys(self) -> Iterator[bytes]:
        for key, _ in self._file.index.iter_entries():
            yield key

    def iter_entries(self) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) in key order; values read sequentially."""
        for (key, _), value in self._file.scan_entries():
            yield key, value

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return self.iter_entries()
