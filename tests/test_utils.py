"""neon.utils: LSNs, ids, crash-safe writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from neon.utils.crashsafe import TEMP_SUFFIX, durable_mkdir, durable_write, remove_temp_files
from neon.utils.id import TenantId, TimelineId
from neon.utils.lsn import Lsn


def test_lsn_text_forms() -> None:
    assert Lsn("0/16B3748") == 0x16B3748
    assert Lsn("0/01511B38") == 0x1511B38  # pg_waldump's zero-padded form
    assert str(Lsn(0x1_0000_0028)) == "1/28"
    assert repr(Lsn(0x28)) == "Lsn(0/28)"
    for bad in ("", "16B3748", "0/", "/1", "x/1", "123456789/0", "0/1/2"):
        with pytest.raises(ValueError, match="invalid LSN"):
            Lsn(bad)
    with pytest.raises(ValueError):
        Lsn(-1)
    with pytest.raises(ValueError):
        Lsn(1 << 64)


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_lsn_round_trip(v: int) -> None:
    assert Lsn(str(Lsn(v))) == v


def test_lsn_arithmetic() -> None:
    a = Lsn("0/1000028")
    assert isinstance(a + 8, Lsn) and a + 8 == 0x1000030
    assert Lsn("0/1000100") - a == 0xD8 and not isinstance(Lsn("0/1000100") - a, Lsn)
    assert Lsn(0x1000029).align() == 0x1000030 and Lsn(0x1000030).align() == 0x1000030
    assert a.segment_number() == 1 and a.segment_offset() == 0x28 and a.segment_start() == 0x1000000
    assert a.page_offset() == 0x28 and Lsn(0x1002010).page_start() == 0x1002000
    assert Lsn.from_segment(3, 40) == 3 * 16 * 1024 * 1024 + 40
    assert a.segment_number(1 << 20) == 16
    assert a.widened(5) == a and Lsn(5).widened(a) == a


def test_ids() -> None:
    t = TenantId.generate()
    assert len(str(t)) == 32 and TenantId(str(t)) == t
    assert TimelineId("ab" * 16).hex() == "ab" * 16
    for bad in ("ab" * 15, "zz" * 16, "ab" * 17):
        with pytest.raises(ValueError, match="TenantId"):
            TenantId(bad)
    with pytest.raises(ValueError):
        TimelineId(b"short")


def test_durable_write_replaces_atomically(tmp_path: Path) -> None:
    target = tmp_path / "metadata"
    durable_write(target, b"one")
    durable_write(target, b"two" * 1000)
    assert target.read_bytes() == b"two" * 1000
    assert not list(tmp_path.glob("*" + TEMP_SUFFIX))
    assert oct(target.stat().st_mode & 0o777) == oct(0o600)
    # A crash between the temp write and the rename leaves the old file and a temp file.
    (tmp_path / ("metadata" + TEMP_SUFFIX)).write_bytes(b"partial")
    assert remove_temp_files(tmp_path) == [tmp_path / ("metadata" + TEMP_SUFFIX)]
    assert target.read_bytes() == b"two" * 1000


def test_durable_mkdir(tmp_path: Path) -> None:
    d = tmp_path / "a" / "b" / "c"
    durable_mkdir(d)
    assert d.is_dir() and oct(d.stat().st_mode & 0o777) == oct(0o700)
    durable_mkdir(d)  # idempotent
    assert os.listdir(tmp_path / "a") == ["b"]
