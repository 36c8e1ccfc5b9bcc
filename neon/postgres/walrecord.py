"""`decode_record`: the structure of one reassembled XLogRecord (spec §2, §3).

Header fields, block references (fork, flags, relation, block, image with hole and PG15
compression, will_init/apply), main data, origin and top-level xid. Payload bytes stay in the
record; blocks and main data refer to them by offset so decoding copies nothing.
"""

from __future__ import annotations

import struct

import lz4.block
import zstandard

from neon.postgres.constants import (
    BKPBLOCK_HAS_DATA,
    BKPBLOCK_HAS_IMAGE,
    BKPBLOCK_SAME_REL,
    BKPBLOCK_WILL_INIT,
    BKPIMAGE_APPLY,
    BKPIMAGE_COMPRESS_LZ4,
    BKPIMAGE_COMPRESS_PGLZ,
    BKPIMAGE_COMPRESS_ZSTD,
    BKPIMAGE_COMPRESSED,
    BKPIMAGE_HAS_HOLE,
    BLCKSZ,
    SIZE_OF_XLOG_RECORD,
    XLR_BLOCK_ID_DATA_LONG,
    XLR_BLOCK_ID_DATA_SHORT,
    XLR_BLOCK_ID_ORIGIN,
    XLR_BLOCK_ID_TOPLEVEL_XID,
    XLR_MAX_BLOCK_ID,
)
from neon.postgres.errors import WalDecodeError
from neon.postgres.pglz import PglzError, pglz_decompress

_rec_hdr = struct.Struct("<IIQBB").unpack_from
_u16 = struct.Struct("<H").unpack_from
_u32 = struct.Struct("<I").unpack_from
_img_hdr = struct.Struct("<HHB").unpack_from
_rnode_blk = struct.Struct("<IIII").unpack_from

_zstd = zstandard.ZstdDecompressor()


class DecodedBlock:
    """One block reference of a record."""

    __slots__ = (
        "bimg_info",
        "blkno",
        "block_id",
        "data_len",
        "data_off",
        "flags",
        "forknum",
        "hole_length",
        "hole_offset",
        "image_len",
        "image_off",
        "rel",
    )

    def __init__(self) -> None:
        self.image_len = 0
        self.hole_offset = 0
        self.hole_length = 0
        self.bimg_info = 0
        self.image_off = 0
        self.data_off = 0

    # rel = (spcNode, dbNode, relNode)
    block_id: int
    flags: int
    forknum: int
    data_len: int
    rel: tuple[int, int, int]
    blkno: int

    @property
    def has_image(self) -> bool:
        return bool(self.flags & BKPBLOCK_HAS_IMAGE)

    @property
    def apply_image(self) -> bool:
        return bool(self.flags & BKPBLOCK_HAS_IMAGE) and bool(self.bimg_info & BKPIMAGE_APPLY)

    @property
    def has_data(self) -> bool:
        return bool(self.flags & BKPBLOCK_HAS_DATA)

    @property
    def will_init(self) -> bool:
        return bool(self.flags & BKPBLOCK_WILL_INIT)

    @property
    def image_compressed(self) -> bool:
        return bool(self.bimg_info & BKPIMAGE_COMPRESSED)

    def __repr__(self) -> str:
        spc, db, rel = self.rel
        return (
            f"DecodedBlock(id={self.block_id}, rel={spc}/{db}/{rel}, fork={self.forknum}, blk={self.blkno}, "
            f"image={self.has_image}, apply={self.apply_image}, will_init={self.will_init}, data={self.data_len})"
        )


