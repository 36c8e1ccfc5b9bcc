"""The timeline `metadata` file: Neon's byte vectors, round trips, and every way a file can be bad."""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from neon.pageserver.metadata import (
    METADATA_FILE_NAME,
    METADATA_MAX_SIZE,
    MetadataError,
    TimelineMetadata,
    load_metadata,
    save_metadata,
)
from neon.postgres.crc32c import crc32c
from neon.postgres.errors import PgFormatError
from neon.utils.crashsafe import TEMP_SUFFIX
from neon.utils.id import TimelineId
from neon.utils.lsn import Lsn

# From Neon's remote_timeline_client/index.rs tests (v1_indexpart_is_parsed): the first 54 bytes
# of a `metadata_bytes` array; the rest of the 512 are zeros. Spec §1.5 quotes its header.
NEON_VECTOR_NO_ANCESTOR = bytes.fromhex(
    "710b9fd2 0036 0004"  # checksum, size 54, format version 4
    "00000000016960e8"  # disk_consistent_lsn 0/16960E8
    "01 0000000001696070"  # prev_record_lsn Some(0/1696070)
    "00"  # ancestor_timeline None
    "0000000000000000"  # ancestor_lsn 0/0
    "0000000001696070"  # latest_gc_cutoff_lsn 0/1696070
    "0000000001696070"  # initdb_lsn 0/1696070
    "0000000e"  # pg_version 14
).ljust(METADATA_MAX_SIZE, b"\x00")

# Same file, v2_indexpart_is_parsed_with_deleted_at: a branch (ancestor present), PG 15.
NEON_VECTOR_WITH_ANCESTOR = bytes.fromhex(
    "889731d0 0046 0004"  # checksum, size 70, format version 4
    "0000000002532648"  # disk_consistent_lsn 0/2532648
    "01 0000000002532620"  # prev_record_lsn Some(0/2532620)
    "01 57c6f08761772d7d261d9ba18c8dffd2"  # ancestor_timeline Some(...)
    "0000000002532648"  # ancestor_lsn 0/2532648
    "000000000149f0c0"  # latest_gc_cutoff_lsn 0/149F0C0
    "000000000149f0c0"  # initdb_lsn 0/149F0C0
    "0000000f"  # pg_version 15
).ljust(METADATA_MAX_SIZE, b"\x00")


def _example(**changes: object) -> TimelineMetadata:
    md = TimelineMetadata(
        disk_consistent_lsn=Lsn(0x200),
        prev_record_lsn=Lsn(0x100),
        ancestor_timeline=TimelineId("11223344556677881122334455667788"),
        ancestor_lsn=Lsn(0x80),
        latest_gc_cutoff_lsn=Lsn(0x40),
        initdb_lsn=Lsn(0x28),
        pg_version=15,
    )
    return dataclasses.replace(md, **changes)


def _with_header(body: bytes, *, version: int = 4, size: int | None = None, checksum: int | None = None) -> bytes:
    size = 8 + len(body) if size is None else size
    checksum = crc32c(body) if checksum is None else checksum
    return (struct.pack(">IHH", checksum, size, version) + body).ljust(METADATA_MAX_SIZE, b"\x00")


def test_neon_vector_without_ancestor() -> None:
    assert NEON_VECTOR_NO_ANCESTOR[:8].hex(" ") == "71 0b 9f d2 00 36 00 04"  # spec §1.5
    md = TimelineMetadata.decode(NEON_VECTOR_NO_ANCESTOR)
    assert md == TimelineMetadata(
        disk_consistent_lsn=Lsn("0/16960E8"),
        prev_record_lsn=Lsn("0/1696070"),
        ancestor_timeline=None,
        ancestor_lsn=Lsn(0),
        latest_gc_cutoff_lsn=Lsn("0/1696070"),
        initdb_lsn=Lsn("0/1696070"),
        pg_version=14,
    )
    assert md.encode() == NEON_VECTOR_NO_ANCESTOR


