"""Unit tests of the pageserver key space, stored values and directory formats (spec pageserver §2-3).

Exact byte expectations below are worked out by hand from the bincode-BE rules of §0 and the
layouts of §2.3/§3.1-3.2, not produced by the code under test.
"""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from neon.pageserver import key as k
from neon.pageserver.directories import (
    AuxFilesDirectory,
    DbDirectory,
    DirectoryFormatError,
    RelDirectory,
    SlruSegmentDirectory,
    TwoPhaseDirectory,
    decode_nblocks,
    encode_nblocks,
)
from neon.pageserver.key import InvalidKeyError, Key, KeyRange
from neon.pageserver.value import (
    Image,
    ValueFormatError,
    WalRecord,
    decode_neon_record,
    decode_value,
    encode_neon_record,
    encode_value,
    will_init,
)
from neon.postgres.errors import PgFormatError
from neon.walredo.records import (
    BufferTag,
    ClearVisibilityMapFlags,
    ClogSetAborted,
    ClogSetCommitted,
    MultixactMembersCreate,
    MultixactOffsetCreate,
    PostgresRecord,
    SlruKind,
    SlruPage,
)

U32 = 0xFFFFFFFF
SPC, DB, REL = 1663, 5, 16384

u8s = st.integers(0, 0xFF)
u32s = st.integers(0, U32)
keys = st.builds(Key, u8s, u32s, u32s, u32s, u8s, u32s)


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


# --- Key forms ---------------------------------------------------------------------------------
def test_binary_and_hex_layout() -> None:
    key = Key(0x01, 0x02030405, 0x06070809, 0x0A0B0C0D, 0x0E, 0x0F101112)
    assert key.to_bytes() == h("01 02030405 06070809 0A0B0C0D 0E 0F101112")
    assert key.to_hex() == "0102030405060708090A0B0C0D0E0F101112"
    assert str(key) == key.to_hex()
    assert Key.MIN.to_hex() == "0" * 36
    assert Key.MAX.to_hex() == "F" * 36
    assert Key.from_hex("f" * 36) == Key.MAX  # lower case is accepted, as in Neon


@given(keys)
def test_binary_and_hex_round_trip(key: Key) -> None:
    raw = key.to_bytes()
    assert len(raw) == k.KEY_SIZE == 18
    assert Key.from_bytes(raw) == key
    text = key.to_hex()
    assert len(text) == 36 and text == text.upper()
    assert Key.from_hex(text) == key
    assert Key.from_int(key.to_int()) == key


@given(keys, keys)
def test_binary_order_is_key_order(a: Key, b: Key) -> None:
    assert (a < b) == (a.to_bytes() < b.to_bytes()) == (a.as_tuple() < b.as_tuple())
    assert (a < b) == (a.to_hex() < b.to_hex()) == (a.to_int() < b.to_int())
    if a == b:
        assert hash(a) == hash(b) and a.to_bytes() == b.to_bytes()


@pytest.mark.parametrize(
    "bad",
    ["", "0" * 35, "0" * 37, "G" + "0" * 35, "0" * 34 + " 0", "+" + "0" * 35, "0" * 34 + "\u0660\u0660"],
)
def test_bad_hex_rejected(bad: str) -> None:
    with pytest.raises(InvalidKeyError):
        Key.from_hex(bad)


@pytest.mark.parametrize("n", [0, 17, 19])
def test_bad_binary_length_rejected(n: int) -> None:
    with pytest.raises(InvalidKeyError):
        Key.from_bytes(b"\x00" * n)


@pytest.mark.parametrize(
    "fields", [(256, 0, 0, 0, 0, 0), (0, 1 << 32, 0, 0, 0, 0), (0, 0, 0, 0, 256, 0), (0, 0, 0, 0, 0, -1)]
)
def test_field_out_of_range_rejected(fields: tuple[int, ...]) -> None:
    with pytest.raises(InvalidKeyError):
        Key(*fields)


