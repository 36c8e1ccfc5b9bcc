"""Per-block redo histories collected from real WAL, for reconstruction oracle tests.

For every relation block: the newest full-page image or initialising record and every later
record that touches it, plus Neon's ClearVisibilityMapFlags records for VM pages whose bits
heap records clear (the way the pageserver's ingest will store them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from neon.postgres.constants import RM_HEAP2_ID, RM_HEAP_ID, RM_SMGR_ID, RM_XLOG_ID, VISIBILITYMAP_FORKNUM
from neon.postgres.errors import WalDecodeError
from neon.postgres.page import page_is_new, page_set_lsn, vm_block
from neon.postgres.records.heap import vm_bits_cleared
from neon.postgres.records.smgr import SmgrTruncate
from neon.postgres.records.xlog import XLOG_FPI, XLOG_FPI_FOR_HINT
from neon.postgres.walfiles import read_wal_files
from neon.postgres.walrecord import decode_record
from neon.walredo.records import BufferTag, ClearVisibilityMapFlags, PostgresRecord, WalRecord


@dataclass
class BlockHistory:
    tag: BufferTag
    base: tuple[int, bytes] | None = None
    records: list[tuple[int, WalRecord]] = field(default_factory=list)


@dataclass
class RedoHistories:
    blocks: dict[BufferTag, BlockHistory]
    no_history: set[BufferTag]  # touched by WAL, but first seen without an image or init record
    vm_truncated: set[tuple[int, int, int]]  # relations whose VM was truncated (not modelled here)
    end_lsn: int


def collect_histories(files: Sequence[Path]) -> RedoHistories:
    blocks: dict[BufferTag, BlockHistory] = {}
    no_history: set[BufferTag] = set()
    vm_truncated: set[tuple[int, int, int]] = set()
    end_lsn = 0
    try:
        for start, end, raw in read_wal_files(files):
            end_lsn = end
            r = decode_record(raw, start)
            if r.rmid == RM_XLOG_ID and r.info & 0xF0 in (XLOG_FPI, XLOG_FPI_FOR_HINT):
                for b in r.blocks:
                    if b.apply_image:
                        image = bytearray(r.block_image(b))
                        if not page_is_new(image):
                            page_set_lsn(image, end)
                        tag = BufferTag(*b.rel, b.forknum, b.blkno)
                        blocks[tag] = BlockHistory(tag, (end, bytes(image)))
                        no_history.discard(tag)
                continue
            if r.rmid == RM_SMGR_ID and r.info & 0xF0 == 0x20:
                trunc = SmgrTruncate.unpack(r.main_data)
                if trunc.truncates_vm:
                    vm_truncated.add((trunc.rnode.spc, trunc.rnode.db, trunc.rnode.rel))
            for b in r.blocks:
                tag = BufferTag(*b.rel, b.forknum, b.blkno)
                if b.will_init or b.apply_image:
                    blocks[tag] = BlockHistory(tag, None, [(end, PostgresRecord(True, raw))])
                    no_history.discard(tag)
                elif tag in blocks:
                    blocks[tag].records.append((end, PostgresRecord(False, raw)))
                else:
                    no_history.add(tag)
            if r.rmid in (RM_HEAP_ID, RM_HEAP2_ID) and r.blocks:
                numbers = {b.block_id: b.blkno for b in r.blocks}
                for heap_blk, bits in vm_bits_cleared(r.rmid, r.info, r.main_data, numbers):
                    vm_tag = BufferTag(*r.blocks[0].rel, VISIBILITYMAP_FORKNUM, vm_block(heap_blk))
                    # As in Neon: a VM page that does not exist yet has no bits to clear.
                    if vm_tag in blocks:
                        blocks[vm_tag].records.append((end, ClearVisibilityMapFlags(heap_blk, None, bits)))
    except WalDecodeError:
        pass  # the end of the valid WAL
    return RedoHistories(blocks, no_history, vm_truncated, end_lsn)
