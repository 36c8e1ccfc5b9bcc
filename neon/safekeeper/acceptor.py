"""The per-timeline Paxos acceptor state machine (spec safekeeper-and-broker §2.5.3, §3.2.3).

This module owns the *rules*: what a safekeeper does with each proposer message, which LSNs move,
and when the control file must be persisted. It is plain synchronous code over

* a `SafeKeeperState` (the persisted control file contents),
* a `WalStorage` (the segment files; blocking I/O — callers run the acceptor in a worker thread),
* a `persist` callable that durably replaces the control file with a new state.

Networking, batching and locking belong to the WAL service and the timeline; hot-standby and
pageserver feedback are filled into AppendResponses by the timeline.

`commit_lsn`, `backup_lsn`, `peer_horizon_lsn`, `proposer_uuid` and `remote_consistent_lsn` advance
in memory first (`InMemoryState`) and reach the control file lazily, at the moments §3.2.3 lists;
AppendResponse reports the *persisted* commit LSN (sync-safekeepers waits for it).

Anything that must end the proposer connection (term violations, WAL that would be overwritten,
mismatching greetings, storage errors) raises `AcceptorError`; the timeline stays usable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from neon.safekeeper.control_file import AcceptorState, SafeKeeperState, ServerInfo
from neon.safekeeper.protocol import (
    PROTOCOL_VERSION,
    AcceptorGreeting,
    AcceptorMessage,
    AppendRequest,
    AppendResponse,
    ProposerElected,
    ProposerGreeting,
    ProposerMessage,
    VoteRequest,
    VoteResponse,
)
from neon.safekeeper.wal_storage import FlushTicket, WalStorage, WalStorageError
from neon.utils.logging import get_logger
from neon.utils.lsn import Lsn

log = get_logger("safekeeper.acceptor")

PersistFn = Callable[[SafeKeeperState], None]


class AcceptorError(Exception):
    """A proposer message that cannot be accepted; ends that proposer connection only."""


@dataclass(slots=True)
class InMemoryState:
    """Values that run ahead of the control file and are persisted lazily."""

    commit_lsn: Lsn
    backup_lsn: Lsn
    peer_horizon_lsn: Lsn
    remote_consistent_lsn: Lsn
    proposer_uuid: bytes

    @classmethod
    def of(cls, state: SafeKeeperState) -> InMemoryState:
        return cls(
            commit_lsn=state.commit_lsn,
            backup_lsn=state.backup_lsn,
            peer_horizon_lsn=state.peer_horizon_lsn,
            remote_consistent_lsn=state.remote_consistent_lsn,
            proposer_uuid=state.proposer_uuid,
        )


@dataclass(slots=True)
class AcceptorStats:
    """Counters for /metrics (the acceptor knows how long its fsyncs take)."""

    flushes: int = 0
    flush_seconds: float = 0.0
    persists: int = 0
    bytes_written: int = 0


class Acceptor:
    """One timeline's acceptor. Not thread-safe: the caller serialises calls (the timeline lock)."""

    def __init__(self, state: SafeKeeperState, wal: WalStorage, persist: PersistFn, *, node_id: int) -> None:
        self.state = state
        self.wal = wal
        self._persist_fn = persist
        self.node_id = node_id
        self.inmem = InMemoryState.of(state)
        # Where the current term's WAL begins; set by the latest accepted ProposerElected.
        self.epoch_start_lsn = Lsn(0)
        self.stats = AcceptorStats()
        self._flush_started = 0.0

    # --- derived values ---------------------------------------------------------------------
    @property
    def term(self) -> int:
        return self.state.acceptor_state.term

    @property
    def flush_lsn(self) -> Lsn:
        """The raw local flush LSN (TIMELINE_STATUS, HTTP status)."""
        return self.wal.flush_lsn

    @property
    def reported_flush_lsn(self) -> Lsn:
        """What votes, append responses and the broker carry: max(flush_lsn, timeline_start_lsn)."""
        return Lsn(max(self.wal.flush_lsn, self.state.timeline_start_lsn))

    @property
    def epoch(self) -> int:
        """last_log_term: term of the last history entry at or before the local flush LSN."""
        return self.state.acceptor_state.last_log_term(self.wal.flush_lsn)

    @property
    def commit_lsn(self) -> Lsn:
        return self.inmem.commit_lsn

    # --- persistence ------------------------------------------------------------------------
    def persist(self, **changes: object) -> None:
        """Write the state (with the in-memory lazy values and `changes`) durably, then adopt it."""
        new = self.state.replace(
            commit_lsn=self.inmem.commit_lsn,
            backup_lsn=self.inmem.backup_lsn,
            peer_horizon_lsn=self.inmem.peer_horizon_lsn,
            remote_consistent_lsn=self.inmem.remote_consistent_lsn,
            proposer_uuid=self.inmem.proposer_uuid,
            **changes,
        )
        self._persist_fn(new)
        self.state = new  # only after the write succeeded (§3.2.2 step 6)
        self.stats.persists += 1

    def persist_if_lagging(self) -> bool:
        """Persist if any lazy value moved since the last persist (shutdown, periodic save)."""
        s, m = self.state, self.inmem
        if (s.commit_lsn, s.backup_lsn, s.peer_horizon_lsn, s.remote_consistent_lsn, s.proposer_uuid) == (
            m.commit_lsn,
            m.backup_lsn,
            m.peer_horizon_lsn,
            m.remote_consistent_lsn,
            m.proposer_uuid,
        ):
            return False
        self.persist()
        return True

    # --- dispatch ---------------------------------------------------------------------------
    def process(self, msg: ProposerMessage) -> AcceptorMessage | None:
        """Handle one message; AppendRequests use the flush variant (fsync + reply)."""
        if isinstance(msg, ProposerGreeting):
            return self.handle_greeting(msg)
        if isinstance(msg, VoteRequest):
            return self.handle_vote_request(msg)
        if isinstance(msg, ProposerElected):
            self.handle_elected(msg)
            return None
        if isinstance(msg, AppendRequest):
            return self.handle_append(msg, flush=True)
        raise AcceptorError(f"unexpected proposer message {type(msg).__name__}")

    # --- ProposerGreeting -------------------------------------------------------------------
    def handle_greeting(self, msg: ProposerGreeting) -> AcceptorGreeting:
        if msg.protocol_version != PROTOCOL_VERSION:
            raise AcceptorError(f"incompatible protocol version {msg.protocol_version}, expected {PROTOCOL_VERSION}")
        server = self.state.server
        if server.pg_version != 0 and server.pg_version // 10000 != msg.pg_version // 10000:
            raise AcceptorError(f"incompatible server version {msg.pg_version}, expected {server.pg_version}")
        if bytes(msg.tenant_id) != bytes(self.state.tenant_id):
            raise AcceptorError(f"invalid tenant ID, got {msg.tenant_id}, expected {self.state.tenant_id}")
        if bytes(msg.timeline_id) != bytes(self.state.timeline_id):
            raise AcceptorError(f"invalid timeline ID, got {msg.timeline_id}, expected {self.state.timeline_id}")
        if msg.wal_seg_size != server.wal_seg_size:
            raise AcceptorError(f"invalid wal_seg_size, got {msg.wal_seg_size}, expected {server.wal_seg_size}")
        # A zero system id comes from sync-safekeepers and tells nothing; a real one is adopted.
        if msg.system_id != 0 and msg.system_id != server.system_id:
            if server.system_id != 0 and self.wal.flush_lsn > 0:
                # Deviation from Neon, which overwrites and warns: WAL of two database systems in
                # one timeline cannot be right (a compute of another cluster pointed here).
                raise AcceptorError(
                    f"system id mismatch: the proposer's system is {msg.system_id}, this timeline holds WAL"
                    f" of system {server.system_id}"
                )
            if server.system_id != 0:
                log.warning(
                    "changing system_id in the control file",
                    old=server.system_id,
                    new=msg.system_id,
                    tenant_id=str(self.state.tenant_id),
                    timeline_id=str(self.state.timeline_id),
                )
            self.persist(
                server=ServerInfo(
                    pg_version=msg.pg_version if msg.pg_version != 0 else server.pg_version,
                    system_id=msg.system_id,
                    wal_seg_size=server.wal_seg_size,
                )
            )
        return AcceptorGreeting(term=self.term, node_id=self.node_id)

    # --- VoteRequest ------------------------------------------------------------------------
    def handle_vote_request(self, msg: VoteRequest) -> VoteResponse:
        # Everything received must be durable before voting: WAL a stale proposer may have
        # counted as acknowledged must not be missing from this vote's flush_lsn.
        self._flush_wal()
        given = False
        if self.term < msg.term:
            self.persist(acceptor_state=AcceptorState(term=msg.term, term_history=self.state.term_history))
            given = True
        return VoteResponse(
            term=self.term,
            vote_given=given,
            flush_lsn=self.reported_flush_lsn,
            truncate_lsn=self.inmem.peer_horizon_lsn,
            term_history=self.state.term_history.up_to(self.wal.flush_lsn),
            timeline_start_lsn=self.state.timeline_start_lsn,
        )

    # --- ProposerElected --------------------------------------------------------------------
    def handle_elected(self, msg: ProposerElected) -> None:
        if self.term < msg.term:
            self.persist(acceptor_state=AcceptorState(term=msg.term, term_history=self.state.term_history))
        if self.term > msg.term:
            return  # a stale proposer: the next AppendResponse tells it our term
        start = msg.start_streaming_at
        flush = self.wal.flush_lsn
        if msg.term == self.epoch and flush > start:
            raise AcceptorError(
                f"refusing ProposerElected which is going to overwrite correct WAL: term={msg.term}, "
                f"flush_lsn={flush}, start_streaming_at={start}; restarting the proposer should help"
            )
        if start < self.inmem.commit_lsn:
            raise AcceptorError(
                f"refusing ProposerElected: start_streaming_at {start} is below commit_lsn {self.inmem.commit_lsn}"
            )
        if not msg.term_history:
            raise AcceptorError("refusing ProposerElected with an empty term history")
        try:
            self.wal.truncate_wal(start, not_below=self.inmem.commit_lsn)
        except WalStorageError as e:
            raise AcceptorError(f"failed to truncate WAL at {start}: {e}") from e
        timeline_start = self.state.timeline_start_lsn or msg.timeline_start_lsn
        local_start = self.state.local_start_lsn or start
        self.inmem.commit_lsn = Lsn(max(self.inmem.commit_lsn, timeline_start))
        self.inmem.backup_lsn = Lsn(max(self.inmem.backup_lsn, timeline_start))
        self.persist(
            acceptor_state=AcceptorState(term=self.term, term_history=msg.term_history),
            timeline_start_lsn=Lsn(timeline_start),
            local_start_lsn=Lsn(local_start),
        )
        self.epoch_start_lsn = msg.term_history.term_start_lsn
        log.info(
            "accepted ProposerElected",
            term=msg.term,
            start_streaming_at=str(start),
            epoch_start_lsn=str(self.epoch_start_lsn),
            timeline_id=str(self.state.timeline_id),
        )

    # --- AppendRequest ----------------------------------------------------------------------
    def handle_append(self, msg: AppendRequest, *, flush: bool) -> AppendResponse | None:
        """The flush variant replies; the no-flush one (inside a batch) only replies a refusal."""
        h = msg.header
        if h.term > self.term:
            raise AcceptorError(f"got AppendRequest of term {h.term} before ProposerElected (term {self.term})")
        if h.term < self.term:
            return AppendResponse.term_only(self.term)
        self.inmem.proposer_uuid = h.proposer_id
        if msg.wal:
            try:
                self.wal.write_wal(h.begin_lsn, msg.wal)
            except WalStorageError as e:
                raise AcceptorError(f"failed to write WAL at {h.begin_lsn}: {e}") from e
            self.stats.bytes_written += len(msg.wal)
        if flush:
            self._flush_wal()
        if h.commit_lsn != 0:
            self._update_commit_lsn(h.commit_lsn)
        self.inmem.peer_horizon_lsn = Lsn(max(self.inmem.peer_horizon_lsn, h.truncate_lsn))
        if self.inmem.peer_horizon_lsn > self.state.peer_horizon_lsn + self.state.server.wal_seg_size:
            self.persist()
        return self.append_response() if flush else None

    def append_is_free(self, msg: AppendRequest) -> bool:
        """Whether handling `msg` (flush variant) does no file I/O: no WAL, nothing unflushed, and
        neither of the control-file triggers below (so it may run on the event loop)."""
        if msg.wal or self.wal.flush_lsn != self.wal.write_record_lsn:
            return False
        return self.append_keeps_control_file(msg)

    def append_keeps_control_file(self, msg: AppendRequest) -> bool:
        """Whether handling `msg` inside a batch (flush_lsn as it is now) persists nothing: it is
        of the current term and crosses neither control-file trigger. All positions only grow,
        so checking each message of a batch against the state before it is enough."""
        h = msg.header
        if h.term != self.term:
            return False
        commit = min(max(h.commit_lsn, self.inmem.commit_lsn), self.wal.flush_lsn) if h.commit_lsn else 0
        if self.state.commit_lsn < self.epoch_start_lsn <= commit:
            return False
        horizon = max(self.inmem.peer_horizon_lsn, h.truncate_lsn)
        return horizon <= self.state.peer_horizon_lsn + self.state.server.wal_seg_size

    def _update_commit_lsn(self, candidate: int) -> None:
        new = Lsn(min(max(candidate, self.inmem.commit_lsn), self.wal.flush_lsn))
        # commit_lsn never decreases (the flush bound can be below it only right after an
        # explicit creation with commit_lsn ahead of the local WAL).
        self.inmem.commit_lsn = Lsn(max(new, self.inmem.commit_lsn))
        # sync-safekeepers waits for the persisted commit to reach the term start: persist the
        # first time the in-memory value gets there.
        if self.state.commit_lsn < self.epoch_start_lsn <= self.inmem.commit_lsn:
            self.persist()

    def advance_commit_lsn(self, candidate: int) -> None:
        """A commit position learnt elsewhere (a peer in the same epoch): bounded by flush_lsn."""
        self._update_commit_lsn(candidate)

    def record_peer_info(
        self, *, commit_lsn: int, last_log_term: int, backup_lsn: int, remote_consistent_lsn: int, peer_horizon_lsn: int
    ) -> None:
        """What a peer published (spec §5.5 steps 1-4): its commit LSN counts only within our
        epoch; the other positions only move forward; persisted when they got a segment ahead."""
        m = self.inmem
        m.remote_consistent_lsn = Lsn(max(m.remote_consistent_lsn, remote_consistent_lsn))
        if commit_lsn and last_log_term and last_log_term == self.epoch:
            self._update_commit_lsn(commit_lsn)
        m.backup_lsn = Lsn(max(m.backup_lsn, backup_lsn))
        m.peer_horizon_lsn = Lsn(max(m.peer_horizon_lsn, peer_horizon_lsn))
        seg, st = self.state.server.wal_seg_size, self.state
        if (
            m.backup_lsn > st.backup_lsn + seg
            or m.remote_consistent_lsn > st.remote_consistent_lsn + seg
            or m.peer_horizon_lsn > st.peer_horizon_lsn + seg
        ):
            self.persist()

    # --- flush after a batch ----------------------------------------------------------------
    def flush(self) -> AppendResponse:
        """fdatasync what the batch wrote, advance flush_lsn, and produce the one reply."""
        self._flush_wal()
        return self.append_response()

    def append_response(self) -> AppendResponse:
        return AppendResponse(term=self.term, flush_lsn=self.reported_flush_lsn, commit_lsn=self.state.commit_lsn)

    def _flush_wal(self) -> None:
        ticket = self.begin_flush()
        if ticket is not None:
            self.sync(ticket)
            self.end_flush(ticket)

    # The flush split so that only the fdatasync runs off the event loop (Timeline.process_batch).
    def begin_flush(self) -> FlushTicket | None:
        try:
            ticket = self.wal.begin_flush()
        except WalStorageError as e:
            raise AcceptorError(f"failed to flush WAL: {e}") from e
        if ticket is not None:
            self._flush_started = time.perf_counter()
        return ticket

    def sync(self, ticket: FlushTicket) -> None:
        try:
            self.wal.sync(ticket)
        except OSError as e:
            raise AcceptorError(f"failed to flush WAL: {e}") from e

    def end_flush(self, ticket: FlushTicket | None) -> AppendResponse:
        if ticket is not None:
            self.wal.end_flush(ticket)
            self.stats.flushes += 1
            self.stats.flush_seconds += time.perf_counter() - self._flush_started
        return self.append_response()
