"""WalStreamDecoder on crafted WAL: chunking, page/segment crossings, switch, overwrite, bad input."""

from __future__ import annotations

import contextlib
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neon.postgres import waldecoder
from neon.postgres.constants import (
    RM_LOGICALMSG_ID,
    RM_XLOG_ID,
    XLOG_BLCKSZ,
    XLP_BKP_REMOVABLE,
    XLP_FIRST_IS_OVERWRITE_CONTRECORD,
)
from neon.postgres.errors import WalDecodeError
from neon.postgres.pglz import PglzError, pglz_decompress
from neon.postgres.waldecoder import WalStreamDecoder
from neon.postgres.walformat import encode_record
from neon.postgres.walrecord import decode_record
from neon.postgres.walwriter import WalWriter

SEG = 1 << 20  # the smallest segment size keeps crafted WAL small
SYSID = 0x6B07D87C94DC8ED8
START = 3 * SEG + 40


def make_wal(sizes: list[int], start: int = START, seed: int = 1) -> tuple[bytes, int, list[tuple[int, int, bytes]]]:
    """WAL holding one LogicalMessage-rmgr record per size; returns (bytes from the start's page,
    page start LSN, [(start, end, record)])."""
    rnd = random.Random(seed)
    w = WalWriter(start, sysid=SYSID, seg_size=SEG)
    out = []
    prev = 0
    for n in sizes:
        rec = encode_record(
            xid=rnd.randrange(1 << 32), prev=prev, info=0, rmid=RM_LOGICALMSG_ID, main_data=rnd.randbytes(n)
        )
        s, e = w.append(rec)
        out.append((s, e, rec))
        prev = s
    return w.bytes_from(w.start), w.start, out


@pytest.fixture(params=[False, True], ids=["python", "native"])
def native(request: pytest.FixtureRequest) -> bool:
    if request.param and not waldecoder.NATIVE:
        pytest.skip("native scanner not built")
    return request.param


def decode(
    data: bytes, lsn: int, chunks: list[int] | None = None, native: bool = False, **kw: object
) -> list[tuple[int, int, bytes]]:
    dec = WalStreamDecoder(lsn, seg_size=SEG, native=native, **kw)  # type: ignore[arg-type]
    got = []
    pos = 0
    for n in chunks or [len(data)]:
        dec.feed(data[pos : pos + n])
        pos += n
        got.extend(dec.records())
    dec.feed(data[pos:])
    got.extend(dec.records())
    return got


SIZES = [8115, 10, 100, 8000, 30, 20000, 8150, 8158, 3, 70000, 5, 2000000, 40, 8166, 1]


def test_round_trip_and_shapes(native: bool) -> None:
    data, page, recs = make_wal(SIZES)
    got = decode(data, page, native=native)
    assert got == recs
    # The crafted WAL covers the shapes the decoder must handle.
    assert any(s // SEG != (e - 1) // SEG for s, e, _ in recs)
    assert any(XLOG_BLCKSZ - s % XLOG_BLCKSZ < 24 for s, _, _ in recs)
    for s, e, rec in got:
        r = decode_record(rec, s)
        assert r.main_data_len == len(rec) - 24 - (2 if r.main_data_len < 256 else 5)
        assert e % 8 == 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=1, max_value=40000), min_size=1, max_size=40), st.data())
def test_any_chunking_gives_the_same_records(sizes: list[int], data: st.DataObject) -> None:
    wal, page, recs = make_wal(sizes)
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=9000), max_size=30))
    assert decode(wal, page, cuts) == recs
    if waldecoder.NATIVE:
        assert decode(wal, page, cuts, native=True) == recs


def test_start_at_record_with_prev_check(native: bool) -> None:
    data, page, recs = make_wal(SIZES)
    s1 = recs[3][0]
    got = decode(data[s1 - page :], s1, native=native, prev_lsn=recs[2][0])
    assert got == recs[3:]
    with pytest.raises(WalDecodeError, match="prev-link"):
        decode(data[s1 - page :], s1, native=native, prev_lsn=recs[1][0])


