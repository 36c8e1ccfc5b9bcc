"""RelFileNode: the 12-byte (tablespace, database, relfilenode) triple that names a relation's files."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from neon.postgres.constants import DEFAULTTABLESPACE_OID, GLOBALTABLESPACE_OID, TABLESPACE_VERSION_DIRECTORY
from neon.postgres.errors import PayloadError

from ._reader import Buffer, PayloadReader

_RNODE = struct.Struct("<III")
RELFILENODE_SIZE = _RNODE.size


@dataclass(frozen=True, slots=True)
class RelFileNode:
    spc: int
    db: int
    rel: int

    @classmethod
    def unpack_from(cls, buf: Buffer, off: int = 0) -> RelFileNode:
        if off < 0 or len(buf) - off < RELFILENODE_SIZE:
            raise PayloadError(f"RelFileNode: needs {RELFILENODE_SIZE} bytes at offset {off}, buffer has {len(buf)}")
        return cls(*_RNODE.unpack_from(buf, off))

    @classmethod
    def read(cls, r: PayloadReader, field: str = "rnode") -> RelFileNode:
        return cls(*r.unpack(_RNODE, field))

    def pack(self) -> bytes:
        return _RNODE.pack(self.spc, self.db, self.rel)

    def path(self) -> str:
        """The main fork's path relative to the data directory, as pg_waldump prints relations."""
        if self.spc == GLOBALTABLESPACE_OID:
            return f"global/{self.rel}"
        if self.spc == DEFAULTTABLESPACE_OID:
            return f"base/{self.db}/{self.rel}"
        return f"pg_tblspc/{self.spc}/{TABLESPACE_VERSION_DIRECTORY}/{self.db}/{self.rel}"

    def __str__(self) -> str:
        return f"{self.spc}/{self.db}/{self.rel}"