def test_next_carries() -> None:
    assert Key(0, 1, 2, 3, 4, 5).next() == Key(0, 1, 2, 3, 4, 6)
    assert Key(0, 1, 2, 3, 4, U32).next() == Key(0, 1, 2, 3, 5, 0)
    assert Key(0, 1, 2, 3, 0xFF, U32).next() == Key(0, 1, 2, 4, 0, 0)
    assert Key(0, 1, 2, U32, 0xFF, U32).next() == Key(0, 1, 3, 0, 0, 0)
    assert Key(0, 1, U32, U32, 0xFF, U32).next() == Key(0, 2, 0, 0, 0, 0)
    assert Key(0, U32, U32, U32, 0xFF, U32).next() == Key(1, 0, 0, 0, 0, 0)
    with pytest.raises(InvalidKeyError):
        Key.MAX.next()


@given(keys)
def test_next_is_successor(key: Key) -> None:
    if key == Key.MAX:
        return
    nxt = key.next()
    assert key < nxt
    assert nxt.to_int() == key.to_int() + 1


# --- the key table -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "fields"),
    [
        (k.dbdir_key(), (0, 0, 0, 0, 0, 0)),
        (k.relmap_file_key(SPC, DB), (0, SPC, DB, 0, 0, 0)),
        (k.relmap_file_key(1664, 0), (0, 1664, 0, 0, 0, 0)),
        (k.rel_dir_key(SPC, DB), (0, SPC, DB, 0, 0, 1)),
        (k.rel_block_key(SPC, DB, REL, 2, 7), (0, SPC, DB, REL, 2, 7)),
        (k.rel_size_key(SPC, DB, REL, 1), (0, SPC, DB, REL, 1, U32)),
        (k.slru_dir_key(SlruKind.CLOG), (1, 0, 0, 0, 0, 0)),
        (k.slru_dir_key(SlruKind.MULTIXACT_MEMBERS), (1, 1, 0, 0, 0, 0)),
        (k.slru_dir_key(SlruKind.MULTIXACT_OFFSETS), (1, 2, 0, 0, 0, 0)),
        (k.slru_block_key(SlruKind.CLOG, 3, 31), (1, 0, 1, 3, 0, 31)),
        (k.slru_block_key(SlruKind.MULTIXACT_OFFSETS, 0, 0), (1, 2, 1, 0, 0, 0)),
        (k.slru_pageno_key(SlruKind.MULTIXACT_MEMBERS, 70), (1, 1, 1, 2, 0, 6)),
        (k.slru_segment_size_key(SlruKind.MULTIXACT_MEMBERS, 9), (1, 1, 1, 9, 0, U32)),
        (k.twophase_dir_key(), (2, 0, 0, 0, 0, 0)),
        (k.twophase_file_key(1234), (2, 0, 0, 0, 0, 1234)),
        (k.controlfile_key(), (3, 0, 0, 0, 0, 0)),
        (k.checkpoint_key(), (3, 0, 0, 0, 0, 1)),
        (k.aux_files_key(), (3, 0, 0, 0, 0, 2)),
    ],
)
def test_key_table_rows(key: Key, fields: tuple[int, ...]) -> None:
    assert key.as_tuple() == fields


def test_relnode_zero_rejected() -> None:
    for make in (
        lambda: k.rel_block_key(SPC, DB, 0, 0, 0),
        lambda: k.rel_size_key(SPC, DB, 0, 0),
        lambda: k.rel_fork_range(SPC, DB, 0, 0),
        lambda: k.buffer_tag_key(BufferTag(SPC, DB, 0, 0, 0)),
        lambda: k.rel_dir_key(SPC, DB).to_buffer_tag(),
    ):
        with pytest.raises(InvalidKeyError, match="invalid relnode"):
            make()


