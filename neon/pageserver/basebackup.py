"""Basebackup and fullbackup (spec pageserver §8; DESIGN §2.3): a timeline at an LSN as a tar stream
of a PostgreSQL 15 data directory.

`write_basebackup` streams, in Neon's entry order (§8.3): the directory skeleton, the config
files, the SLRU segments, every database (PG_VERSION, pg_filenode.map, relation files), the aux
files, the two-phase state files, `zenith.signal`, then `global/pg_control` and the WAL segment.

Where stock PostgreSQL 15 needs more than Neon's patched compute, we follow the stock needs
(spec postgres15-formats §10.7-10.8); each point is marked "stock PG15" below:

* pg_control and the WAL segment come from `neon.postgres.synth`: a real XLOG_CHECKPOINT_SHUTDOWN
  record at the backup LSN and a pg_control pointing at it, instead of Neon's `checkPoint = 0`
  and a segment with no record. The compute starts without recovery and writes its first
  record at `BasebackupInfo.end_lsn` with `xl_prev = BasebackupInfo.checkpoint_lsn`.
* An empty `postgresql.conf` is included (stock Postgres refuses to start without one; Neon
  leaves it out because its compute writes its own first). Pass `postgresql_conf=None` to omit it.
* `PG_VERSION` is "15\\n" as initdb writes it (Neon writes "15"; both are accepted).
* A `pg_wal` directory entry precedes `pg_wal/archive_status`.
* A checkpoint counter (nextXid, nextMulti, nextMultiOffset) that points into an SLRU page the
  timeline does not have is moved back to the start of that page (`startable_checkpoint`).
* With data checksums enabled, every relation page gets its pd_checksum stamped.
* Aux files are written once, not once per database (a Neon quirk).

The stream is produced with constant memory: relation and SLRU pages are fetched through a
sliding window of concurrent GetPage@LSN requests (keeping the WAL-redo process busy) and
written out as they arrive. Every request check happens before the first byte is written; an
error later raises out of `write_basebackup` before the end-of-archive blocks are written, so the
caller must treat the partial output as a failure (the page service sends an ErrorResponse).
"""

from __future__ import annotations

import asyncio
import inspect
import tarfile
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from neon.postgres import slru
from neon.postgres.checkpoint import CheckPoint
from neon.postgres.constants import (
    BLCKSZ,
    DEFAULTTABLESPACE_OID,
    FIRST_NORMAL_TRANSACTION_ID,
    FSM_FORKNUM,
    GLOBALTABLESPACE_OID,
    INIT_FORKNUM,
    MAIN_FORKNUM,
    RELSEG_SIZE,
    SLRU_PAGES_PER_SEGMENT,
    VISIBILITYMAP_FORKNUM,
)
from neon.postgres.crc32c import crc32c
from neon.postgres.page import page_is_new, page_set_checksum
from neon.postgres.synth import SynthesizedCheckpoint, normalize_lsn, synthesize_checkpoint
from neon.utils.lsn import Lsn
from neon.walredo.records import SlruKind

from .key import RelTag

if TYPE_CHECKING:
    from .timeline import Timeline

log = structlog.get_logger("basebackup")

PG_VERSION = b"15\n"
# Neon's PGDATA_SUBDIRS (libs/postgres_ffi, v15) in its order, with `pg_wal` itself first.
PGDATA_SUBDIRS: tuple[str, ...] = (
    "global",
    "pg_wal",
    "pg_wal/archive_status",
    "pg_commit_ts",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_subtrans",
    "pg_twophase",
    "pg_multixact",
    "pg_multixact/members",
    "pg_multixact/offsets",
    "base",
    "base/1",
    "pg_replslot",
    "pg_tblspc",
    "pg_stat",
    "pg_stat_tmp",
    "pg_xact",
    "pg_logical",
    "pg_logical/snapshots",
    "pg_logical/mappings",
)
# Neon's samples/pg_hba.conf: trust for local sockets and loopback, for databases and replication.
PG_HBA = b"""\
# TYPE  DATABASE        USER            ADDRESS                 METHOD
# "local" is for Unix domain socket connections only
local   all             all                                     trust
# IPv4 local connections:
host    all             all             127.0.0.1/32            trust
# IPv6 local connections:
host    all             all             ::1/128                 trust
# Allow replication connections from localhost, by a user with the
# replication privilege.
local   replication     all                                     trust
host    replication     all             127.0.0.1/32            trust
host    replication     all             ::1/128                 trust
"""
SIZEOF_RELMAPFILE = 512
REPL_SLOT_RESTART_LSN_OFFSET = 96  # offsetof(ReplicationSlotOnDisk, slotdata.restart_lsn)

