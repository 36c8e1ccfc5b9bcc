"""Data pages (storage/bufpage.h, checksum_impl.h; spec §5) and the block arithmetic of the
visibility map and free space map forks (spec §6).

Owns: the 24-byte PageHeaderData (pd_lsn is two little-endian uint32 halves, *high half first*),
PageInit, line pointers, the data checksum, VM bit addressing and truncation, FSM logical to
physical block mapping and truncation sizes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from neon.postgres.constants import BLCKSZ, maxalign
from neon.postgres.errors import PgFormatError

SIZE_OF_PAGE_HEADER_DATA = 24
PG_PAGE_LAYOUT_VERSION = 4
PD_HAS_FREE_LINES = 0x0001
PD_PAGE_FULL = 0x0002
PD_ALL_VISIBLE = 0x0004
PD_VALID_FLAG_BITS = 0x0007

PAGE_HEADER = struct.Struct("<IIHHHHHHI")
_LSN = struct.Struct("<II")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_PD_CHECKSUM_OFFSET = 8

# Line pointers (ItemIdData): lp_off:15, lp_flags:2, lp_len:15 packed into a little-endian uint32.
SIZE_OF_ITEM_ID = 4
LP_UNUSED = 0
LP_NORMAL = 1
LP_REDIRECT = 2
LP_DEAD = 3


class PageError(PgFormatError):
    """A page of the wrong size, or an item/offset outside what its header describes."""


def _check_page(page: bytes | bytearray | memoryview) -> None:
    if len(page) != BLCKSZ:
        raise PageError(f"page is {len(page)} bytes, expected {BLCKSZ}")


# --- page header ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PageHeader:
    lsn: int
    checksum: int
    flags: int
    lower: int
    upper: int
    special: int
    pagesize_version: int
    prune_xid: int

    @classmethod
    def unpack(cls, page: bytes | bytearray | memoryview) -> PageHeader:
        if len(page) < SIZE_OF_PAGE_HEADER_DATA:
            raise PageError(f"page header needs {SIZE_OF_PAGE_HEADER_DATA} bytes, got {len(page)}")
        hi, lo, checksum, flags, lower, upper, special, psv, prune = PAGE_HEADER.unpack_from(page, 0)
        return cls((hi << 32) | lo, checksum, flags, lower, upper, special, psv, prune)

    def pack(self) -> bytes:
        try:
            return PAGE_HEADER.pack(
                self.lsn >> 32,
                self.lsn & 0xFFFFFFFF,
                self.checksum,
                self.flags,
                self.lower,
                self.upper,
                self.special,
                self.pagesize_version,
                self.prune_xid,
            )
        except struct.error as e:
            raise PageError(f"page header field out of range: {e}") from None

    @property
    def page_size(self) -> int:
        return self.pagesize_version & 0xFF00

    @property
    def layout_version(self) -> int:
        return self.pagesize_version & 0x00FF

    @property
    def is_new(self) -> bool:
        return self.upper == 0


def page_get_lsn(page: bytes | bytearray | memoryview) -> int:
    if len(page) < 8:
        raise PageError(f"page of {len(page)} bytes has no pd_lsn")
    hi, lo = _LSN.unpack_from(page, 0)
    return (hi << 32) | lo


def page_set_lsn(page: bytearray | memoryview, lsn: int) -> None:
    if len(page) < 8:
        raise PageError(f"page of {len(page)} bytes has no pd_lsn")
    if not 0 <= lsn < 1 << 64:
        raise PageError(f"LSN {lsn} out of range")
    _LSN.pack_into(page, 0, lsn >> 32, lsn & 0xFFFFFFFF)


def page_init(special_size: int = 0) -> bytearray:
    """An empty page as PageInit writes it: pd_lower 24, pd_upper = pd_special = end of the
    MAXALIGNed special space, layout version 4, everything else zero."""
    special = BLCKSZ - maxalign(special_size)
    if not SIZE_OF_PAGE_HEADER_DATA <= special <= BLCKSZ:
        raise PageError(f"special space of {special_size} bytes does not fit a page")
    page = bytearray(BLCKSZ)
    PAGE_HEADER.pack_into(
        page, 0, 0, 0, 0, 0, SIZE_OF_PAGE_HEADER_DATA, special, special, BLCKSZ | PG_PAGE_LAYOUT_VERSION, 0
    )
    return page


def page_is_new(page: bytes | bytearray | memoryview) -> bool:
    """PageIsNew: pd_upper == 0 (in practice an all-zero, never initialised page)."""
    if len(page) < SIZE_OF_PAGE_HEADER_DATA:
        raise PageError(f"page header needs {SIZE_OF_PAGE_HEADER_DATA} bytes, got {len(page)}")
    return _U16.unpack_from(page, 14)[0] == 0


# --- line pointers ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ItemId:
    off: int
    flags: int
    len: int

    @classmethod
    def unpack(cls, value: int) -> ItemId:
        return cls(value & 0x7FFF, (value >> 15) & 0x3, value >> 17)

    def pack(self) -> int:
        if not (0 <= self.off <= 0x7FFF and 0 <= self.flags <= 3 and 0 <= self.len <= 0x7FFF):
            raise PageError(f"line pointer out of range: {self!r}")
        return self.off | (self.flags << 15) | (self.len << 17)


def page_get_max_offset_number(page: bytes | bytearray | memoryview) -> int:
    """Number of line pointers: (pd_lower - 24) / 4, or 0 for a new page."""
    hdr = PageHeader.unpack(page)
    if hdr.lower <= SIZE_OF_PAGE_HEADER_DATA:
        return 0
    return (hdr.lower - SIZE_OF_PAGE_HEADER_DATA) // SIZE_OF_ITEM_ID


def page_get_item_id(page: bytes | bytearray | memoryview, offnum: int) -> ItemId:
    """Line pointer `offnum` (numbered from 1)."""
    _check_page(page)
    n = page_get_max_offset_number(page)
    if not 1 <= offnum <= n:
        raise PageError(f"offset number {offnum} outside 1..{n}")
    pos = SIZE_OF_PAGE_HEADER_DATA + (offnum - 1) * SIZE_OF_ITEM_ID
    return ItemId.unpack(_U32.unpack_from(page, pos)[0])


def page_item_ids(page: bytes | bytearray | memoryview) -> list[ItemId]:
    return [page_get_item_id(page, i) for i in range(1, page_get_max_offset_number(page) + 1)]


def page_get_item(page: bytes | bytearray | memoryview, offnum: int) -> bytes:
    """The tuple bytes line pointer `offnum` points at (empty for pointers without storage)."""
    iid = page_get_item_id(page, offnum)
    if iid.len == 0:
        return b""
    if iid.off + iid.len > BLCKSZ:
        raise PageError(f"line pointer {offnum} ({iid.off}+{iid.len}) runs past the page")
    return bytes(page[iid.off : iid.off + iid.len])


# --- data checksum (spec §5.3) ----------------------------------------------------------------
_N_SUMS = 32
_FNV_PRIME = 16777619
_CHECKSUM_BASE_OFFSETS = (
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
)  # fmt: skip
_PAGE_WORDS = struct.Struct(f"<{BLCKSZ // 4}I")


def page_checksum(page: bytes | bytearray | memoryview, blkno: int) -> int:
    """pd_checksum Postgres computes for `page` as block `blkno` of its fork (never 0).

    The stored pd_checksum is ignored (treated as zero), so this verifies a page read from disk
    as well as it stamps a new one.
    """
    _check_page(page)
    buf = bytearray(page)
    buf[_PD_CHECKSUM_OFFSET : _PD_CHECKSUM_OFFSET + 2] = b"\0\0"
    words = _PAGE_WORDS.unpack(buf)
    sums = list(_CHECKSUM_BASE_OFFSETS)
    mask = 0xFFFFFFFF
    # The page is processed as 64 rows of 32 words; lane j mixes word j of every row.
    for j in range(_N_SUMS):
        s = sums[j]
        for v in words[j::_N_SUMS]:
            t = s ^ v
            s = ((t * _FNV_PRIME) & mask) ^ (t >> 17)
        # Two extra rounds of zeros so every input bit affects every output bit.
        for _ in range(2):
            s = ((s * _FNV_PRIME) & mask) ^ (s >> 17)
        sums[j] = s
    result = 0
    for s in sums:
        result ^= s
    result ^= blkno & mask
    return (result % 65535) + 1


def page_get_checksum(page: bytes | bytearray | memoryview) -> int:
    if len(page) < SIZE_OF_PAGE_HEADER_DATA:
        raise PageError(f"page header needs {SIZE_OF_PAGE_HEADER_DATA} bytes, got {len(page)}")
    return _U16.unpack_from(page, _PD_CHECKSUM_OFFSET)[0]


def page_set_checksum(page: bytearray, blkno: int) -> None:
    """Stamp pd_checksum as the server does before writing a page of a `-k` cluster."""
    _U16.pack_into(page, _PD_CHECKSUM_OFFSET, page_checksum(page, blkno))


# --- fork truncation result -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ForkTruncation:
    """Outcome of truncating the heap to some size, for a VM or FSM fork."""

    nblocks: int
    """Blocks the fork keeps."""
    partial_block: int | None
    """The last kept block when part of it describes removed heap blocks and must be cleared."""


# --- visibility map (spec §6.1) ---------------------------------------------------------------
VISIBILITYMAP_ALL_VISIBLE = 0x01
VISIBILITYMAP_ALL_FROZEN = 0x02
VISIBILITYMAP_VALID_BITS = 0x03
VM_BITS_PER_HEAPBLOCK = 2
VM_HEAPBLOCKS_PER_BYTE = 4
VM_MAPSIZE = BLCKSZ - maxalign(SIZE_OF_PAGE_HEADER_DATA)  # 8168
VM_HEAPBLOCKS_PER_PAGE = VM_MAPSIZE * VM_HEAPBLOCKS_PER_BYTE  # 32672


def vm_block(heapblk: int) -> int:
    """VM fork block holding the bits of heap block `heapblk`."""
    return heapblk // VM_HEAPBLOCKS_PER_PAGE


def vm_byte_offset(heapblk: int) -> int:
    """Offset *in the VM page* (past its 24-byte header) of the byte holding `heapblk`'s bits."""
    return SIZE_OF_PAGE_HEADER_DATA + (heapblk % VM_HEAPBLOCKS_PER_PAGE) // VM_HEAPBLOCKS_PER_BYTE


