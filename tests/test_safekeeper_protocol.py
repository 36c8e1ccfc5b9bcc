"""The proposer/acceptor codec: byte layouts and worked bytes of spec safekeeper-and-broker §2.3,
round trips, strict rejection of malformed payloads, the per-connection readers, and the term
history arithmetic (§1.3, §2.6.5, §2.7)."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neon.pq.errors import LocalProtocolError, ProtocolViolation
from neon.pq.replication import PageserverFeedback
from neon.safekeeper.protocol import (
    MAX_SEND_SIZE,
    AcceptorGreeting,
    AcceptorProtocol,
    AggregatedHsFeedback,
    AppendRequest,
    AppendRequestHeader,
    AppendResponse,
    ProposerElected,
    ProposerGreeting,
    ProposerProtocol,
    ProtocolVersionMismatch,
    TermHistory,
    TermHistoryMismatch,
    TermLsn,
    VoteRequest,
    VoteResponse,
    decode_acceptor_message,
    decode_proposer_message,
)
from neon.utils.id import TenantId, TimelineId
from neon.utils.lsn import Lsn

MOCK_ID = "9e4c8f36063c6c6e93bc20d65a820f3d"


def unhex(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# --- worked bytes (§2.3, from the walproposer mock test) ---------------------------------------

WORKED_PROPOSER_GREETING = unhex(
    """67000000 00000000 02000000 00710200 00000000 00000000 00000000 00000000
       00000000 00000000 9e4c8f36 063c6c6e 93bc20d6 5a820f3d 9e4c8f36 063c6c6e
       93bc20d6 5a820f3d 01000000 00000001"""
)
WORKED_ACCEPTOR_GREETING = unhex("67000000 00000000 02000000 00000000 01000000 00000000")
WORKED_VOTE_REQUEST = unhex("76000000 00000000 03000000 00000000") + bytes(16)
WORKED_VOTE_RESPONSE = unhex(
    """76000000 00000000 03000000 00000000 01000000 00000000 39050000 00000000
       39050000 00000000 01000000 02000000 00000000 39050000 00000000 39050000
       00000000"""
)


def test_worked_proposer_greeting() -> None:
    msg = ProposerGreeting(
        tenant_id=TenantId(MOCK_ID),
        timeline_id=TimelineId(MOCK_ID),
        pg_version=160000,
        system_id=0,
        wal_seg_size=16 * 1024 * 1024,
    )
    assert len(WORKED_PROPOSER_GREETING) == 80
    assert msg.encode() == WORKED_PROPOSER_GREETING
    assert decode_proposer_message(WORKED_PROPOSER_GREETING) == msg


def test_worked_acceptor_greeting() -> None:
    msg = AcceptorGreeting(term=2, node_id=1)
    assert msg.encode() == WORKED_ACCEPTOR_GREETING
    assert decode_acceptor_message(WORKED_ACCEPTOR_GREETING) == msg


def test_worked_vote_request() -> None:
    msg = VoteRequest(term=3)
    assert msg.encode() == WORKED_VOTE_REQUEST
    assert decode_proposer_message(WORKED_VOTE_REQUEST) == msg


def test_worked_vote_response() -> None:
    msg = VoteResponse(
        term=3,
        vote_given=True,
        flush_lsn=Lsn(0x539),
        truncate_lsn=Lsn(0x539),
        term_history=TermHistory.of((2, 0x539)),
        timeline_start_lsn=Lsn(0x539),
    )
    assert len(WORKED_VOTE_RESPONSE) == 68
    assert msg.encode() == WORKED_VOTE_RESPONSE
    assert decode_acceptor_message(WORKED_VOTE_RESPONSE) == msg


# --- layouts at their offsets ----------------------------------------------------------------

PROPOSER_ID = bytes(range(0xA0, 0xB0))
TENANT = TenantId(bytes(range(0x10, 0x20)))
TIMELINE = TimelineId(bytes(range(0x20, 0x30)))


def test_proposer_greeting_layout() -> None:
    data = ProposerGreeting(
        tenant_id=TENANT,
        timeline_id=TIMELINE,
        pg_version=150004,
        system_id=0x1122334455667788,
        wal_seg_size=1 << 24,
        proposer_id=PROPOSER_ID,
        tli=1,
    ).encode()
    assert len(data) == 80
    assert struct.unpack_from("<Q", data, 0) == (ord("g"),)
    assert struct.unpack_from("<II", data, 8) == (2, 150004)
    assert data[16:32] == PROPOSER_ID
    assert struct.unpack_from("<Q", data, 32) == (0x1122334455667788,)
    assert data[40:56] == bytes(TIMELINE)  # timeline before tenant
    assert data[56:72] == bytes(TENANT)
    assert struct.unpack_from("<II", data, 72) == (1, 1 << 24)


def test_vote_request_layout_and_short_form() -> None:
    data = VoteRequest(term=7, proposer_id=PROPOSER_ID).encode()
    assert len(data) == 32
    assert struct.unpack_from("<QQ", data) == (ord("v"), 7)
    assert data[16:] == PROPOSER_ID
    # The Rust safekeeper reads only tag and term; the 16-byte form is accepted too.
    assert decode_proposer_message(struct.pack("<QQ", ord("v"), 7)) == VoteRequest(term=7)


def test_vote_response_layout() -> None:
    history = TermHistory.of((1, 0x100), (4, 0x200), (9, 0x300))
    data = VoteResponse(
        term=9,
        vote_given=False,
        flush_lsn=Lsn(0x350),
        truncate_lsn=Lsn(0x120),
        term_history=history,
        timeline_start_lsn=Lsn(0x100),
    ).encode()
    assert len(data) == 52 + 16 * 3
    assert struct.unpack_from("<QQQQQ", data) == (ord("v"), 9, 0, 0x350, 0x120)
    assert struct.unpack_from("<I", data, 40) == (3,)  # u32 count on the wire
    assert [struct.unpack_from("<QQ", data, 44 + 16 * i) for i in range(3)] == history.pairs()
    assert struct.unpack_from("<Q", data, 44 + 48) == (0x100,)


def test_proposer_elected_layout() -> None:
    history = TermHistory.of((1, 0x100), (5, 0x4000))
    data = ProposerElected(
        term=5, start_streaming_at=Lsn(0x3000), term_history=history, timeline_start_lsn=Lsn(0x100)
    ).encode()
    assert len(data) == 36 + 16 * 2
    assert struct.unpack_from("<QQQI", data) == (ord("e"), 5, 0x3000, 2)
    assert struct.unpack_from("<QQQQ", data, 28) == (1, 0x100, 5, 0x4000)
    assert struct.unpack_from("<Q", data, 60) == (0x100,)


def test_append_request_layout() -> None:
    wal = bytes(range(256)) * 3
    msg = AppendRequest.build(
        term=5,
        epoch_start_lsn=0x1000,
        begin_lsn=0x2000,
        commit_lsn=0x1800,
        truncate_lsn=0x1400,
        wal=wal,
        proposer_id=PROPOSER_ID,
    )
    data = msg.encode()
    assert len(data) == 72 + len(wal)
    assert struct.unpack_from("<QQQQQQQ", data) == (ord("a"), 5, 0x1000, 0x2000, 0x2000 + len(wal), 0x1800, 0x1400)
    assert data[56:72] == PROPOSER_ID
    assert data[72:] == wal
    assert msg.header.end_lsn == 0x2000 + len(wal)
    assert not msg.heartbeat
    assert decode_proposer_message(data) == msg


def test_heartbeat_is_an_empty_append() -> None:
    msg = AppendRequest.build(term=3, epoch_start_lsn=0x10, begin_lsn=0x50, commit_lsn=0x40, truncate_lsn=0x20)
    data = msg.encode()
    assert len(data) == 72
    assert msg.heartbeat
    decoded = decode_proposer_message(data)
    assert isinstance(decoded, AppendRequest) and decoded.heartbeat and decoded == msg


def test_append_response_layout() -> None:
    feedback = PageserverFeedback(
        current_timeline_size=1, last_received_lsn=2, disk_consistent_lsn=3, remote_consistent_lsn=4, replytime=-5
    )
    msg = AppendResponse(
        term=4,
        flush_lsn=Lsn(0x900),
        commit_lsn=Lsn(0x800),
        hs_feedback=AggregatedHsFeedback(ts=-1, xmin=0x1234, catalog_xmin=0x5678),
        pageserver_feedback=feedback,
    )
    data = msg.encode()
    assert len(data) == 188
    assert struct.unpack_from("<QQQQqQQ", data) == (ord("a"), 4, 0x900, 0x800, -1, 0x1234, 0x5678)
    assert data[56:] == feedback.encode_body()  # the big-endian K/V block, unchanged
    assert decode_acceptor_message(data) == msg


def test_append_response_without_feedback_and_term_only() -> None:
    refusal = AppendResponse.term_only(12)
    data = refusal.encode()
    assert data == struct.pack("<QQQQqQQ", ord("a"), 12, 0, 0, 0, 0, 0)
    decoded = decode_acceptor_message(data)
    assert decoded == refusal and isinstance(decoded, AppendResponse) and decoded.pageserver_feedback is None


# --- round trips -----------------------------------------------------------------------------

u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
lsns = u64.map(Lsn)
ids16 = st.binary(min_size=16, max_size=16)
histories = st.lists(st.tuples(u64, u64), max_size=6).map(TermHistory.from_pairs)
nonempty_histories = st.lists(st.tuples(u64, u64), min_size=1, max_size=6).map(TermHistory.from_pairs)

proposer_greetings = st.builds(
    ProposerGreeting,
    tenant_id=ids16.map(TenantId),
    timeline_id=ids16.map(TimelineId),
    pg_version=u32,
    system_id=u64,
    wal_seg_size=u32,
    proposer_id=ids16,
    tli=u32,
)
vote_requests = st.builds(VoteRequest, term=u64, proposer_id=ids16)
elected = st.builds(
    ProposerElected, term=u64, start_streaming_at=lsns, term_history=nonempty_histories, timeline_start_lsn=lsns
)


@st.composite
def append_requests(draw: st.DrawFn) -> AppendRequest:
    wal = draw(st.binary(max_size=512))
    return AppendRequest.build(
        term=draw(u64),
        epoch_start_lsn=draw(u64),
        begin_lsn=draw(st.integers(0, 2**64 - 1 - len(wal))),
        commit_lsn=draw(u64),
        truncate_lsn=draw(u64),
        wal=wal,
        proposer_id=draw(ids16),
    )


acceptor_greetings = st.builds(AcceptorGreeting, term=u64, node_id=u64)
vote_responses = st.builds(
    VoteResponse,
    term=u64,
    vote_given=st.booleans(),
    flush_lsn=lsns,
    truncate_lsn=lsns,
    term_history=histories,
    timeline_start_lsn=lsns,
)
feedbacks = st.builds(
    PageserverFeedback,
    current_timeline_size=u64,
    last_received_lsn=u64,
    disk_consistent_lsn=u64,
    remote_consistent_lsn=u64,
    replytime=st.integers(-(2**63), 2**63 - 1),
)
append_responses = st.builds(
    AppendResponse,
    term=u64,
    flush_lsn=lsns,
    commit_lsn=lsns,
    hs_feedback=st.builds(AggregatedHsFeedback, ts=st.integers(-(2**63), 2**63 - 1), xmin=u64, catalog_xmin=u64),
    pageserver_feedback=st.none() | feedbacks,
)
proposer_messages = proposer_greetings | vote_requests | elected | append_requests()
acceptor_messages = acceptor_greetings | vote_responses | append_responses


@given(proposer_messages)
def test_proposer_message_round_trip(msg: object) -> None:
    data = msg.encode()  # type: ignore[attr-defined]
    assert decode_proposer_message(data) == msg
    assert decode_proposer_message(memoryview(data)) == msg


@given(acceptor_messages)
def test_acceptor_message_round_trip(msg: object) -> None:
    data = msg.encode()  # type: ignore[attr-defined]
    assert decode_acceptor_message(data) == msg


# --- malformed input -------------------------------------------------------------------------


def _valid_proposer_payloads() -> list[bytes]:
    return [
        WORKED_PROPOSER_GREETING,
        WORKED_VOTE_REQUEST,
        ProposerElected(
            term=3,
            start_streaming_at=Lsn(0x10),
            term_history=TermHistory.of((1, 8), (3, 0x10)),
            timeline_start_lsn=Lsn(8),
        ).encode(),
        AppendRequest.build(
            term=3, epoch_start_lsn=1, begin_lsn=0x10, commit_lsn=0, truncate_lsn=0, wal=b"x" * 40
        ).encode(),
    ]


def _valid_acceptor_payloads() -> list[bytes]:
    return [
        WORKED_ACCEPTOR_GREETING,
        WORKED_VOTE_RESPONSE,
        AppendResponse(term=1, flush_lsn=Lsn(2), commit_lsn=Lsn(1), pageserver_feedback=PageserverFeedback()).encode(),
    ]


def test_every_truncation_is_a_protocol_violation() -> None:
    for payload in _valid_proposer_payloads():
        for cut in range(len(payload)):
            # A 16-byte VoteRequest prefix is the accepted short form, not a truncation.
            if payload is WORKED_VOTE_REQUEST and cut == 16:
                continue
            with pytest.raises(ProtocolViolation):
                decode_proposer_message(payload[:cut])
    for payload in _valid_acceptor_payloads():
        # An AppendResponse cut exactly after its fixed part is the valid no-feedback form.
        cuts = [c for c in range(len(payload)) if not (payload[:1] == b"a" and c == 56)]
        for cut in cuts:
            with pytest.raises(ProtocolViolation):
                decode_acceptor_message(payload[:cut])


@pytest.mark.parametrize(
    "payload",
    [
        WORKED_PROPOSER_GREETING + b"\0",
        WORKED_VOTE_REQUEST + b"\0",
        _valid_proposer_payloads()[2] + b"\0",
        _valid_proposer_payloads()[3] + b"\0",  # more WAL than end - begin
    ],
)
def test_trailing_bytes_from_the_proposer_are_refused(payload: bytes) -> None:
    with pytest.raises(ProtocolViolation, match="bytes"):
        decode_proposer_message(payload)


@pytest.mark.parametrize("payload", [WORKED_ACCEPTOR_GREETING + b"\0", WORKED_VOTE_RESPONSE + b"\0"])
def test_trailing_bytes_from_the_acceptor_are_refused(payload: bytes) -> None:
    with pytest.raises(ProtocolViolation, match="bytes"):
        decode_acceptor_message(payload)


def test_unknown_tags() -> None:
    with pytest.raises(ProtocolViolation, match="unknown proposer message tag 'x'"):
        decode_proposer_message(struct.pack("<Q", ord("x")) + bytes(40))
    # 'e' exists only in the proposer's direction.
    with pytest.raises(ProtocolViolation, match="unknown acceptor message tag 'e'"):
        decode_acceptor_message(struct.pack("<Q", ord("e")) + bytes(40))
    with pytest.raises(ProtocolViolation, match="high bytes"):
        decode_proposer_message(struct.pack("<Q", 0x0100 | ord("g")) + WORKED_PROPOSER_GREETING[8:])
    with pytest.raises(ProtocolViolation, match="8-byte tag"):
        decode_proposer_message(b"g")


def test_protocol_version_mismatch_is_reported_as_such() -> None:
    data = bytearray(WORKED_PROPOSER_GREETING)
    struct.pack_into("<I", data, 8, 3)
    with pytest.raises(ProtocolVersionMismatch, match="incompatible protocol version 3, expected 2") as info:
        decode_proposer_message(bytes(data))
    assert info.value.got == 3 and info.value.expected == 2
    # Even when the rest of the message has another size, the version is what gets reported.
    with pytest.raises(ProtocolVersionMismatch):
        decode_proposer_message(bytes(data[:40]))


def test_absurd_term_history_counts() -> None:
    huge = struct.pack("<QQQI", ord("e"), 1, 0, 0xFFFFFFFF) + struct.pack("<QQQ", 1, 0, 0)
    with pytest.raises(ProtocolViolation, match="claims 4294967295 entries"):
        decode_proposer_message(huge)
    head = struct.pack("<QQQQQ", ord("v"), 1, 1, 0, 0)
    with pytest.raises(ProtocolViolation, match="claims 1000000 entries"):
        decode_acceptor_message(head + struct.pack("<I", 1_000_000) + bytes(24))


def test_proposer_elected_needs_a_history() -> None:
    data = ProposerElected(
        term=1, start_streaming_at=Lsn(0), term_history=TermHistory.of((1, 0)), timeline_start_lsn=Lsn(0)
    ).encode()
    empty = data[:24] + struct.pack("<I", 0) + data[-8:]
    with pytest.raises(ProtocolViolation, match="empty term history"):
        decode_proposer_message(empty)


def test_append_request_bounds() -> None:
    def header(begin: int, end: int) -> bytes:
        return struct.pack("<QQQQQQQ16s", ord("a"), 1, 0, begin, end, 0, 0, bytes(16))

    with pytest.raises(ProtocolViolation, match="begin_lsn 0/20 > end_lsn 0/10"):
        decode_proposer_message(header(0x20, 0x10))
    with pytest.raises(ProtocolViolation, match="MAX_SEND_SIZE"):
        decode_proposer_message(header(0, MAX_SEND_SIZE + 1) + bytes(MAX_SEND_SIZE + 1))
    assert isinstance(decode_proposer_message(header(0, MAX_SEND_SIZE) + bytes(MAX_SEND_SIZE)), AppendRequest)
    with pytest.raises(ProtocolViolation, match="10 bytes but 9 WAL bytes"):
        decode_proposer_message(header(0, 10) + bytes(9))
    with pytest.raises(ValueError, match="MAX_SEND_SIZE"):
        AppendRequest.build(
            term=1, epoch_start_lsn=0, begin_lsn=0, commit_lsn=0, truncate_lsn=0, wal=bytes(MAX_SEND_SIZE + 1)
        )
    bad_header = AppendRequestHeader(
        term=1, epoch_start_lsn=Lsn(0), begin_lsn=Lsn(0), end_lsn=Lsn(5), commit_lsn=Lsn(0), truncate_lsn=Lsn(0)
    )
    with pytest.raises(ValueError, match="end_lsn - begin_lsn"):
        AppendRequest(bad_header, b"abc")


def test_vote_given_must_be_a_flag() -> None:
    data = bytearray(WORKED_VOTE_RESPONSE)
    struct.pack_into("<Q", data, 16, 2)
    with pytest.raises(ProtocolViolation, match="vote_given"):
        decode_acceptor_message(bytes(data))


def test_append_response_with_broken_feedback() -> None:
    fixed = AppendResponse.term_only(1).encode()
    with pytest.raises(ProtocolViolation, match="AppendResponse: PageserverFeedback"):
        decode_acceptor_message(fixed + b"\x01ps_writelsn")


def test_encoders_refuse_out_of_range_fields() -> None:
    with pytest.raises(ValueError, match="AcceptorGreeting"):
        AcceptorGreeting(term=2**64, node_id=1).encode()
    with pytest.raises(ValueError, match="proposer id"):
        VoteRequest(term=1, proposer_id=b"short").encode()


@settings(max_examples=300)
@given(st.sampled_from([ord(c) for c in "gvea"] + [0, 0x7A]), st.binary(max_size=200))
def test_random_payloads_never_raise_anything_else(tag: int, rest: bytes) -> None:
    payload = struct.pack("<Q", tag) + rest
    for decode in (decode_proposer_message, decode_acceptor_message):
        with contextlib.suppress(ProtocolViolation):
            decode(payload)


@settings(max_examples=200)
@given(st.binary(max_size=120))
def test_random_bytes_never_raise_anything_else(payload: bytes) -> None:
    for decode in (decode_proposer_message, decode_acceptor_message):
        with contextlib.suppress(ProtocolViolation):
            decode(payload)


@settings(max_examples=200)
@given(st.sampled_from(_valid_proposer_payloads() + _valid_acceptor_payloads()), st.data())
def test_corrupted_valid_payloads_never_raise_anything_else(payload: bytes, data: st.DataObject) -> None:
    pos = data.draw(st.integers(0, len(payload) - 1))
    corrupted = payload[:pos] + bytes([data.draw(st.integers(0, 255))]) + payload[pos + 1 :]
    for decode in (decode_proposer_message, decode_acceptor_message):
        with contextlib.suppress(ProtocolViolation):
            decode(corrupted)


# --- per-connection readers ------------------------------------------------------------------


def test_acceptor_protocol_requires_greeting_first() -> None:
    conn = AcceptorProtocol()
    with pytest.raises(LocalProtocolError):
        conn.send(AcceptorGreeting(term=0, node_id=1))
    with pytest.raises(ProtocolViolation, match="first proposer message must be ProposerGreeting, got VoteRequest"):
        conn.receive(WORKED_VOTE_REQUEST)
    assert conn.greeting is None


def test_acceptor_protocol_session() -> None:
    conn = AcceptorProtocol()
    greeting = conn.receive(WORKED_PROPOSER_GREETING)
    assert isinstance(greeting, ProposerGreeting) and conn.greeting == greeting
    assert conn.send(AcceptorGreeting(term=2, node_id=1)) == WORKED_ACCEPTOR_GREETING
    assert conn.receive(WORKED_VOTE_REQUEST) == VoteRequest(term=3)
    elected, append = _valid_proposer_payloads()[2:]
    assert isinstance(conn.receive(elected), ProposerElected)
    assert isinstance(conn.receive(append), AppendRequest)
    with pytest.raises(ProtocolViolation):
        conn.receive(b"\x61")


def _greeting() -> ProposerGreeting:
    return ProposerGreeting(
        tenant_id=TenantId(MOCK_ID),
        timeline_id=TimelineId(MOCK_ID),
        pg_version=160000,
        system_id=0,
        wal_seg_size=1 << 24,
    )


def test_proposer_protocol_session() -> None:
    conn = ProposerProtocol()
    with pytest.raises(ProtocolViolation, match="expecting nothing"):
        conn.receive(WORKED_ACCEPTOR_GREETING)
    with pytest.raises(LocalProtocolError):
        conn.send(VoteRequest(term=3))
    assert conn.send(_greeting()) == WORKED_PROPOSER_GREETING
    with pytest.raises(
        ProtocolViolation, match="unexpected VoteResponse from the safekeeper \\(expecting AcceptorGreeting\\)"
    ):
        conn.receive(WORKED_VOTE_RESPONSE)


def test_proposer_protocol_full_exchange() -> None:
    conn = ProposerProtocol()
    conn.send(_greeting())
    assert conn.receive(WORKED_ACCEPTOR_GREETING) == AcceptorGreeting(term=2, node_id=1)
    with pytest.raises(LocalProtocolError):
        conn.send(AppendRequest.build(term=3, epoch_start_lsn=0, begin_lsn=0, commit_lsn=0, truncate_lsn=0))
    assert conn.send(VoteRequest(term=3)) == WORKED_VOTE_REQUEST
    response = conn.receive(WORKED_VOTE_RESPONSE)
    assert isinstance(response, VoteResponse) and response.vote_given
    with pytest.raises(ProtocolViolation, match="expecting nothing"):
        conn.receive(AppendResponse.term_only(3).encode())
    conn.send(
        ProposerElected(
            term=3,
            start_streaming_at=Lsn(0x539),
            term_history=TermHistory.of((2, 0x539), (3, 0x539)),
            timeline_start_lsn=Lsn(0x539),
        )
    )
    conn.send(AppendRequest.build(term=3, epoch_start_lsn=0x539, begin_lsn=0x539, commit_lsn=0, truncate_lsn=0x539))
    for _ in range(3):
        assert isinstance(conn.receive(AppendResponse.term_only(3).encode()), AppendResponse)
    with pytest.raises(ProtocolViolation, match="unexpected AcceptorGreeting"):
        conn.receive(WORKED_ACCEPTOR_GREETING)


# --- term history ----------------------------------------------------------------------------


def test_up_to_last_term_and_epoch() -> None:
    th = TermHistory.of((1, 10), (2, 20), (4, 40))
    assert th.up_to(9) == TermHistory()
    assert th.up_to(20).pairs() == [(1, 10), (2, 20)]
    assert th.up_to(39).pairs() == [(1, 10), (2, 20)]
    assert th.up_to(2**64 - 1) == th
    assert th.last_term == 4 and TermHistory().last_term == 0
    assert th.term_start_lsn == 40 and th.last == TermLsn(4, Lsn(40))
    assert th.last_log_term(25) == 2 and th.last_log_term(5) == 0 and th.last_log_term(40) == 4
    assert th.appended(5, 50).pairs()[-1] == (5, 50)
    assert th.is_well_formed() and not TermHistory.of((2, 10), (1, 20)).is_well_formed()
    assert th[1] == TermLsn(2, Lsn(20)) and th[1:].pairs() == [(2, 20), (4, 40)] and len(th) == 3


def test_common_point_none() -> None:
    assert TermHistory.find_highest_common_point(TermHistory.of((0, 1)), TermHistory.of((1, 1), (2, 2)), 3) is None
    assert TermHistory.find_highest_common_point(TermHistory.of((1, 1)), TermHistory(), 0) is None


def test_common_point_in_the_middle() -> None:
    prop = TermHistory.of((1, 10), (2, 20), (4, 40))
    sk = TermHistory.of((1, 10), (2, 20), (3, 30))  # sk ends the common term 2 at 30
    assert TermHistory.find_highest_common_point(prop, sk, 40) == TermLsn(2, Lsn(30))


def test_common_point_at_safekeeper_wal_end() -> None:
    prop = TermHistory.of((1, 10), (2, 20), (4, 40))
    sk = TermHistory.of((1, 10), (2, 20))
    assert TermHistory.find_highest_common_point(prop, sk, 32) == TermLsn(2, Lsn(32))


def test_common_point_when_proposer_last_term_is_common() -> None:
    # The proposer's last term extends to infinity: the safekeeper's end of WAL decides.
    th = TermHistory.of((1, 10), (2, 20))
    assert TermHistory.find_highest_common_point(th, th, 32) == TermLsn(2, Lsn(32))


def test_common_point_divergence_example() -> None:
    """§2.7: five safekeepers, the term-3 proposer's history is [(1,1),(2,2),(3,4)]."""
    prop = TermHistory.of((1, 1), (2, 2), (3, 4))
    # A wrote 1.1-1.4 under term 1 only (flush 5): it must truncate at 2, dropping 1.2-1.4.
    assert TermHistory.find_highest_common_point(prop, TermHistory.of((1, 1)), 5) == TermLsn(1, Lsn(2))
    # B and E hold only 1.1 (flush 2): nothing to cut, resume at 2.
    assert TermHistory.find_highest_common_point(prop, TermHistory.of((1, 1)), 2) == TermLsn(1, Lsn(2))
    # C has 2.2 2.3 (epoch 2, flush 4): term 2 ends at 4 on both sides.
    assert TermHistory.find_highest_common_point(prop, TermHistory.of((1, 1), (2, 2)), 4) == TermLsn(2, Lsn(4))
    # D also has 3.4 (flush 5): already in the proposer's own term, resume at its end of WAL.
    assert TermHistory.find_highest_common_point(prop, TermHistory.of((1, 1), (2, 2), (3, 4)), 5) == TermLsn(3, Lsn(5))
    # After A adopts the history its epoch moves as its flush reaches each switch (§1.3).
    assert prop.last_log_term(1) == 1 and prop.last_log_term(2) == 2 and prop.last_log_term(4) == 3


def test_common_point_contradictions() -> None:
    with pytest.raises(TermHistoryMismatch, match="term 2 starts at"):
        TermHistory.find_highest_common_point(TermHistory.of((1, 10), (2, 20)), TermHistory.of((1, 10), (2, 25)), 30)
    with pytest.raises(TermHistoryMismatch, match="beyond its WAL end"):
        TermHistory.find_highest_common_point(TermHistory.of((1, 10)), TermHistory.of((1, 10), (2, 25)), 20)


@given(st.lists(st.tuples(st.integers(1, 5), st.integers(0, 1000)), max_size=6), st.integers(0, 1000))
def test_up_to_is_a_prefix_with_lsns_in_range(pairs: list[tuple[int, int]], lsn: int) -> None:
    pairs.sort(key=lambda p: p[1])
    th = TermHistory.from_pairs(pairs)
    cut = th.up_to(lsn)
    assert th.entries[: len(cut)] == cut.entries
    assert all(e.lsn <= lsn for e in cut)
    assert len(cut) == len(th) or th[len(cut)].lsn > lsn