PREFETCH_WINDOW = 32
"""GetPage@LSN requests kept in flight while a file is written."""
FLUSH_BYTES = 256 * 1024
"""Output is handed to the sink in chunks of about this size."""

_FORK_SUFFIX = {MAIN_FORKNUM: "", FSM_FORKNUM: "_fsm", VISIBILITYMAP_FORKNUM: "_vm", INIT_FORKNUM: "_init"}
_SLRU_KINDS = (SlruKind.CLOG, SlruKind.MULTIXACT_OFFSETS, SlruKind.MULTIXACT_MEMBERS)  # Neon's order
_U32 = 0xFFFFFFFF
_ZERO_BLOCK = bytes(512)


class BasebackupError(Exception):
    """A basebackup that cannot be produced (bad request, or data the timeline cannot serve)."""


class BasebackupLsnError(BasebackupError):
    """The requested LSN (or prev LSN) cannot be served by this timeline."""


@dataclass(frozen=True, slots=True)
class BasebackupInfo:
    lsn: Lsn
    """The backup LSN: the data directory is the timeline's state there."""
    prev_lsn: Lsn
    """xl_prev of the synthesized checkpoint record (0 when unknown: Neon's "PREV LSN: invalid")."""
    checkpoint_lsn: Lsn
    """Start of the synthesized checkpoint record: `lsn`, moved past a page header if `lsn` is a
    page boundary. The compute's first record has this as its xl_prev."""
    end_lsn: Lsn
    """End of the checkpoint record: where the compute writes its first record."""
    files: int
    """Regular files in the archive (directories not counted)."""
    bytes: int
    """Bytes written to the sink (after gzip compression, if any)."""


class _Sink(Protocol):
    def write(self, data: bytes, /) -> Any: ...


# --- LSN choice (§8.1) --------------------------------------------------------------------------
async def resolve_backup_lsns(
    timeline: Timeline,
    lsn: int | None = None,
    prev_lsn: int | None = None,
    *,
    wait_timeout: float | None = None,
) -> tuple[Lsn, Lsn]:
    """(backup LSN, prev LSN) for a request, checked as Neon checks it (spec §8.1).

    Without `lsn`: the timeline's last_record_lsn and prev_record_lsn. With `lsn`: it must be
    8-aligned, at or after the timeline's ancestor LSN and latest GC cutoff, and not beyond
    last_record_lsn (after waiting up to `wait_timeout` seconds for it, if given); its prev is the
    timeline's prev_record_lsn when it is the last record LSN, else 0 (unknown). A `prev_lsn`
    passed by the caller must agree with a known prev, and is used when none is known."""
    tl = timeline
    if lsn is not None:
        if lsn <= 0 or lsn % 8:
            raise BasebackupLsnError(f"invalid basebackup lsn {_lsn(lsn)}: not a multiple of 8")
        if lsn > tl.last_record_lsn and wait_timeout:
            try:
                await tl.wait_lsn(lsn, wait_timeout)
            except TimeoutError as e:
                raise BasebackupLsnError(f"invalid basebackup lsn {_lsn(lsn)}: {e}") from None
        if lsn > tl.last_record_lsn:
            raise BasebackupLsnError(
                f"invalid basebackup lsn {_lsn(lsn)}: beyond the end of the timeline's WAL"
                f" (last_record_lsn {_lsn(tl.last_record_lsn)})"
            )
        if lsn < tl.latest_gc_cutoff_lsn:
            raise BasebackupLsnError(
                f"invalid basebackup lsn {_lsn(lsn)}: less than latest GC cutoff {_lsn(tl.latest_gc_cutoff_lsn)}"
            )
        if lsn < tl.ancestor_lsn:
            raise BasebackupLsnError(
                f"invalid basebackup lsn {_lsn(lsn)}: less than timeline ancestor lsn {_lsn(tl.ancestor_lsn)}"
            )
    # One read of both (no await in between): a consistent pair.
    last, prev = int(tl.last_record_lsn), int(tl.prev_record_lsn)
    if lsn is None:
        backup_lsn, backup_prev = last, prev
    else:
        backup_lsn, backup_prev = int(lsn), (prev if lsn == last else 0)
    if prev_lsn is not None:
        if backup_prev and prev_lsn != backup_prev:
            raise BasebackupLsnError(
                f"invalid prev lsn {_lsn(prev_lsn)} for basebackup at {_lsn(backup_lsn)}:"
                f" the timeline's prev record lsn there is {_lsn(backup_prev)}"
            )
        if not 0 <= prev_lsn < backup_lsn:
            raise BasebackupLsnError(
                f"invalid prev lsn {_lsn(prev_lsn)}: must be below the basebackup lsn {_lsn(backup_lsn)}"
            )
        backup_prev = int(prev_lsn)
    return Lsn(backup_lsn), Lsn(backup_prev)