def vm_bit_shift(heapblk: int) -> int:
    """Shift of the all-visible bit; all-frozen is the next bit up."""
    return VM_BITS_PER_HEAPBLOCK * (heapblk % VM_HEAPBLOCKS_PER_BYTE)


def vm_get_status(page: bytes | bytearray | memoryview, heapblk: int) -> int:
    """VISIBILITYMAP_* bits of `heapblk` from VM page `vm_block(heapblk)`."""
    _check_page(page)
    return (page[vm_byte_offset(heapblk)] >> vm_bit_shift(heapblk)) & VISIBILITYMAP_VALID_BITS


def vm_set_bits(page: bytearray, heapblk: int, flags: int) -> bool:
    """Set `flags` for `heapblk`; returns whether the page changed."""
    _check_page(page)
    if flags & ~VISIBILITYMAP_VALID_BITS:
        raise PageError(f"invalid visibility map flags {flags:#x}")
    off = vm_byte_offset(heapblk)
    new = page[off] | (flags << vm_bit_shift(heapblk))
    changed = new != page[off]
    page[off] = new
    return changed


def vm_clear_bits(page: bytearray, heapblk: int, flags: int = VISIBILITYMAP_VALID_BITS) -> bool:
    """Clear `flags` (by default both) for `heapblk`, as heap records do implicitly; returns
    whether the page changed."""
    _check_page(page)
    if flags & ~VISIBILITYMAP_VALID_BITS:
        raise PageError(f"invalid visibility map flags {flags:#x}")
    off = vm_byte_offset(heapblk)
    new = page[off] & ~(flags << vm_bit_shift(heapblk)) & 0xFF
    changed = new != page[off]
    page[off] = new
    return changed


