"""The summary: block 0 of every layer file, saying what the layer is and where its parts are."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum

from neon.postgres.crc32c import crc32c
from neon.utils.id import TenantId, TimelineId

from .blockio import BLOCK_SIZE, PAYLOAD_SIZE, LayerFormatError
from .layer_name import KEY_SIZE

FORMAT_VERSION = 1
LSN_SIZE = 8


class LayerKind(Enum):
    DELTA = b"NPLD"
    IMAGE = b"NPLI"

    @property
    def index_key_size(self) -> int:
        """Index keys: key ++ LSN (big-endian) in delta layers, the bare key in image layers."""
        return KEY_SIZE + LSN_SIZE if self is LayerKind.DELTA else KEY_SIZE


# magic, version, flags, block size, zstd level, reserved, tenant, timeline, key start, key end,
# lsn start, lsn end, entry count, data end, index start blk, index block count, leaf count,
# root (relative), depth, index key size, reserved, total blocks, raw value bytes, stored value bytes
_STRUCT = struct.Struct(">4sHHIBB16s16s18s18sQQQQIIIIBBHIQQ")
SUMMARY_SIZE = _STRUCT.size
FLAG_ZSTD = 0x0001
KNOWN_FLAGS = FLAG_ZSTD


@dataclass(frozen=True)
class LayerSummary:
    kind: LayerKind
    tenant_id: TenantId
    timeline_id: TimelineId
    key_start: bytes
    key_end: bytes
    lsn_start: int
    lsn_end: int
    entry_count: int
    data_end: int  # bytes of the logical value stream (payload bytes of the data blocks)
    index_start_blk: int
    index_blocks: int
    index_leaf_count: int
    index_root: int  # relative to index_start_blk
    index_depth: int  # 1 = the root is a leaf
    total_blocks: int
    raw_value_bytes: int
    stored_value_bytes: int
    zstd_level: int = 0
    flags: int = 0
    format_version: int = FORMAT_VERSION

    def encode(self) -> bytes:
        """The payload of block 0 (PAYLOAD_SIZE bytes, zero padded)."""
        packed = _STRUCT.pack(
            self.kind.value,
            self.format_version,
            self.flags,
            BLOCK_SIZE,
            self.zstd_level,
            0,
            bytes(self.tenant_id),
            bytes(self.timeline_id),
            self.key_start,
            self.key_end,
            self.lsn_start,
            self.lsn_end,
            self.entry_count,
            self.data_end,
            self.index_start_blk,
            self.index_blocks,
            self.index_leaf_count,
            self.index_root,
            self.index_depth,
            self.kind.index_key_size,
            0,
            self.total_blocks,
            self.raw_value_bytes,
            self.stored_value_bytes,
        )
        return packed + bytes(PAYLOAD_SIZE - len(packed))

    @classmethod
    def decode(cls, payload: bytes) -> LayerSummary:
        """Decode a checksum-verified block 0; `LayerFormatError` for foreign or unsupported files."""
        (
            magic,
            version,
            flags,
            block_size,
            zstd_level,
            _r1,
            tenant,
            timeline,
            key_start,
            key_end,
            lsn_start,
            lsn_end,
            entry_count,
            data_end,
            index_start_blk,
            index_blocks,
            leaf_count,
            root,
            depth,
            key_size,
            _r2,
            total_blocks,
            raw_bytes,
            stored_bytes,
        ) = _STRUCT.unpack_from(payload)
        try:
            kind = LayerKind(magic)
        except ValueError:
            raise LayerFormatError(f"not a layer file (magic {magic!r})") from None
        if version != FORMAT_VERSION:
            raise LayerFormatError(f"unsupported layer format version {version} (this build reads {FORMAT_VERSION})")
        if block_size != BLOCK_SIZE:
            raise LayerFormatError(f"unsupported block size {block_size} (this build reads {BLOCK_SIZE})")
        if flags & ~KNOWN_FLAGS:
            raise LayerFormatError(f"unknown layer flags {flags:#06x}")
        if key_size != kind.index_key_size:
            raise LayerFormatError(f"index key size {key_size} for a {kind.name} layer")
        return cls(
            kind=kind,
            tenant_id=TenantId(tenant),
            timeline_id=TimelineId(timeline),
            key_start=key_start,
            key_end=key_end,
            lsn_start=lsn_start,
            lsn_end=lsn_end,
            entry_count=entry_count,
            data_end=data_end,
            index_start_blk=index_start_blk,
            index_blocks=index_blocks,
            index_leaf_count=leaf_count,
            index_root=root,
            index_depth=depth,
            total_blocks=total_blocks,
            raw_value_bytes=raw_bytes,
            stored_value_bytes=stored_bytes,
            zstd_level=zstd_level,
            flags=flags,
            format_version=version,
        )

    @property
    def salt(self) -> int:
        return file_salt(self.kind, self.tenant_id, self.timeline_id, self.key_start, self.lsn_start, self.lsn_end)


def file_salt(
    kind: LayerKind, tenant_id: bytes, timeline_id: bytes, key_start: bytes, lsn_start: int, lsn_end: int
) -> int:
    """The checksum seed of blocks ≥ 1: CRC-32C of what is known when the writer starts."""
    return crc32c(
        kind.value
        + bytes(tenant_id)
        + bytes(timeline_id)
        + key_start
        + lsn_start.to_bytes(8, "big")
        + lsn_end.to_bytes(8, "big")
    )