def zenith_signal(timeline: Timeline, lsn: int, prev: int) -> bytes:
    """`zenith.signal` as Neon writes it (no trailing newline)."""
    if prev:
        return f"PREV LSN: {Lsn(prev)}".encode()
    if lsn == timeline.ancestor_lsn:
        return b"PREV LSN: none"
    return b"PREV LSN: invalid"


# --- the checkpoint -----------------------------------------------------------------------------
def startable_checkpoint(timeline: Timeline, lsn: int, checkpoint: CheckPoint) -> CheckPoint:
    """`checkpoint` with each counter whose SLRU page stock PG15 reads at start-up (§10.8) moved
    back to the start of that page when the timeline does not have the page.

    Ingest rounds nextXid up to a multiple of 1024, which can point into the next, not yet
    created, CLOG page; the server would fail with "could not access status of transaction".
    Moving the counter back to the page start is safe: assigning the first xid (multixact,
    member) of a page creates that page (a ZEROPAGE record), so if the page is absent nothing on
    it was ever assigned. The compute then creates the page itself, with WAL, when it gets there.
    """
    cp = checkpoint

    def has_page(kind: SlruKind, pageno: int) -> bool:
        segno, blk = divmod(pageno, SLRU_PAGES_PER_SEGMENT)
        return timeline.get_slru_segment_exists(kind, segno, lsn) and blk < timeline.get_slru_segment_size(
            kind, segno, lsn
        )

    xid = cp.next_xid & _U32
    if xid % slru.CLOG_XACTS_PER_PAGE and not has_page(SlruKind.CLOG, slru.clog_page(xid)):
        start = xid - xid % slru.CLOG_XACTS_PER_PAGE
        if start >= FIRST_NORMAL_TRANSACTION_ID:
            log.info("nextXid points into a CLOG page not in the timeline, moved back", next_xid=xid, to=start)
            cp = cp.replace(next_xid=(cp.next_xid & ~_U32) | start)
    multi = cp.next_multi
    if multi % slru.MULTIXACT_OFFSETS_PER_PAGE and not has_page(SlruKind.MULTIXACT_OFFSETS, slru.mxoff_page(multi)):
        start = multi - multi % slru.MULTIXACT_OFFSETS_PER_PAGE
        if start >= slru.FIRST_MULTIXACT_ID:
            log.warning("nextMulti points into an offsets page not in the timeline, moved back", next_multi=multi)
            cp = cp.replace(next_multi=start)
    off = cp.next_multi_offset
    if slru.member_group_offset(off) and not has_page(SlruKind.MULTIXACT_MEMBERS, slru.member_page(off)):
        start = off - off % slru.MULTIXACT_MEMBERS_PER_PAGE
        if start > 0:
            log.warning("nextMultiOffset points into a members page not in the timeline, moved back", offset=off)
            cp = cp.replace(next_multi_offset=start)
    return cp


def synthesize_for_backup(timeline: Timeline, lsn: int, prev: int) -> SynthesizedCheckpoint:
    """The shutdown checkpoint (record, WAL segment(s), pg_control) a stock PG15 starts from at
    `lsn`: the stored control file as the base, the stored checkpoint value (made startable)."""
    control = timeline.get_control_file(lsn)
    checkpoint = startable_checkpoint(timeline, lsn, CheckPoint.unpack(timeline.get_checkpoint(lsn)))
    try:
        return synthesize_checkpoint(control, lsn, prev, checkpoint)
    except Exception as e:
        raise BasebackupError(f"cannot synthesize the checkpoint at {_lsn(lsn)}: {e}") from e


