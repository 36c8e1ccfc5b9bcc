"""The pagestream codec (spec pageserver §7.3): byte-exact layouts of Neon's requests and responses,
round trips, clear errors for malformed messages (and nothing but `PagestreamError` for random
bytes), and the `latest`/LSN rules of `wait_or_get_last_lsn`."""

from __future__ import annotations

import random
import re
import struct

import pytest

from neon.pageserver import pagestream as ps
from neon.pageserver.key import RelTag
from neon.utils.lsn import Lsn

REL = RelTag(1663, 5, 16384, 0)


# --- byte layouts ---------------------------------------------------------------------------------
def test_exists_request_layout() -> None:
    req = ps.ExistsRequest(True, Lsn(0x16B5A50), REL)
    data = ps.encode_request(req)
    assert data == (
        b"\x00"  # tag
        + b"\x01"  # latest
        + bytes.fromhex("00000000016b5a50")
        + (1663).to_bytes(4, "big")
        + (5).to_bytes(4, "big")
        + (16384).to_bytes(4, "big")
        + b"\x00"
    )
    assert len(data) == 23
    assert ps.decode_request(data) == req


def test_nblocks_request_layout() -> None:
    req = ps.NblocksRequest(False, Lsn(0x1_0000_00A8), RelTag(1, 2, 3, 2))
    data = ps.encode_request(req)
    assert data == bytes.fromhex("010000000001000000a800000001000000020000000302")
    assert ps.decode_request(data) == req


def test_getpage_request_layout() -> None:
    req = ps.GetPageRequest(True, Lsn(0x16B5A50), RelTag(1663, 1, 1259, 0), 0xDEADBEEF)
    data = ps.encode_request(req)
    assert data == bytes.fromhex("020100000000016b5a500000067f00000001000004eb00deadbeef")
    assert len(data) == 27
    assert ps.decode_request(data) == req


def test_dbsize_request_layout() -> None:
    req = ps.DbSizeRequest(True, Lsn(8), 16385)
    data = ps.encode_request(req)
    assert data == bytes.fromhex("0301000000000000000800004001")
    assert len(data) == 14
    assert ps.decode_request(data) == req


def test_latest_is_any_nonzero_byte() -> None:
    data = bytearray(ps.encode_request(ps.ExistsRequest(False, Lsn(8), REL)))
    data[1] = 0x7F
    assert ps.decode_request(bytes(data)).latest is True


def test_response_layouts() -> None:
    assert ps.encode_response(ps.ExistsResponse(True)) == b"\x64\x01"
    assert ps.encode_response(ps.ExistsResponse(False)) == b"\x64\x00"
    assert ps.encode_response(ps.NblocksResponse(0x01020304)) == b"\x65\x01\x02\x03\x04"
    page = bytes(range(256)) * 32
    assert ps.encode_response(ps.GetPageResponse(page)) == b"\x66" + page
    assert ps.encode_response(ps.ErrorResponse("oops é")) == b"\x67" + "oops é".encode() + b"\x00"
    assert ps.encode_response(ps.DbSizeResponse(8192 * 3)) == b"\x68" + struct.pack(">q", 8192 * 3)
    assert ps.encode_response(ps.DbSizeResponse(-1)) == b"\x68" + b"\xff" * 8


def test_error_response_with_nul_stays_one_c_string() -> None:
    data = ps.encode_response(ps.ErrorResponse("a\0b"))
    assert data.count(b"\0") == 1 and data.endswith(b"\0")
    assert ps.decode_response(data) == ps.ErrorResponse("a\\0b")


@pytest.mark.parametrize(
    "resp",
    [
        ps.ExistsResponse(True),
        ps.ExistsResponse(False),
        ps.NblocksResponse(0),
        ps.NblocksResponse(0xFFFFFFFF),
        ps.GetPageResponse(bytes(8192)),
        ps.GetPageResponse(b"\xaa" * 8192),
        ps.ErrorResponse(""),
        ps.ErrorResponse("Timed out while waiting for WAL record at LSN 0/16B5A50 to arrive"),
        ps.DbSizeResponse(0),
        ps.DbSizeResponse(2**63 - 1),
    ],
)
def test_response_round_trip(resp: ps.PagestreamResponse) -> None:
    assert ps.decode_response(ps.encode_response(resp)) == resp


def test_request_round_trip_random() -> None:
    rng = random.Random(1)
    for _ in range(2000):
        latest = rng.random() < 0.5
        lsn = Lsn(rng.getrandbits(64))
        rel = RelTag(rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(8))
        req: ps.PagestreamRequest = rng.choice(
            [
                ps.ExistsRequest(latest, lsn, rel),
                ps.NblocksRequest(latest, lsn, rel),
                ps.GetPageRequest(latest, lsn, rel, rng.getrandbits(32)),
                ps.DbSizeRequest(latest, lsn, rng.getrandbits(32)),
            ]
        )
        assert ps.decode_request(ps.encode_request(req)) == req