def test_start_at_page_boundary_skips_a_continuation(native: bool) -> None:
    data, page, recs = make_wal(SIZES)
    # A page inside the 2 MB record: every record starting after it is found.
    big_start = next(s for s, e, r in recs if len(r) > 1000000)
    boundary = (big_start // XLOG_BLCKSZ + 5) * XLOG_BLCKSZ
    got = decode(data[boundary - page :], boundary, native=native)
    assert got == [r for r in recs if r[0] > boundary]


def test_switch_skips_to_next_segment(native: bool) -> None:
    w = WalWriter(START, sysid=SYSID, seg_size=SEG)
    a = encode_record(xid=1, prev=0, info=0, rmid=RM_LOGICALMSG_ID, main_data=b"a" * 50)
    sa, _ = w.append(a)
    sw = encode_record(xid=0, prev=sa, info=0x40, rmid=RM_XLOG_ID)
    ss, _ = w.append(sw)
    data = bytearray(w.bytes_from(w.start))
    # The tail of the segment is zeros (page headers included), then the next segment.
    seg_end = (START // SEG + 1) * SEG
    data += bytes(seg_end - w.start - len(data))
    w2 = WalWriter(seg_end, sysid=SYSID, seg_size=SEG)
    b = encode_record(xid=2, prev=ss, info=0, rmid=RM_LOGICALMSG_ID, main_data=b"b" * 20)
    sb, eb = w2.append(b)
    data += w2.bytes_from(seg_end)
    got = decode(bytes(data), w.start, [100, 5000, 300000], native=native)
    assert [(s, e) for s, e, _ in got] == [(sa, got[0][1]), (ss, seg_end), (sb, eb)]
    assert sb == seg_end + 40


def test_overwrite_contrecord_drops_the_lost_record(native: bool) -> None:
    w = WalWriter(START, sysid=SYSID, seg_size=SEG)
    a = encode_record(xid=1, prev=0, info=0, rmid=RM_LOGICALMSG_ID, main_data=b"a" * 7000)
    sa, _ = w.append(a)
    broken = encode_record(xid=1, prev=sa, info=0, rmid=RM_LOGICALMSG_ID, main_data=b"b" * 20000)
    sb, _ = w.append(broken)
    lost_page = (sb // XLOG_BLCKSZ + 1) * XLOG_BLCKSZ
    data = w.bytes_from(w.start)[: lost_page - w.start]
    w2 = WalWriter(
        lost_page, sysid=SYSID, seg_size=SEG, page_info=XLP_BKP_REMOVABLE | XLP_FIRST_IS_OVERWRITE_CONTRECORD
    )
    ow = encode_record(xid=0, prev=sa, info=0xD0, rmid=RM_XLOG_ID, main_data=struct.pack("<Qq", sb, 0))
    so, _ = w2.append(ow)
    got = decode(data + w2.bytes_from(lost_page), w.start, native=native)
    assert [g[0] for g in got] == [sa, so]
    assert got[1][2] == ow and so == lost_page + 24


def test_missing_contrecord_flag_is_an_error(native: bool) -> None:
    data, page, recs = make_wal([20000])
    bad = bytearray(data)
    s = recs[0][0]
    next_page = (s // XLOG_BLCKSZ + 1) * XLOG_BLCKSZ - page
    struct.pack_into("<H", bad, next_page + 2, XLP_BKP_REMOVABLE)  # drop XLP_FIRST_IS_CONTRECORD
    with pytest.raises(WalDecodeError, match="contrecord") as ei:
        decode(bytes(bad), page, native=native)
    assert ei.value.lsn == next_page + page


def test_error_is_sticky_and_names_lsn() -> None:
    data, page, recs = make_wal([100, 100])
    bad = bytearray(data)
    bad[recs[1][0] - page + 30] ^= 0xFF
    dec = WalStreamDecoder(page, seg_size=SEG)
    dec.feed(bytes(bad))
    it = dec.records()
    assert next(it)[2] == recs[0][2]
    with pytest.raises(WalDecodeError, match="checksum") as ei:
        next(it)
    assert ei.value.lsn == recs[1][0]
    assert "0/" in str(ei.value)
    with pytest.raises(WalDecodeError):
        dec.poll()


BASE_WAL, BASE_PAGE, BASE_RECS = make_wal([10, 300, 9000, 60, 50000, 8150, 12, 8158, 1000, 20000, 7], seed=7)


def _check_prefix(data: bytes) -> None:
    """Decoding damaged WAL yields only original records, then at most a WalDecodeError,
    and both implementations agree on where and why it stops."""
    results = [_damaged(data, False)]
    if waldecoder.NATIVE:
        results.append(_damaged(data, True))
        assert results[0] == results[1]


def _damaged(data: bytes, native: bool) -> tuple[list[int], str | None]:
    originals = {s: (e, r) for s, e, r in BASE_RECS}
    dec = WalStreamDecoder(BASE_PAGE, seg_size=SEG, native=native)
    got = []
    error = None
    try:
        for pos in range(0, len(data), 4096):
            dec.feed(data[pos : pos + 4096])
            got.extend(dec.records())
    except WalDecodeError as e:
        assert e.lsn is not None
        error = str(e)
    for s, e, r in got:
        assert originals[s] == (e, r)
    assert [g[0] for g in got] == [s for s, _, _ in BASE_RECS[: len(got)]]
    return [g[0] for g in got], error


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=len(BASE_WAL) - 1), st.integers(min_value=0, max_value=7))
def test_bit_flip_never_yields_a_wrong_record(offset: int, bit: int) -> None:
    bad = bytearray(BASE_WAL)
    bad[offset] ^= 1 << bit
    _check_prefix(bytes(bad))


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=len(BASE_WAL)))
def test_truncation_yields_a_prefix(n: int) -> None:
    _check_prefix(BASE_WAL[:n])


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=20000), st.sampled_from([0, 24, 40, 4096, 8192 - 8]))
def test_random_bytes_only_raise_decoder_errors(junk: bytes, at: int) -> None:
    # Random bytes after a valid header prefix, or on their own.
    data = BASE_WAL[:at] + junk
    _check_prefix(data)
    dec = WalStreamDecoder(0, seg_size=SEG)
    dec.feed(junk)
    with contextlib.suppress(WalDecodeError):
        list(dec.records())


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=300), st.integers(min_value=0, max_value=255))
def test_decode_record_on_garbage_raises_only_its_error(body: bytes, rmid: int) -> None:
    rec = struct.pack("<IIQBB2xI", 24 + len(body), 0, 0, 0, rmid, 0) + body
    try:
        r = decode_record(rec)
    except WalDecodeError:
        return
    for b in r.blocks:
        if b.has_image:
            try:
                page = r.block_image(b)
            except WalDecodeError:
                continue
            assert len(page) == 8192


def test_pglz_literals_and_matches() -> None:
    # ctrl 0b0000_0010: literal 'a', then a match of length 5 at offset 1 ("aaaaa"), then literals.
    src = bytes([0b0000_0010]) + b"a" + bytes([0x02, 0x01]) + b"bcdefg"
    assert pglz_decompress(src, 12) == b"aaaaaabcdefg"
    assert pglz_decompress(bytes([0b10]) + b"a" + bytes([0x02, 0x01]), 6) == b"aaaaaa"
    with pytest.raises(PglzError):
        pglz_decompress(bytes([0b10]) + b"a" + bytes([0x02, 0x05]), 6)
    with pytest.raises(PglzError):
        pglz_decompress(b"\x00abc", 10)


def test_native_scanner_is_built() -> None:
    """CI must exercise the C fast path: make setup builds it."""
    import os

    if os.environ.get("NEON_NO_NATIVE"):
        pytest.skip("native code disabled")
    assert waldecoder.NATIVE