# --- the tar stream -----------------------------------------------------------------------------
class _TarWriter:
    """A streaming tar writer (GNU headers, Neon's modes: files 0600, directories 0755)."""

    def __init__(self, out: _Sink, *, gzip: bool) -> None:
        self._out = out
        self._drain: Callable[[], Awaitable[None]] | None = getattr(out, "drain", None)
        self._z = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS) if gzip else None
        self._buf = bytearray()
        self._mtime = int(time.time())
        self._remaining = 0  # bytes still owed to the current file
        self._padding = 0
        self.files = 0
        self.bytes_out = 0

    def _header(self, name: str, size: int, *, directory: bool) -> bytes:
        info = tarfile.TarInfo(name)
        info.size = 0 if directory else size
        info.mode = 0o755 if directory else 0o600
        info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
        info.mtime = self._mtime
        return info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="strict")

    async def _emit(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data
        if len(self._buf) >= FLUSH_BYTES:
            await self._flush()

    async def _flush(self, *, final: bool = False) -> None:
        data = bytes(self._buf)
        self._buf.clear()
        if self._z is not None:
            data = self._z.compress(data)
            if final:
                data += self._z.flush()
        if not data:
            return
        result = self._out.write(data)
        if inspect.isawaitable(result):
            await result
        if self._drain is not None:
            await self._drain()
        self.bytes_out += len(data)

    async def add_dir(self, name: str) -> None:
        assert not self._remaining
        await self._emit(self._header(name, 0, directory=True))

    async def begin_file(self, name: str, size: int) -> None:
        assert not self._remaining
        await self._emit(self._header(name, size, directory=False))
        self.files += 1
        self._remaining = size
        self._padding = -size % 512

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) > self._remaining:
            raise BasebackupError(f"internal error: {len(data)} bytes written to a file with {self._remaining} left")
        self._remaining -= len(data)
        await self._emit(data)
        if not self._remaining and self._padding:
            await self._emit(_ZERO_BLOCK[: self._padding])
            self._padding = 0

    async def add_file(self, name: str, data: bytes) -> None:
        await self.begin_file(name, len(data))
        view = memoryview(data)
        for off in range(0, len(data), FLUSH_BYTES):  # a 16 MiB WAL segment goes out in pieces
            await self.write(view[off : off + FLUSH_BYTES])

    async def finish(self) -> None:
        """The end-of-archive blocks, the gzip trailer, and everything still buffered."""
        if self._remaining:
            raise BasebackupError(f"internal error: archive closed with {self._remaining} bytes of a file missing")
        self._buf += _ZERO_BLOCK * 2
        await self._flush(final=True)


