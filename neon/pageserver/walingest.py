"""WAL ingest (spec pageserver §4.3-4.10): what each decoded PG15 record puts into a timeline.

`WalIngest.ingest_record` turns one record into the puts Neon makes: per-block values (full-page
images extracted from XLOG_FPI records, otherwise the whole record under every block it touches),
implicit relation extension, relation and database creation and removal, CLOG and multixact
records as Neon's own record kinds, twophase and relmap files, VM bits cleared by heap records,
and the checkpoint value. Everything of one record commits at its end LSN.

Two record kinds need pages that only WAL redo can produce (CREATE DATABASE with the FILE_COPY
strategy copies every page; an SMGR truncate rewrites the last VM page): for those the pages are
fetched first (`prefetch`, async), then the record is ingested like any other.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace

from neon.postgres import slru
from neon.postgres.checkpoint import XLOG_CHECKPOINT_ONLINE, XLOG_CHECKPOINT_SHUTDOWN, CheckPoint
from neon.postgres.constants import (
    FSM_FORKNUM,
    INIT_FORKNUM,
    MAIN_FORKNUM,
    RM_CLOG_ID,
    RM_DBASE_ID,
    RM_HEAP2_ID,
    RM_HEAP_ID,
    RM_LOGICALMSG_ID,
    RM_MULTIXACT_ID,
    RM_RELMAP_ID,
    RM_SMGR_ID,
    RM_XACT_ID,
    RM_XLOG_ID,
    VISIBILITYMAP_FORKNUM,
)
from neon.postgres.page import VM_HEAPBLOCKS_PER_PAGE, page_is_new, page_set_lsn, vm_truncate_page
from neon.postgres.records import clog as clog_rec
from neon.postgres.records import dbase as dbase_rec
from neon.postgres.records import multixact as mx_rec
from neon.postgres.records import xact as xact_rec
from neon.postgres.records.heap import XLOG_HEAP2_LOCK_UPDATED, XLOG_HEAP_LOCK, XLOG_HEAP_OPMASK, vm_bits_cleared
from neon.postgres.records.logicalmsg import LogicalMessage
from neon.postgres.records.relmap import RelmapUpdate
from neon.postgres.records.smgr import XLOG_SMGR_CREATE, XLOG_SMGR_TRUNCATE, SmgrCreate, SmgrTruncate
from neon.postgres.records.xlog import XLOG_FPI, XLOG_FPI_FOR_HINT, XLOG_NEXTOID, NextOid, unpack_checkpoint
from neon.postgres.walrecord import DecodedRecord, decode_record, restore_image
from neon.walredo.records import (
    ClearVisibilityMapFlags,
    ClogSetAborted,
    ClogSetCommitted,
    MultixactMembersCreate,
    SlruKind,
)

from .datadir_mapping import ZERO_PAGE, DatadirModification
from .key import RelTag, rel_block_key_bytes, slru_block_key
from .timeline import Timeline
from .value import encode_postgres_value

try:  # the C fast lane for plain block records (native/ingestfast.c), when built
    from neon._ingestfast import ingest_simple as _ingest_simple
except ImportError:  # pragma: no cover - the pure Python path does everything too
    _ingest_simple = None

FSM_LEAF_NODES_PER_PAGE = 4069  # SlotsPerFSMPage for 8 KiB pages
_U32 = 0xFFFF_FFFF


class WalIngestError(Exception):
    """A record the pageserver cannot apply (it would make the stored state wrong)."""


def fsm_logical_to_physical(addr: int) -> int:
    """The physical FSM block of leaf page `addr` (the bottom level), as Neon computes it."""
    pages = 0
    leaf = addr
    for _ in range(3):
        pages += leaf + 1
        leaf //= FSM_LEAF_NODES_PER_PAGE
    return pages - 1


def _int32(v: int) -> int:
    v &= _U32
    return v - (1 << 32) if v & 0x8000_0000 else v


def _slru_addr(pageno: int) -> tuple[int, int]:
    return pageno // 32, pageno % 32


# Where heap records keep the flags that say a VM bit was cleared (vanilla PG15 layouts, see
# records/heap.py), so that most records are passed over without parsing: (rmid, opcode) ->
# (offset in main data, mask).
_VM_FLAG_BYTES: dict[tuple[int, int], tuple[int, int]] = {
    (RM_HEAP_ID, 0x00): (2, 0x01),  # INSERT: ALL_VISIBLE_CLEARED
    (RM_HEAP_ID, 0x10): (7, 0x01),  # DELETE
    (RM_HEAP_ID, 0x20): (7, 0x03),  # UPDATE: old / new page cleared
    (RM_HEAP_ID, 0x40): (7, 0x03),  # HOT_UPDATE
    (RM_HEAP_ID, 0x60): (7, 0x01),  # LOCK: ALL_FROZEN_CLEARED
    (RM_HEAP2_ID, 0x50): (0, 0x01),  # MULTI_INSERT
    (RM_HEAP2_ID, 0x60): (7, 0x01),  # LOCK_UPDATED
}


def _may_clear_vm_bits(rec: DecodedRecord) -> bool:
    where = _VM_FLAG_BYTES.get((rec.rmid, rec.info & XLOG_HEAP_OPMASK))
    if where is None:
        return False
    offset, mask = where
    if offset >= rec.main_data_len:
        return True  # let the parser report the malformed record
    return bool(rec.record[rec.main_data_off + offset] & mask)


def _xid_max(a: int, b: int) -> int:
    """The later of two xids, wraparound-aware."""
    return b if _int32(b - a) > 0 else a


class WalIngest:
    """The per-timeline ingest state: the decoded checkpoint value kept between records."""

    def __init__(self, timeline: Timeline, checkpoint: CheckPoint) -> None:
        self.timeline = timeline
        self.checkpoint = checkpoint
        self.checkpoint_modified = False
        self._prefetched: dict[bytes, bytes] = {}
        self._last_xid = -1
        self.fast_lane = _ingest_simple if not os.environ.get("NEON_NO_NATIVE") else None

    @classmethod
    def for_timeline(cls, timeline: Timeline) -> WalIngest:
        raw = timeline.get_checkpoint(timeline.last_record_lsn)
        return cls(timeline, CheckPoint.unpack(raw))

    # --- records that need reconstructed pages first -----------------------------------------------
    @staticmethod
    def needs_prefetch(rec: DecodedRecord) -> bool:
        if rec.rmid == RM_DBASE_ID:
            return rec.info & 0xF0 == dbase_rec.XLOG_DBASE_CREATE_FILE_COPY
        if rec.rmid == RM_SMGR_ID and rec.info & 0xF0 == XLOG_SMGR_TRUNCATE:
            return SmgrTruncate.unpack(rec.main_data).truncates_vm
        return rec.rmid == RM_MULTIXACT_ID and rec.info & 0xF0 == mx_rec.XLOG_MULTIXACT_CREATE_ID

    async def prefetch(self, rec: DecodedRecord) -> None:
        """Reconstruct, at last_record_lsn, the pages `ingest_record` will need for `rec`."""
        tl = self.timeline
        lsn = tl.last_record_lsn
        pages: dict[bytes, bytes] = {}
        if rec.rmid == RM_DBASE_ID:
            c = dbase_rec.DbaseCreateFileCopy.unpack(rec.main_data)
            for tag in sorted(tl.list_rels(c.src_tablespace_id, c.src_db_id, lsn)):
                for blk in range(tl.get_rel_size(tag, lsn, latest=True)):
                    key = rel_block_key_bytes(*tag, blk)
                    pages[key] = await tl.get(key, lsn)
        elif rec.rmid == RM_MULTIXACT_ID:
            c = mx_rec.MultiXactCreate.unpack(rec.main_data)
            for mxid in (c.mid, slru.next_multixact_id(c.mid)):
                pageno = slru.mxoff_page(mxid)
                segno, blk = _slru_addr(pageno)
                kind = SlruKind.MULTIXACT_OFFSETS
                if tl.get_slru_segment_exists(kind, segno, lsn) and blk < tl.get_slru_segment_size(kind, segno, lsn):
                    pages[_offsets_key(pageno)] = await tl.get_slru_page_at_lsn(kind, segno, blk, lsn)
        else:
            t = SmgrTruncate.unpack(rec.main_data)
            vm = RelTag(t.rnode.spc, t.rnode.db, t.rnode.rel, VISIBILITYMAP_FORKNUM)
            vm_blk = t.blkno // VM_HEAPBLOCKS_PER_PAGE
            if t.blkno % VM_HEAPBLOCKS_PER_PAGE and tl.get_rel_exists(vm, lsn) and vm_blk < tl.get_rel_size(vm, lsn):
                key = rel_block_key_bytes(*vm, vm_blk)
                pages[key] = await tl.get(key, lsn)
        self._prefetched = pages

    # --- batches ------------------------------------------------------------------------------------
    async def ingest_batch(self, batch: Sequence[tuple[int, int, bytes]], mod: DatadirModification) -> int:
        """Ingest (start LSN, end LSN, raw record) in order, each committed at its end LSN; records
        ending at or below last_record_lsn are skipped. Returns how many were ingested.

        Runs of plain block records go through the C fast lane when it is built (and not disabled
        with NEON_NO_NATIVE=1); it stores exactly what `ingest_record` would, and hands every
        other record back to `ingest_record`."""
        tl = self.timeline
        fast = self.fast_lane
        if fast is not None and not isinstance(batch, list):
            batch = list(batch)
        i = 0
        n = 0
        count = len(batch)
        while i < count:
            if fast is not None and batch[i][1] > tl.last_record_lsn:
                layer = tl.layer_for_write(batch[i][1])
                done, value_bytes, n_values, last_end, prev_end = fast(
                    batch, i, layer.bulk_index(), tl.rel_size_cache, self._last_xid, tl.last_record_lsn
                )
                if done:
                    layer.account(value_bytes, n_values, last_end)
                    tl.advance_last_record_lsn(last_end, prev_end or None)
                    i += done
                    n += done
                    if i >= count:
                        break
                xid = int.from_bytes(batch[i][2][4:8], "little")
                if xid != self._last_xid:
                    # The fast lane stops at every new xid: account for it here and try again.
                    self._last_xid = xid
                    self._update_next_xid(xid)
                    if not self.checkpoint_modified:
                        continue
            start, end, raw = batch[i]
            i += 1
            if end <= tl.last_record_lsn:
                continue
            rec = decode_record(raw, start)
            if self.needs_prefetch(rec):
                await self.prefetch(rec)
            try:
                self.ingest_record(rec, end, mod)
            except BaseException:
                self.abandon(mod)
                raise
            n += 1
        return n

    def abandon(self, mod: DatadirModification) -> None:
        """Forget a record that failed half-way: its pending puts, and what the caches learnt from
        them, so that the timeline is exactly as before the record and ingest can be retried."""
        lsn = mod.lsn
        mod.pending.clear()
        mod.pending_images.clear()
        mod.pending_records.clear()
        mod.pending_nblocks = 0
        tl = self.timeline
        for cache in (tl.rel_size_cache, tl.reldir_cache):
            for k in [k for k, (at, _) in cache.items() if at >= lsn]:
                del cache[k]
        # The checkpoint may have been changed by the failed record: reload the committed one.
        self.checkpoint = CheckPoint.unpack(tl.get_checkpoint(tl.last_record_lsn))
        self.checkpoint_modified = False
        self._last_xid = -1
        self._prefetched = {}

    # --- the per-record pipeline (§4.3) ---------------------------------------------------------------
    def ingest_record(self, rec: DecodedRecord, lsn: int, mod: DatadirModification) -> None:
        """Put everything `rec` (ending at `lsn`) changes, and commit it at `lsn`."""
        mod.lsn = lsn
        xid = rec.xid
        if xid != self._last_xid:  # a transaction's records come in runs: check each xid once
            self._last_xid = xid
            self._update_next_xid(xid)
        rmid = rec.rmid
        if rmid in (RM_HEAP_ID, RM_HEAP2_ID):
            if rec.blocks and _may_clear_vm_bits(rec):
                self._clear_vm_bits(rec, mod)
        elif rmid == RM_XLOG_ID:
            self._xlog(rec, mod)
        elif rmid == RM_XACT_ID:
            self._xact(rec, mod)
        elif rmid == RM_SMGR_ID:
            self._smgr(rec, mod)
        elif rmid == RM_CLOG_ID:
            self._clog(rec, mod)
        elif rmid == RM_DBASE_ID:
            self._dbase(rec, mod)
        elif rmid == RM_MULTIXACT_ID:
            self._multixact(rec, mod)
        elif rmid == RM_RELMAP_ID:
            u = RelmapUpdate.unpack(rec.main_data)
            mod.put_relmap_file(u.tsid, u.dbid, u.data)
        elif rmid == RM_LOGICALMSG_ID:
            self._logical_message(rec, mod)
        if rec.blocks:
            self._store_blocks(rec, lsn, mod)
        if self.checkpoint_modified:
            mod.put_checkpoint(self.checkpoint.pack())
            self.checkpoint_modified = False
        self._prefetched = {}
        mod.commit()

    # --- per-block storage (§4.4) -------------------------------------------------------------------
    def _store_blocks(self, rec: DecodedRecord, lsn: int, mod: DatadirModification) -> None:
        extract_fpi = rec.rmid == RM_XLOG_ID and rec.info in (XLOG_FPI, XLOG_FPI_FOR_HINT)
        encoded: dict[bool, bytes] = {}
        sizes = self.timeline.rel_size_cache
        for blk in rec.blocks:
            spc, db, rel = blk.rel
            tag = RelTag(spc, db, rel, blk.forknum)
            blkno = blk.blkno
            cached = sizes.get(tag)
            if cached is None or lsn < cached[0] or blkno >= cached[1]:
                mod.ensure_rel_block(tag, blkno)  # the rare case: creation or extension
            key = rel_block_key_bytes(spc, db, rel, blk.forknum, blkno)
            if extract_fpi and blk.apply_image and not blk.image_compressed:
                image = bytearray(restore_image(rec, blk))
                if not page_is_new(image):
                    page_set_lsn(image, lsn)
                mod.put_image(key, bytes(image))
                continue
            init = blk.will_init or blk.apply_image
            value = encoded.get(init)
            if value is None:
                value = encoded[init] = encode_postgres_value(init, rec.record)
            mod.put_encoded(key, init, value)

    # --- heap: visibility-map bits (§4.8) -------------------------------------------------------------
    def _clear_vm_bits(self, rec: DecodedRecord, mod: DatadirModification) -> None:
        numbers = {b.block_id: b.blkno for b in rec.blocks}
        cleared = vm_bits_cleared(rec.rmid, rec.info, rec.main_data, numbers)
        if not cleared:
            return
        opcode = rec.info & XLOG_HEAP_OPMASK
        is_lock = (rec.rmid == RM_HEAP_ID and opcode == XLOG_HEAP_LOCK) or (
            rec.rmid == RM_HEAP2_ID and opcode == XLOG_HEAP2_LOCK_UPDATED
        )
        b0 = rec.blocks[0]
        vm = RelTag(*b0.rel, VISIBILITYMAP_FORKNUM)
        vm_size = mod.rel_size(vm) if mod.rel_exists(vm) else 0
        by_vm_block: dict[int, list[tuple[int, int]]] = {}
        for heap_blk, bits in cleared:
            vm_blk = heap_blk // VM_HEAPBLOCKS_PER_PAGE
            if vm_blk < vm_size:  # Postgres may flag a clear although no VM page exists
                by_vm_block.setdefault(vm_blk, []).append((heap_blk, bits))
        for vm_blk, items in by_vm_block.items():
            if len(items) == 2:
                (a, bits), (b, _) = items
                out = ClearVisibilityMapFlags(new_heap_blkno=b, old_heap_blkno=a, flags=bits)
            else:
                heap_blk, bits = items[0]
                out = (
                    ClearVisibilityMapFlags(None, heap_blk, bits)
                    if is_lock
                    else ClearVisibilityMapFlags(heap_blk, None, bits)
                )
            mod.put_rel_wal_record(vm, vm_blk, out)

    # --- XLOG ---------------------------------------------------------------------------------------
    def _xlog(self, rec: DecodedRecord, mod: DatadirModification) -> None:
        info = rec.info & 0xF0
        if info in (XLOG_CHECKPOINT_SHUTDOWN, XLOG_CHECKPOINT_ONLINE):
            cp = unpack_checkpoint(rec.main_data)
            if _int32(self.checkpoint.oldest_xid - cp.oldest_xid) < 0:
                self._set_checkpoint(oldest_xid=cp.oldest_xid)
        elif info == XLOG_NEXTOID:
            next_oid = NextOid.unpack(rec.main_data).next_oid
            if self.checkpoint.next_oid != next_oid:
                self._set_checkpoint(next_oid=next_oid)

    # --- XACT ---------------------------------------------------------------------------------------
    def _xact(self, rec: DecodedRecord, mod: DatadirModification) -> None:
        op = rec.info & xact_rec.XLOG_XACT_OPMASK
        if op == xact_rec.XLOG_XACT_PREPARE:
            mod.put_twophase_file(rec.xid, rec.main_data)  # the state file without its CRC, as Neon stores it
            return
        if op not in (
            xact_rec.XLOG_XACT_COMMIT,
            xact_rec.XLOG_XACT_ABORT,
            xact_rec.XLOG_XACT_COMMIT_PREPARED,
            xact_rec.XLOG_XACT_ABORT_PREPARED,
        ):
            return
        x = xact_rec.XactCommitAbort.unpack(rec.info, rec.main_data)
        xids = x.decided_xids(rec.xid)
        group: list[int] = []
        page = slru.clog_page(xids[0])
        for xid in xids:
            p = slru.clog_page(xid)
            if p != page and group:
                self._put_clog_group(mod, page, group, x)
                group = []
            page = p
            group.append(xid)
        if group:
            self._put_clog_group(mod, page, group, x)
        last = self.timeline.last_record_lsn
        for rnode in x.rels:
            for fork in (MAIN_FORKNUM, FSM_FORKNUM, VISIBILITYMAP_FORKNUM, INIT_FORKNUM):
                tag = RelTag(rnode.spc, rnode.db, rnode.rel, fork)
                if self.timeline.get_rel_exists(tag, last):
                    mod.put_rel_drop(tag)
        if x.is_prepared:
            mod.drop_twophase_file(x.decided_xid(rec.xid))

    def _put_clog_group(
        self, mod: DatadirModification, pageno: int, xids: list[int], x: xact_rec.XactCommitAbort
    ) -> None:
        segno, blk = _slru_addr(pageno)
        out = ClogSetCommitted(tuple(xids), x.xact_time) if x.is_commit else ClogSetAborted(tuple(xids))
        mod.put_slru_wal_record(SlruKind.CLOG, segno, blk, out)

    # --- SMGR ---------------------------------------------------------------------------------------
    def _smgr(self, rec: DecodedRecord, mod: DatadirModification) -> None:
        info = rec.info & 0xF0
        if info == XLOG_SMGR_CREATE:
            c = SmgrCreate.unpack(rec.main_data)
            mod.put_rel_creation(RelTag(c.rnode.spc, c.rnode.db, c.rnode.rel, c.fork_num), 0)
        elif info == XLOG_SMGR_TRUNCATE:
            self._smgr_truncate(SmgrTruncate.unpack(rec.main_data), mod)

    def _smgr_truncate(self, t: SmgrTruncate, mod: DatadirModification) -> None:
        spc, db, rel = t.rnode.spc, t.rnode.db, t.rnode.rel
        if t.truncates_heap:
            mod.put_rel_truncation(RelTag(spc, db, rel, MAIN_FORKNUM), t.blkno)
        if t.truncates_fsm:
            fsm = RelTag(spc, db, rel, FSM_FORKNUM)
            p = fsm_logical_to_physical(t.blkno // FSM_LEAF_NODES_PER_PAGE)
            if t.blkno % FSM_LEAF_NODES_PER_PAGE:
                # FSM contents are only hints and never WAL-logged: a zeroed page is always valid.
                mod.put_rel_page_image(fsm, p, ZERO_PAGE)
                p += 1
            if mod.rel_exists(fsm) and mod.rel_size(fsm) > p:
                mod.put_rel_truncation(fsm, p)
        if t.truncates_vm:
            vm = RelTag(spc, db, rel, VISIBILITYMAP_FORKNUM)
            p = t.blkno // VM_HEAPBLOCKS_PER_PAGE
            if t.blkno % VM_HEAPBLOCKS_PER_PAGE:
                # Postgres clears only the bits of the truncated heap blocks in the last VM page. Neon
                # writes a zero page there; we keep the exact page (fetched by `prefetch`), so the
                # remaining all-visible bits survive as they do in Postgres.
                key = rel_block_key_bytes(*vm, p)
                page = self._prefetched.get(key)
                if page is not None:
                    exact = bytearray(page)
                    vm_truncate_page(exact, t.blkno)
                    mod.put_rel_page_image(vm, p, bytes(exact))
                elif mod.rel_exists(vm) and mod.rel_size(vm) > p:
                    mod.put_rel_page_image(vm, p, ZERO_PAGE)
                p += 1
            if mod.rel_exists(vm) and mod.rel_size(vm) > p:
                mod.put_rel_truncation(vm, p)

    # --- CLOG ---------------------------------------------------------------------------------------
    def _clog(self, rec: DecodedRecord, mod: DatadirModification) -> None:
        info = rec.info & 0xF0
        if info == clog_rec.CLOG_ZEROPAGE:
            pageno = clog_rec.ClogZeroPage.unpack(rec.main_data).pageno
            self._slru_zero_page(mod, SlruKind.CLOG, pageno)
        elif info == clog_rec.CLOG_TRUNCATE:
            t = clog_rec.ClogTruncate.unpack(rec.main_data)
            self._set_checkpoint(oldest_xid=t.oldest_xact, oldest_xid_db=t.oldest_xact_db)
            latest_page = (self.checkpoint.next_xid & _U32) // slru.CLOG_XACTS_PER_PAGE
            if slru.clog_page_precedes(latest_page, t.pageno):
                self.timeline.log.info("could not truncate CLOG: apparent wraparound", pageno=t.pageno)
                return
            last = self.timeline.last_record_lsn
            for segno in sorted(self.timeline.list_slru_segments(SlruKind.CLOG, last)):
                first = segno * 32
                if slru.clog_page_precedes(first, t.pageno) and slru.clog_page_precedes(first + 31, t.pageno):
                    mod.drop_slru_segment(SlruKind.CLOG, segno)

    def _slru_zero_page(self, mod: DatadirModification, kind: SlruKind, pageno: int) -> None:
        segno, blk = _slru_addr(pageno)
        # SLRU extension (§4.5): create the segment if needed, grow it to this page, zero any gap.
        if not mod.slru_segment_exists(kind, segno):
            mod.put_slru_segment_creation(kind, segno, 0)
            old = 0
        else:
            old = mod.slru_segment_size(kind, segno) or 0
        if blk + 1 > old:
            mod.put_slru_extend(kind, segno, blk + 1)
            for gap in range(old, blk):
                mod.put_slru_page_image(kind, segno, gap, ZERO_PAGE)
        mod.put_slru_page_image(kind, segno, blk, ZERO_PAGE)

    # --- DBASE --------------------------------------------------------------------------------------
    def _dbase(self, rec: DecodedRecord, mod: DatadirModification) -> None:
        info = rec.info & 0xF0
        if info == dbase_rec.XLOG_DBASE_CREATE_FILE_COPY:
            c = dbase_rec.DbaseCreateFileCopy.unpack(rec.main_data)
            self._copy_database(c, mod)
        elif info == dbase_rec.XLOG_DBASE_DROP:
            d = dbase_rec.DbaseDrop.unpack(rec.main_data)
            for spc in d.tablespace_ids:
                mod.drop_dbdir(spc, d.db_id)
        # CREATE_WAL_LOG: the new database arrives as ordinary WAL (relmap update, SMGR creates, FPIs).

    def _copy_database(self, c: dbase_rec.DbaseCreateFileCopy, mod: DatadirModification) -> None:
        tl = self.timeline
        lsn = tl.last_record_lsn
        src_rels = sorted(tl.list_rels(c.src_tablespace_id, c.src_db_id, lsn))
        mod.put_relmap_file(c.tablespace_id, c.db_id, tl.get_relmap_file(c.src_tablespace_id, c.src_db_id, lsn))
        for src in src_rels:
            dst = RelTag(c.tablespace_id, c.db_id, src.rel, src.fork)
            n = tl.get_rel_size(src, lsn, latest=True)
            mod.put_rel_creation(dst, n)
            for blk in range(n):
                page = self._prefetched.get(rel_block_key_bytes(*src, blk))
                if page is None:
                    raise WalIngestError(f"CREATE DATABASE: page {blk} of {src} was not fetched")
                mod.put_rel_page_image(dst, blk, page)

    # --- MULTIXACT ----------------------------------------------------------------------------------
    def _multixact(self, rec: DecodedRecord, mod: DatadirModification) -> None:
        info = rec.info & 0xF0
        if info in (mx_rec.XLOG_MULTIXACT_ZERO_OFF_PAGE, mx_rec.XLOG_MULTIXACT_ZERO_MEM_PAGE):
            z = mx_rec.MultiXactZeroPage.unpack(rec.info, rec.main_data)
            kind = SlruKind.MULTIXACT_MEMBERS if z.members else SlruKind.MULTIXACT_OFFSETS
            self._slru_zero_page(mod, kind, z.pageno)
        elif info == mx_rec.XLOG_MULTIXACT_CREATE_ID:
            self._multixact_create(mx_rec.MultiXactCreate.unpack(rec.main_data), mod)
        elif info == mx_rec.XLOG_MULTIXACT_TRUNCATE_ID:
            t = mx_rec.MultiXactTruncate.unpack(rec.main_data)
            self._set_checkpoint(oldest_multi=t.end_trunc_off, oldest_multi_db=t.oldest_multi_db)
            last = slru.member_segment(t.end_trunc_memb)
            seg = slru.member_segment(t.start_trunc_memb)
            existing = self.timeline.list_slru_segments(SlruKind.MULTIXACT_MEMBERS, self.timeline.last_record_lsn)
            while seg != last:
                if seg in existing:
                    mod.drop_slru_segment(SlruKind.MULTIXACT_MEMBERS, seg)
                seg = 0 if seg == slru.MAX_MEMBERS_SEGMENT else seg + 1

    def _multixact_create(self, c: mx_rec.MultiXactCreate, mod: DatadirModification) -> None:
        # The offsets pages are stored as images, not as Neon's MultixactOffsetCreate records:
        # PostgreSQL 15.20 also pre-fills the next multixact's starting offset, often on the same
        # page, and one key holds one value per LSN. The pages were fetched by `prefetch` (they
        # are images already, so that costs no redo).
        end_off = (c.moff + len(c.members)) & _U32
        nxt = slru.next_multixact_id(c.mid)
        pages: dict[int, bytearray] = {}
        for mxid, offset in ((c.mid, c.moff), (nxt, end_off)):
            pageno = slru.mxoff_page(mxid)
            page = pages.get(pageno)
            if page is None:
                key = _offsets_key(pageno)
                base = mod.pending_images.get(key) or self._prefetched.get(key)
                if base is None:
                    if mxid == nxt:
                        continue  # the next page does not exist yet: its ZEROPAGE comes first
                    raise WalIngestError(f"multixact {c.mid}: offsets page {pageno} does not exist")
                page = pages[pageno] = bytearray(base)
            slru.set_multixact_offset(page, mxid, offset)
        for pageno, page in pages.items():
            segno, blk = _slru_addr(pageno)
            mod.put_slru_page_image(SlruKind.MULTIXACT_OFFSETS, segno, blk, bytes(page))
        off = c.moff
        i = 0
        members = [(m.xid, m.status) for m in c.members]
        while i < len(members):
            pageno = slru.member_page(off)
            room = slru.MULTIXACT_MEMBERS_PER_PAGE - off % slru.MULTIXACT_MEMBERS_PER_PAGE
            chunk = tuple(members[i : i + room])
            m_segno, m_blk = _slru_addr(pageno)
            mod.put_slru_wal_record(SlruKind.MULTIXACT_MEMBERS, m_segno, m_blk, MultixactMembersCreate(off, chunk))
            i += len(chunk)
            off = (off + len(chunk)) & _U32
        cp = self.checkpoint
        if _int32(c.mid - cp.next_multi) >= 0:
            self._set_checkpoint(next_multi=slru.next_multixact_id(c.mid))
        if _int32(end_off - self.checkpoint.next_multi_offset) > 0:
            self._set_checkpoint(next_multi_offset=end_off)
        max_xid = 0
        for xid, _ in members:
            max_xid = xid if max_xid == 0 else _xid_max(max_xid, xid)
        if max_xid:
            self._update_next_xid(max_xid)

    # --- logical messages -----------------------------------------------------------------------------
    def _logical_message(self, rec: DecodedRecord, mod: DatadirModification) -> None:
        msg = LogicalMessage.unpack(rec.main_data)
        if msg.prefix.startswith("neon-file:"):
            mod.put_aux_file(msg.prefix[len("neon-file:") :], msg.message)

    # --- the checkpoint value (§4.9) ------------------------------------------------------------------
    def _set_checkpoint(self, **changes: int) -> None:
        new = replace(self.checkpoint, **changes)
        if new != self.checkpoint:
            self.checkpoint = new
            self.checkpoint_modified = True

    def _update_next_xid(self, xid: int) -> None:
        new = max((xid + 1) & _U32, 3)
        new = (new + 1023) & ~1023 & _U32
        next_xid = self.checkpoint.next_xid
        old = next_xid & _U32
        if _int32(new - old) > 0:
            epoch = next_xid >> 32
            if new < old:
                epoch += 1
            self._set_checkpoint(next_xid=(epoch << 32) | new)


def _offsets_key(pageno: int) -> bytes:
    segno, blk = _slru_addr(pageno)
    return slru_block_key(SlruKind.MULTIXACT_OFFSETS, segno, blk).to_bytes()
