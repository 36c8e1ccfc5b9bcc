"""What delta and image layer files share: the write protocol and the verified read path.

A file is: block 0 = summary; blocks 1 .. index_start_blk-1 = the value stream (blobs back to
back over the block payloads); then the index blocks (leaves first, root last).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

import zstandard

from neon.utils.crashsafe import fsync_path
from neon.utils.id import TenantId, TimelineId
from neon.utils.lsn import Lsn

from .blob import (
    LENGTH_MASK,
    LONG_FLAG,
    LONG_HEADER_SIZE,
    MIN_COMPRESS_SIZE,
    SHORT_MAX,
    ZSTD_FLAG,
    BlobEncoder,
    decompress,
)
from .blockio import (
    BLOCK_SIZE,
    CHECKSUM_SIZE,
    PAYLOAD_SIZE,
    BlockReader,
    BlockReadStats,
    LayerCorruptionError,
    LayerSummaryMismatchError,
    block_checksum,
    encode_blocks,
)
from .index import IndexBuilder, IndexLayout, IndexReader, node_capacity
from .layer_name import LayerName, parse_layer_file_name
from .summary import FLAG_ZSTD, LayerKind, LayerSummary, file_salt

DATA_START_BLK = 1
_WRITE_BATCH = 1 << 20
_SCAN_BLOCKS = 64

T = TypeVar("T")


try:  # the flush's inner loop in C (native/ingestfast.c), when built
    from neon._ingestfast import encode_versions as _encode_versions
except ImportError:  # pragma: no cover
    _encode_versions = None
if os.environ.get("NEON_NO_NATIVE"):
    _encode_versions = None

_SHORT_HEADERS = [bytes((n,)) for n in range(SHORT_MAX + 1)]
_LONG_HEADERS = [(LONG_FLAG | n).to_bytes(4, "big") for n in range(MIN_COMPRESS_SIZE)]


class LayerFileWriter:
    """Streams one layer file under a temporary name; `finish` makes it durable under its final name."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        kind: LayerKind,
        tenant_id: TenantId,
        timeline_id: TimelineId,
        key_start: bytes,
        lsn_start: int,
        lsn_end: int,
        temp_name: str,
        zstd_level: int,
    ) -> None:
        self.directory = Path(directory)
        self.kind = kind
        self.tenant_id = TenantId(bytes(tenant_id))
        self.timeline_id = TimelineId(bytes(timeline_id))
        self.key_start = key_start
        self.lsn_start = lsn_start
        self.lsn_end = lsn_end
        self.temp_path = self.directory / temp_name
        self._salt = file_salt(kind, self.tenant_id, self.timeline_id, key_start, lsn_start, lsn_end)
        self._encoder = BlobEncoder(zstd_level)
        self._data = bytearray()  # value-stream bytes not yet written out as blocks
        self._data_len = 0  # logical length of the value stream
        self._next_blk = DATA_START_BLK
        self._raw_bytes = 0
        self._stored_bytes = 0
        self._closed = False
        self._fd = os.open(self.temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            self._index = IndexBuilder(kind.index_key_size, spool_dir=self.directory)
            os.lseek(self._fd, DATA_START_BLK * BLOCK_SIZE, os.SEEK_SET)
        except BaseException:
            self.abort()
            raise

    @property
    def entry_count(self) -> int:
        return self._index.entry_count

    @property
    def bytes_written(self) -> int:
        """An estimate of the file size so far (data blocks; index not counted)."""
        return self._next_blk * BLOCK_SIZE + len(self._data)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"layer writer for {self.temp_path.name} is already finished or aborted")

    def append(self, index_key: bytes, value: bytes | bytearray | memoryview, will_init: bool | None) -> None:
        """Store `value` as a blob and index it under `index_key` (delta: ref has a will_init bit)."""
        self._check_open()
        header, stored = self._encoder.encode(value)
        pos = self._data_len % PAYLOAD_SIZE
        if PAYLOAD_SIZE - pos < LONG_HEADER_SIZE:
            # A blob header never straddles blocks: skip the last few bytes of this block.
            pad = PAYLOAD_SIZE - pos
            self._data += bytes(pad)
            self._data_len += pad
        offset = self._data_len
        self._data += header
        self._data += stored
        self._data_len += len(header) + len(stored)
        self._raw_bytes += len(value)
        self._stored_bytes += len(stored)
        self._index.add(index_key, offset if will_init is None else (offset << 1) | will_init)
        if len(self._data) >= _WRITE_BATCH:
            self._flush_data(final=False)

    def append_versions(self, key: bytes, versions: list[tuple[int, bool, bytes]], lsn_range: tuple[int, int]) -> None:
        """Every version of one delta key, (lsn, will_init, value) with strictly increasing LSNs in
        `lsn_range` (checked here), keys increasing across calls (checked by the caller). The same
        bytes as `append` per entry; the flush of an in-memory layer spends most of its time here,
        so raw values go through the C loop when it is built."""
        self._check_open()
        encode = self._encoder.encode
        raw_limit = self._encoder.raw_below
        data = self._data
        data_len = self._data_len
        raw_bytes = stored_bytes = 0
        keys: list[bytes] = []
        refs: list[int] = []
        lo, hi = lsn_range
        prev = -1
        i = 0
        n_versions = len(versions)
        while i < n_versions:
            if _encode_versions is not None:
                i, data_len, raw, prev_plus_one = _encode_versions(
                    key, versions, i, data, data_len, lo, hi, prev + 1, raw_limit, PAYLOAD_SIZE, keys, refs
                )
                prev = prev_plus_one - 1
                raw_bytes += raw
                stored_bytes += raw
                if i >= n_versions:
                    break
            lsn, will_init, value = versions[i]
            i += 1
            if not (prev < lsn and lo <= lsn < hi):
                raise ValueError(f"LSN {Lsn(lsn)} of {key.hex()} out of order or outside {Lsn(lo)}..{Lsn(hi)}")
            prev = lsn
            n = len(value)
            if n <= SHORT_MAX:
                header = _SHORT_HEADERS[n]
                stored = value
            elif n < raw_limit:
                header = _LONG_HEADERS[n]
                stored = value
            else:
                header, stored = encode(value)
            if PAYLOAD_SIZE - data_len % PAYLOAD_SIZE < LONG_HEADER_SIZE:
                pad = PAYLOAD_SIZE - data_len % PAYLOAD_SIZE
                data += bytes(pad)
                data_len += pad
            keys.append(key + lsn.to_bytes(8, "big"))
            refs.append((data_len << 1) | will_init)
            data += header
            data += stored
            data_len += len(header) + len(stored)
            raw_bytes += n
            stored_bytes += len(stored)
        self._index.add_many(keys, refs)
        self._data_len = data_len
        self._raw_bytes += raw_bytes
        self._stored_bytes += stored_bytes
        if len(data) >= _WRITE_BATCH:
            self._flush_data(final=False)

    def _write(self, buf: bytes | bytearray) -> None:
        view = memoryview(buf)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def _flush_data(self, final: bool) -> None:
        full = len(self._data) // PAYLOAD_SIZE * PAYLOAD_SIZE
        if final and full < len(self._data):
            self._data += bytes(PAYLOAD_SIZE - len(self._data) % PAYLOAD_SIZE)
            full = len(self._data)
        if not full:
            return
        self._write(encode_blocks(memoryview(self._data)[:full], self._next_blk, self._salt))
        self._next_blk += full // PAYLOAD_SIZE
        del self._data[:full]

    def _write_index_payloads(self, payloads: bytes) -> None:
        self._write(encode_blocks(payloads, self._next_blk, self._salt))
        self._next_blk += len(payloads) // PAYLOAD_SIZE

    def finish(self, key_end: bytes, final_name: LayerName) -> Path:
        """Write index and summary, fsync, rename to `final_name`, fsync the directory."""
        self._check_open()
        try:
            self._flush_data(final=True)
            index_start = self._next_blk
            layout = self._index.finish(self._write_index_payloads)
            summary = LayerSummary(
                kind=self.kind,
                tenant_id=self.tenant_id,
                timeline_id=self.timeline_id,
                key_start=self.key_start,
                key_end=key_end,
                lsn_start=self.lsn_start,
                lsn_end=self.lsn_end,
                entry_count=self._index.entry_count,
                data_end=self._data_len,
                index_start_blk=index_start,
                index_blocks=layout.blocks,
                index_leaf_count=layout.leaf_count,
                index_root=layout.root,
                index_depth=layout.depth,
                total_blocks=self._next_blk,
                raw_value_bytes=self._raw_bytes,
                stored_value_bytes=self._stored_bytes,
                zstd_level=self._encoder.zstd_level,
                flags=FLAG_ZSTD if self._encoder.zstd_level > 0 else 0,
            )
            payload = summary.encode()
            block0 = payload + block_checksum(payload, 0, 0).to_bytes(CHECKSUM_SIZE, "big")
            os.pwrite(self._fd, block0, 0)
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            final = self.directory / str(final_name)
            if final.exists():
                raise FileExistsError(f"layer file {final} already exists; layer files are immutable")
            os.rename(self.temp_path, final)
            fsync_path(self.directory)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return final

    def abort(self) -> None:
        """Drop the unfinished file (idempotent)."""
        self._closed = True
        with contextlib.suppress(Exception):
            self._index.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(FileNotFoundError):
            self.temp_path.unlink()

    def __enter__(self) -> LayerFileWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._closed:
            self.abort()