class _Basebackup:
    def __init__(
        self, timeline: Timeline, lsn: int, prev: int, synth: SynthesizedCheckpoint, tar: _TarWriter, *, full: bool
    ) -> None:
        self.tl = timeline
        self.lsn = lsn
        self.prev = prev
        self.synth = synth
        self.tar = tar
        self.full = full
        self.checksums = synth.control_file.data_checksum_version != 0
        self.dirs: set[str] = set()

    async def dir(self, name: str) -> None:
        if name not in self.dirs:
            self.dirs.add(name)
            await self.tar.add_dir(name)

    async def parent_dirs(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            await self.dir("/".join(parts[:i]))

    async def send(self, postgresql_conf: bytes | None) -> None:
        tl, lsn, tar = self.tl, self.lsn, self.tar
        for d in PGDATA_SUBDIRS:
            await self.dir(d)
        await tar.add_file("pg_hba.conf", PG_HBA)
        await tar.add_file("pg_ident.conf", b"")
        await tar.add_file("postgresql.auto.conf", b"")
        if postgresql_conf is not None:
            await tar.add_file("postgresql.conf", postgresql_conf)
        for kind in _SLRU_KINDS:
            for segno in sorted(tl.list_slru_segments(kind, lsn)):
                await self.slru_segment(kind, segno)
        dbdirs = tl.list_dbdirs(lsn)
        # The global tablespace first (it holds the top-level PG_VERSION), then the databases.
        for spc, db in sorted(dbdirs, key=lambda k: (k[0] != GLOBALTABLESPACE_OID, k)):
            await self.database(spc, db, dbdirs[(spc, db)])
        await self.aux_files()
        for xid in sorted(tl.list_twophase_files(lsn)):
            state = tl.get_twophase_file(xid, lsn)
            await tar.add_file(f"pg_twophase/{xid:08X}", state + crc32c(state).to_bytes(4, "little"))
        await tar.add_file("zenith.signal", zenith_signal(tl, lsn, self.prev))
        await tar.add_file("global/pg_control", self.synth.pg_control)
        for name, segment in self.synth.segments.items():
            await tar.add_file(f"pg_wal/{name}", segment)
        await tar.finish()

    # --- pages -----------------------------------------------------------------------------------
    async def pages(
        self, name: str, nblocks: int, fetch: Callable[[int], Awaitable[bytes]], fix: Callable[[int, bytes], bytes]
    ) -> None:
        """File `name` of `nblocks` pages: fetch(i) for each, through a window of concurrent requests."""
        tar = self.tar
        await tar.begin_file(name, nblocks * BLCKSZ)
        window: deque[asyncio.Future[bytes]] = deque()
        nxt = 0
        try:
            while nxt < nblocks and len(window) < PREFETCH_WINDOW:
                window.append(asyncio.ensure_future(fetch(nxt)))
                nxt += 1
            i = 0
            while window:
                page = await window.popleft()
                if nxt < nblocks:
                    window.append(asyncio.ensure_future(fetch(nxt)))
                    nxt += 1
                await tar.write(fix(i, page))
                i += 1
        finally:
            for fut in window:
                fut.cancel()
            if window:
                await asyncio.gather(*window, return_exceptions=True)

    async def slru_segment(self, kind: SlruKind, segno: int) -> None:
        tl, lsn = self.tl, self.lsn
        nblocks = tl.get_slru_segment_size(kind, segno, lsn)
        name = f"{kind.value}/{slru.segment_file_name(segno)}"

        def fix(blk: int, page: bytes) -> bytes:
            if len(page) < BLCKSZ:
                raise BasebackupError(f"SLRU page {name} block {blk} is {len(page)} bytes")
            return page[:BLCKSZ]  # CLOG values may carry 8 more bytes

        await self.pages(name, nblocks, lambda blk: tl.get_slru_page_at_lsn(kind, segno, blk, lsn), fix)

    # --- databases and relations -------------------------------------------------------------------
    async def database(self, spc: int, db: int, has_relmap: bool) -> None:
        tl, lsn, tar = self.tl, self.lsn, self.tar
        rels = sorted(tl.list_rels(spc, db, lsn), key=lambda t: (t.rel, t.fork))
        if spc == GLOBALTABLESPACE_OID:
            prefix = "global"
            await tar.add_file("PG_VERSION", PG_VERSION)
            if has_relmap:
                await tar.add_file("global/pg_filenode.map", self.relmap(spc, db))
            else:
                log.warning("no relmap file for the global tablespace", lsn=str(Lsn(lsn)))
        else:
            if not has_relmap and not rels:
                return
            if spc != DEFAULTTABLESPACE_OID:
                raise BasebackupError(f"user tablespaces are not supported (tablespace {spc}, database {db})")
            prefix = f"base/{db}"
            await self.dir(prefix)
            if has_relmap:
                await tar.add_file(f"{prefix}/PG_VERSION", PG_VERSION)
                await tar.add_file(f"{prefix}/pg_filenode.map", self.relmap(spc, db))
        with_init = {t.rel for t in rels if t.fork == INIT_FORKNUM}
        for tag in rels:
            if tag.fork == INIT_FORKNUM:
                # Unlogged relations: the init fork, and the main fork with the same (empty) contents.
                await self.relation(prefix, tag, tag)
                await self.relation(prefix, tag, tag._replace(fork=MAIN_FORKNUM))
            elif self.full and not (tag.fork == MAIN_FORKNUM and tag.rel in with_init):
                await self.relation(prefix, tag, tag)

    def relmap(self, spc: int, db: int) -> bytes:
        data = self.tl.get_relmap_file(spc, db, self.lsn)
        if len(data) != SIZEOF_RELMAPFILE:
            raise BasebackupError(f"relmap file of {spc}/{db} is {len(data)} bytes, expected {SIZEOF_RELMAPFILE}")
        return data

    async def relation(self, prefix: str, source: RelTag, as_tag: RelTag) -> None:
        """The segment files of fork `source`, named as fork `as_tag`."""
        tl, lsn = self.tl, self.lsn
        nblocks = tl.get_rel_size(source, lsn)
        base = f"{prefix}/{as_tag.rel}{_FORK_SUFFIX[as_tag.fork]}"
        checksums = self.checksums
        for segno in range(max(1, -(-nblocks // RELSEG_SIZE))):
            first = segno * RELSEG_SIZE
            count = min(RELSEG_SIZE, nblocks - first)
            name = base if segno == 0 else f"{base}.{segno}"

            def fetch(i: int, first: int = first) -> Awaitable[bytes]:
                return tl.get_rel_page_at_lsn(source, first + i, lsn)

            def fix(i: int, page: bytes, first: int = first, name: str = name) -> bytes:
                if len(page) != BLCKSZ:
                    raise BasebackupError(f"page {first + i} of {source} ({name}) is {len(page)} bytes")
                if checksums and not page_is_new(page):
                    buf = bytearray(page)
                    page_set_checksum(buf, first + i)
                    return bytes(buf)
                return page

            await self.pages(name, count, fetch, fix)

    # --- other files -------------------------------------------------------------------------------
    async def aux_files(self) -> None:
        files = self.tl.list_aux_files(self.lsn)
        restart_lsns = []
        for path, content in sorted(files.items()):
            if path.startswith("/") or ".." in path.split("/"):
                raise BasebackupError(f"aux file with an unsafe path {path!r}")
            await self.parent_dirs(path)
            await self.tar.add_file(path, content)
            if path.startswith("pg_replslot/") and len(content) >= REPL_SLOT_RESTART_LSN_OFFSET + 8:
                off = REPL_SLOT_RESTART_LSN_OFFSET
                restart_lsns.append(int.from_bytes(content[off : off + 8], "little"))
        if restart_lsns:
            await self.tar.add_file("restart.lsn", min(restart_lsns).to_bytes(8, "little"))


async def write_basebackup(
    timeline: Timeline,
    out: _Sink,
    *,
    lsn: int | None = None,
    prev_lsn: int | None = None,
    full: bool = True,
    gzip: bool = False,
    wait_timeout: float | None = None,
    postgresql_conf: bytes | None = b"",
) -> BasebackupInfo:
    """Stream a tar of the timeline's PG15 data directory at `lsn` (default: last_record_lsn) to `out`.

    `out` is a binary file-like object (`write(bytes)`), an `asyncio.StreamWriter`-like object
    (`write` then `await drain()`), or anything whose `write` returns an awaitable. `full=True`
    writes every relation fork (a stock PG15 compute starts from it); `full=False` only the init
    forks (and their main-fork copies), as Neon's basebackup for its lazily-fetching compute.
    `gzip` compresses the stream at the fastest level. `prev_lsn` and `wait_timeout`: see
    `resolve_backup_lsns`. `postgresql_conf` is written as postgresql.conf (None: not at all).

    Raises `BasebackupLsnError` (nothing written) for a bad LSN, `BasebackupError` (nothing
    written) when the checkpoint cannot be synthesized, and whatever a page read raises
    mid-stream (the output is then incomplete: no end-of-archive marker)."""
    backup_lsn, backup_prev = await resolve_backup_lsns(timeline, lsn, prev_lsn, wait_timeout=wait_timeout)
    synth = synthesize_for_backup(timeline, backup_lsn, backup_prev)
    assert synth.lsn == normalize_lsn(backup_lsn, synth.control_file.xlog_seg_size)
    tar = _TarWriter(out, gzip=gzip)
    started = time.monotonic()
    await _Basebackup(timeline, backup_lsn, backup_prev, synth, tar, full=full).send(postgresql_conf)
    info = BasebackupInfo(
        lsn=backup_lsn,
        prev_lsn=backup_prev,
        checkpoint_lsn=Lsn(synth.lsn),
        end_lsn=Lsn(synth.end_lsn),
        files=tar.files,
        bytes=tar.bytes_out,
    )
    timeline.log.info(
        "basebackup done",
        lsn=str(info.lsn),
        prev_lsn=str(info.prev_lsn),
        full=full,
        files=info.files,
        bytes=info.bytes,
        seconds=round(time.monotonic() - started, 3),
    )
    return info


def _lsn(value: int) -> str:
    return str(Lsn(value))
