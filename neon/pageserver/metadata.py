"""The per-timeline `metadata` file (spec pageserver §1.5): its 512-byte encoding and crash-safe I/O.

This module owns `TimelineMetadata` and the bytes Neon stores in
`tenants/<tenant>/timelines/<timeline>/metadata` (and embeds in `index_part.json` as
`metadata_bytes`):

    u32 checksum   CRC32C of bytes [8, size)
    u16 size       8 + body length
    u16 version    4 (version 3, which lacks pg_version, is read as pg_version 14)
    body           bincode BE: disk_consistent_lsn u64, prev_record_lsn Option<u64>,
                   ancestor_timeline Option<[u8; 16]>, ancestor_lsn u64, latest_gc_cutoff_lsn u64,
                   initdb_lsn u64, pg_version u32 (version 4 only)
    zeros          up to 512 bytes

Every decoding failure is a `MetadataError` that names the file when the caller gave its path.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from neon.postgres.crc32c import crc32c
from neon.postgres.errors import PgFormatError
from neon.utils.crashsafe import durable_write
from neon.utils.id import TimelineId
from neon.utils.lsn import Lsn

__all__ = [
    "METADATA_FILE_NAME",
    "METADATA_FORMAT_VERSION",
    "METADATA_MAX_SIZE",
    "METADATA_OLD_FORMAT_VERSION",
    "MetadataError",
    "TimelineMetadata",
    "load_metadata",
    "metadata_path",
    "save_metadata",
]

METADATA_FILE_NAME = "metadata"
METADATA_FORMAT_VERSION = 4
METADATA_OLD_FORMAT_VERSION = 3  # no pg_version; every such timeline was PostgreSQL 14
METADATA_MAX_SIZE = 512  # like pg_control: assumed to be written atomically by the disk
_V3_PG_VERSION = 14

_HEADER = struct.Struct(">IHH")  # checksum, size, format_version
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_U32_MAX = (1 << 32) - 1


class MetadataError(PgFormatError):
    """A timeline metadata file (or `metadata_bytes` blob) that cannot be read."""


@dataclass(frozen=True)
class TimelineMetadata:
    """What a timeline persists about itself; the fields match Neon's `TimelineMetadataBodyV2`.

    Plain ints are accepted for the LSN fields and bytes/hex for `ancestor_timeline`; they are
    converted to `Lsn` / `TimelineId` on construction so that equal metadata compares equal."""

    disk_consistent_lsn: Lsn
    prev_record_lsn: Lsn | None
    ancestor_timeline: TimelineId | None
    ancestor_lsn: Lsn
    latest_gc_cutoff_lsn: Lsn
    initdb_lsn: Lsn
    pg_version: int

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise through object.__setattr__ (Lsn() also range-checks u64).
        for name in ("disk_consistent_lsn", "ancestor_lsn", "latest_gc_cutoff_lsn", "initdb_lsn"):
            object.__setattr__(self, name, Lsn(getattr(self, name)))
        if self.prev_record_lsn is not None:
            object.__setattr__(self, "prev_record_lsn", Lsn(self.prev_record_lsn))
        if self.ancestor_timeline is not None and not isinstance(self.ancestor_timeline, TimelineId):
            object.__setattr__(self, "ancestor_timeline", TimelineId(self.ancestor_timeline))
        if isinstance(self.pg_version, bool) or not isinstance(self.pg_version, int):
            raise TypeError(f"pg_version must be an int, not {type(self.pg_version).__name__}")
        if not 0 <= self.pg_version <= _U32_MAX:
            raise ValueError(f"pg_version {self.pg_version} does not fit in a u32")

    # --- encoding ------------------------------------------------------------------------------
    def encode_body(self) -> bytes:
        """The bincode-BE body (format 4), without header or padding."""
        parts = [_U64.pack(self.disk_consistent_lsn)]
        if self.prev_record_lsn is None:
            parts.append(b"\x00")
        else:
            parts.append(b"\x01" + _U64.pack(self.prev_record_lsn))
        if self.ancestor_timeline is None:
            parts.append(b"\x00")
        else:
            parts.append(b"\x01" + bytes(self.ancestor_timeline))
        parts.append(_U64.pack(self.ancestor_lsn))
        parts.append(_U64.pack(self.latest_gc_cutoff_lsn))
        parts.append(_U64.pack(self.initdb_lsn))
        parts.append(_U32.pack(self.pg_version))
        return b"".join(parts)

    def encode(self) -> bytes:
        """The full 512-byte file image, always in format version 4."""
        if not self.disk_consistent_lsn.is_aligned():
            # decode() rejects this, so writing it would produce a file the timeline cannot load.
            raise MetadataError(
                f"refusing to encode metadata: disk_consistent_lsn {self.disk_consistent_lsn} is not 8-aligned"
            )
        body = self.encode_body()
        size = _HEADER.size + len(body)
        header = _HEADER.pack(crc32c(body), size, METADATA_FORMAT_VERSION)
        return (header + body).ljust(METADATA_MAX_SIZE, b"\x00")

    # --- decoding ------------------------------------------------------------------------------
    @classmethod
    def decode(
        cls, buf: bytes | bytearray | memoryview, *, path: str | os.PathLike[str] | None = None
    ) -> TimelineMetadata:
        """Parse a 512-byte metadata image (format 4, or 3 upgraded to pg_version 14).

        `path` only makes the error messages name the file."""
        what = f"metadata file {os.fspath(path)}" if path is not None else "timeline metadata"
        data = bytes(buf)
        if len(data) < METADATA_MAX_SIZE:
            raise MetadataError(f"{what} is truncated: {len(data)} bytes, expected {METADATA_MAX_SIZE}")
        if len(data) > METADATA_MAX_SIZE:
            raise MetadataError(f"{what} is {len(data)} bytes long, expected {METADATA_MAX_SIZE}")
        checksum, size, version = _HEADER.unpack_from(data, 0)
        if not _HEADER.size <= size <= METADATA_MAX_SIZE:
            raise MetadataError(
                f"{what} is corrupt: size field {size} is outside [{_HEADER.size}, {METADATA_MAX_SIZE}]"
            )
        body = data[_HEADER.size : size]
        actual = crc32c(body)
        if actual != checksum:
            raise MetadataError(f"{what}: checksum mismatch (stored {checksum:08x}, computed {actual:08x})")
        if version not in (METADATA_FORMAT_VERSION, METADATA_OLD_FORMAT_VERSION):
            raise MetadataError(
                f"{what}: unsupported metadata format version {version} "
                f"(expected {METADATA_FORMAT_VERSION} or {METADATA_OLD_FORMAT_VERSION})"
            )
        return _BodyReader(body, what).read(has_pg_version=version == METADATA_FORMAT_VERSION)


class _BodyReader:
    """Sequential bincode-BE reads over the body, with errors naming the field and the file."""

    def __init__(self, body: bytes, what: str) -> None:
        self.body = body
        self.what = what
        self.pos = 0

    def _take(self, n: int, field: str) -> bytes:
        if self.pos + n > len(self.body):
            raise MetadataError(
                f"{self.what}: body of {len(self.body)} bytes ends inside {field} (at byte {self.pos}, needs {n})"
            )
        chunk = self.body[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u64(self, field: str) -> int:
        return _U64.unpack(self._take(8, field))[0]

    def tag(self, field: str) -> bool:
        tag = self._take(1, field)[0]
        if tag > 1:
            raise MetadataError(f"{self.what}: invalid Option tag {tag} for {field} (expected 0 or 1)")
        return tag == 1

    def read(self, *, has_pg_version: bool) -> TimelineMetadata:
        disk_consistent_lsn = Lsn(self.u64("disk_consistent_lsn"))
        prev_record_lsn = Lsn(self.u64("prev_record_lsn")) if self.tag("prev_record_lsn") else None
        ancestor = TimelineId(self._take(16, "ancestor_timeline")) if self.tag("ancestor_timeline") else None
        ancestor_lsn = Lsn(self.u64("ancestor_lsn"))
        latest_gc_cutoff_lsn = Lsn(self.u64("latest_gc_cutoff_lsn"))
        initdb_lsn = Lsn(self.u64("initdb_lsn"))
        pg_version = _U32.unpack(self._take(4, "pg_version"))[0] if has_pg_version else _V3_PG_VERSION
        if self.pos != len(self.body):
            # bincode rejects trailing bytes; a size field that covers more than the body is corrupt.
            raise MetadataError(f"{self.what}: {len(self.body) - self.pos} trailing bytes after the metadata body")
        if not disk_consistent_lsn.is_aligned():
            raise MetadataError(f"{self.what}: disk_consistent_lsn {disk_consistent_lsn} is not 8-aligned")
        return TimelineMetadata(
            disk_consistent_lsn=disk_consistent_lsn,
            prev_record_lsn=prev_record_lsn,
            ancestor_timeline=ancestor,
            ancestor_lsn=ancestor_lsn,
            latest_gc_cutoff_lsn=latest_gc_cutoff_lsn,
            initdb_lsn=initdb_lsn,
            pg_version=pg_version,
        )


def metadata_path(timeline_dir: str | os.PathLike[str]) -> Path:
    return Path(timeline_dir) / METADATA_FILE_NAME


def save_metadata(
    timeline_dir: str | os.PathLike[str], md: TimelineMetadata, *, owner: tuple[int, int] | None = None
) -> None:
    """Write `<timeline_dir>/metadata` crash-safely (temp file `metadata.___temp`, fsync, rename,
    fsync of the directory). `owner` (uid, gid) is passed on to `durable_write`."""
    durable_write(metadata_path(timeline_dir), md.encode(), owner=owner)


def load_metadata(timeline_dir: str | os.PathLike[str]) -> TimelineMetadata:
    """Read and decode `<timeline_dir>/metadata`; a missing file is a `MetadataError` too."""
    path = metadata_path(timeline_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MetadataError(f"metadata file {path} not found") from None
    return TimelineMetadata.decode(data, path=path)
