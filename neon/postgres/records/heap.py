"""Heap (rmid 10) and Heap2 (rmid 9) main-data payloads, and the visibility-map bits that heap
records clear as a side effect (spec §4.9).

These are stock PostgreSQL 15 layouts: no `t_cid` fields, and the flags byte of `xl_heap_delete`,
`xl_heap_update`, `xl_heap_lock` and `xl_heap_lock_updated` is at offset 7 (Neon's patched structs
differ, spec §12.1). Heap records are otherwise plain block records: their block data goes to the
redo helper untouched, so only main data is parsed here.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from neon.postgres.constants import RM_HEAP2_ID, RM_HEAP_ID
from neon.postgres.errors import PayloadError

from ._reader import Buffer, PayloadReader, fixed

XLOG_HEAP_OPMASK = 0x70
XLOG_HEAP_INIT_PAGE = 0x80

# Heap (rmid 10) opcodes.
XLOG_HEAP_INSERT = 0x00
XLOG_HEAP_DELETE = 0x10
XLOG_HEAP_UPDATE = 0x20
XLOG_HEAP_TRUNCATE = 0x30
XLOG_HEAP_HOT_UPDATE = 0x40
XLOG_HEAP_CONFIRM = 0x50
XLOG_HEAP_LOCK = 0x60
XLOG_HEAP_INPLACE = 0x70

# Heap2 (rmid 9) opcodes.
XLOG_HEAP2_REWRITE = 0x00
XLOG_HEAP2_PRUNE = 0x10
XLOG_HEAP2_VACUUM = 0x20
XLOG_HEAP2_FREEZE_PAGE = 0x30
XLOG_HEAP2_VISIBLE = 0x40
XLOG_HEAP2_MULTI_INSERT = 0x50
XLOG_HEAP2_LOCK_UPDATED = 0x60
XLOG_HEAP2_NEW_CID = 0x70

# xl_heap_insert / xl_heap_multi_insert flags.
XLH_INSERT_ALL_VISIBLE_CLEARED = 0x01
XLH_INSERT_LAST_IN_MULTI = 0x02
XLH_INSERT_IS_SPECULATIVE = 0x04
XLH_INSERT_CONTAINS_NEW_TUPLE = 0x08
XLH_INSERT_ON_TOAST_RELATION = 0x10
XLH_INSERT_ALL_FROZEN_SET = 0x20

# xl_heap_update flags.
XLH_UPDATE_OLD_ALL_VISIBLE_CLEARED = 0x01
XLH_UPDATE_NEW_ALL_VISIBLE_CLEARED = 0x02
XLH_UPDATE_CONTAINS_OLD_TUPLE = 0x04
XLH_UPDATE_CONTAINS_OLD_KEY = 0x08
XLH_UPDATE_CONTAINS_NEW_TUPLE = 0x10
XLH_UPDATE_PREFIX_FROM_OLD = 0x20
XLH_UPDATE_SUFFIX_FROM_OLD = 0x40

# xl_heap_delete flags.
XLH_DELETE_ALL_VISIBLE_CLEARED = 0x01
XLH_DELETE_CONTAINS_OLD_TUPLE = 0x02
XLH_DELETE_CONTAINS_OLD_KEY = 0x04
XLH_DELETE_IS_SUPER = 0x08
XLH_DELETE_IS_PARTITION_MOVE = 0x10

# xl_heap_lock / xl_heap_lock_updated flags.
XLH_LOCK_ALL_FROZEN_CLEARED = 0x01

# xl_heap_visible flags = the VM bits to set (access/visibilitymapdefs.h).
VISIBILITYMAP_ALL_VISIBLE = 0x01
VISIBILITYMAP_ALL_FROZEN = 0x02
VISIBILITYMAP_VALID_BITS = VISIBILITYMAP_ALL_VISIBLE | VISIBILITYMAP_ALL_FROZEN

HEAP_OPCODE_NAMES = {
    XLOG_HEAP_INSERT: "INSERT",
    XLOG_HEAP_DELETE: "DELETE",
    XLOG_HEAP_UPDATE: "UPDATE",
    XLOG_HEAP_TRUNCATE: "TRUNCATE",
    XLOG_HEAP_HOT_UPDATE: "HOT_UPDATE",
    XLOG_HEAP_CONFIRM: "CONFIRM",
    XLOG_HEAP_LOCK: "LOCK",
    XLOG_HEAP_INPLACE: "INPLACE",
}
HEAP2_OPCODE_NAMES = {
    XLOG_HEAP2_REWRITE: "REWRITE",
    XLOG_HEAP2_PRUNE: "PRUNE",
    XLOG_HEAP2_VACUUM: "VACUUM",
    XLOG_HEAP2_FREEZE_PAGE: "FREEZE_PAGE",
    XLOG_HEAP2_VISIBLE: "VISIBLE",
    XLOG_HEAP2_MULTI_INSERT: "MULTI_INSERT",
    XLOG_HEAP2_LOCK_UPDATED: "LOCK_UPDATED",
    XLOG_HEAP2_NEW_CID: "NEW_CID",
}

_INSERT = struct.Struct("<HB")
_MULTI_INSERT_HEAD = struct.Struct("<BxH")
_DELETE = struct.Struct("<IHBB")
_UPDATE = struct.Struct("<IHBBIH")
_LOCK = struct.Struct("<IHbB")
_LOCK_UPDATED = struct.Struct("<IHBB")
_VISIBLE = struct.Struct("<IB")
_PRUNE = struct.Struct("<IHH")
_U16 = struct.Struct("<H")
_FREEZE_PAGE = struct.Struct("<IH")
_TRUNCATE_HEAD = struct.Struct("<IIB3x")
HEAP_HEADER_SIZE = 5  # xl_heap_header, which starts a logged old tuple/key


@dataclass(frozen=True, slots=True)
class HeapInsert:
    offnum: int
    flags: int

    @classmethod
    def unpack(cls, data: Buffer) -> HeapInsert:
        return cls(*fixed(data, _INSERT, "HEAP INSERT"))


@dataclass(frozen=True, slots=True)
class HeapMultiInsert:
    """`xl_heap_multi_insert`; `offsets` is empty when the page is initialised (INIT_PAGE)."""

    flags: int
    ntuples: int
    offsets: tuple[int, ...]

    @classmethod
    def unpack(cls, info: int, data: Buffer) -> HeapMultiInsert:
        r = PayloadReader(data, "HEAP2 MULTI_INSERT")
        flags, ntuples = r.unpack(_MULTI_INSERT_HEAD, "xl_heap_multi_insert")
        # With INIT_PAGE the tuples go to offsets 1..ntuples and the array is not logged.
        offsets = () if info & XLOG_HEAP_INIT_PAGE else r.array("H", ntuples, "offsets")
        r.end()
        return cls(flags, ntuples, offsets)


def _old_tuple(r: PayloadReader, has_old: bool) -> bytes:
    """The replica-identity old tuple/key (xl_heap_header + data) that may follow in main data."""
    tail = r.rest()
    if has_old and len(tail) < HEAP_HEADER_SIZE:
        raise r.error(f"flags say an old tuple follows, but only {len(tail)} bytes do")
    if not has_old and tail:
        raise r.error(f"{len(tail)} trailing bytes but flags say no old tuple follows")
    return tail


@dataclass(frozen=True, slots=True)
class HeapDelete:
    xmax: int
    offnum: int
    infobits_set: int
    flags: int
    old_tuple: bytes  # xl_heap_header + old key/tuple, with CONTAINS_OLD_TUPLE/KEY (wal_level=logical)

    @classmethod
    def unpack(cls, data: Buffer) -> HeapDelete:
        r = PayloadReader(data, "HEAP DELETE")
        xmax, offnum, infobits, flags = r.unpack(_DELETE, "xl_heap_delete")
        has_old = bool(flags & (XLH_DELETE_CONTAINS_OLD_TUPLE | XLH_DELETE_CONTAINS_OLD_KEY))
        return cls(xmax, offnum, infobits, flags, _old_tuple(r, has_old))


@dataclass(frozen=True, slots=True)
class HeapUpdate:
    """`xl_heap_update` (UPDATE and HOT_UPDATE). Block 0 is the new page, block 1 the old one
    when it differs."""

    old_xmax: int
    old_offnum: int
    old_infobits_set: int
    flags: int
    new_xmax: int
    new_offnum: int
    old_tuple: bytes  # xl_heap_header + old key/tuple, with CONTAINS_OLD_TUPLE/KEY

    @classmethod
    def unpack(cls, data: Buffer, what: str = "HEAP UPDATE") -> HeapUpdate:
        r = PayloadReader(data, what)
        old_xmax, old_off, old_infobits, flags, new_xmax, new_off = r.unpack(_UPDATE, "xl_heap_update")
        has_old = bool(flags & (XLH_UPDATE_CONTAINS_OLD_TUPLE | XLH_UPDATE_CONTAINS_OLD_KEY))
        return cls(old_xmax, old_off, old_infobits, flags, new_xmax, new_off, _old_tuple(r, has_old))


@dataclass(frozen=True, slots=True)
class HeapLock:
    locking_xid: int
    offnum: int
    infobits_set: int
    flags: int

    @classmethod
    def unpack(cls, data: Buffer) -> HeapLock:
        return cls(*fixed(data, _LOCK, "HEAP LOCK"))


@dataclass(frozen=True, slots=True)
class HeapLockUpdated:
    xmax: int
    offnum: int
    infobits_set: int
    flags: int

    @classmethod
    def unpack(cls, data: Buffer) -> HeapLockUpdated:
        return cls(*fixed(data, _LOCK_UPDATED, "HEAP2 LOCK_UPDATED"))


@dataclass(frozen=True, slots=True)
class HeapVisible:
    """`xl_heap_visible`: `flags` are the VM bits set for the heap page (block 1)."""

    cutoff_xid: int
    flags: int

    @classmethod
    def unpack(cls, data: Buffer) -> HeapVisible:
        return cls(*fixed(data, _VISIBLE, "HEAP2 VISIBLE"))


@dataclass(frozen=True, slots=True)
class HeapPrune:
    latest_removed_xid: int
    nredirected: int
    ndead: int

    @classmethod
    def unpack(cls, data: Buffer) -> HeapPrune:
        return cls(*fixed(data, _PRUNE, "HEAP2 PRUNE"))


@dataclass(frozen=True, slots=True)
class HeapVacuum:
    nunused: int

    @classmethod
    def unpack(cls, data: Buffer) -> HeapVacuum:
        return cls(*fixed(data, _U16, "HEAP2 VACUUM"))


@dataclass(frozen=True, slots=True)
class HeapFreezePage:
    cutoff_xid: int
    ntuples: int

    @classmethod
    def unpack(cls, data: Buffer) -> HeapFreezePage:
        return cls(*fixed(data, _FREEZE_PAGE, "HEAP2 FREEZE_PAGE"))


@dataclass(frozen=True, slots=True)
class HeapConfirm:
    offnum: int

    @classmethod
    def unpack(cls, data: Buffer) -> HeapConfirm:
        return cls(*fixed(data, _U16, "HEAP CONFIRM"))


@dataclass(frozen=True, slots=True)
class HeapInplace:
    offnum: int

    @classmethod
    def unpack(cls, data: Buffer) -> HeapInplace:
        return cls(*fixed(data, _U16, "HEAP INPLACE"))


@dataclass(frozen=True, slots=True)
class HeapTruncate:
    """`xl_heap_truncate`: logged for logical decoding only; the storage change is SMGR's."""

    db_id: int
    flags: int
    relids: tuple[int, ...]

    @classmethod
    def unpack(cls, data: Buffer) -> HeapTruncate:
        r = PayloadReader(data, "HEAP TRUNCATE")
        db_id, nrelids, flags = r.unpack(_TRUNCATE_HEAD, "xl_heap_truncate")
        relids = r.array("I", r.fits(nrelids, 4, "relids"), "relids")
        r.end()
        return cls(db_id, flags, relids)


