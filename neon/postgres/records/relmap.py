"""RelMap (rmid 7) payload: `xl_relmap_update`, a whole new pg_filenode.map (spec §4.7)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ._reader import Buffer, PayloadReader

XLOG_RELMAP_UPDATE = 0x00
RELMAP_FILE_SIZE = 512  # sizeof(RelMapFile) in 15

_HEAD = struct.Struct("<II")


@dataclass(frozen=True, slots=True)
class RelmapUpdate:
    """Overwrite the map of (tsid, dbid) with `data`; dbid 0 is the shared map (global/)."""

    dbid: int
    tsid: int
    data: bytes

    @classmethod
    def unpack(cls, data: Buffer) -> RelmapUpdate:
        r = PayloadReader(data, "RELMAP UPDATE")
        dbid, tsid = r.unpack(_HEAD, "dbid/tsid")
        nbytes = r.count("map bytes", 1)
        body = r.take(nbytes, "map data")
        r.end()
        return cls(dbid, tsid, body)

    @property
    def nbytes(self) -> int:
        return len(self.data)

    @property
    def is_shared(self) -> bool:
        return self.dbid == 0


def describe(info: int, data: Buffer) -> RelmapUpdate | None:
    return RelmapUpdate.unpack(data) if info & 0xF0 == XLOG_RELMAP_UPDATE else None
