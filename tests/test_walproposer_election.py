"""The proposer's consensus arithmetic (neon.compute.election) against spec §1.5 and §2.6-§2.7."""

from __future__ import annotations

import pytest

from neon.compute.election import (
    Election,
    NewerTermSeen,
    VoteRefused,
    quorum_lsn,
    quorum_size,
    start_streaming_at,
)
from neon.compute.wal_spool import WalNotInSpool, WalSpool
from neon.safekeeper.protocol import TermHistory, VoteResponse
from neon.utils.lsn import Lsn


def vote(term: int, flush: int, history: TermHistory, *, given: bool = True, truncate: int = 0, start: int = 0):
    return VoteResponse(
        term=term,
        vote_given=given,
        flush_lsn=Lsn(flush),
        truncate_lsn=Lsn(truncate),
        term_history=history,
        timeline_start_lsn=Lsn(start),
    )


def test_quorum_size_and_lsn() -> None:
    assert [quorum_size(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]
    # The quorum-th highest flush; flushes below the term's start count as 0.
    assert quorum_lsn([100, 300, 200], 0) == 200
    assert quorum_lsn([100, 300, 200], 150) == 200
    assert quorum_lsn([100, 300, 120], 150) == 0  # only one safekeeper has WAL of this term
    assert quorum_lsn([0, 0, 500], 0) == 0
    assert quorum_lsn([10, 20, 30, 40, 50], 0) == 30
    with pytest.raises(ValueError):
        quorum_size(0)


def test_term_is_one_above_the_first_quorum_of_greetings() -> None:
    e = Election(3)
    e.on_greeting(4)
    assert not e.term_chosen
    e.on_greeting(7)
    assert e.term_chosen and e.term == 8
    e.on_greeting(8)  # a late greeting at our term (a reconnect) is fine
    with pytest.raises(NewerTermSeen):
        e.on_greeting(9)  # a later one above it means another proposer


def test_votes_donor_and_bootstrap() -> None:
    e = Election(3)
    for t in (1, 1):
        e.on_greeting(t)
    h1 = TermHistory.of((1, 0x100))
    assert e.on_vote(0, vote(2, 0x500, h1, truncate=0x300, start=0x100))
    assert not e.has_quorum_of_votes
    assert e.on_vote(2, vote(2, 0x700, h1, truncate=0x200, start=0x100))
    r = e.elect(bootstrap_lsn=0x900)
    # donor: same epoch, higher flush; truncate: the max over voters; history extended by our term.
    assert (r.donor, r.epoch_start_lsn, r.truncate_lsn, r.timeline_start_lsn) == (2, 0x700, 0x300, 0x100)
    assert r.history == TermHistory.of((1, 0x100), (2, 0x700)) and r.needs_recovery and not r.bootstrapped
    # A late voter is answered with ProposerElected but does not change the result.
    assert not e.on_vote(1, vote(2, 0x100, h1))
    assert e.elect(bootstrap_lsn=None) is r

    fresh = Election(3)
    fresh.on_greeting(0)
    fresh.on_greeting(0)
    fresh.on_vote(0, vote(1, 0, TermHistory(())))
    fresh.on_vote(1, vote(1, 0, TermHistory(())))
    b = fresh.elect(bootstrap_lsn=0x1_6B_91_88)
    assert b.bootstrapped and b.epoch_start_lsn == b.truncate_lsn == b.timeline_start_lsn == 0x16B9188
    assert b.history == TermHistory.of((1, 0x16B9188)) and not b.needs_recovery
    sync = Election(1)
    sync.on_greeting(0)
    sync.on_vote(0, vote(1, 0, TermHistory(())))
    assert sync.elect(bootstrap_lsn=None).epoch_start_lsn == 0  # sync mode on a new timeline: 0/0


def test_higher_epoch_beats_higher_flush_and_refusals() -> None:
    e = Election(3)
    e.on_greeting(2)
    e.on_greeting(2)
    e.on_vote(0, vote(3, 0x900, TermHistory.of((1, 0x10))))
    e.on_vote(1, vote(3, 0x500, TermHistory.of((1, 0x10), (2, 0x400))))
    assert e.elect(bootstrap_lsn=None).donor == 1

    e = Election(3)
    e.on_greeting(2)
    e.on_greeting(2)
    with pytest.raises(VoteRefused):
        e.on_vote(0, vote(3, 0, TermHistory(()), given=False))  # same term, before quorum
    with pytest.raises(NewerTermSeen):
        e.on_vote(0, vote(5, 0, TermHistory(()), given=False))


def test_start_streaming_at_in_the_divergence_example() -> None:
    """Spec §2.7, step 4 (term 3's proposer; A comes back with 1.1-1.4) plus the other cases of §2.6.5."""
    p = TermHistory.of((1, 1), (2, 2), (3, 4))
    # A: history [(1,1)], flush 5: truncated back to 2, where term 2 began.
    assert start_streaming_at(p, 3, TermHistory.of((1, 1)), 5, 1, 9) == 2
    # B/E: [(1,1)], flush 2: resume at 2.
    assert start_streaming_at(p, 3, TermHistory.of((1, 1)), 2, 1, 9) == 2
    # C: [(1,1),(2,2)], flush 4: resume at 4 (where term 3 starts).
    assert start_streaming_at(p, 3, TermHistory.of((1, 1), (2, 2)), 4, 1, 9) == 4
    # D reconnecting in our own term: resume at its flush.
    assert start_streaming_at(p, 3, p, 7, 1, 9) == 7
    # An empty safekeeper joins: from truncateLsn.
    assert start_streaming_at(p, 3, TermHistory(()), 0, 3, 9) == 3
    with pytest.raises(RuntimeError):
        start_streaming_at(p, 3, p, 10, 1, 9)  # beyond what the proposer has


def test_wal_spool() -> None:
    s = WalSpool(100)
    s.append(100, b"abcdef")
    s.append(103, b"defgh")  # overlap: only the new bytes are added
    assert s.end_lsn == 108 and s.read(102, 3) == b"cde"
    with pytest.raises(ValueError, match="gap"):
        s.append(110, b"x")
    s.trim(104)
    assert s.start_lsn == 104 and s.read(104, 100) == b"efgh"
    with pytest.raises(WalNotInSpool):
        s.read(103, 1)
    s.trim(1000)
    assert s.start_lsn == 108 and len(s) == 0 and s.read(108, 5) == b""