def vm_truncation(heap_nblocks: int) -> ForkTruncation:
    """VM size after truncating the heap to `heap_nblocks` (visibilitymap_prepare_truncate)."""
    tb = heap_nblocks // VM_HEAPBLOCKS_PER_PAGE
    rest = heap_nblocks % VM_HEAPBLOCKS_PER_PAGE
    if rest == 0:
        return ForkTruncation(tb, None)
    return ForkTruncation(tb + 1, tb)


def vm_truncate_page(page: bytearray, heap_nblocks: int) -> None:
    """Clear, in VM page `vm_truncation(heap_nblocks).partial_block`, the bits of heap blocks
    >= `heap_nblocks`: later bytes become 0, the boundary byte keeps only its lower blocks."""
    _check_page(page)
    rest = heap_nblocks % VM_HEAPBLOCKS_PER_PAGE
    tbyte = SIZE_OF_PAGE_HEADER_DATA + rest // VM_HEAPBLOCKS_PER_BYTE
    toff = vm_bit_shift(heap_nblocks)
    page[tbyte + 1 :] = bytes(BLCKSZ - tbyte - 1)
    page[tbyte] &= (1 << toff) - 1


# --- free space map (spec §6.2) ---------------------------------------------------------------
FSM_NODES_PER_PAGE = BLCKSZ - maxalign(SIZE_OF_PAGE_HEADER_DATA) - 4  # 8164 (after fp_next_slot)
FSM_NON_LEAF_NODES_PER_PAGE = BLCKSZ // 2 - 1  # 4095
FSM_SLOTS_PER_PAGE = FSM_NODES_PER_PAGE - FSM_NON_LEAF_NODES_PER_PAGE  # 4069
FSM_TREE_DEPTH = 3
FSM_ROOT_LEVEL = FSM_TREE_DEPTH - 1
FSM_BOTTOM_LEVEL = 0
FSM_CATEGORY_SIZE = BLCKSZ // 256  # 32 bytes of free space per category step