def test_other_constructor_errors() -> None:
    with pytest.raises(InvalidKeyError):
        k.rel_block_key(SPC, DB, REL, 0, U32)  # InvalidBlockNumber is the size key's slot
    with pytest.raises(InvalidKeyError):
        k.slru_block_key(SlruKind.CLOG, 0, 32)
    with pytest.raises(InvalidKeyError):
        k.twophase_file_key(0)
    with pytest.raises(InvalidKeyError):
        k.rel_block_key(SPC, DB, REL, 0, 1 << 32)


def test_size_key_sorts_right_after_last_block() -> None:
    last = k.rel_block_key(SPC, DB, REL, 0, U32 - 1)
    size = k.rel_size_key(SPC, DB, REL, 0)
    assert last < size and last.next() == size
    assert size < k.rel_block_key(SPC, DB, REL, 1, 0)  # the next fork
    seg_last = k.slru_block_key(SlruKind.CLOG, 4, 31)
    seg_size = k.slru_segment_size_key(SlruKind.CLOG, 4)
    assert seg_last < seg_size < k.slru_block_key(SlruKind.CLOG, 5, 0)
    assert k.slru_segment_range(SlruKind.CLOG, 4).contains(seg_size)


def test_relmap_and_reldir_sort_before_rel_blocks() -> None:
    relmap, reldir = k.relmap_file_key(SPC, DB), k.rel_dir_key(SPC, DB)
    first_block = k.rel_block_key(SPC, DB, 1, 0, 0)
    assert relmap < reldir < first_block
    assert k.dbdir_key() <= relmap
    assert k.rel_size_key(SPC, DB, U32, 3) < k.relmap_file_key(SPC, DB + 1)


def test_collect_keyspace_order_is_key_order() -> None:
    # §2.4 lists keys namespace by namespace; in key order that is the same sequence.
    listed = [k.dbdir_key(), k.relmap_file_key(SPC, DB), k.rel_dir_key(SPC, DB)]
    listed += [k.rel_block_key(SPC, DB, REL, 0, b) for b in range(3)] + [k.rel_size_key(SPC, DB, REL, 0)]
    for kind in k.SLRU_KINDS_IN_KEY_ORDER:
        listed += [k.slru_dir_key(kind), k.slru_block_key(kind, 0, 0), k.slru_segment_size_key(kind, 0)]
    listed += [k.twophase_dir_key(), k.twophase_file_key(7)]
    listed += [k.controlfile_key(), k.checkpoint_key(), k.aux_files_key()]
    assert listed == sorted(listed)
    assert k.SLRU_KINDS_IN_KEY_ORDER == (SlruKind.CLOG, SlruKind.MULTIXACT_MEMBERS, SlruKind.MULTIXACT_OFFSETS)


# --- ranges ------------------------------------------------------------------------------------
def test_range_table() -> None:
    r = k.rel_fork_range(SPC, DB, REL, 2)
    assert (r.start.as_tuple(), r.end.as_tuple()) == ((0, SPC, DB, REL, 2, 0), (0, SPC, DB, REL, 3, 0))
    assert r.contains(k.rel_block_key(SPC, DB, REL, 2, 99)) and r.contains(k.rel_size_key(SPC, DB, REL, 2))
    assert not r.contains(k.rel_block_key(SPC, DB, REL, 3, 0))

    d = k.database_range(SPC, DB)
    assert (d.start.as_tuple(), d.end.as_tuple()) == ((0, SPC, DB, 0, 0, 0), (0, SPC, DB, U32, 0xFF, U32))
    for key in (k.relmap_file_key(SPC, DB), k.rel_dir_key(SPC, DB), k.rel_size_key(SPC, DB, REL, 3)):
        assert key in d
    assert k.relmap_file_key(SPC, DB + 1) not in d

    s = k.slru_segment_range(SlruKind.MULTIXACT_OFFSETS, 6)
    assert (s.start.as_tuple(), s.end.as_tuple()) == ((1, 2, 1, 6, 0, 0), (1, 2, 1, 6, 1, 0))

    t = k.twophase_file_range(42)
    assert (t.start.as_tuple(), t.end.as_tuple()) == ((2, 0, 0, 0, 0, 42), (2, 0, 0, 0, 0, 43))
    t = k.twophase_file_range(U32)
    assert (t.start.as_tuple(), t.end.as_tuple()) == ((2, 0, 0, 0, 0, U32), (2, 0, 0, 0, 1, 0))


