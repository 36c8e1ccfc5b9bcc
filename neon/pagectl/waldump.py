"""`pagectl waldump`: print the records of WAL segment files, as text or JSON lines."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import TextIO

from neon.postgres.constants import (
    BKPIMAGE_COMPRESS_LZ4,
    BKPIMAGE_COMPRESS_PGLZ,
    BKPIMAGE_COMPRESS_ZSTD,
    rmgr_name,
)
from neon.postgres.errors import WalDecodeError
from neon.postgres.walfiles import read_wal_files
from neon.postgres.walrecord import DecodedRecord, decode_record

FORKS = {0: "main", 1: "fsm", 2: "vm", 3: "init"}


def _lsn(v: int) -> str:
    return f"{v >> 32:X}/{v & 0xFFFFFFFF:08X}"


def record_json(start: int, end: int, r: DecodedRecord) -> dict[str, object]:
    return {
        "lsn": _lsn(start),
        "end_lsn": _lsn(end),
        "prev": _lsn(r.prev),
        "rmgr": rmgr_name(r.rmid),
        "info": r.info,
        "xid": r.xid,
        "tot_len": r.tot_len,
        "main_data_len": r.main_data_len,
        "blocks": [
            {
                "id": b.block_id,
                "spc": b.rel[0],
                "db": b.rel[1],
                "rel": b.rel[2],
                "fork": b.forknum,
                "blk": b.blkno,
                "has_image": b.has_image,
                "apply_image": b.apply_image,
                "will_init": b.will_init,
                "data_len": b.data_len,
                **(
                    {
                        "image_len": b.image_len,
                        "hole_offset": b.hole_offset,
                        "hole_length": b.hole_length,
                        "compression": _compression(b.bimg_info),
                    }
                    if b.has_image
                    else {}
                ),
            }
            for b in r.blocks
        ],
    }


def _compression(bimg_info: int) -> str | None:
    if bimg_info & BKPIMAGE_COMPRESS_PGLZ:
        return "pglz"
    if bimg_info & BKPIMAGE_COMPRESS_LZ4:
        return "lz4"
    if bimg_info & BKPIMAGE_COMPRESS_ZSTD:
        return "zstd"
    return None


def record_text(start: int, end: int, r: DecodedRecord) -> str:
    parts = [
        f"rmgr: {rmgr_name(r.rmid):<11}",
        f"len (rec/tot): {r.tot_len - sum(b.image_len for b in r.blocks):6}/{r.tot_len:6},",
        f"tx: {r.xid:10},",
        f"lsn: {_lsn(start)},",
        f"prev {_lsn(r.prev)},",
        f"info: 0x{r.info:02X}",
    ]
    line = " ".join(parts)
    for b in r.blocks:
        spc, db, rel = b.rel
        line += f", blkref #{b.block_id}: rel {spc}/{db}/{rel}"
        if b.forknum:
            line += f" fork {FORKS.get(b.forknum, b.forknum)}"
        line += f" blk {b.blkno}"
        if b.has_image:
            line += " FPW" if b.apply_image else " FPW for WAL verification"
        if b.will_init:
            line += " WILL_INIT"
    return line


def run(files: Sequence[str], *, as_json: bool, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    try:
        for start, end, rec in read_wal_files(files):
            r = decode_record(rec, start)
            if as_json:
                out.write(json.dumps(record_json(start, end, r), separators=(",", ":")) + "\n")
            else:
                out.write(record_text(start, end, r) + "\n")
    except WalDecodeError as e:
        out.flush()
        err.write(f"pagectl waldump: error: {e}\n")
        return 1
    except OSError as e:
        err.write(f"pagectl waldump: error: {e}\n")
        return 1
    return 0