def fsm_logical_to_physical(level: int, logpageno: int) -> int:
    """FSM fork block of the page at tree `level` (0 = leaves) with logical number `logpageno`.

    The fork is laid out depth-first: each upper page precedes the subtree it covers, so count
    the pages at every level up to and including the leaves below this page."""
    if not FSM_BOTTOM_LEVEL <= level <= FSM_ROOT_LEVEL or logpageno < 0:
        raise PageError(f"no FSM page at level {level}, logical page {logpageno}")
    leafno = logpageno * FSM_SLOTS_PER_PAGE**level
    pages = 0
    for _ in range(FSM_TREE_DEPTH):
        pages += leafno + 1
        leafno //= FSM_SLOTS_PER_PAGE
    return pages - level - 1


def fsm_heap_block_location(heapblk: int) -> tuple[int, int]:
    """(leaf logical page, slot) of heap block `heapblk`."""
    return heapblk // FSM_SLOTS_PER_PAGE, heapblk % FSM_SLOTS_PER_PAGE


def fsm_block_of_heap_block(heapblk: int) -> int:
    """Physical FSM block holding heap block `heapblk`'s leaf slot."""
    return fsm_logical_to_physical(FSM_BOTTOM_LEVEL, heapblk // FSM_SLOTS_PER_PAGE)


def fsm_truncation(heap_nblocks: int) -> ForkTruncation:
    """FSM size after truncating the heap to `heap_nblocks` (FreeSpaceMapPrepareTruncateRel).
    The partial leaf's slots >= the new size must be cleared; zeroing the whole page is also
    correct, since the FSM is only a hint."""
    leaf, slot = fsm_heap_block_location(heap_nblocks)
    phys = fsm_logical_to_physical(FSM_BOTTOM_LEVEL, leaf)
    if slot == 0:
        return ForkTruncation(phys, None)
    return ForkTruncation(phys + 1, phys)
