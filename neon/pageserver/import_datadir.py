"""Importing a Postgres data directory and WAL files into a timeline (spec pageserver §1.8, §4.11).

`import_datadir` puts every file of a stopped cluster as images at one LSN, in one modification
(relations, SLRUs, relmap and twophase files, pg_control and its checkpoint). `WalImporter`
ingests WAL from segment files: it is how a bootstrapped timeline gets its shutdown checkpoint
record, and how tests and benchmarks feed a timeline the WAL of a real cluster.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Sequence
from itertools import islice
from pathlib import Path

from neon.postgres import slru
from neon.postgres.constants import BLCKSZ
from neon.postgres.controlfile import ControlFileData, DBState
from neon.postgres.crc32c import crc32c
from neon.postgres.errors import WalDecodeError
from neon.postgres.walfiles import read_wal_file_batches
from neon.utils.lsn import Lsn
from neon.walredo.records import SlruKind

from .datadir_mapping import AlreadyExistsError, DatadirModification
from .key import RelTag
from .timeline import Timeline
from .walingest import WalIngest

BATCH_RECORDS = 256  # records ingested between two yields to the event loop
RELSEG_SIZE = 131072  # blocks per 1 GiB relation segment file
GLOBALTABLESPACE_OID = 1664
DEFAULTTABLESPACE_OID = 1663
_FORK_SUFFIXES = {"": 0, "_fsm": 1, "_vm": 2, "_init": 3}
_REL_FILE = re.compile(r"(\d+)(_fsm|_vm|_init)?(?:\.(\d+))?")
_SLRU_DIRS = {
    "pg_xact": SlruKind.CLOG,
    "pg_multixact/offsets": SlruKind.MULTIXACT_OFFSETS,
    "pg_multixact/members": SlruKind.MULTIXACT_MEMBERS,
}


class DatadirImportError(Exception):
    """The data directory or WAL cannot be imported as it is."""


def parse_rel_file_name(name: str) -> tuple[int, int, int] | None:
    """(relnode, fork, segno) of a relation segment file name, or None for other files."""
    m = _REL_FILE.fullmatch(name)
    if m is None:
        return None
    return int(m.group(1)), _FORK_SUFFIXES[m.group(2) or ""], int(m.group(3) or 0)


def read_control_file(pgdata: Path) -> ControlFileData:
    return ControlFileData.decode((pgdata / "global" / "pg_control").read_bytes())


def import_datadir(timeline: Timeline, pgdata: str | os.PathLike[str], lsn: int) -> None:
    """Put every file of the stopped cluster at `pgdata` into `timeline` at `lsn`, and commit."""
    root = Path(pgdata)
    mod = DatadirModification(timeline)
    mod.lsn = lsn
    mod.init_empty()
    # pg_control first: everything else is read relative to the state it describes.
    control = (root / "global" / "pg_control").read_bytes()
    cf = ControlFileData.decode(control)
    mod.put_control_file(control)
    mod.put_checkpoint(cf.checkpoint_copy.pack())
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            _import_file(mod, root, rel_dir, name)
    mod.commit()


def _import_file(mod: DatadirModification, root: Path, rel_dir: Path, name: str) -> None:
    path = root / rel_dir / name
    parts = rel_dir.parts
    top = parts[0] if parts else ""
    if top == "pg_tblspc" and name != ".keep":
        raise DatadirImportError(f"tablespaces are not supported: {rel_dir / name}")
    if name == "PG_VERSION" or top == "pg_wal":
        return
    if parts == ("global",):
        if name == "pg_control":
            return  # imported first
        if name == "pg_filenode.map":
            mod.put_relmap_file(GLOBALTABLESPACE_OID, 0, path.read_bytes())
            return
        _import_rel(mod, GLOBALTABLESPACE_OID, 0, name, path)
        return
    if len(parts) == 2 and top == "base" and parts[1].isdigit():
        db = int(parts[1])
        if name == "pg_filenode.map":
            mod.put_relmap_file(DEFAULTTABLESPACE_OID, db, path.read_bytes())
            return
        _import_rel(mod, DEFAULTTABLESPACE_OID, db, name, path)
        return
    slru_kind = _SLRU_DIRS.get("/".join(parts))
    if slru_kind is not None:
        _import_slru(mod, slru_kind, name, path)
        return
    if parts == ("pg_twophase",):
        mod.put_twophase_file(int(name, 16), _twophase_state(path))
        return
    if not parts and name == "zenith.signal":
        _import_zenith_signal(mod, path)


def _import_rel(mod: DatadirModification, spc: int, db: int, name: str, path: Path) -> None:
    parsed = parse_rel_file_name(name)
    if parsed is None:
        return  # pg_internal.init, temp relations (t<n>_<relnode>) and the like
    relnode, fork, segno = parsed
    tag = RelTag(spc, db, relnode, fork)
    data = path.read_bytes()
    if len(data) % BLCKSZ:
        raise DatadirImportError(f"relation file {path} is {len(data)} bytes, not a multiple of {BLCKSZ}")
    nblocks = len(data) // BLCKSZ
    with contextlib.suppress(AlreadyExistsError):  # a later segment of the same fork
        mod.put_rel_creation(tag, nblocks)
    first = segno * RELSEG_SIZE
    for i in range(nblocks):
        mod.put_rel_page_image(tag, first + i, data[i * BLCKSZ : (i + 1) * BLCKSZ])
    if nblocks:
        mod.put_rel_extend(tag, first + nblocks)


def _import_slru(mod: DatadirModification, kind: SlruKind, name: str, path: Path) -> None:
    try:
        segno = slru.parse_segment_file_name(name)
    except Exception as e:
        raise DatadirImportError(f"unexpected file in {kind.value}: {name} ({e})") from None
    data = path.read_bytes()
    if len(data) % BLCKSZ or len(data) > 32 * BLCKSZ:
        raise DatadirImportError(f"SLRU segment {path} has an invalid size {len(data)}")
    nblocks = len(data) // BLCKSZ
    mod.put_slru_segment_creation(kind, segno, nblocks)
    for i in range(nblocks):
        mod.put_slru_page_image(kind, segno, i, data[i * BLCKSZ : (i + 1) * BLCKSZ])


def _twophase_state(path: Path) -> bytes:
    """A pg_twophase file without its trailing CRC-32C (which basebackup appends again)."""
    raw = path.read_bytes()
    if len(raw) < 4 or crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
        raise DatadirImportError(f"two-phase state file {path} has a bad CRC")
    return raw[:-4]


def _import_zenith_signal(mod: DatadirModification, path: Path) -> None:
    text = path.read_text().strip()
    if not text.startswith("PREV LSN:"):
        raise DatadirImportError(f"{path}: expected 'PREV LSN: <lsn>', got {text!r}")
    value = text[len("PREV LSN:") :].strip()
    if value in ("none", "invalid"):
        return
    prev = Lsn.parse(value)
    mod.tline.advance_last_record_lsn(prev)


def check_bootstrap_datadir(pgdata: Path) -> int:
    """The import LSN of a freshly initdb'd, cleanly stopped cluster (its shutdown checkpoint)."""
    cf = read_control_file(pgdata)
    if cf.state != DBState.SHUTDOWNED:
        raise DatadirImportError(f"{pgdata} was not shut down cleanly (state {cf.state})")
    lsn = cf.checkpoint
    if lsn % 8:
        lsn += 8 - lsn % 8
    if cf.checkpoint_copy.redo != lsn:
        raise DatadirImportError(
            f"{pgdata}: checkpoint redo {Lsn(cf.checkpoint_copy.redo)} is not its location {Lsn(lsn)}"
        )
    return lsn