# --- malformed input ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty pagestream message"),
        (b"\x04" + bytes(22), "unknown smgr message tag: 4"),
        (b"\xff", "unknown smgr message tag: 255"),
        (b"\x00", "truncated pagestream Exists request: 1 bytes, expected 23"),
        (b"\x01" + bytes(21), "truncated pagestream Nblocks request: 22 bytes, expected 23"),
        (b"\x02" + bytes(22), "truncated pagestream GetPage request: 23 bytes, expected 27"),
        (b"\x03" + bytes(14), "trailing bytes in pagestream DbSize request: 15 bytes, expected 14"),
        (b"\x02" + bytes(30), "trailing bytes in pagestream GetPage request"),
    ],
)
def test_malformed_requests(data: bytes, message: str) -> None:
    with pytest.raises(ps.PagestreamError, match=message):
        ps.decode_request(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty pagestream message"),
        (b"\x63", "unknown pagestream response tag: 99"),
        (b"\x64", "Exists response has 0 bytes after the tag, expected 1"),
        (b"\x64\x02", "exists byte is 2"),
        (b"\x65\x00\x00\x00", "Nblocks response has 3 bytes"),
        (b"\x66" + bytes(8191), "GetPage response has 8191 bytes"),
        (b"\x67abc", "not NUL-terminated"),
        (b"\x67abc\x00d", "1 bytes after the terminating NUL"),
        (b"\x67\xff\x00", "not UTF-8"),
        (b"\x68" + bytes(9), "DbSize response has 9 bytes"),
    ],
)
def test_malformed_responses(data: bytes, message: str) -> None:
    with pytest.raises(ps.PagestreamError, match=message):
        ps.decode_response(data)


def test_unencodable_values() -> None:
    with pytest.raises(ps.PagestreamError, match="8192 bytes, not 10"):
        ps.encode_response(ps.GetPageResponse(bytes(10)))
    with pytest.raises(ps.PagestreamError, match="cannot encode"):
        ps.encode_response(ps.NblocksResponse(-1))
    with pytest.raises(ps.PagestreamError, match="cannot encode"):
        ps.encode_request(ps.GetPageRequest(True, Lsn(8), REL, 1 << 32))
    with pytest.raises(ps.PagestreamError, match="not a pagestream request"):
        ps.encode_request("GetPage")  # type: ignore[arg-type]
    with pytest.raises(ps.PagestreamError, match="not a pagestream response"):
        ps.encode_response(None)  # type: ignore[arg-type]


def test_fuzz_random_bytes_only_pagestream_error() -> None:
    rng = random.Random(0xC0FFEE)
    valid = [ps.encode_request(ps.GetPageRequest(True, Lsn(8), REL, 1)), ps.encode_response(ps.NblocksResponse(3))]
    decoded = 0
    for i in range(5000):
        kind = i % 3
        if kind == 0:
            data = rng.randbytes(rng.randrange(0, 40))
        elif kind == 1:
            # Plausible tags with random lengths hit the length checks of every message type.
            data = bytes([rng.choice([0, 1, 2, 3, 100, 101, 102, 103, 104])]) + rng.randbytes(rng.randrange(0, 30))
        else:
            base = bytearray(rng.choice(valid))
            for _ in range(rng.randrange(1, 4)):
                base[rng.randrange(len(base))] = rng.getrandbits(8)
            data = bytes(base[: rng.randrange(len(base) + 1)])
        for decode in (ps.decode_request, ps.decode_response):
            try:
                decode(data)
                decoded += 1
            except ps.PagestreamError as e:
                assert str(e)
    assert decoded > 0  # some random inputs are valid messages: the loop exercised both paths


# --- LSN semantics --------------------------------------------------------------------------------
def test_latest_at_or_below_last_record_serves_last_record() -> None:
    assert ps.resolve_request_lsn(True, 0x100, 0x200) == (Lsn(0x200), False)
    assert ps.resolve_request_lsn(True, 0x200, 0x200) == (Lsn(0x200), False)
    # LSN 0 with latest (bootstrap) must not wait and is not an error.
    assert ps.resolve_request_lsn(True, 0, 0x200) == (Lsn(0x200), False)


def test_latest_beyond_last_record_waits_for_it() -> None:
    assert ps.resolve_request_lsn(True, 0x300, 0x200) == (Lsn(0x300), True)


def test_not_latest_reads_at_the_lsn() -> None:
    assert ps.resolve_request_lsn(False, 0x100, 0x200) == (Lsn(0x100), False)
    assert ps.resolve_request_lsn(False, 0x300, 0x200) == (Lsn(0x300), True)
    with pytest.raises(ps.PagestreamRequestError, match=r"invalid LSN\(0\) in request"):
        ps.resolve_request_lsn(False, 0, 0x200)


def test_gc_cutoff() -> None:
    ps.check_gc_cutoff(0x200, 0x200)
    ps.check_gc_cutoff(0x300, 0x200)
    with pytest.raises(
        ps.PagestreamRequestError,
        match=re.escape(
            "tried to request a page version that was garbage collected. requested at 0/100 gc cutoff 0/200"
        ),
    ):
        ps.check_gc_cutoff(0x100, 0x200)
    # With latest, an old LSN is served at last_record_lsn, which is never below the cutoff.
    lsn, _ = ps.resolve_request_lsn(True, 0x100, 0x400)
    ps.check_gc_cutoff(lsn, 0x200)