def test_key_range_contains_and_overlaps() -> None:
    a, b, c, d = (Key(0, 0, 0, 0, 0, i) for i in (10, 20, 30, 40))
    ab, bc, ad, cd = KeyRange(a, b), KeyRange(b, c), KeyRange(a, d), KeyRange(c, d)
    assert ab.contains(a) and not ab.contains(b)  # end exclusive
    assert not ab.overlaps(bc) and not bc.overlaps(ab)  # touching is not overlapping
    assert ad.overlaps(bc) and bc.overlaps(ad)
    assert not ab.overlaps(cd)
    assert KeyRange(b, b).is_empty() and not KeyRange(b, b).overlaps(ad)
    with pytest.raises(InvalidKeyError):
        KeyRange(b, a)


@given(keys, keys, keys, keys)
def test_overlaps_agrees_with_contains(a: Key, b: Key, c: Key, d: Key) -> None:
    r1, r2 = KeyRange(min(a, b), max(a, b)), KeyRange(min(c, d), max(c, d))
    # Two non-empty ranges overlap iff one contains the other's start.
    if not r1.is_empty() and not r2.is_empty():
        assert r1.overlaps(r2) == (r1.contains(r2.start) or r2.contains(r1.start))
    else:
        assert not r1.overlaps(r2)
    assert r1.overlaps(r2) == r2.overlaps(r1)


# --- classification and conversions ------------------------------------------------------------
def test_classification() -> None:
    block = k.rel_block_key(SPC, DB, REL, 0, 1)
    size = k.rel_size_key(SPC, DB, REL, 0)
    fsm = k.rel_block_key(SPC, DB, REL, 1, 1)
    vm = k.rel_block_key(SPC, DB, REL, 2, 1)
    slru = k.slru_block_key(SlruKind.CLOG, 0, 1)
    slru_size = k.slru_segment_size_key(SlruKind.CLOG, 0)
    assert k.is_rel_block_key(block) and k.is_rel_block_key(size)  # size keys match too, as in Neon
    for key in (k.dbdir_key(), k.rel_dir_key(SPC, DB), k.relmap_file_key(SPC, DB), slru, k.controlfile_key()):
        assert not k.is_rel_block_key(key)
    assert k.is_rel_fsm_block_key(fsm) and not k.is_rel_fsm_block_key(vm)
    assert not k.is_rel_fsm_block_key(k.rel_size_key(SPC, DB, REL, 1))
    assert k.is_rel_vm_block_key(vm) and not k.is_rel_vm_block_key(fsm) and not k.is_rel_vm_block_key(block)
    assert not k.is_rel_vm_block_key(k.rel_size_key(SPC, DB, REL, 2))
    assert k.is_slru_block_key(slru) and not k.is_slru_block_key(slru_size)
    assert not k.is_slru_block_key(k.slru_dir_key(SlruKind.CLOG)) and not k.is_slru_block_key(block)
    assert k.is_rel_size_key(size) and not k.is_rel_size_key(block)
    assert k.is_slru_segment_size_key(slru_size) and not k.is_slru_segment_size_key(slru)


def test_buffer_tag_conversion() -> None:
    tag = BufferTag(SPC, DB, REL, 2, 77)
    assert k.buffer_tag_key(tag).to_buffer_tag() == tag
    for not_block in (k.rel_size_key(SPC, DB, REL, 0), k.dbdir_key(), k.slru_block_key(SlruKind.CLOG, 0, 0)):
        with pytest.raises(InvalidKeyError):
            not_block.to_buffer_tag()


