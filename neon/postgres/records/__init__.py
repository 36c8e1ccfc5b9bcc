"""Parsers for the main data of every WAL record type the pageserver interprets (spec §4).

One module per resource manager; each payload is a frozen dataclass built by an `unpack`
classmethod from the record's main data (the bytes after all block data, as located by the record
decoder). Every parser checks lengths and raises `PayloadError` on short or malformed input.

`describe(rmid, info, main_data)` dispatches on the rmgr id and `xl_info`; it returns None for
rmgrs and opcodes whose payload the pageserver does not interpret (plain block records, FPIs).
"""

from __future__ import annotations

from collections.abc import Callable

from neon.postgres.constants import (
    RM_CLOG_ID,
    RM_COMMIT_TS_ID,
    RM_DBASE_ID,
    RM_HEAP2_ID,
    RM_HEAP_ID,
    RM_LOGICALMSG_ID,
    RM_MULTIXACT_ID,
    RM_RELMAP_ID,
    RM_REPLORIGIN_ID,
    RM_SMGR_ID,
    RM_STANDBY_ID,
    RM_TBLSPC_ID,
    RM_XACT_ID,
    RM_XLOG_ID,
)

from . import clog, dbase, heap, logicalmsg, misc, multixact, relmap, smgr, standby, tblspc, xact, xlog
from ._reader import Buffer
from .relfilenode import RelFileNode

__all__ = [
    "RelFileNode",
    "clog",
    "dbase",
    "describe",
    "heap",
    "logicalmsg",
    "misc",
    "multixact",
    "relmap",
    "smgr",
    "standby",
    "tblspc",
    "xact",
    "xlog",
]

_DESCRIBERS: dict[int, Callable[[int, Buffer], object | None]] = {
    RM_XLOG_ID: xlog.describe,
    RM_XACT_ID: xact.describe,
    RM_SMGR_ID: smgr.describe,
    RM_CLOG_ID: clog.describe,
    RM_DBASE_ID: dbase.describe,
    RM_TBLSPC_ID: tblspc.describe,
    RM_MULTIXACT_ID: multixact.describe,
    RM_RELMAP_ID: relmap.describe,
    RM_STANDBY_ID: standby.describe,
    RM_HEAP2_ID: heap.describe_heap2,
    RM_HEAP_ID: heap.describe_heap,
    RM_COMMIT_TS_ID: misc.describe_commit_ts,
    RM_REPLORIGIN_ID: misc.describe_replorigin,
    RM_LOGICALMSG_ID: logicalmsg.describe,
}


def describe(rmid: int, info: int, main_data: Buffer) -> object | None:
    """The parsed main data of a record, or None if its rmgr/opcode has no interpreted payload."""
    describer = _DESCRIBERS.get(rmid)
    return describer(info, main_data) if describer else None
