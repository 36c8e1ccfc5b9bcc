"""`pg_filenode.map`, the relation map of mapped catalogs (utils/relmapper.c; spec §9).

512 bytes: magic 0x592717, the number of mappings, 62 (catalog OID, relfilenode) slots, CRC-32C of
bytes 0..503 at 504, 4 zero bytes. This module decodes it with validation and encodes it exactly.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from neon.postgres.constants import DEFAULTTABLESPACE_OID, GLOBALTABLESPACE_OID, TABLESPACE_VERSION_DIRECTORY
from neon.postgres.crc32c import crc32c
from neon.postgres.errors import PgFormatError

RELMAPPER_FILEMAGIC = 0x592717
MAX_MAPPINGS = 62
RELMAP_FILE_SIZE = 512
RELMAP_CRC_OFFSET = 504  # offsetof(RelMapFile, crc)
RELMAP_FILE_NAME = "pg_filenode.map"

_HEADER = struct.Struct("<Ii")
_MAPPING = struct.Struct("<II")
_CRC = struct.Struct("<I")
_MAPPINGS_OFFSET = _HEADER.size


class RelMapError(PgFormatError):
    """Bytes that are not a valid PG15 pg_filenode.map."""


@dataclass(frozen=True, slots=True)
class RelMapping:
    oid: int
    filenode: int


@dataclass(frozen=True, slots=True)
class RelMapFile:
    mappings: tuple[RelMapping, ...]
    """In file order (order matters only for byte-identical re-encoding)."""

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[int, int]]) -> RelMapFile:
        return cls(tuple(RelMapping(oid, node) for oid, node in pairs))

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview) -> RelMapFile:
        if len(buf) != RELMAP_FILE_SIZE:
            raise RelMapError(f"pg_filenode.map is {len(buf)} bytes, expected {RELMAP_FILE_SIZE}")
        magic, num = _HEADER.unpack_from(buf, 0)
        if magic != RELMAPPER_FILEMAGIC:
            raise RelMapError(f"pg_filenode.map has magic {magic:#x}, expected {RELMAPPER_FILEMAGIC:#x}")
        if not 0 <= num <= MAX_MAPPINGS:
            raise RelMapError(f"pg_filenode.map claims {num} mappings, at most {MAX_MAPPINGS} fit")
        (stored,) = _CRC.unpack_from(buf, RELMAP_CRC_OFFSET)
        computed = crc32c(memoryview(buf)[:RELMAP_CRC_OFFSET])
        if stored != computed:
            raise RelMapError(f"pg_filenode.map checksum mismatch: stored {stored:08X}, computed {computed:08X}")
        return cls(
            tuple(RelMapping(*_MAPPING.unpack_from(buf, _MAPPINGS_OFFSET + i * _MAPPING.size)) for i in range(num))
        )

    def encode(self) -> bytes:
        if len(self.mappings) > MAX_MAPPINGS:
            raise RelMapError(f"{len(self.mappings)} relation mappings, at most {MAX_MAPPINGS} fit")
        out = bytearray(RELMAP_FILE_SIZE)  # unused slots and the trailing pad stay zero
        _HEADER.pack_into(out, 0, RELMAPPER_FILEMAGIC, len(self.mappings))
        try:
            for i, m in enumerate(self.mappings):
                _MAPPING.pack_into(out, _MAPPINGS_OFFSET + i * _MAPPING.size, m.oid, m.filenode)
        except struct.error as e:
            raise RelMapError(f"relation mapping out of range: {e}") from None
        _CRC.pack_into(out, RELMAP_CRC_OFFSET, crc32c(memoryview(out)[:RELMAP_CRC_OFFSET]))
        return bytes(out)

    def as_dict(self) -> dict[int, int]:
        return {m.oid: m.filenode for m in self.mappings}

    def filenode_of(self, oid: int) -> int | None:
        for m in self.mappings:
            if m.oid == oid:
                return m.filenode
        return None

    def with_mapping(self, oid: int, filenode: int) -> RelMapFile:
        """A copy with `oid` mapped to `filenode`: replaced in place, or appended as Postgres does."""
        if any(m.oid == oid for m in self.mappings):
            return RelMapFile(tuple(RelMapping(oid, filenode) if m.oid == oid else m for m in self.mappings))
        if len(self.mappings) >= MAX_MAPPINGS:
            raise RelMapError(f"relation map is full ({MAX_MAPPINGS} mappings)")
        return RelMapFile((*self.mappings, RelMapping(oid, filenode)))


def relmap_path(datadir: str | os.PathLike[str], spcnode: int, dbnode: int) -> str:
    """Where the map of (tablespace, database) lives; the shared map is (1664, 0)."""
    if spcnode == GLOBALTABLESPACE_OID:
        return os.path.join(datadir, "global", RELMAP_FILE_NAME)
    if spcnode == DEFAULTTABLESPACE_OID:
        return os.path.join(datadir, "base", str(dbnode), RELMAP_FILE_NAME)
    return os.path.join(datadir, "pg_tblspc", str(spcnode), TABLESPACE_VERSION_DIRECTORY, str(dbnode), RELMAP_FILE_NAME)