def test_neon_vector_with_ancestor() -> None:
    md = TimelineMetadata.decode(NEON_VECTOR_WITH_ANCESTOR)
    assert md.ancestor_timeline == TimelineId("57c6f08761772d7d261d9ba18c8dffd2")
    assert (md.disk_consistent_lsn, md.prev_record_lsn, md.ancestor_lsn) == (
        Lsn("0/2532648"),
        Lsn("0/2532620"),
        Lsn("0/2532648"),
    )
    assert (md.latest_gc_cutoff_lsn, md.initdb_lsn, md.pg_version) == (Lsn("0/149F0C0"), Lsn("0/149F0C0"), 15)
    assert md.encode() == NEON_VECTOR_WITH_ANCESTOR


def test_encoding_layout() -> None:
    buf = _example(prev_record_lsn=None, ancestor_timeline=None).encode()
    assert len(buf) == METADATA_MAX_SIZE
    checksum, size, version = struct.unpack_from(">IHH", buf)
    assert (size, version) == (8 + 8 + 1 + 1 + 8 + 8 + 8 + 4, 4)
    assert checksum == crc32c(buf[8:size])
    assert buf[size:] == bytes(METADATA_MAX_SIZE - size)


lsns = st.integers(min_value=0, max_value=(1 << 64) - 1).map(Lsn)
metadatas = st.builds(
    TimelineMetadata,
    disk_consistent_lsn=st.integers(min_value=0, max_value=((1 << 64) - 1) // 8).map(lambda v: Lsn(v * 8)),
    prev_record_lsn=st.none() | lsns,
    ancestor_timeline=st.none() | st.binary(min_size=16, max_size=16).map(TimelineId),
    ancestor_lsn=lsns,
    latest_gc_cutoff_lsn=lsns,
    initdb_lsn=lsns,
    pg_version=st.sampled_from([14, 15, 16]) | st.integers(min_value=0, max_value=(1 << 32) - 1),
)


@given(metadatas)
def test_round_trip(md: TimelineMetadata) -> None:
    buf = md.encode()
    assert len(buf) == METADATA_MAX_SIZE
    assert TimelineMetadata.decode(buf) == md
    assert TimelineMetadata.decode(memoryview(bytearray(buf))) == md


@given(metadatas, st.integers(min_value=0, max_value=METADATA_MAX_SIZE - 1), st.integers(min_value=1, max_value=255))
def test_any_flipped_byte_is_detected_or_harmless(md: TimelineMetadata, pos: int, xor: int) -> None:
    buf = bytearray(md.encode())
    size = struct.unpack_from(">H", buf, 4)[0]
    buf[pos] ^= xor
    if pos >= size:
        # Neon ignores the zero padding, and so do we.
        assert TimelineMetadata.decode(bytes(buf)) == md
    else:
        with pytest.raises(MetadataError):
            TimelineMetadata.decode(bytes(buf))


def test_flipped_body_byte_is_a_checksum_error() -> None:
    buf = bytearray(NEON_VECTOR_NO_ANCESTOR)
    buf[20] ^= 0x01
    with pytest.raises(MetadataError, match=r"metadata file /x/metadata: checksum mismatch"):
        TimelineMetadata.decode(bytes(buf), path="/x/metadata")


def test_truncated_and_oversized() -> None:
    with pytest.raises(MetadataError, match=r"^metadata file /t/metadata is truncated: 100 bytes, expected 512$"):
        TimelineMetadata.decode(NEON_VECTOR_NO_ANCESTOR[:100], path=Path("/t/metadata"))
    with pytest.raises(MetadataError, match="is truncated: 0 bytes"):
        TimelineMetadata.decode(b"")
    with pytest.raises(MetadataError, match="513 bytes long, expected 512"):
        TimelineMetadata.decode(NEON_VECTOR_NO_ANCESTOR + b"\x00")


def test_metadata_error_is_a_format_error() -> None:
    assert issubclass(MetadataError, PgFormatError)
    assert issubclass(MetadataError, ValueError)


def test_version_3_is_upgraded_to_pg14() -> None:
    body_v3 = _example().encode_body()[:-4]  # the v3 body is the v4 body without pg_version
    md = TimelineMetadata.decode(_with_header(body_v3, version=3))
    assert md == _example(pg_version=14)
    # Written back, it is a version-4 file.
    assert struct.unpack_from(">H", md.encode(), 6)[0] == 4


def test_unknown_version() -> None:
    body = _example().encode_body()
    for version in (2, 5, 0xFFFF):
        with pytest.raises(MetadataError, match=rf"unsupported metadata format version {version}\b"):
            TimelineMetadata.decode(_with_header(body, version=version), path="p")


def test_size_field_out_of_range() -> None:
    body = _example().encode_body()
    for size in (0, 7, 513, 0xFFFF):
        with pytest.raises(MetadataError, match=rf"size field {size} is outside \[8, 512\]"):
            TimelineMetadata.decode(_with_header(body, size=size, checksum=0), path="p")


def test_size_field_covering_padding_means_trailing_bytes() -> None:
    body = _example().encode_body()
    buf = _with_header(body, size=8 + len(body) + 3, checksum=crc32c(body + b"\x00" * 3))
    with pytest.raises(MetadataError, match="3 trailing bytes after the metadata body"):
        TimelineMetadata.decode(buf, path="p")


def test_short_body() -> None:
    body = _example().encode_body()[:-2]
    with pytest.raises(MetadataError, match="ends inside pg_version"):
        TimelineMetadata.decode(_with_header(body))
    with pytest.raises(MetadataError, match="ends inside disk_consistent_lsn"):
        TimelineMetadata.decode(_with_header(b""))


def test_bad_option_tags() -> None:
    body = bytearray(_example().encode_body())
    body[8] = 2  # prev_record_lsn tag
    with pytest.raises(MetadataError, match="invalid Option tag 2 for prev_record_lsn"):
        TimelineMetadata.decode(_with_header(bytes(body)))
    body = bytearray(_example().encode_body())
    body[17] = 0xFF  # ancestor_timeline tag
    with pytest.raises(MetadataError, match="invalid Option tag 255 for ancestor_timeline"):
        TimelineMetadata.decode(_with_header(bytes(body)))


def test_unaligned_disk_consistent_lsn() -> None:
    body = bytearray(_example().encode_body())
    body[7] |= 0x03
    with pytest.raises(MetadataError, match=r"disk_consistent_lsn 0/203 is not 8-aligned"):
        TimelineMetadata.decode(_with_header(bytes(body)), path="p")
    with pytest.raises(MetadataError, match="not 8-aligned"):
        _example(disk_consistent_lsn=Lsn(0x201)).encode()


def test_construction_normalises_and_checks() -> None:
    md = TimelineMetadata(0x10, 0x8, bytes(range(16)), 0, 0, 0, 15)  # type: ignore[arg-type]
    assert isinstance(md.disk_consistent_lsn, Lsn) and isinstance(md.prev_record_lsn, Lsn)
    assert isinstance(md.ancestor_timeline, TimelineId)
    assert md == TimelineMetadata(Lsn(0x10), Lsn(0x8), TimelineId(bytes(range(16))), Lsn(0), Lsn(0), Lsn(0), 15)
    with pytest.raises(ValueError):
        _example(pg_version=1 << 32)
    with pytest.raises(ValueError):
        _example(initdb_lsn=-1)
    with pytest.raises(TypeError):
        _example(pg_version="15")
    with pytest.raises(dataclasses.FrozenInstanceError):
        md.pg_version = 14  # type: ignore[misc]


def test_save_and_load(tmp_path: Path) -> None:
    md = _example()
    save_metadata(tmp_path, md)
    path = tmp_path / METADATA_FILE_NAME
    assert path.read_bytes() == md.encode()
    assert not (tmp_path / (METADATA_FILE_NAME + TEMP_SUFFIX)).exists()
    assert load_metadata(tmp_path) == md
    # Overwriting replaces the whole file.
    md2 = _example(disk_consistent_lsn=Lsn(0x1000), ancestor_timeline=None)
    save_metadata(tmp_path, md2, owner=(os.geteuid(), os.getegid()))
    assert load_metadata(tmp_path) == md2


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / METADATA_FILE_NAME
    with pytest.raises(MetadataError, match=rf"^metadata file {path} not found$"):
        load_metadata(tmp_path)
    path.write_bytes(NEON_VECTOR_NO_ANCESTOR[:300])
    with pytest.raises(MetadataError, match=rf"^metadata file {path} is truncated: 300 bytes, expected 512$"):
        load_metadata(tmp_path)
    buf = bytearray(NEON_VECTOR_NO_ANCESTOR)
    buf[0] ^= 0xFF
    path.write_bytes(bytes(buf))
    with pytest.raises(MetadataError, match=rf"metadata file {path}: checksum mismatch"):
        load_metadata(tmp_path)
