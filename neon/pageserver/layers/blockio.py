"""Block-addressed layer files: 8192-byte blocks, each ending in a CRC-32C of its payload.

A block is ``payload[PAYLOAD_SIZE] ++ crc32c_be[4]``.  The CRC is seeded with ``salt ^ blkno``,
so a block that is intact but sits at the wrong place (or comes from another layer file) fails
its check too.  Block 0 (the summary) uses salt 0; the other blocks use the salt the summary
implies (see `summary.file_salt`).

`BlockReader` verifies every block it returns and raises `LayerCorruptionError` naming the file
and block; it never hands out unverified bytes.  It is safe to use from several threads
(``os.pread`` has no shared file position; the cache tolerates races).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from neon.postgres.crc32c import crc32c

BLOCK_SIZE = 8192
CHECKSUM_SIZE = 4
PAYLOAD_SIZE = BLOCK_SIZE - CHECKSUM_SIZE

K = TypeVar("K")
V = TypeVar("V")


class LayerError(Exception):
    """Base of the errors about a layer file."""


class LayerCorruptionError(LayerError):
    """The layer file at `path` is damaged: a checksum failed, it is truncated, or a structure is invalid."""

    def __init__(self, path: str | os.PathLike[str], block: int | None, reason: str) -> None:
        self.path = Path(path)
        self.block = block
        self.reason = reason
        where = f" block {block}" if block is not None else ""
        super().__init__(f"corrupt layer file {self.path}{where}: {reason}")


class LayerSummaryMismatchError(LayerCorruptionError):
    """The summary block describes another layer than the file name (or the expected tenant/timeline)."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(path, 0, reason)


class LayerFormatError(LayerError):
    """A well-formed layer file of a format version or kind this code does not read."""


def block_checksum(payload: bytes | bytearray | memoryview, salt: int, blkno: int) -> int:
    return crc32c(payload, (salt ^ blkno) & 0xFFFFFFFF)


def encode_blocks(payloads: bytes | bytearray, first_blkno: int, salt: int) -> bytearray:
    """Turn ``n * PAYLOAD_SIZE`` payload bytes into n checksummed blocks numbered from `first_blkno`."""
    if len(payloads) % PAYLOAD_SIZE:
        raise ValueError(f"payload length {len(payloads)} is not a multiple of {PAYLOAD_SIZE}")
    view = memoryview(payloads)
    out = bytearray()
    for i in range(len(payloads) // PAYLOAD_SIZE):
        chunk = view[i * PAYLOAD_SIZE : (i + 1) * PAYLOAD_SIZE]
        out += chunk
        out += block_checksum(chunk, salt, first_blkno + i).to_bytes(CHECKSUM_SIZE, "big")
    return out


class LruCache(Generic[K, V]):
    """A small LRU map; capacity 0 disables it.  Races between threads lose entries, never corrupt."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            try:  # noqa: SIM105 - contextlib.suppress costs more than the lookup on this hot path
                self._items.move_to_end(key)
            except KeyError:
                pass
        return value

    def put(self, key: K, value: V) -> None:
        if self.capacity <= 0:
            return
        self._items[key] = value
        while len(self._items) > self.capacity:
            try:
                self._items.popitem(last=False)
            except KeyError:
                break

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class BlockReadStats:
    """`reads`: blocks read from the file (and verified); `cache_hits`: blocks served from the cache."""

    reads: int = 0
    cache_hits: int = 0


class BlockReader:
    """Verified reads of one layer file's blocks, with a small LRU of recently read blocks.

    Returned blocks are the full 8192 bytes; only ``[0, PAYLOAD_SIZE)`` is payload."""

    def __init__(self, path: str | os.PathLike[str], cache_blocks: int = 16) -> None:
        self.path = Path(path)
        self.salt = 0
        self.stats = BlockReadStats()
        self._cache: LruCache[int, bytes] = LruCache(cache_blocks)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.file_size = os.fstat(self._fd).st_size
        except BaseException:
            os.close(self._fd)
            raise
        self.nblocks = self.file_size // BLOCK_SIZE

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._cache.clear()

    def corruption(self, block: int | None, reason: str) -> LayerCorruptionError:
        return LayerCorruptionError(self.path, block, reason)

    def _check(self, buf: bytes, blkno: int) -> None:
        stored = int.from_bytes(buf[PAYLOAD_SIZE:], "big")
        computed = block_checksum(memoryview(buf)[:PAYLOAD_SIZE], self.salt if blkno else 0, blkno)
        if stored != computed:
            raise self.corruption(blkno, f"checksum mismatch (stored {stored:08x}, computed {computed:08x})")

    def _pread(self, blkno: int, count: int) -> bytes:
        if self._fd < 0:
            raise ValueError(f"layer file {self.path} is closed")
        if blkno < 0 or blkno + count > self.nblocks:
            raise self.corruption(
                blkno, f"read of blocks {blkno}..{blkno + count - 1} beyond the file's {self.nblocks} blocks"
            )
        want = count * BLOCK_SIZE
        buf = os.pread(self._fd, want, blkno * BLOCK_SIZE)
        if len(buf) != want:
            raise self.corruption(blkno, f"short read: {len(buf)} of {want} bytes (file truncated?)")
        return buf

    def read_block(self, blkno: int, cache: bool = True) -> bytes:
        """One verified block (8192 bytes)."""
        buf = self._cache.get(blkno)
        if buf is not None:
            self.stats.cache_hits += 1
            return buf
        buf = self._pread(blkno, 1)
        self.stats.reads += 1
        self._check(buf, blkno)
        if cache:
            self._cache.put(blkno, buf)
        return buf

    def read_payloads(self, blkno: int, count: int) -> bytes:
        """The concatenated payloads of `count` consecutive verified blocks, in one read (not cached)."""
        buf = self._pread(blkno, count)
        self.stats.reads += count
        view = memoryview(buf)
        for i in range(count):
            self._check(buf[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE], blkno + i)
        return b"".join(view[i * BLOCK_SIZE : i * BLOCK_SIZE + PAYLOAD_SIZE] for i in range(count))

    def verify_all(self, progress: Callable[[int], None] | None = None) -> None:
        """Check the checksum of every block (a scrub); raises on the first bad one."""
        step = 256
        for start in range(0, self.nblocks, step):
            count = min(step, self.nblocks - start)
            buf = self._pread(start, count)
            for i in range(count):
                self._check(buf[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE], start + i)
            if progress is not None:
                progress(start + count)
