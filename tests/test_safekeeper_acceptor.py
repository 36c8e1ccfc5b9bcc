"""The acceptor state machine (spec safekeeper-and-broker §2.5.3, §2.7, §3.2.3), sans-IO.

A real `WalStorage` on a tmp dir is fed real PG15 WAL (the `pg_wal` fixture of the WAL storage
tests: 1 MiB segments, record boundaries from pg_waldump), and every persisted state is read back
from the control file on disk.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from neon.postgres.walformat import parse_wal_file_name, wal_file_name
from neon.safekeeper import control_file
from neon.safekeeper.acceptor import Acceptor, AcceptorError
from neon.safekeeper.control_file import SafeKeeperState, ServerInfo
from neon.safekeeper.protocol import (
    MAX_SEND_SIZE,
    AcceptorGreeting,
    AppendRequest,
    AppendResponse,
    ProposerElected,
    ProposerGreeting,
    TermHistory,
    VoteRequest,
    VoteResponse,
)
from neon.safekeeper.wal_storage import WalStorage
from neon.utils.id import TenantId, TimelineId
from neon.utils.lsn import Lsn
from tests.test_safekeeper_wal_storage import SEG, PgWal, pg_wal  # noqa: F401  (fixture)

TENANT = TenantId("11" * 16)
TIMELINE = TimelineId("22" * 16)
PG_VERSION = 150004
PROPOSER = bytes(range(16))


@dataclass
class Harness:
    dir: Path
    acceptor: Acceptor
    persisted: list[SafeKeeperState] = field(default_factory=list)

    def on_disk(self) -> SafeKeeperState:
        return control_file.load(self.dir)

    def reopen(self) -> Harness:
        """A restart: load the control file and find the end of WAL, as the daemon does."""
        self.acceptor.wal.close()
        state = self.on_disk()
        wal = WalStorage.open(self.dir, wal_seg_size=SEG, commit_lsn=state.commit_lsn, no_sync=True)
        return _harness(self.dir, state, wal)


def _harness(d: Path, state: SafeKeeperState, wal: WalStorage) -> Harness:
    h = Harness(d, None)  # type: ignore[arg-type]

    def persist(new: SafeKeeperState) -> None:
        control_file.persist(d, new, no_sync=True)
        h.persisted.append(new)

    h.acceptor = Acceptor(state, wal, persist, node_id=7)
    return h


@pytest.fixture
def sk(tmp_path: Path, pg_wal: PgWal) -> Iterator[Harness]:  # noqa: F811
    d = tmp_path / str(TENANT) / str(TIMELINE)
    d.mkdir(parents=True)
    state = control_file.initial(TENANT, TIMELINE, ServerInfo(pg_version=PG_VERSION, system_id=0, wal_seg_size=SEG))
    control_file.persist(d, state, no_sync=True)
    h = _harness(d, state, WalStorage(d, wal_seg_size=SEG, no_sync=True))
    yield h
    h.acceptor.wal.close()


def greeting(**kw: object) -> ProposerGreeting:
    fields: dict[str, object] = dict(
        tenant_id=TENANT, timeline_id=TIMELINE, pg_version=PG_VERSION, system_id=0, wal_seg_size=SEG
    )
    fields.update(kw)
    return ProposerGreeting(**fields)  # type: ignore[arg-type]


def appends(
    wal: PgWal, start: int, end: int, *, term: int, commit: int = 0, truncate: int = 0, size: int = 50000
) -> list[AppendRequest]:
    """WAL [start, end) as AppendRequests of `size` bytes (not on record boundaries)."""
    out = []
    pos = start
    while pos < end:
        n = min(size, end - pos, MAX_SEND_SIZE)
        out.append(
            AppendRequest.build(
                term=term,
                epoch_start_lsn=0,
                begin_lsn=pos,
                commit_lsn=commit,
                truncate_lsn=truncate,
                wal=wal.bytes(pos, pos + n),
                proposer_id=PROPOSER,
            )
        )
        pos += n
    return out


def elect(sk: Harness, term: int, start: int, history: TermHistory, timeline_start: int) -> None:
    a = sk.acceptor
    vote = a.process(VoteRequest(term=term))
    assert isinstance(vote, VoteResponse) and vote.vote_given
    msg = ProposerElected(
        term=term, start_streaming_at=Lsn(start), term_history=history, timeline_start_lsn=Lsn(timeline_start)
    )
    assert a.process(msg) is None


def stream(sk: Harness, reqs: list[AppendRequest]) -> AppendResponse:
    a = sk.acceptor
    for r in reqs:
        assert a.handle_append(r, flush=False) is None
    return a.flush()


# --- greeting -----------------------------------------------------------------------------------


def test_greeting_reports_term_and_adopts_system_id(sk: Harness) -> None:
    a = sk.acceptor
    reply = a.process(greeting())
    assert reply == AcceptorGreeting(term=0, node_id=7)
    assert sk.persisted == []  # a zero system id (sync-safekeepers) changes nothing
    a.process(greeting(system_id=1234))
    assert sk.on_disk().server.system_id == 1234
    assert len(sk.persisted) == 1


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"tenant_id": TenantId("33" * 16)}, "tenant"),
        ({"timeline_id": TimelineId("44" * 16)}, "timeline"),
        ({"wal_seg_size": 16 * 1024 * 1024}, "wal_seg_size"),
        ({"pg_version": 160000}, "server version"),
        ({"protocol_version": 3}, "protocol version"),
    ],
)
def test_greeting_mismatch_is_refused(sk: Harness, change: dict[str, object], needle: str) -> None:
    with pytest.raises(AcceptorError, match=needle):
        sk.acceptor.process(greeting(**change))
    assert sk.persisted == []


# --- voting -------------------------------------------------------------------------------------


def test_vote_persists_term_before_replying(sk: Harness) -> None:
    a = sk.acceptor
    reply = a.process(VoteRequest(term=5))
    assert isinstance(reply, VoteResponse)
    assert (reply.term, reply.vote_given) == (5, True)
    assert sk.on_disk().acceptor_state.term == 5
    again = a.process(VoteRequest(term=5))
    assert isinstance(again, VoteResponse) and (again.term, again.vote_given) == (5, False)
    lower = a.process(VoteRequest(term=3))
    assert isinstance(lower, VoteResponse) and (lower.term, lower.vote_given) == (5, False)
    assert len(sk.persisted) == 1


def test_vote_flushes_received_wal_first(sk: Harness, pg_wal: PgWal) -> None:  # noqa: F811
    wal = pg_wal
    elect(sk, 1, wal.start, TermHistory.of((1, wal.start)), wal.start)
    mid = wal.start + 300000
    for r in appends(wal, wal.start, mid, term=1):
        sk.acceptor.handle_append(r, flush=False)
    assert sk.acceptor.flush_lsn == wal.start  # nothing fsynced yet
    vote = sk.acceptor.process(VoteRequest(term=2))
    assert isinstance(vote, VoteResponse) and vote.vote_given
    assert vote.flush_lsn == wal.last_end_at_or_before(mid)
    assert vote.term_history == TermHistory.of((1, wal.start))
    assert vote.timeline_start_lsn == wal.start


# --- election, streaming, commit ----------------------------------------------------------------


def test_elected_sets_start_lsns_and_streaming_reports_flush(sk: Harness, pg_wal: PgWal) -> None:  # noqa: F811
    wal = pg_wal
    elect(sk, 1, wal.start, TermHistory.of((1, wal.start)), wal.start)
    disk = sk.on_disk()
    assert (disk.timeline_start_lsn, disk.local_start_lsn, disk.commit_lsn) == (wal.start, wal.start, wal.start)
    assert disk.term_history == TermHistory.of((1, wal.start))
    assert sk.acceptor.epoch_start_lsn == wal.start
    end = wal.start + 700000
    resp = stream(sk, appends(wal, wal.start, end, term=1))
    assert resp.term == 1
    assert resp.flush_lsn == wal.last_end_at_or_before(end)
    assert sk.acceptor.epoch == 1


def test_greeting_of_another_system_is_refused_once_the_timeline_has_wal(sk: Harness, pg_wal: PgWal) -> None:  # noqa: F811
    wal = pg_wal
    a = sk.acceptor
    a.process(greeting(system_id=1234))
    a.process(greeting(system_id=5678))  # no WAL yet: adopted, as Neon does
    assert sk.on_disk().server.system_id == 5678
    elect(sk, 1, wal.start, TermHistory.of((1, wal.start)), wal.start)
    stream(sk, appends(wal, wal.start, wal.start + 100000, term=1))
    before = len(sk.persisted)
    with pytest.raises(AcceptorError, match="system id mismatch"):
        a.process(greeting(system_id=1234))
    assert sk.on_disk().server.system_id == 5678 and len(sk.persisted) == before
    a.process(greeting(system_id=0))  # sync-safekeepers: fine
    a.process(greeting(system_id=5678))


def test_commit_lsn_is_bounded_by_flush_and_never_decreases(sk: Harness, pg_wal: PgWal) -> None:  # noqa: F811
    wal = pg_wal
    a = sk.acceptor
    elect(sk, 1, wal.start, TermHistory.of((1, wal.start)), wal.start)
    end = wal.start + 400000
    flushed = wal.last_end_at_or_before(end)
    reqs = appends(wal, wal.start, end, term=1, commit=wal.end)
    # No-flush appends: commit is bounded by the (old) flush LSN.
    for r in reqs:
        a.handle_append(r, flush=False)
    assert a.commit_lsn == wal.start
    a.flush()
    heartbeat = AppendRequest.build(term=1, epoch_start_lsn=0, begin_lsn=end, commit_lsn=wal.end, truncate_lsn=0)
    resp = a.handle_append(heartbeat, flush=True)
    assert a.commit_lsn == flushed  # min(candidate, flush_lsn)
    lower = AppendRequest.build(term=1, epoch_start_lsn=0, begin_lsn=end, commit_lsn=wal.start + 8, truncate_lsn=0)
    a.handle_append(lower, flush=True)
    assert a.commit_lsn == flushed  # never decreases
    # The reply carries the *persisted* commit LSN: not persisted yet (commit did not cross a
    # term start: the term started where the timeline did).
    assert isinstance(resp, AppendResponse) and resp.commit_lsn == wal.start == sk.on_disk().commit_lsn


def test_commit_is_persisted_when_it_crosses_epoch_start(sk: Harness, pg_wal: PgWal) -> None:  # noqa: F811
    wal = pg_wal
    a = sk.acceptor
    elect(sk, 1, wal.start, TermHistory.of((1, wal.start)), wal.start)
    end1 = wal.start + 300000
    stream(sk, appends(wal, wal.start, end1, term=1))
    e2 = a.flush_lsn  # term 2 starts where this safekeeper's WAL ends
    elect(sk, 2, e2, TermHistory.of((1, wal.start), (2, e2)), wal.start)
    assert a.epoch == 2 and a.epoch_start_lsn == e2
    end2 = e2 + 300000
    stream(sk, appends(wal, e2, end2, term=2))
    below = AppendRequest.build(term=2, epoch_start_lsn=e2, begin_lsn=end2, commit_lsn=e2 - 8, truncate_lsn=0)
    a.handle_append(below, flush=True)
    assert a.commit_lsn == e2 - 8 and sk.on_disk().commit_lsn == wal.start
    target = wal.last_end_at_or_before(end2)
    cross = AppendRequest.build(term=2, epoch_start_lsn=e2, begin_lsn=end2, commit_lsn=target, truncate_lsn=0)
    resp = a.handle_append(cross, flush=True)
    assert sk.on_disk().commit_lsn == target
    assert isinstance(resp, AppendResponse) and resp.commit_lsn == target


def test_peer_horizon_persisted_beyond_one_segment(sk: Harness, pg_wal: PgWal) -> None:  # noqa: F811
    wal = pg_wal
    a = sk.acceptor
    elect(sk, 1, wal.start, TermHistory.of((1, wal.start)), wal.start)
    persisted = sk.on_disk().peer_horizon_lsn
    small = AppendRequest.build(
        term=1, epoch_start_lsn=0, begin_lsn=wal.start, commit_lsn=0, truncate_lsn=persisted + 8
    )
    a.handle_append(small, flush=True)
    assert a.inmem.peer_horizon_lsn == persisted + 8 and sk.on_disk().peer_horizon_lsn == persisted
    big = persisted + SEG + 16
    a.handle_append(
        AppendRequest.build(term=1, epoch_start_lsn=0, begin_lsn=wal.start, commit_lsn=0, truncate_lsn=big),
        flush=True,
    )
    assert sk.on_disk().peer_horizon_lsn == big


def test_divergent_wal_is_truncated_by_history(sk: Harness, pg_wal: PgWal) -> None:  # noqa: F811
    """§2.7: A holds term-1 WAL beyond the point where terms 2 and 3 took over elsewhere."""
    wal = pg_wal
    a = sk.acceptor
    elect(sk, 1, wal.start, TermHistory.of((1, wal.start)), wal.start)
    stream(sk, appends(wal, wal.start, wal.start + 900000, term=1))
    a_flush = a.flush_lsn
    two = wal.last_end_at_or_before(wal.start + 200000)  # where term 2 began on the others
    three = wal.last_end_at_or_before(wal.start + 500000)
    proposer = TermHistory.of((1, wal.start), (2, two), (3, three))
    vote = a.process(VoteRequest(term=3))
    assert isinstance(vote, VoteResponse)
    common = TermHistory.find_highest_common_point(proposer, vote.term_history, vote.flush_lsn)
    assert common is not None and common.lsn == two
    a.process(ProposerElected(term=3, start_streaming_at=common.lsn, term_history=proposer, timeline_start_lsn=Lsn(0)))
    assert a.flush_lsn == two < a_flush
    assert sk.on_disk().term_history == proposer
    assert a.epoch == 2  # the flush reaches term 2's start; 3 once it reaches `three`
    # The bytes after the truncation point are zeros and later segments are gone.
    segno, offset = divmod(two, SEG)
    seg = sk.dir / (wal_file_name(1, segno, SEG) + ".partial")
    assert seg.read_bytes()[offset:] == bytes(SEG - offset)
    assert not any(parse_wal_file_name(p.name, SEG)[1] > segno for p in sk.dir.glob("0000*"))
    stream(sk, appends(wal, two, wal.start + 600000, term=3))
    assert a.epoch == 3


def test_refusals(sk: Harness, pg_wal: PgWal) -> None:  # noqa: F811
    wal = pg_wal
    a = sk.acceptor
    elect(sk, 1, wal.start, TermHistory.of((1, wal.start)), wal.start)
    stream(sk, appends(wal, wal.start, wal.start + 300000, term=1, commit=wal.end))
    a.handle_append(
        AppendRequest.build(
            term=1, epoch_start_lsn=0, begin_lsn=wal.start + 300000, commit_lsn=wal.end, truncate_lsn=0
        ),
        flush=True,
    )
    # An append of a term never elected here.
    with pytest.raises(AcceptorError, match="before ProposerElected"):
        a.handle_append(appends(wal, wal.start + 300000, wal.start + 300100, term=2)[0], flush=True)
    # Same-epoch ProposerElected that would cut flushed WAL.
    with pytest.raises(AcceptorError, match="overwrite correct WAL"):
        a.process(
            ProposerElected(
                term=1,
                start_streaming_at=Lsn(wal.start),
                term_history=TermHistory.of((1, wal.start)),
                timeline_start_lsn=Lsn(wal.start),
            )
        )
    # A new term may not truncate below commit_lsn.
    assert a.commit_lsn > wal.start
    a.process(VoteRequest(term=2))
    with pytest.raises(AcceptorError, match="below commit_lsn"):
        a.process(
            ProposerElected(
                term=2,
                start_streaming_at=Lsn(wal.start),
                term_history=TermHistory.of((1, wal.start), (2, wal.start)),
                timeline_start_lsn=Lsn(wal.start),
            )
        )
    assert a.flush_lsn == wal.last_end_at_or_before(wal.start + 300000)  # nothing was truncated
    # A stale proposer's append is answered with our term only; its ProposerElected is ignored.
    stale = a.handle_append(appends(wal, wal.start + 300000, wal.start + 300100, term=1)[0], flush=False)
    assert stale == AppendResponse.term_only(2)
    before = sk.on_disk()
    a.process(
        ProposerElected(
            term=1, start_streaming_at=Lsn(wal.start), term_history=TermHistory.of((1, 8)), timeline_start_lsn=Lsn(0)
        )
    )
    assert sk.on_disk() == before


def test_reported_flush_is_at_least_timeline_start(tmp_path: Path) -> None:
    d = tmp_path / "tl"
    d.mkdir()
    state = control_file.initial(
        TENANT, TIMELINE, ServerInfo(pg_version=PG_VERSION, system_id=0, wal_seg_size=SEG)
    ).replace(timeline_start_lsn=Lsn(0x1000028))
    h = _harness(d, state, WalStorage(d, wal_seg_size=SEG, no_sync=True))
    vote = h.acceptor.process(VoteRequest(term=1))
    assert isinstance(vote, VoteResponse)
    assert h.acceptor.flush_lsn == 0 and vote.flush_lsn == 0x1000028
    assert h.acceptor.flush().flush_lsn == 0x1000028


def test_restart_keeps_term_history_and_wal(sk: Harness, pg_wal: PgWal) -> None:  # noqa: F811
    wal = pg_wal
    elect(sk, 1, wal.start, TermHistory.of((1, wal.start)), wal.start)
    end = wal.start + 500000
    stream(sk, appends(wal, wal.start, end, term=1))
    flushed = sk.acceptor.flush_lsn
    again = sk.reopen()
    assert again.acceptor.term == 1
    assert again.acceptor.state.term_history == TermHistory.of((1, wal.start))
    assert again.acceptor.flush_lsn == flushed
    vote = again.acceptor.process(VoteRequest(term=2))
    assert isinstance(vote, VoteResponse) and vote.flush_lsn == flushed
    again.acceptor.wal.close()