@pytest.mark.parametrize(
    ("kind", "num"), [(SlruKind.CLOG, 0), (SlruKind.MULTIXACT_MEMBERS, 1), (SlruKind.MULTIXACT_OFFSETS, 2)]
)
def test_slru_page_conversion(kind: SlruKind, num: int) -> None:
    page = SlruPage(kind, 12, 5)
    key = k.slru_page_key(page)
    assert key.field2 == num
    assert key.to_slru_page() == page
    assert k.slru_pageno_key(kind, 12 * 32 + 5) == key
    for not_page in (k.slru_segment_size_key(kind, 12), k.slru_dir_key(kind), Key(1, 3, 1, 0, 0, 0), k.dbdir_key()):
        with pytest.raises(InvalidKeyError):
            not_page.to_slru_page()


def test_key_error_is_a_format_error() -> None:
    assert issubclass(InvalidKeyError, PgFormatError)
    assert issubclass(ValueFormatError, PgFormatError)
    assert issubclass(DirectoryFormatError, PgFormatError)


# --- values ------------------------------------------------------------------------------------
EXACT = [
    (Image(b"\x01\x02\x03"), "00000000 0000000000000003 010203"),
    (Image(b""), "00000000 0000000000000000"),
    (WalRecord(PostgresRecord(True, b"\xaa\xbb")), "00000001 00000000 01 0000000000000002 AABB"),
    (WalRecord(PostgresRecord(False, b"")), "00000001 00000000 00 0000000000000000"),
    (WalRecord(ClearVisibilityMapFlags(5, None, 3)), "00000001 00000001 01 00000005 00 03"),
    (WalRecord(ClearVisibilityMapFlags(None, 0x01020304, 2)), "00000001 00000001 00 01 01020304 02"),
    (
        WalRecord(ClogSetCommitted((3, 4), -1)),
        "00000001 00000002 0000000000000002 00000003 00000004 FFFFFFFFFFFFFFFF",
    ),
    (WalRecord(ClogSetAborted((7,))), "00000001 00000003 0000000000000001 00000007"),
    (WalRecord(MultixactOffsetCreate(1, 2)), "00000001 00000004 00000001 00000002"),
    (
        WalRecord(MultixactMembersCreate(10, ((100, 1),))),
        "00000001 00000005 0000000A 0000000000000001 00000064 00000001",
    ),
]


@pytest.mark.parametrize(("value", "expected"), EXACT)
def test_value_exact_bytes(value: Image | WalRecord, expected: str) -> None:
    raw = encode_value(value)
    assert raw == h(expected)
    assert decode_value(raw) == value
    assert decode_value(memoryview(raw)) == value
    if isinstance(value, WalRecord):
        assert encode_neon_record(value.rec) == raw[4:]
        assert decode_neon_record(raw[4:]) == value.rec


opt_u32 = st.none() | u32s
u32_tuples = st.lists(u32s, max_size=20).map(tuple)
neon_records = st.one_of(
    st.builds(PostgresRecord, st.booleans(), st.binary(max_size=64)),
    st.builds(ClearVisibilityMapFlags, opt_u32, opt_u32, u8s),
    st.builds(ClogSetCommitted, u32_tuples, st.integers(-(1 << 63), (1 << 63) - 1)),
    st.builds(ClogSetAborted, u32_tuples),
    st.builds(MultixactOffsetCreate, u32s, u32s),
    st.builds(MultixactMembersCreate, u32s, st.lists(st.tuples(u32s, u32s), max_size=10).map(tuple)),
)
values = st.builds(Image, st.binary(max_size=256)) | st.builds(WalRecord, neon_records)


@given(values)
def test_value_round_trip(value: Image | WalRecord) -> None:
    assert decode_value(encode_value(value)) == value