class DecodedRecord:
    """A parsed XLogRecord. `record` holds the bytes; blocks and main data point into it."""

    __slots__ = (
        "blocks",
        "info",
        "main_data_len",
        "main_data_off",
        "origin",
        "prev",
        "record",
        "rmid",
        "toplevel_xid",
        "tot_len",
        "xid",
    )

    record: bytes
    tot_len: int
    xid: int
    prev: int
    info: int
    rmid: int
    blocks: list[DecodedBlock]
    main_data_off: int
    main_data_len: int
    origin: int | None
    toplevel_xid: int | None

    @property
    def main_data(self) -> bytes:
        return self.record[self.main_data_off : self.main_data_off + self.main_data_len]

    def block_data(self, blk: DecodedBlock) -> bytes:
        return self.record[blk.data_off : blk.data_off + blk.data_len]

    def block_image_bytes(self, blk: DecodedBlock) -> bytes:
        """The image bytes as stored in the record (hole removed, maybe compressed)."""
        return self.record[blk.image_off : blk.image_off + blk.image_len]

    def block_image(self, blk: DecodedBlock) -> bytes:
        """The full 8192-byte page image of a block reference (spec §3.7)."""
        return restore_image(self, blk)

    def block(self, block_id: int) -> DecodedBlock | None:
        for b in self.blocks:
            if b.block_id == block_id:
                return b
        return None


def decode_record(record: bytes, lsn: int | None = None) -> DecodedRecord:
    """Parse the block references and data headers of a complete record (its CRC already checked)."""
    tot_len = len(record)
    if tot_len < SIZE_OF_XLOG_RECORD:
        raise WalDecodeError(f"record too short: {tot_len} bytes", lsn)
    hdr_len, xid, prev, info, rmid = _rec_hdr(record, 0)
    if hdr_len != tot_len:
        raise WalDecodeError(f"record length {hdr_len} in header, {tot_len} bytes given", lsn)
    r = DecodedRecord()
    r.record = record
    r.tot_len = tot_len
    r.xid = xid
    r.prev = prev
    r.info = info
    r.rmid = rmid
    r.origin = None
    r.toplevel_xid = None
    blocks: list[DecodedBlock] = []
    r.blocks = blocks
    main_len = 0
    pos = SIZE_OF_XLOG_RECORD
    payload = 0  # bytes of images, block data and main data announced by the headers
    last_id = -1
    rel: tuple[int, int, int] | None = None
    try:
        while pos < tot_len - payload:
            block_id = record[pos]
            pos += 1
            if block_id == XLR_BLOCK_ID_DATA_SHORT:
                main_len = record[pos]
                pos += 1
                break  # by convention the last header
            if block_id == XLR_BLOCK_ID_DATA_LONG:
                main_len = _u32(record, pos)[0]
                pos += 4
                break
            if block_id == XLR_BLOCK_ID_ORIGIN:
                r.origin = _u16(record, pos)[0]
                pos += 2
                continue
            if block_id == XLR_BLOCK_ID_TOPLEVEL_XID:
                r.toplevel_xid = _u32(record, pos)[0]
                pos += 4
                continue
            if block_id > XLR_MAX_BLOCK_ID:
                raise WalDecodeError(f"invalid block_id {block_id}", lsn)
            if block_id <= last_id:
                raise WalDecodeError(f"out-of-order block_id {block_id}", lsn)
            last_id = block_id
            b = DecodedBlock()
            b.block_id = block_id
            fork_flags = record[pos]
            b.flags = fork_flags
            b.forknum = fork_flags & 0x0F
            data_len = _u16(record, pos + 1)[0]
            b.data_len = data_len
            pos += 3
            if fork_flags & BKPBLOCK_HAS_DATA:
                if data_len == 0:
                    raise WalDecodeError("BKPBLOCK_HAS_DATA set, but no data included", lsn)
            elif data_len:
                raise WalDecodeError(f"BKPBLOCK_HAS_DATA not set, but data length is {data_len}", lsn)
            payload += data_len
            if fork_flags & BKPBLOCK_HAS_IMAGE:
                image_len, hole_offset, bimg_info = _img_hdr(record, pos)
                pos += 5
                b.image_len = image_len
                b.hole_offset = hole_offset
                b.bimg_info = bimg_info
                compressed = bimg_info & BKPIMAGE_COMPRESSED
                if bimg_info & BKPIMAGE_HAS_HOLE:
                    if compressed:
                        hole_length = _u16(record, pos)[0]
                        pos += 2
                    else:
                        hole_length = BLCKSZ - image_len
                    if hole_offset == 0 or hole_length == 0 or image_len == BLCKSZ:
                        raise WalDecodeError(
                            f"BKPIMAGE_HAS_HOLE set, but hole offset {hole_offset} length {hole_length} "
                            f"block image length {image_len}",
                            lsn,
                        )
                    if hole_offset + hole_length > BLCKSZ:
                        raise WalDecodeError(f"image hole {hole_offset}+{hole_length} beyond the page", lsn)
                    b.hole_length = hole_length
                else:
                    if hole_offset != 0:
                        raise WalDecodeError(f"BKPIMAGE_HAS_HOLE not set, but hole offset {hole_offset}", lsn)
                    if not compressed and image_len != BLCKSZ:
                        raise WalDecodeError(f"image without hole has length {image_len}", lsn)
                if compressed and image_len >= BLCKSZ - b.hole_length:
                    raise WalDecodeError(f"compressed image has length {image_len}", lsn)
                if image_len == 0:
                    raise WalDecodeError("block image of zero length", lsn)
                payload += image_len
            if fork_flags & BKPBLOCK_SAME_REL:
                if rel is None:
                    raise WalDecodeError("BKPBLOCK_SAME_REL set but no previous rel", lsn)
                b.rel = rel
                b.blkno = _u32(record, pos)[0]
                pos += 4
            else:
                spc, db, relnode, blkno = _rnode_blk(record, pos)
                pos += 16
                rel = (spc, db, relnode)
                b.rel = rel
                b.blkno = blkno
            blocks.append(b)
    except (IndexError, struct.error):
        raise WalDecodeError("record header area truncated", lsn) from None
    # Payloads follow all headers: per block image then data, then the main data.
    if pos + payload + main_len != tot_len:
        raise WalDecodeError(
            f"record with invalid length: headers end at {pos}, payload {payload + main_len}, total {tot_len}",
            lsn,
        )
    for b in blocks:
        if b.flags & BKPBLOCK_HAS_IMAGE:
            b.image_off = pos
            pos += b.image_len
        if b.data_len:
            b.data_off = pos
            pos += b.data_len
    r.main_data_off = pos
    r.main_data_len = main_len
    return r


