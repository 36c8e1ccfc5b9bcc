"""Reading WAL segment files in order: the decoder fed from `pg_wal`-style files."""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

from neon.postgres.constants import DEFAULT_WAL_SEGMENT_SIZE, SIZE_OF_XLOG_LONG_PHD, XLOG_PAGE_MAGIC
from neon.postgres.errors import WalDecodeError
from neon.postgres.waldecoder import WalRecordBytes, WalStreamDecoder
from neon.postgres.walformat import parse_wal_file_name

READ_CHUNK = 1 << 20


def segment_size_of(path: str | os.PathLike[str]) -> int:
    """The segment size recorded in a segment file's long page header (xlp_seg_size)."""
    with open(path, "rb") as f:
        head = f.read(SIZE_OF_XLOG_LONG_PHD)
    if len(head) < SIZE_OF_XLOG_LONG_PHD or struct.unpack_from("<H", head)[0] != XLOG_PAGE_MAGIC:
        return DEFAULT_WAL_SEGMENT_SIZE
    seg_size = struct.unpack_from("<I", head, 32)[0]
    if seg_size < 1 << 20 or seg_size > 1 << 30 or seg_size & (seg_size - 1):
        return DEFAULT_WAL_SEGMENT_SIZE
    return seg_size


def read_wal_files(
    paths: Sequence[str | os.PathLike[str]],
    *,
    start_lsn: int | None = None,
    prev_lsn: int | None = None,
    seg_size: int | None = None,
    native: bool | None = None,
) -> Iterator[WalRecordBytes]:
    """Records from consecutive segment files (named as in pg_wal), from the first file's start
    or from `start_lsn` inside it. The first invalid record raises WalDecodeError naming the
    LSN and the file that holds it."""
    for batch in read_wal_file_batches(paths, start_lsn=start_lsn, prev_lsn=prev_lsn, seg_size=seg_size, native=native):
        yield from batch


def read_wal_file_batches(
    paths: Sequence[str | os.PathLike[str]],
    *,
    start_lsn: int | None = None,
    prev_lsn: int | None = None,
    seg_size: int | None = None,
    native: bool | None = None,
) -> Iterator[list[WalRecordBytes]]:
    """`read_wal_files` in lists of records (for batch consumers such as WAL ingest)."""
    files = [Path(p) for p in paths]
    if not files:
        return
    seg_size = seg_size or segment_size_of(files[0])
    names: dict[int, Path] = {}
    ordered: list[tuple[int, Path]] = []
    for p in files:
        try:
            _tli, segno = parse_wal_file_name(p.name, seg_size)
        except ValueError as e:
            raise WalDecodeError(str(e), None, str(p)) from None
        ordered.append((segno, p))
        names[segno] = p
    ordered.sort()
    for (a, pa), (b, _pb) in itertools.pairwise(ordered):
        if b != a + 1:
            raise WalDecodeError(f"WAL files are not consecutive: gap after {pa.name}", None, str(pa))
    first_segno = ordered[0][0]
    seg_start = first_segno * seg_size
    begin = seg_start if start_lsn is None else start_lsn
    if not seg_start <= begin < seg_start + seg_size:
        raise WalDecodeError("start LSN is not in the first WAL file", begin, str(ordered[0][1]))
    dec = WalStreamDecoder(begin, seg_size=seg_size, prev_lsn=prev_lsn, native=native)
    try:
        for segno, path in ordered:
            with open(path, "rb") as f:
                if segno == first_segno and begin > seg_start:
                    f.seek(begin - seg_start)
                while chunk := f.read(READ_CHUNK):
                    dec.feed(chunk)
                    yield from dec.record_batches()
    except WalDecodeError as e:
        if e.lsn is not None and e.source is None:
            e.source = str(names.get(e.lsn // seg_size, ordered[-1][1]))
        raise
    if dec.in_record or dec.pos < (ordered[-1][0] + 1) * seg_size:
        # The files ended inside a record or before the end of the last segment.
        raise WalDecodeError("WAL ends before the end of the last segment", dec.pos, str(ordered[-1][1]))