def wal_segment_files(wal_dir: Path) -> list[Path]:
    """The timeline-1 segment files of a pg_wal directory in order ('.partial' accepted)."""
    out = []
    for p in wal_dir.iterdir():
        name = p.name.removesuffix(".partial")
        if len(name) == 24 and name.startswith("00000001") and p.is_file():
            out.append(p)
    return sorted(out, key=lambda p: p.name)


class WalImporter:
    """Feeds a timeline WAL records from segment files, through `WalIngest`."""

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline
        self.ingest = WalIngest.for_timeline(timeline)
        self.modification = DatadirModification(timeline)
        self.records = 0
        self.bytes = 0

    async def ingest_records(self, records: Iterable[tuple[int, int, bytes]], *, stop_after: int | None = None) -> int:
        """Ingest (start, end, raw) records whose end is above last_record_lsn; stop after the first
        record ending beyond `stop_after`. Returns the timeline's last_record_lsn."""
        it = iter(records)
        return await self.ingest_record_batches(
            iter(lambda: list(islice(it, BATCH_RECORDS)), []), stop_after=stop_after
        )

    async def ingest_record_batches(
        self, batches: Iterable[list[tuple[int, int, bytes]]], *, stop_after: int | None = None
    ) -> int:
        """`ingest_records` for records that come in lists (as the WAL decoder produces them)."""
        tl = self.timeline
        for batch in batches:
            while batch:
                chunk, batch = batch[:BATCH_RECORDS], batch[BATCH_RECORDS:]
                stop = False
                if stop_after is not None and chunk[-1][1] > stop_after:
                    # Up to and including the first record that ends beyond stop_after.
                    cut = next(i for i, r in enumerate(chunk) if r[1] > stop_after)
                    chunk, stop = chunk[: cut + 1], True
                self.records += await self.ingest.ingest_batch(chunk, self.modification)
                self.bytes += chunk[-1][1] - chunk[0][0]  # WAL bytes, page headers included
                tl.check_checkpoint_distance()
                # Let flushes and compactions run, and wait when flushing falls behind.
                await tl.ingest_backpressure()
                if stop:
                    return tl.last_record_lsn
        return tl.last_record_lsn

    async def ingest_files(
        self,
        files: Sequence[Path],
        *,
        start_lsn: int,
        prev_lsn: int | None = None,
        stop_after: int | None = None,
    ) -> int:
        """Ingest the WAL in `files` (consecutive segments) from the record at `start_lsn`.
        The first invalid record ends the WAL, as at the end of pg_wal."""
        seg = start_lsn // (16 * 1024 * 1024)
        chosen = [f for f in files if int(f.name[16:24], 16) + (int(f.name[8:16], 16) << 8) >= seg]

        def gen() -> Iterable[list[tuple[int, int, bytes]]]:
            try:
                yield from read_wal_file_batches(chosen, start_lsn=start_lsn, prev_lsn=prev_lsn)
            except WalDecodeError:
                return

        return await self.ingest_record_batches(gen(), stop_after=stop_after)
