"""The Postgres view of a timeline's key space (spec pageserver §2, §4.3-4.6): reads and modifications.

`DatadirMapping` (mixed into `Timeline`) answers in Postgres terms at an LSN: databases, relations
and their sizes, pages, SLRU segments, relmap and twophase files, the checkpoint and control file,
and the live key space. `DatadirModification` collects the puts of one WAL record (or one import)
and commits them atomically at its LSN, keeping relation sizes exact through the eagerly updated
rel-size cache, exactly as Neon's `DatadirModification` does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

from neon.postgres.constants import BLCKSZ, FSM_FORKNUM, VISIBILITYMAP_FORKNUM
from neon.utils.lsn import Lsn
from neon.walredo.records import SlruKind, WalRecord

from . import key as K
from .directories import (
    AuxFilesDirectory,
    DbDirectory,
    RelDirectory,
    SlruSegmentDirectory,
    TwoPhaseDirectory,
    decode_nblocks,
    encode_nblocks,
)
from .key import RelTag, rel_block_key_bytes, rel_size_key_bytes
from .value import Image, encode_value
from .value import WalRecord as WalRecordValue

if TYPE_CHECKING:
    from .timeline import Timeline

ZERO_PAGE = bytes(BLCKSZ)
CLOG_TRAILER_SIZE = 8  # the commit timestamp Neon's ClogSetCommitted keeps after a CLOG page
_DBDIR_KEY = K.dbdir_key().to_bytes()
_TWOPHASEDIR_KEY = K.twophase_dir_key().to_bytes()
_CONTROLFILE_KEY = K.controlfile_key().to_bytes()
_CHECKPOINT_KEY = K.checkpoint_key().to_bytes()
_AUX_FILES_KEY = K.aux_files_key().to_bytes()
_SLRU_DIR_KEYS = {kind: K.slru_dir_key(kind).to_bytes() for kind in SlruKind}


class RelationError(Exception):
    """A relation-level request that cannot be answered (relnode 0, a missing size key...)."""


class AlreadyExistsError(RelationError):
    pass


def _rel_dir_key(spc: int, db: int) -> bytes:
    return K.rel_dir_key(spc, db).to_bytes()


def _slru_block_key(kind: SlruKind, segno: int, blk: int) -> bytes:
    return K.slru_block_key(kind, segno, blk).to_bytes()


def _slru_size_key(kind: SlruKind, segno: int) -> bytes:
    return K.slru_segment_size_key(kind, segno).to_bytes()


class DatadirMapping:
    """Reads in Postgres terms; needs `get_image`, `try_get_image`, `get` and `rel_size_cache`."""

    rel_size_cache: dict[RelTag, tuple[int, int]]
    last_record_lsn: int

    if TYPE_CHECKING:

        def get_image(self, key: bytes, lsn: int) -> bytes: ...
        def try_get_image(self, key: bytes, lsn: int) -> bytes | None: ...
        async def get(self, key: bytes, lsn: int) -> bytes: ...

    # --- databases and relations ---------------------------------------------------------------
    def get_dbdir(self, lsn: int) -> DbDirectory:
        return DbDirectory.decode(self.get_image(_DBDIR_KEY, lsn))

    def list_dbdirs(self, lsn: int) -> dict[tuple[int, int], bool]:
        return dict(self.get_dbdir(lsn).dbdirs)

    def get_rel_dir(self, spc: int, db: int, lsn: int) -> RelDirectory:
        return RelDirectory.decode(self.get_image(_rel_dir_key(spc, db), lsn))

    def list_rels(self, spc: int, db: int, lsn: int) -> set[RelTag]:
        return {RelTag(spc, db, rel, fork) for rel, fork in self.get_rel_dir(spc, db, lsn)}

    def get_rel_exists(self, tag: RelTag, lsn: int) -> bool:
        if tag.rel == 0:
            raise RelationError("invalid relnode 0")
        cached = self.rel_size_cache.get(tag)
        if cached is not None and lsn >= cached[0]:
            return True
        raw = self.try_get_image(_rel_dir_key(tag.spc, tag.db), lsn)
        return raw is not None and (tag.rel, tag.fork) in RelDirectory.decode(raw)

    def get_rel_size(self, tag: RelTag, lsn: int, latest: bool = False) -> int:
        if tag.rel == 0:
            raise RelationError("invalid relnode 0")
        cached = self.rel_size_cache.get(tag)
        if cached is not None and lsn >= cached[0]:
            return cached[1]
        if tag.fork in (FSM_FORKNUM, VISIBILITYMAP_FORKNUM) and not self.get_rel_exists(tag, lsn):
            return 0  # Postgres asks for the size of forks it never created
        raw = self.try_get_image(rel_size_key_bytes(tag), lsn)
        if raw is None:
            raise RelationError(f"relation {tag} does not exist at LSN {Lsn(lsn)}")
        nblocks = decode_nblocks(raw)
        if latest:
            self._update_cached_rel_size(tag, lsn, nblocks)
        return nblocks

    def _update_cached_rel_size(self, tag: RelTag, lsn: int, nblocks: int) -> None:
        cached = self.rel_size_cache.get(tag)
        if cached is None or lsn >= cached[0]:
            self.rel_size_cache[tag] = (lsn, nblocks)

    async def get_rel_page_at_lsn(self, tag: RelTag, blkno: int, lsn: int, latest: bool = False) -> bytes:
        if tag.rel == 0:
            raise RelationError("invalid relnode 0")
        if blkno >= self.get_rel_size(tag, lsn, latest):
            return ZERO_PAGE
        return await self.get(rel_block_key_bytes(tag.spc, tag.db, tag.rel, tag.fork, blkno), lsn)

    def get_db_size(self, spc: int, db: int, lsn: int) -> int:
        """Bytes of every relation fork of a database."""
        return sum(self.get_rel_size(tag, lsn) for tag in self.list_rels(spc, db, lsn)) * BLCKSZ

    def get_relmap_file(self, spc: int, db: int, lsn: int) -> bytes:
        return self.get_image(K.relmap_file_key(spc, db).to_bytes(), lsn)

    # --- SLRUs ---------------------------------------------------------------------------------
    def list_slru_segments(self, kind: SlruKind, lsn: int) -> set[int]:
        return set(SlruSegmentDirectory.decode(self.get_image(_SLRU_DIR_KEYS[kind], lsn)))

    def get_slru_segment_exists(self, kind: SlruKind, segno: int, lsn: int) -> bool:
        raw = self.try_get_image(_SLRU_DIR_KEYS[kind], lsn)
        return raw is not None and segno in SlruSegmentDirectory.decode(raw)

    def get_slru_segment_size(self, kind: SlruKind, segno: int, lsn: int) -> int:
        return decode_nblocks(self.get_image(_slru_size_key(kind, segno), lsn))

    async def get_slru_page_at_lsn(self, kind: SlruKind, segno: int, blkno: int, lsn: int) -> bytes:
        return await self.get(_slru_block_key(kind, segno, blkno), lsn)

    # --- LSN by commit timestamp (spec §5.10, Neon's find_lsn_for_timestamp) ---------------------
    async def _clog_commit_timestamps(self, probe_lsn: int) -> AsyncIterator[int]:
        """The commit timestamps (µs since 2000) the CLOG pages at `probe_lsn` carry in their
        trailers (Neon's map_all_timestamps): newest segment and page first; pages without a
        trailer (no commit redone onto them yet) are skipped."""
        for segno in sorted(self.list_slru_segments(SlruKind.CLOG, probe_lsn), reverse=True):
            for blk in range(self.get_slru_segment_size(SlruKind.CLOG, segno, probe_lsn) - 1, -1, -1):
                page = await self.get_slru_page_at_lsn(SlruKind.CLOG, segno, blk, probe_lsn)
                if len(page) == BLCKSZ + CLOG_TRAILER_SIZE:
                    yield int.from_bytes(page[BLCKSZ:], "big", signed=True)

    async def is_latest_commit_timestamp_ge_than(self, ts: int, probe_lsn: int, seen: list[bool]) -> bool:
        """Whether some CLOG page at `probe_lsn` carries a commit timestamp ≥ `ts` (µs since 2000).

        `seen` is [found smaller, found larger], updated as Neon does: the scan stops at the first
        timestamp ≥ `ts`."""
        async for page_ts in self._clog_commit_timestamps(probe_lsn):
            if page_ts >= ts:
                seen[1] = True
                return True
            seen[0] = True
        return False

    async def get_timestamp_for_lsn(self, probe_lsn: int) -> int | None:
        """The newest commit timestamp (µs since 2000) visible at `probe_lsn`, or None when no CLOG
        page has one yet (Neon's get_timestamp_for_lsn). Errors of the reads propagate: an LSN
        before initdb has no CLOG directory ("could not find data for key ...")."""
        newest: int | None = None
        async for page_ts in self._clog_commit_timestamps(probe_lsn):
            newest = page_ts if newest is None else max(newest, page_ts)
        return newest

    async def find_lsn_for_timestamp(self, ts: int, gc_cutoff: int, last: int) -> tuple[str, int]:
        """("present", lsn): the last LSN before the first commit at or after `ts`; ("future", last)
        when every commit is older; ("past", gc_cutoff) when every commit is newer; ("nodata", 0)."""
        low, high = gc_cutoff // 8, last // 8 + 1
        seen = [False, False]
        while low < high:
            mid = (low + high) // 2
            if await self.is_latest_commit_timestamp_ge_than(ts, mid * 8, seen):
                high = mid
            else:
                low = mid + 1
        smaller, larger = seen
        if smaller and larger:
            return "present", (low - 1) * 8
        if smaller:
            return "future", last
        if larger:
            return "past", gc_cutoff
        return "nodata", 0

    # --- other files ---------------------------------------------------------------------------
    def list_twophase_files(self, lsn: int) -> set[int]:
        return set(TwoPhaseDirectory.decode(self.get_image(_TWOPHASEDIR_KEY, lsn)))

    def get_twophase_file(self, xid: int, lsn: int) -> bytes:
        return self.get_image(K.twophase_file_key(xid).to_bytes(), lsn)

    def get_control_file(self, lsn: int) -> bytes:
        return self.get_image(_CONTROLFILE_KEY, lsn)

    def get_checkpoint(self, lsn: int) -> bytes:
        return self.get_image(_CHECKPOINT_KEY, lsn)

    def list_aux_files(self, lsn: int) -> dict[str, bytes]:
        raw = self.try_get_image(_AUX_FILES_KEY, lsn)
        return {} if raw is None else dict(AuxFilesDirectory.decode(raw).files)

    # --- the whole key space (§2.4) -------------------------------------------------------------
    def collect_keyspace(self, lsn: int) -> list[tuple[bytes, bytes]]:
        """Every live key at `lsn` as sorted, non-overlapping [start, end) ranges of 18-byte keys."""
        ranges: list[tuple[bytes, bytes]] = []

        def add(start: bytes, end: bytes) -> None:
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((start, end))

        items: list[tuple[bytes, bytes]] = []
        items.append(_range1(_DBDIR_KEY))
        for spc, db in self.get_dbdir(lsn):
            items.append(_range1(K.relmap_file_key(spc, db).to_bytes()))
            items.append(_range1(_rel_dir_key(spc, db)))
            for tag in sorted(self.list_rels(spc, db, lsn)):
                n = self.get_rel_size(tag, lsn)
                if n:
                    items.append((rel_block_key_bytes(*tag, 0), rel_block_key_bytes(*tag, n)))
                items.append(_range1(rel_size_key_bytes(tag)))
        for kind in K.SLRU_KINDS_IN_KEY_ORDER:
            items.append(_range1(_SLRU_DIR_KEYS[kind]))
            for segno in sorted(self.list_slru_segments(kind, lsn)):
                n = self.get_slru_segment_size(kind, segno, lsn)
                if n:
                    items.append((_slru_block_key(kind, segno, 0), _slru_block_key(kind, segno, n)))
                items.append(_range1(_slru_size_key(kind, segno)))
        items.append(_range1(_TWOPHASEDIR_KEY))
        for xid in sorted(self.list_twophase_files(lsn)):
            items.append(_range1(K.twophase_file_key(xid).to_bytes()))
        items.append(_range1(_CONTROLFILE_KEY))
        items.append(_range1(_CHECKPOINT_KEY))
        if self.try_get_image(_AUX_FILES_KEY, lsn) is not None:
            items.append(_range1(_AUX_FILES_KEY))
        for start, end in sorted(items):
            add(start, end)
        return ranges

    def calculate_logical_size(self, lsn: int) -> int:
        """The sum of relation sizes in bytes at `lsn` (Neon's non-incremental logical size)."""
        return sum(self.get_db_size(spc, db, lsn) for spc, db in self.get_dbdir(lsn))


def _range1(key: bytes) -> tuple[bytes, bytes]:
    return (key, K.Key.from_bytes(key).next().to_bytes())


def iter_range_keys(start: bytes, end: bytes) -> Iterator[bytes]:
    """Every key in [start, end) (ranges from `collect_keyspace` are small enough to enumerate)."""
    k = K.Key.from_bytes(start).to_int()
    e = K.Key.from_bytes(end).to_int()
    while k < e:
        yield k.to_bytes(K.KEY_SIZE, "big")
        k += 1


class DatadirModification:
    """The puts of one WAL record (or one import), applied at `lsn` by `commit`."""

    def __init__(self, timeline: Timeline) -> None:
        self.tline = timeline
        self.lsn = 0
        self.pending: dict[bytes, tuple[bool, bytes]] = {}  # key -> (will_init, encoded value)
        self.pending_images: dict[bytes, bytes] = {}  # the images among them, readable by `get`
        self.pending_records: set[bytes] = set()
        self.pending_nblocks = 0

    # --- low level -----------------------------------------------------------------------------
    def put_image(self, key: bytes, data: bytes) -> None:
        self.pending[key] = (True, encode_value(Image(data)))
        self.pending_images[key] = data
        self.pending_records.discard(key)

    def put_record(self, key: bytes, rec: WalRecord, will_init: bool) -> None:
        self.pending[key] = (will_init, encode_value(WalRecordValue(rec)))
        self.pending_images.pop(key, None)
        self.pending_records.add(key)

    def put_encoded(self, key: bytes, will_init: bool, encoded: bytes) -> None:
        """A record value already in its stored form (the per-block path of ingest)."""
        self.pending[key] = (will_init, encoded)
        self.pending_images.pop(key, None)
        self.pending_records.add(key)

    def get(self, key: bytes) -> bytes | None:
        """The image of `key` as of this modification: a pending put, else the timeline's latest."""
        data = self.pending_images.get(key)
        if data is not None:
            return data
        if key in self.pending_records:
            raise RelationError(f"cannot read key {key.hex()} with a pending WAL record in the same modification")
        return self.tline.try_get_image(key, max(self.tline.last_record_lsn, self.lsn))

    # --- directories ---------------------------------------------------------------------------
    def init_empty(self) -> None:
        self.put_image(_DBDIR_KEY, DbDirectory().encode())
        self.put_image(_AUX_FILES_KEY, AuxFilesDirectory().encode())
        self.put_image(_TWOPHASEDIR_KEY, TwoPhaseDirectory().encode())
        for kind in (SlruKind.CLOG, SlruKind.MULTIXACT_MEMBERS, SlruKind.MULTIXACT_OFFSETS):
            self.put_image(_SLRU_DIR_KEYS[kind], SlruSegmentDirectory().encode())

    def _dbdir(self) -> DbDirectory:
        raw = self.get(_DBDIR_KEY)
        if raw is None:
            raise RelationError("the DbDirectory key is missing (timeline was never initialised)")
        return DbDirectory.decode(raw)

    def put_relmap_file(self, spc: int, db: int, img: bytes) -> None:
        dbdir = self._dbdir()
        prior = dbdir.dbdirs.get((spc, db))
        if not prior:
            self.put_image(_DBDIR_KEY, dbdir.add(spc, db, True).encode())
            # Neon resets the aux-files map whenever a database first gets its relmap file.
            self.put_image(_AUX_FILES_KEY, AuxFilesDirectory().encode())
            if prior is None:
                self._put_rel_dir(spc, db, RelDirectory())
        self.put_image(K.relmap_file_key(spc, db).to_bytes(), bytes(img))

    def drop_dbdir(self, spc: int, db: int) -> None:
        lsn = self.tline.last_record_lsn
        total = 0
        dbdir = self._dbdir()
        if (spc, db) in dbdir:
            for tag in self.tline.list_rels(spc, db, lsn):
                total += self.tline.get_rel_size(tag, lsn)
                self.tline.rel_size_cache.pop(tag, None)
            self.put_image(_DBDIR_KEY, dbdir.remove(spc, db).encode())
            self.tline.reldir_cache.pop((spc, db), None)
        else:
            self.tline.log.warning("dropped database not in DbDirectory", spc=spc, db=db)
        self.pending_nblocks -= total

    def put_twophase_file(self, xid: int, img: bytes) -> None:
        raw = self.get(_TWOPHASEDIR_KEY)
        d = TwoPhaseDirectory.decode(raw) if raw is not None else TwoPhaseDirectory()
        if xid in d:
            raise AlreadyExistsError(f"twophase file for xid {xid} already exists")
        self.put_image(_TWOPHASEDIR_KEY, d.add(xid).encode())
        self.put_image(K.twophase_file_key(xid).to_bytes(), bytes(img))

    def drop_twophase_file(self, xid: int) -> None:
        raw = self.get(_TWOPHASEDIR_KEY)
        d = TwoPhaseDirectory.decode(raw) if raw is not None else TwoPhaseDirectory()
        if xid not in d:
            self.tline.log.warning("twophase file to drop does not exist", xid=xid)
            return
        self.put_image(_TWOPHASEDIR_KEY, d.remove(xid).encode())

    def put_control_file(self, img: bytes) -> None:
        self.put_image(_CONTROLFILE_KEY, bytes(img))

    def put_checkpoint(self, img: bytes) -> None:
        self.put_image(_CHECKPOINT_KEY, bytes(img))

    def put_aux_file(self, path: str, content: bytes) -> None:
        raw = self.get(_AUX_FILES_KEY)
        try:
            d = AuxFilesDirectory.decode(raw) if raw is not None else AuxFilesDirectory()
        except Exception:
            d = AuxFilesDirectory()
        d = d.remove(path) if not content else d.add(path, content)
        self.put_image(_AUX_FILES_KEY, d.encode())

    # --- relations (§4.5, §4.6) ------------------------------------------------------------------
    def _rel_dir(self, spc: int, db: int) -> RelDirectory | None:
        """The database's RelDirectory as of this modification, decoded once per change.

        `reldir_cache` maps (spc, db) to (LSN of the newest version, directory); it is filled by
        every put of a RelDirectory, so ingest never re-reads and re-decodes one it wrote."""
        cached = self.tline.reldir_cache.get((spc, db))
        if cached is not None and self.lsn >= cached[0]:
            return cached[1]
        raw = self.get(_rel_dir_key(spc, db))
        if raw is None:
            return None
        rel_dir = RelDirectory.decode(raw)
        if (spc, db) not in self.tline.reldir_cache:
            self.tline.reldir_cache[(spc, db)] = (self.tline.last_record_lsn, rel_dir)
        return rel_dir

    def _put_rel_dir(self, spc: int, db: int, rel_dir: RelDirectory) -> None:
        self.put_image(_rel_dir_key(spc, db), rel_dir.encode())
        self.tline.reldir_cache[(spc, db)] = (self.lsn, rel_dir)

    def rel_exists(self, tag: RelTag) -> bool:
        cache = self.tline.rel_size_cache
        cached = cache.get(tag)
        if cached is not None and self.lsn >= cached[0]:
            return True
        rel_dir = self._rel_dir(tag.spc, tag.db)
        return rel_dir is not None and (tag.rel, tag.fork) in rel_dir

    def rel_size(self, tag: RelTag) -> int:
        """The fork's size as of this modification (the cache holds sizes set by pending puts)."""
        cached = self.tline.rel_size_cache.get(tag)
        if cached is not None and self.lsn >= cached[0]:
            return cached[1]
        raw = self.get(rel_size_key_bytes(tag))
        if raw is None:
            if tag.fork in (FSM_FORKNUM, VISIBILITYMAP_FORKNUM):
                return 0
            raise RelationError(f"relation {tag} has no size key")
        n = decode_nblocks(raw)
        self.tline._update_cached_rel_size(tag, self.lsn, n)
        return n

    def put_rel_creation(self, tag: RelTag, nblocks: int) -> None:
        if tag.rel == 0:
            raise RelationError("invalid relnode 0")
        dbdir = self._dbdir()
        if (tag.spc, tag.db) not in dbdir:
            self.put_image(_DBDIR_KEY, dbdir.add(tag.spc, tag.db, False).encode())
            rel_dir = RelDirectory()
        else:
            rel_dir = self._rel_dir(tag.spc, tag.db) or RelDirectory()
        if (tag.rel, tag.fork) in rel_dir:
            raise AlreadyExistsError(f"relation {tag} already exists")
        self._put_rel_dir(tag.spc, tag.db, rel_dir.add(tag.rel, tag.fork))
        self.pending_nblocks += nblocks
        self.put_image(rel_size_key_bytes(tag), encode_nblocks(nblocks))
        self.tline.rel_size_cache[tag] = (self.lsn, nblocks)

    def put_rel_extend(self, tag: RelTag, nblocks: int) -> None:
        old = self.rel_size(tag)
        if nblocks > old:
            self.put_image(rel_size_key_bytes(tag), encode_nblocks(nblocks))
            self.tline.rel_size_cache[tag] = (self.lsn, nblocks)
            self.pending_nblocks += nblocks - old

    def put_rel_truncation(self, tag: RelTag, nblocks: int) -> None:
        if not self.tline.get_rel_exists(tag, self.tline.last_record_lsn):
            return
        old = self.rel_size(tag)
        self.put_image(rel_size_key_bytes(tag), encode_nblocks(nblocks))
        self.tline.rel_size_cache[tag] = (self.lsn, nblocks)
        self.pending_nblocks -= old - nblocks

    def put_rel_drop(self, tag: RelTag) -> None:
        rel_dir = self._rel_dir(tag.spc, tag.db) or RelDirectory()
        if (tag.rel, tag.fork) in rel_dir:
            self.pending_nblocks -= self.rel_size(tag)
            self._put_rel_dir(tag.spc, tag.db, rel_dir.remove(tag.rel, tag.fork))
        else:
            self.tline.log.warning("dropped relation not in RelDirectory", rel=str(tag))
        self.tline.rel_size_cache.pop(tag, None)

    def ensure_rel_block(self, tag: RelTag, blkno: int) -> None:
        """Implicit creation and extension (§4.5): the fork exists and has block `blkno`."""
        cached = self.tline.rel_size_cache.get(tag)
        if cached is not None and self.lsn >= cached[0]:
            old = cached[1]
        else:
            if not self.rel_exists(tag):
                self.put_rel_creation(tag, 0)
            old = self.rel_size(tag)
        if blkno + 1 > old:
            self.put_rel_extend(tag, blkno + 1)
            for gap in range(old, blkno):
                self.put_image(rel_block_key_bytes(tag.spc, tag.db, tag.rel, tag.fork, gap), ZERO_PAGE)

    def put_rel_page_image(self, tag: RelTag, blkno: int, img: bytes) -> None:
        self.put_image(rel_block_key_bytes(tag.spc, tag.db, tag.rel, tag.fork, blkno), bytes(img))

    def put_rel_wal_record(self, tag: RelTag, blkno: int, rec: WalRecord, will_init: bool = False) -> None:
        self.put_record(rel_block_key_bytes(tag.spc, tag.db, tag.rel, tag.fork, blkno), rec, will_init)

    # --- SLRUs -----------------------------------------------------------------------------------
    def _slru_dir(self, kind: SlruKind) -> SlruSegmentDirectory:
        raw = self.get(_SLRU_DIR_KEYS[kind])
        return SlruSegmentDirectory.decode(raw) if raw is not None else SlruSegmentDirectory()

    def put_slru_segment_creation(self, kind: SlruKind, segno: int, nblocks: int) -> None:
        d = self._slru_dir(kind)
        if segno in d:
            raise AlreadyExistsError(f"SLRU segment {kind.value}/{segno:04X} already exists")
        self.put_image(_SLRU_DIR_KEYS[kind], d.add(segno).encode())
        self.put_image(_slru_size_key(kind, segno), encode_nblocks(nblocks))

    def put_slru_extend(self, kind: SlruKind, segno: int, nblocks: int) -> None:
        self.put_image(_slru_size_key(kind, segno), encode_nblocks(nblocks))

    def slru_segment_size(self, kind: SlruKind, segno: int) -> int | None:
        raw = self.get(_slru_size_key(kind, segno))
        return None if raw is None else decode_nblocks(raw)

    def slru_segment_exists(self, kind: SlruKind, segno: int) -> bool:
        return segno in self._slru_dir(kind)

    def put_slru_page_image(self, kind: SlruKind, segno: int, blkno: int, img: bytes) -> None:
        self.put_image(_slru_block_key(kind, segno, blkno), bytes(img))

    def put_slru_wal_record(self, kind: SlruKind, segno: int, blkno: int, rec: WalRecord) -> None:
        self.put_record(_slru_block_key(kind, segno, blkno), rec, False)

    def drop_slru_segment(self, kind: SlruKind, segno: int) -> None:
        d = self._slru_dir(kind)
        if segno not in d:
            self.tline.log.warning("SLRU segment to drop does not exist", kind=kind.value, segno=segno)
            return
        self.put_image(_SLRU_DIR_KEYS[kind], d.remove(segno).encode())

    # --- commit ----------------------------------------------------------------------------------
    def commit(self) -> None:
        """Write every pending value at `lsn`, then make it visible (advance last_record_lsn)."""
        tline = self.tline
        pending = self.pending
        if pending:
            lsn = self.lsn
            put = tline.layer_for_write(lsn).put
            for k, (init, v) in pending.items():
                put(k, lsn, init, v)
            self.pending = {}
            if self.pending_images:
                self.pending_images = {}
            if self.pending_records:
                self.pending_records = set()
        tline.advance_last_record_lsn(self.lsn)
        if self.pending_nblocks:
            if tline.logical_size is not None:
                tline.logical_size += self.pending_nblocks * BLCKSZ
            else:
                tline.logical_size_pending_delta += self.pending_nblocks * BLCKSZ
        self.pending_nblocks = 0

    def is_empty(self) -> bool:
        return not self.pending
