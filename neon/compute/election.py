"""The WAL proposer's consensus arithmetic (spec safekeeper-and-broker §1.5, §2.6.2-§2.6.5), sans IO.

This module owns the decisions a proposer makes from what safekeepers tell it: the term to run
for (from the first quorum of greetings), whether a vote answer is acceptable or fatal, the donor,
`epochStartLsn`, `truncateLsn` and `timelineStartLsn` of an election, the proposer's term history,
where each safekeeper resumes (`start_streaming_at`), and the quorum commit LSN. The asyncio
driver (`neon.compute.walproposer`) feeds it messages and acts on the results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from neon.safekeeper.protocol import TermHistory, VoteResponse
from neon.utils.lsn import Lsn


class NewerTermSeen(Exception):
    """A safekeeper has seen a term above ours: another proposer has been (or is being) elected.

    Neon's walproposer terminates the compute here; ours ends its term and starts over."""

    def __init__(self, term: int, ours: int, where: str) -> None:
        super().__init__(f"{where}: safekeeper term {term} is above our term {ours}: another proposer was elected")
        self.term = term


class VoteRefused(Exception):
    """A safekeeper refused its vote before we had a quorum (its term equals the one we asked for)."""


def quorum_size(n: int) -> int:
    """n/2 + 1 (integer division): the smallest majority of n safekeepers."""
    if n < 1:
        raise ValueError("at least one safekeeper is needed")
    return n // 2 + 1


def quorum_lsn(flush_lsns: Sequence[int], epoch_start_lsn: int) -> Lsn:
    """The LSN a quorum has flushed in this term: flushes below `epoch_start_lsn` count as 0
    (acknowledgements of earlier terms' WAL do not count), sorted, element [n - quorum]."""
    n = len(flush_lsns)
    counted = sorted(f if f >= epoch_start_lsn else 0 for f in flush_lsns)
    return Lsn(counted[n - quorum_size(n)])


@dataclass
class Voter:
    """What one safekeeper answered to our VoteRequest (the election inputs of §2.6.3)."""

    index: int
    history: TermHistory
    flush_lsn: Lsn
    truncate_lsn: Lsn
    timeline_start_lsn: Lsn

    @classmethod
    def from_response(cls, index: int, resp: VoteResponse) -> Voter:
        return cls(index, resp.term_history, resp.flush_lsn, resp.truncate_lsn, resp.timeline_start_lsn)

    @property
    def epoch(self) -> int:
        """The term of the last history entry (0 for an empty history)."""
        return self.history.last_term


@dataclass(frozen=True)
class ElectionResult:
    term: int
    donor: int  # safekeeper index
    donor_flush_lsn: Lsn
    epoch_start_lsn: Lsn
    truncate_lsn: Lsn
    timeline_start_lsn: Lsn
    history: TermHistory  # the donor's plus (term, epoch_start_lsn)
    bootstrapped: bool  # no safekeeper had WAL: the timeline starts at the compute's LSN

    @property
    def needs_recovery(self) -> bool:
        """Some voter may lack WAL in [truncate_lsn, epoch_start_lsn) that only the donor has (§2.6.4)."""
        return self.truncate_lsn < self.epoch_start_lsn


class Election:
    """Greetings → term, votes → elected, for `n` configured safekeepers (§2.6.2)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.quorum = quorum_size(n)
        self.term = 0
        self.n_connected = 0  # greetings over the proposer's lifetime, reconnects included
        self.voters: dict[int, Voter] = {}
        self.result: ElectionResult | None = None

    @property
    def term_chosen(self) -> bool:
        """The first quorum of greetings has arrived: VoteRequests may go out."""
        return self.n_connected >= self.quorum

    def on_greeting(self, term: int) -> None:
        """An AcceptorGreeting with the safekeeper's current term."""
        self.n_connected += 1
        if self.n_connected <= self.quorum:
            self.term = max(self.term, term)
            if self.n_connected == self.quorum:
                self.term += 1
        elif term > self.term:
            raise NewerTermSeen(term, self.term, "greeting")

    def on_vote(self, index: int, resp: VoteResponse) -> bool:
        """A VoteResponse; True when it is a vote counted before the election completed.

        A refusal is tolerated only once we are elected (a reconnecting safekeeper that already
        voted for us answers with our own term, not granted); otherwise it is fatal."""
        if not resp.vote_given:
            if resp.term > self.term:
                raise NewerTermSeen(resp.term, self.term, "vote")
            if self.result is None:
                raise VoteRefused(
                    f"safekeeper {index} refused its vote for term {self.term} (its term is {resp.term})"
                    " before we had a quorum: another proposer runs for the same term"
                )
        if self.result is not None:
            return False
        self.voters[index] = Voter.from_response(index, resp)
        return True

    @property
    def has_quorum_of_votes(self) -> bool:
        return len(self.voters) >= self.quorum

    def elect(self, *, bootstrap_lsn: int | None) -> ElectionResult:
        """Decide donor, epochStartLsn, truncateLsn and history from the voters (§2.6.3).

        `bootstrap_lsn` is where the compute's WAL begins (its basebackup LSN); None in
        sync-safekeepers mode, where nobody having WAL leaves epochStartLsn at 0."""
        if self.result is not None:
            return self.result
        if not self.has_quorum_of_votes:
            raise RuntimeError(f"elect() with {len(self.voters)} votes, quorum is {self.quorum}")
        voters = [self.voters[i] for i in sorted(self.voters)]
        donor = voters[0]
        for v in voters[1:]:
            if v.epoch > donor.epoch or (v.epoch == donor.epoch and v.flush_lsn > donor.flush_lsn):
                donor = v
        epoch_start = donor.flush_lsn
        truncate = max(v.truncate_lsn for v in voters)
        starts = {v.timeline_start_lsn for v in voters if v.timeline_start_lsn}
        timeline_start = min(starts) if starts else Lsn(0)
        bootstrapped = False
        if epoch_start == 0 and bootstrap_lsn is not None:
            epoch_start = truncate = Lsn(bootstrap_lsn)
            if not timeline_start:
                timeline_start = Lsn(bootstrap_lsn)
            bootstrapped = True
        history = donor.history.appended(self.term, epoch_start) if epoch_start else donor.history
        self.result = ElectionResult(
            term=self.term,
            donor=donor.index,
            donor_flush_lsn=donor.flush_lsn,
            epoch_start_lsn=Lsn(epoch_start),
            truncate_lsn=Lsn(truncate),
            timeline_start_lsn=Lsn(timeline_start),
            history=history,
            bootstrapped=bootstrapped,
        )
        return self.result


def start_streaming_at(
    proposer: TermHistory, term: int, sk_history: TermHistory, sk_flush: int, truncate_lsn: int, available_lsn: int
) -> Lsn:
    """Where a safekeeper with history `sk_history` and flush `sk_flush` resumes (§2.6.5)."""
    point = TermHistory.find_highest_common_point(proposer, sk_history, sk_flush)
    if point is None:
        start = max(proposer[0].lsn, Lsn(truncate_lsn))
    elif point.term == term:
        start = Lsn(sk_flush)
    else:
        start = point.lsn
    if not truncate_lsn <= start <= available_lsn:
        raise RuntimeError(
            f"start_streaming_at {start} outside [truncate_lsn {Lsn(truncate_lsn)}, available {Lsn(available_lsn)}]"
        )
    return start


__all__ = [
    "Election",
    "ElectionResult",
    "NewerTermSeen",
    "VoteRefused",
    "Voter",
    "quorum_lsn",
    "quorum_size",
    "start_streaming_at",
]
