"""The helper protocol codec and the hot-path metrics."""

from __future__ import annotations

import struct

import pytest
from prometheus_client import generate_latest

from neon.walredo import protocol as p
from neon.walredo.metrics import WalRedoMetrics
from neon.walredo.records import BufferTag

TAG = BufferTag(1663, 5, 16384, 2, 7)


def test_message_layouts() -> None:
    assert p.encode_tag(TAG) == struct.pack(">BIIII", 2, 1663, 5, 16384, 7)
    assert p.decode_tag(p.encode_tag(TAG)) == TAG
    assert p.begin_redo_for_block(TAG) == b"B" + struct.pack(">I", 21) + p.encode_tag(TAG)
    assert p.get_page(TAG)[:1] == b"G" and len(p.get_page(TAG)) == 22
    assert p.apply_record(0x1234, b"rec") == b"A" + struct.pack(">IQ", 15, 0x1234) + b"rec"
    page = bytes(range(256)) * 32
    assert p.push_page(TAG, page) == b"P" + struct.pack(">I", 8213) + p.encode_tag(TAG) + page
    assert p.mask_page(10, 3, page) == b"M" + struct.pack(">IBI", 8201, 10, 3) + page
    with pytest.raises(p.RedoProtocolError):
        p.push_page(TAG, b"short")


def test_request_is_the_concatenation_of_its_messages() -> None:
    page = bytes(range(256)) * 32
    recs = [(99, b"abc"), (100, b"de")]
    expected = b"".join(
        [
            p.begin_redo_for_block(TAG),
            p.push_page(TAG, page),
            *(p.apply_record(lsn, r) for lsn, r in recs),
            p.get_page(TAG),
        ]
    )
    assert p.redo_request(TAG, page, recs) == expected
    assert p.redo_request(TAG, None, recs) == expected.replace(p.push_page(TAG, page), b"")
    with pytest.raises(p.RedoProtocolError):
        p.redo_request(TAG, b"x", recs)


def test_message_reader_splits_a_stream() -> None:
    stream = p.redo_request(TAG, None, [(1, b"r1"), (2, b"r2")])
    reader = p.MessageReader()
    got = []
    for i in range(len(stream)):
        reader.feed(stream[i : i + 1])
        while (m := reader.next_message()) is not None:
            got.append(m[0])
    assert got == [b"B", b"A", b"A", b"G"]
    bad = p.MessageReader()
    bad.feed(b"A\x00\x00\x00\x02")
    with pytest.raises(p.RedoProtocolError):
        bad.next_message()


def test_metrics_are_exposed() -> None:
    m = WalRedoMetrics()
    m.redo_seconds.observe(0.0002)
    m.redo_seconds.observe(7)
    m.replayed_records.inc(3)
    text = generate_latest(m.registry).decode()
    assert 'pageserver_wal_redo_seconds_bucket{le="0.00025"} 1.0' in text
    assert 'pageserver_wal_redo_seconds_bucket{le="+Inf"} 2.0' in text
    assert "pageserver_wal_redo_seconds_count 2.0" in text
    assert "pageserver_replayed_wal_records_total 3.0" in text