def restore_image(rec: DecodedRecord, blk: DecodedBlock) -> bytes:
    """Rebuild the 8192-byte page from a block's stored image (decompress, refill the hole)."""
    if not blk.flags & BKPBLOCK_HAS_IMAGE:
        raise WalDecodeError(f"block {blk.block_id} has no image")
    data = rec.block_image_bytes(blk)
    want = BLCKSZ - blk.hole_length
    info = blk.bimg_info
    if info & BKPIMAGE_COMPRESSED:
        try:
            if info & BKPIMAGE_COMPRESS_PGLZ:
                data = pglz_decompress(data, want)
            elif info & BKPIMAGE_COMPRESS_LZ4:
                data = lz4.block.decompress(data, uncompressed_size=want)
            elif info & BKPIMAGE_COMPRESS_ZSTD:
                data = _zstd.decompress(data, max_output_size=want)
        except (PglzError, lz4.block.LZ4BlockError, zstandard.ZstdError) as e:
            raise WalDecodeError(f"could not decompress image of block {blk.block_id}: {e}") from None
    if len(data) != want:
        raise WalDecodeError(f"image of block {blk.block_id} is {len(data)} bytes, expected {want}")
    if blk.hole_length:
        return data[: blk.hole_offset] + bytes(blk.hole_length) + data[blk.hole_offset :]
    return bytes(data)
