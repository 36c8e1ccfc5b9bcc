"""Parse `pg_waldump --bkp-details` output: the oracle for our WAL decoder."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from neon.utils.lsn import Lsn

_REC = re.compile(
    r"^rmgr: (?P<rmgr>\S+)\s+len \(rec/tot\):\s+(?P<rec>\d+)/\s*(?P<tot>\d+), tx:\s+(?P<xid>\d+), "
    r"lsn: (?P<lsn>[0-9A-F]+/[0-9A-F]+), prev (?P<prev>[0-9A-F]+/[0-9A-F]+), desc: (?P<desc>.*)$"
)
_BLK = re.compile(
    r"^\tblkref #(?P<id>\d+): rel (?P<spc>\d+)/(?P<db>\d+)/(?P<rel>\d+) fork (?P<fork>\w+) blk (?P<blk>\d+)"
    r"(?: \(FPW(?P<verify> for WAL verification)?\); hole: offset: (?P<hole_off>\d+), length: (?P<hole_len>\d+)"
    r"(?:, compression saved: \d+, method: (?P<method>\w+))?)?$"
)
_ERR = re.compile(r"error in WAL record at (?P<at>[0-9A-F]+/[0-9A-F]+): (?P<msg>.*)$")
FORKS = {"main": 0, "fsm": 1, "vm": 2, "init": 3}


@dataclass
class DumpBlock:
    block_id: int
    rel: tuple[int, int, int]
    fork: int
    blk: int
    has_image: bool
    apply_image: bool
    hole_offset: int | None
    hole_length: int | None
    method: str | None


@dataclass
class DumpRecord:
    lsn: int
    prev: int
    rmgr: str
    xid: int
    tot_len: int
    rec_len: int
    desc: str
    blocks: list[DumpBlock] = field(default_factory=list)


@dataclass
class Dump:
    records: list[DumpRecord]
    error_at: int | None
    error: str | None


def pg_waldump(pg_waldump_bin: Path, files: list[Path]) -> Dump:
    proc = subprocess.run(
        [str(pg_waldump_bin), "--bkp-details", str(files[0]), str(files[-1])],
        capture_output=True,
        text=True,
        cwd=files[0].parent,
    )
    records: list[DumpRecord] = []
    for line in proc.stdout.splitlines():
        if m := _REC.match(line):
            records.append(
                DumpRecord(
                    lsn=Lsn(m["lsn"]),
                    prev=Lsn(m["prev"]),
                    rmgr=m["rmgr"],
                    xid=int(m["xid"]),
                    tot_len=int(m["tot"]),
                    rec_len=int(m["rec"]),
                    desc=m["desc"],
                )
            )
        elif m := _BLK.match(line):
            has_image = m["hole_off"] is not None
            records[-1].blocks.append(
                DumpBlock(
                    block_id=int(m["id"]),
                    rel=(int(m["spc"]), int(m["db"]), int(m["rel"])),
                    fork=FORKS[m["fork"]],
                    blk=int(m["blk"]),
                    has_image=has_image,
                    apply_image=has_image and not m["verify"],
                    hole_offset=int(m["hole_off"]) if has_image else None,
                    hole_length=int(m["hole_len"]) if has_image else None,
                    method=m["method"],
                )
            )
        elif line.startswith("\t") or not line.strip():
            continue
        else:
            raise AssertionError(f"unparsed pg_waldump line: {line!r}")
    err = _ERR.search(proc.stderr)
    return Dump(records, Lsn(err["at"]) if err else None, err["msg"] if err else None)