@given(st.binary(max_size=64))
def test_garbage_raises_only_value_format_error(raw: bytes) -> None:
    with contextlib.suppress(ValueFormatError):
        decode_value(raw)


@given(values, st.data())
def test_corrupted_value_raises_only_value_format_error(value: Image | WalRecord, data: st.DataObject) -> None:
    raw = bytearray(encode_value(value))
    cut = data.draw(st.integers(0, len(raw)))
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] = data.draw(u8s)
    for candidate in (bytes(raw), bytes(raw[:cut]), bytes(raw) + b"\x00"):
        with contextlib.suppress(ValueFormatError):
            decode_value(candidate)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ("00000002", "unknown Value variant"),
        ("00000001 00000006", "unknown NeonWalRecord variant"),
        ("00000001 00000000 02 0000000000000000", "invalid bool"),
        ("00000001 00000001 02 00000005 00 03", "invalid Option tag"),
        ("00000000 FFFFFFFFFFFFFFFF 00", "truncated"),
        ("00000001 00000003 4000000000000000", "truncated"),
        ("00000000 0000000000000000 00", "trailing"),
        ("000000", "truncated"),
    ],
)
def test_bad_values(raw: str, match: str) -> None:
    with pytest.raises(ValueFormatError, match=match):
        decode_value(h(raw))


@pytest.mark.parametrize(
    "value",
    [
        WalRecord(ClearVisibilityMapFlags(-1, None, 3)),
        WalRecord(ClearVisibilityMapFlags(None, None, 256)),
        WalRecord(ClogSetAborted((1 << 32,))),
        WalRecord(MultixactMembersCreate(0, ((1, None),))),  # type: ignore[arg-type]
        WalRecord(PostgresRecord(0x40, b"")),  # type: ignore[arg-type]
        WalRecord("not a record"),  # type: ignore[arg-type]
        Image("text"),  # type: ignore[arg-type]
    ],
)
def test_unencodable_values(value: Image | WalRecord) -> None:
    with pytest.raises(ValueFormatError):
        encode_value(value)


def test_will_init() -> None:
    assert will_init(Image(b""))
    assert will_init(WalRecord(PostgresRecord(True, b"x")))
    assert not will_init(WalRecord(PostgresRecord(False, b"x")))
    for rec in (
        ClearVisibilityMapFlags(1, None, 3),
        ClogSetCommitted((3,), 0),
        ClogSetAborted((3,)),
        MultixactOffsetCreate(1, 1),
        MultixactMembersCreate(1, ()),
    ):
        assert not will_init(WalRecord(rec))


# --- directories -------------------------------------------------------------------------------
def test_directory_exact_bytes() -> None:
    dbdir = DbDirectory().add(SPC, DB, True).add(1664, 0, False)
    assert dbdir.encode() == h("0000000000000002 0000067F 00000005 01 00000680 00000000 00")  # sorted
    reldir = RelDirectory().add(REL, 2).add(REL, 0)
    assert reldir.encode() == h("0000000000000002 00004000 00 00004000 02")
    assert SlruSegmentDirectory().add(3).add(1).encode() == h("0000000000000002 00000001 00000003")
    assert TwoPhaseDirectory().encode() == h("0000000000000000")
    aux = AuxFilesDirectory().add("pg_logical/x", b"\x01")
    assert aux.encode() == h("0000000000000001 000000000000000C") + b"pg_logical/x" + h("0000000000000001 01")
    assert encode_nblocks(0x01020304) == h("04030201")
    assert decode_nblocks(h("04030201")) == 0x01020304


def test_directory_decode_accepts_any_order() -> None:
    # Neon writes hash-map order; the encoder sorts, the decoder must not care.
    raw = h("0000000000000002 00000003 00000001")
    assert SlruSegmentDirectory.decode(raw) == SlruSegmentDirectory(frozenset({1, 3}))
    assert SlruSegmentDirectory.decode(raw).encode() == h("0000000000000002 00000001 00000003")