HeapPayload = (
    HeapInsert
    | HeapMultiInsert
    | HeapDelete
    | HeapUpdate
    | HeapLock
    | HeapLockUpdated
    | HeapVisible
    | HeapPrune
    | HeapVacuum
    | HeapFreezePage
    | HeapConfirm
    | HeapInplace
    | HeapTruncate
)


def describe_heap(info: int, data: Buffer) -> HeapPayload | None:
    opcode = info & XLOG_HEAP_OPMASK
    if opcode == XLOG_HEAP_INSERT:
        return HeapInsert.unpack(data)
    if opcode == XLOG_HEAP_DELETE:
        return HeapDelete.unpack(data)
    if opcode == XLOG_HEAP_UPDATE:
        return HeapUpdate.unpack(data)
    if opcode == XLOG_HEAP_HOT_UPDATE:
        return HeapUpdate.unpack(data, "HEAP HOT_UPDATE")
    if opcode == XLOG_HEAP_TRUNCATE:
        return HeapTruncate.unpack(data)
    if opcode == XLOG_HEAP_CONFIRM:
        return HeapConfirm.unpack(data)
    if opcode == XLOG_HEAP_LOCK:
        return HeapLock.unpack(data)
    return HeapInplace.unpack(data)  # the only opcode left: 0x70