def _summary_mismatches(summary: LayerSummary, name: LayerName) -> list[str]:
    problems = []
    if (summary.key_start, summary.key_end) != name.key_range:
        problems.append(
            f"key range {summary.key_start.hex().upper()}-{summary.key_end.hex().upper()} "
            f"(name says {name.key_start.hex().upper()}-{name.key_end.hex().upper()})"
        )
    if (summary.lsn_start, summary.lsn_end) != name.lsn_range:
        problems.append(
            f"LSN range {summary.lsn_start:016X}-{summary.lsn_end:016X} "
            f"(name says {name.lsn_range[0]:016X}-{name.lsn_range[1]:016X})"
        )
    return problems


class LayerFile:
    """An open, verified layer file: summary checked against the name, index root loaded."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        kind: LayerKind,
        *,
        tenant_id: TenantId | None = None,
        timeline_id: TimelineId | None = None,
        cache_blocks: int = 16,
        cache_nodes: int = 32,
    ) -> None:
        self.path = Path(path)
        name = parse_layer_file_name(self.path.name)
        if name.is_delta != (kind is LayerKind.DELTA):
            raise ValueError(f"{self.path.name} is not the name of a {kind.name.lower()} layer")
        self.name: LayerName = name
        self.blocks = BlockReader(self.path, cache_blocks)
        try:
            self.summary = self._load_summary(kind, tenant_id, timeline_id)
            self.blocks.salt = self.summary.salt
            layout = IndexLayout(
                blocks=self.summary.index_blocks,
                leaf_count=self.summary.index_leaf_count,
                root=self.summary.index_root,
                depth=self.summary.index_depth,
            )
            self.index = IndexReader(
                self.blocks, self.summary.index_start_blk, layout, kind.index_key_size, cache_nodes
            )
        except BaseException:
            self.blocks.close()
            raise
        self.data_end = self.summary.data_end
        # Delta leaf values are (offset << 1) | will_init; image leaf values are the offset.
        self.value_shift = 1 if kind is LayerKind.DELTA else 0

    def _load_summary(
        self, kind: LayerKind, tenant_id: TenantId | None, timeline_id: TimelineId | None
    ) -> LayerSummary:
        size = self.blocks.file_size
        if size < BLOCK_SIZE:
            raise self.blocks.corruption(None, f"file is {size} bytes, shorter than its {BLOCK_SIZE}-byte summary")
        summary = LayerSummary.decode(self.blocks.read_block(0, cache=False))
        if summary.kind is not kind:
            raise LayerSummaryMismatchError(self.path, f"summary is of a {summary.kind.name.lower()} layer")
        expected = summary.total_blocks * BLOCK_SIZE
        if size != expected:
            what = "truncated" if size < expected else "has trailing bytes"
            raise self.blocks.corruption(
                None,
                f"file is {size} bytes but its summary describes {summary.total_blocks} blocks ({expected}): {what}",
            )
        data_blocks = -(-summary.data_end // PAYLOAD_SIZE)
        s = summary
        if (
            s.index_start_blk != DATA_START_BLK + data_blocks
            or s.index_start_blk + s.index_blocks != s.total_blocks
            or not 0 < s.index_leaf_count <= s.index_blocks
            or s.index_root != s.index_blocks - 1
            or not 1 <= s.index_depth <= 16
            or s.entry_count > s.index_leaf_count * node_capacity(kind.index_key_size)
        ):
            raise self.blocks.corruption(0, "summary geometry is inconsistent")
        problems = _summary_mismatches(summary, self.name)
        if tenant_id is not None and summary.tenant_id != tenant_id:
            problems.append(f"tenant {summary.tenant_id} (expected {tenant_id})")
        if timeline_id is not None and summary.timeline_id != timeline_id:
            problems.append(f"timeline {summary.timeline_id} (expected {timeline_id})")
        if problems:
            raise LayerSummaryMismatchError(self.path, "summary does not match: " + "; ".join(problems))
        return summary

    def close(self) -> None:
        self.blocks.close()

    def _blob_error(self, blkno: int, reason: str) -> LayerCorruptionError:
        return self.blocks.corruption(blkno, reason)

    def read_blob(self, offset: int) -> bytes:
        """The value stored at value-stream `offset` (random access through the block cache)."""
        blkno = DATA_START_BLK + offset // PAYLOAD_SIZE
        off = offset % PAYLOAD_SIZE
        buf = self.blocks.read_block(blkno)
        h = buf[off]
        if h < 0x80:
            start, length, compressed = off + 1, h, False
        else:
            word = int.from_bytes(buf[off : off + LONG_HEADER_SIZE], "big")
            start, length, compressed = off + LONG_HEADER_SIZE, word & LENGTH_MASK, bool(word & ZSTD_FLAG)
        end = start + length
        if offset + (end - off) > self.data_end:
            raise self._blob_error(blkno, f"blob at offset {offset} ({length} bytes) runs past the value stream")
        if end <= PAYLOAD_SIZE:
            data = buf[start:end]
        else:
            rest = end - PAYLOAD_SIZE
            data = buf[start:PAYLOAD_SIZE] + self.blocks.read_payloads(blkno + 1, -(-rest // PAYLOAD_SIZE))[:rest]
        return self._decode_stored(data, blkno, offset) if compressed else data

    def _decode_stored(self, data: bytes, blkno: int, offset: int) -> bytes:
        try:
            return decompress(data)
        except zstandard.ZstdError as e:
            raise self._blob_error(blkno, f"blob at offset {offset}: zstd: {e}") from None

    def scan_blobs(self, items: Iterable[tuple[T, int]]) -> Iterator[tuple[T, bytes]]:
        """(tag, value) for each (tag, offset), offsets increasing; reads sequentially in large verified
        chunks, bypassing the block cache (compaction and scrubs must not evict GetPage's blocks)."""
        win = b""
        win_lo = 0  # logical offset of win[0]
        data_blocks = self.summary.index_start_blk - DATA_START_BLK

        def window(lo: int, hi: int) -> None:
            nonlocal win, win_lo
            if lo >= win_lo and hi <= win_lo + len(win):
                return
            if hi > self.data_end:
                raise self._blob_error(DATA_START_BLK + lo // PAYLOAD_SIZE, f"blob at {lo} runs past the value stream")
            first = lo // PAYLOAD_SIZE
            need = (hi - 1) // PAYLOAD_SIZE - first + 1
            count = min(max(need, _SCAN_BLOCKS), data_blocks - first)
            win = self.blocks.read_payloads(DATA_START_BLK + first, count)
            win_lo = first * PAYLOAD_SIZE

        for tag, offset in items:
            window(offset, offset + 1)
            h = win[offset - win_lo]
            if h < 0x80:
                start, length, compressed = offset + 1, h, False
            else:
                window(offset, offset + LONG_HEADER_SIZE)
                word = int.from_bytes(win[offset - win_lo : offset - win_lo + LONG_HEADER_SIZE], "big")
                start, length, compressed = offset + LONG_HEADER_SIZE, word & LENGTH_MASK, bool(word & ZSTD_FLAG)
            window(offset, start + length)
            data = win[start - win_lo : start - win_lo + length]
            if compressed:
                data = self._decode_stored(data, DATA_START_BLK + offset // PAYLOAD_SIZE, offset)
            yield tag, data

    def verify(self) -> None:
        """Full scrub: every block's checksum, the index structure, every value decodes."""
        self.blocks.verify_all()
        self.index.check_tree(self.summary.entry_count)
        for _ in self.scan_entries():
            pass

    def scan_entries(self) -> Iterator[tuple[tuple[bytes, int], bytes]]:
        """((index key, leaf value), value) of every entry, in index order, read sequentially."""
        shift = self.value_shift
        return self.scan_blobs((entry, entry[1] >> shift) for entry in self.index.iter_entries())


class LayerReader:
    """What delta and image layer readers share: the open file and its summary-level facts."""

    KIND: LayerKind

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        tenant_id: TenantId | None = None,
        timeline_id: TimelineId | None = None,
        cache_blocks: int = 16,
        cache_nodes: int = 32,
    ) -> None:
        self._file = LayerFile(
            path,
            self.KIND,
            tenant_id=tenant_id,
            timeline_id=timeline_id,
            cache_blocks=cache_blocks,
            cache_nodes=cache_nodes,
        )
        self.name: LayerName = self._file.name
        self._find_le = self._file.index.find_le
        self._leaf = self._file.index.leaf
        self._read_blob = self._file.read_blob

    @property
    def path(self) -> Path:
        return self._file.path

    @property
    def summary(self) -> LayerSummary:
        return self._file.summary

    @property
    def key_range(self) -> tuple[bytes, bytes]:
        return self.name.key_range

    @property
    def lsn_range(self) -> tuple[Lsn, Lsn]:
        return self.name.lsn_range

    @property
    def entry_count(self) -> int:
        return self._file.summary.entry_count

    @property
    def index_depth(self) -> int:
        return self._file.summary.index_depth

    @property
    def block_stats(self) -> BlockReadStats:
        """Counters of block reads (file reads vs cache hits), for tests and metrics."""
        return self._file.blocks.stats

    def verify(self) -> None:
        """Read and check everything (checksums, index structure, every value); raises on damage."""
        self._file.verify()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"