def test_directory_add_remove_are_pure() -> None:
    empty = DbDirectory()
    one = empty.add(SPC, DB, False)
    assert len(empty) == 0 and (SPC, DB) in one and one.dbdirs[(SPC, DB)] is False
    assert one.add(SPC, DB, True).dbdirs[(SPC, DB)] is True
    assert one.remove(SPC, DB) == empty and one.remove(1, 1) == one
    assert list(DbDirectory({(2, 1): True, (1, 9): True, (1, 2): False})) == [(1, 2), (1, 9), (2, 1)]
    with pytest.raises(TypeError):
        one.dbdirs[(1, 1)] = True  # type: ignore[index]
    rels = RelDirectory().add(5, 0).add(3, 1)
    assert list(rels) == [(3, 1), (5, 0)] and rels.remove(5, 0) == RelDirectory(frozenset({(3, 1)}))
    assert TwoPhaseDirectory().add(9).remove(9) == TwoPhaseDirectory()
    aux = AuxFilesDirectory().add("a", b"1").add("a", b"2")
    assert aux.files == {"a": b"2"} and aux.remove("a") == AuxFilesDirectory()
    assert hash(one) == hash(DbDirectory({(SPC, DB): False})) and hash(aux) == hash(AuxFilesDirectory({"a": b"2"}))


dbdirs = st.dictionaries(st.tuples(u32s, u32s), st.booleans(), max_size=10).map(DbDirectory)
reldirs = st.frozensets(st.tuples(u32s, u8s), max_size=10).map(RelDirectory)
segdirs = st.frozensets(u32s, max_size=10).map(SlruSegmentDirectory)
twophasedirs = st.frozensets(u32s, max_size=10).map(TwoPhaseDirectory)
auxdirs = st.dictionaries(st.text(max_size=20), st.binary(max_size=20), max_size=5).map(AuxFilesDirectory)
directories = st.one_of(dbdirs, reldirs, segdirs, twophasedirs, auxdirs)


@given(directories)
def test_directory_round_trip(directory) -> None:
    raw = directory.encode()
    assert type(directory).decode(raw) == directory
    assert type(directory).decode(raw).encode() == raw


@given(
    st.sampled_from([DbDirectory, RelDirectory, SlruSegmentDirectory, TwoPhaseDirectory, AuxFilesDirectory]),
    st.binary(max_size=48),
)
def test_directory_garbage_raises_only_format_error(cls, raw: bytes) -> None:
    with contextlib.suppress(DirectoryFormatError):
        cls.decode(raw)


@pytest.mark.parametrize(
    ("cls", "raw", "match"),
    [
        (DbDirectory, "0000000000000001 00000001 00000002 02", "invalid bool"),
        (DbDirectory, "0000000000000002 00000001 00000002 01 00000001 00000002 00", "duplicate"),
        (RelDirectory, "FFFFFFFFFFFFFFFF", "claims"),
        (SlruSegmentDirectory, "0000000000000001 00000001 00", "trailing"),
        (TwoPhaseDirectory, "00000000", "too short"),
        (AuxFilesDirectory, "0000000000000001 0000000000000001 FF 0000000000000000", "not UTF-8"),
        (AuxFilesDirectory, "0000000000000001 0000000000000005 41", "claims"),
    ],
)
def test_bad_directories(cls, raw: str, match: str) -> None:
    with pytest.raises(DirectoryFormatError, match=match):
        cls.decode(h(raw))


@pytest.mark.parametrize("raw", ["", "010203", "0102030405"])
def test_bad_nblocks(raw: str) -> None:
    with pytest.raises(DirectoryFormatError):
        decode_nblocks(h(raw))
    with pytest.raises(DirectoryFormatError):
        encode_nblocks(1 << 32)