def describe_heap2(info: int, data: Buffer) -> HeapPayload | None:
    opcode = info & XLOG_HEAP_OPMASK
    if opcode == XLOG_HEAP2_PRUNE:
        return HeapPrune.unpack(data)
    if opcode == XLOG_HEAP2_VACUUM:
        return HeapVacuum.unpack(data)
    if opcode == XLOG_HEAP2_FREEZE_PAGE:
        return HeapFreezePage.unpack(data)
    if opcode == XLOG_HEAP2_VISIBLE:
        return HeapVisible.unpack(data)
    if opcode == XLOG_HEAP2_MULTI_INSERT:
        return HeapMultiInsert.unpack(info, data)
    if opcode == XLOG_HEAP2_LOCK_UPDATED:
        return HeapLockUpdated.unpack(data)
    return None  # REWRITE and NEW_CID serve logical decoding only and touch no page


# (rmid, opcode) -> (main-data parser, flag meaning "cleared", VM bits it clears) for the records
# whose clear applies to block 0. UPDATE/HOT_UPDATE (two pages) are handled separately.
_VM_CLEAR_RULES: dict[tuple[int, int], tuple[Callable[[int, Buffer], HeapPayload], int, int]] = {
    (RM_HEAP_ID, XLOG_HEAP_INSERT): (
        lambda _info, d: HeapInsert.unpack(d),
        XLH_INSERT_ALL_VISIBLE_CLEARED,
        VISIBILITYMAP_VALID_BITS,
    ),
    (RM_HEAP_ID, XLOG_HEAP_DELETE): (
        lambda _info, d: HeapDelete.unpack(d),
        XLH_DELETE_ALL_VISIBLE_CLEARED,
        VISIBILITYMAP_VALID_BITS,
    ),
    # A lock only invalidates all-frozen: the tuple is still visible to everyone.
    (RM_HEAP_ID, XLOG_HEAP_LOCK): (
        lambda _info, d: HeapLock.unpack(d),
        XLH_LOCK_ALL_FROZEN_CLEARED,
        VISIBILITYMAP_ALL_FROZEN,
    ),
    (RM_HEAP2_ID, XLOG_HEAP2_MULTI_INSERT): (
        HeapMultiInsert.unpack,
        XLH_INSERT_ALL_VISIBLE_CLEARED,
        VISIBILITYMAP_VALID_BITS,
    ),
    (RM_HEAP2_ID, XLOG_HEAP2_LOCK_UPDATED): (
        lambda _info, d: HeapLockUpdated.unpack(d),
        XLH_LOCK_ALL_FROZEN_CLEARED,
        VISIBILITYMAP_ALL_FROZEN,
    ),
}


def _block(block_numbers: Mapping[int, int], block_id: int, what: str) -> int:
    try:
        return block_numbers[block_id]
    except KeyError:
        raise PayloadError(f"{what}: record has no block reference #{block_id}") from None


def vm_bits_cleared(rmid: int, info: int, main_data: Buffer, block_numbers: Mapping[int, int]) -> list[tuple[int, int]]:
    """The (heap block number, VM bits) pairs that replaying this record clears in the VM fork.

    `block_numbers` maps block reference id -> block number for the record's references (block 0,
    and block 1 if present). The VM pages live in fork 2 of block 0's relation; they are not
    among the record's block references, so the pageserver must apply these clears itself.
    Records that clear nothing return [].
    """
    opcode = info & XLOG_HEAP_OPMASK
    if rmid == RM_HEAP_ID and opcode in (XLOG_HEAP_UPDATE, XLOG_HEAP_HOT_UPDATE):
        return _update_vm_bits_cleared(opcode, main_data, block_numbers)
    rule = _VM_CLEAR_RULES.get((rmid, opcode))
    if rule is None:
        return []
    parse, flag, bits = rule
    if parse(info, main_data).flags & flag:
        name = (HEAP_OPCODE_NAMES if rmid == RM_HEAP_ID else HEAP2_OPCODE_NAMES)[opcode]
        return [(_block(block_numbers, 0, name), bits)]
    return []


def _update_vm_bits_cleared(opcode: int, main_data: Buffer, block_numbers: Mapping[int, int]) -> list[tuple[int, int]]:
    what = "HEAP " + HEAP_OPCODE_NAMES[opcode]
    flags = HeapUpdate.unpack(main_data, what).flags
    out: list[tuple[int, int]] = []
    if flags & XLH_UPDATE_OLD_ALL_VISIBLE_CLEARED:
        # Block 1 is the old page only when it differs from the new page (block 0).
        old = block_numbers.get(1)
        out.append((_block(block_numbers, 0, what) if old is None else old, VISIBILITYMAP_VALID_BITS))
    if flags & XLH_UPDATE_NEW_ALL_VISIBLE_CLEARED:
        new = _block(block_numbers, 0, what)
        if not (out and out[0][0] == new):  # same page: cleared once
            out.append((new, VISIBILITYMAP_VALID_BITS))
    return out
