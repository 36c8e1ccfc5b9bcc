"""The WAL proposer beside a stock PG15 primary (DESIGN §2.4; spec safekeeper-and-broker §2.6, §10).

Towards Postgres the proposer is the synchronous standby: a physical replication client with
`application_name=walproposer` (the compute has `synchronous_standby_names = 'walproposer'`)
that reports as written and flushed only the quorum commit LSN of its current term, so a COMMIT
returns once a quorum of safekeepers has fsynced it. Towards the safekeepers it runs Neon's
proposer protocol byte for byte (`neon.safekeeper.protocol`): greetings, a vote for a new term,
ProposerElected with the term history, then AppendRequests carrying the WAL.

This module owns the asyncio side: one task per safekeeper connection (reconnecting every
`reconnect_timeout`, dropping a safekeeper silent for `connect_timeout`), the Postgres stream,
recovery of missing WAL from the donor, the spool of WAL still to be sent, heartbeats, the `'r'`
reports and the retention slot. The arithmetic (term, donor, start points, quorum) is in
`neon.compute.election`.

A term ends when any safekeeper shows a higher term or the Postgres stream ends. Neon then kills
the compute; this proposer stops reporting at once (nothing computed in the old term is reported
after that), closes every connection and, in `run()`, starts a new election with a higher term,
which re-sends WAL the old term could not get committed (same bytes, new history entry).

Sync mode (`sync_safekeepers`, spec §2.8/§10.8) elects without a compute, brings a quorum's
committed LSN up to the donor's flush and returns that LSN: the LSN a new compute must start from.

Deviations, on purpose: `apply` in the `'r'` reports is the quorum LSN, not the pageserver's
disk_consistent_lsn (so `synchronous_commit = remote_apply` does not wait for a pageserver); the
spool of WAL for lagging safekeepers is in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from neon.pq.client import ConnectionLost, CopyStream, PgConnection, ReplicationStream, connect
from neon.pq.errors import LocalProtocolError, PgError, ProtocolViolation
from neon.pq.replication import PageserverFeedback, PrimaryKeepalive, XLogData
from neon.safekeeper.protocol import (
    MAX_SEND_SIZE,
    AcceptorGreeting,
    AppendRequest,
    AppendResponse,
    ProposerElected,
    ProposerGreeting,
    ProposerProtocol,
    TermHistory,
    VoteRequest,
    VoteResponse,
)
from neon.utils.id import TenantId, TimelineId
from neon.utils.lsn import Lsn

from .catchup import CatchUpError, CatchUpReader
from .election import Election, ElectionResult, NewerTermSeen, VoteRefused, quorum_lsn, start_streaming_at
from .wal_spool import WalSpool

log = structlog.get_logger("walproposer")

APPLICATION_NAME = "walproposer"
RECOVERY_APPLICATION_NAME = "wal_proposer_recovery"
CATCHUP_APPLICATION_NAME = "walproposer_catchup"  # never the synchronous standby's name
SLOT_NAME = "wal_proposer_slot"
DEFAULT_WAL_SEG_SIZE = 16 * 1024 * 1024
PG_TLI = 1
LSN_ZERO = Lsn(0)
# How long a new quorum LSN may wait for an AppendRequest with WAL to carry it before safekeepers
# get it in an empty one (Neon broadcasts at once; the pageserver sees commits this much later).
COMMIT_BROADCAST_DELAY = 0.005
# Less WAL than this waits while an AppendRequest with WAL is unanswered and goes out with the
# next response (group commit across the wire: one append, fsync and reply for every commit that
# arrived meanwhile); a full chunk goes at once, so bulk WAL streams pipelined.
COALESCE_BELOW = MAX_SEND_SIZE
# WAL goes to a safekeeper straight from the callback that makes it sendable (`_Term._push`)
# while its socket buffer holds less than this; beyond, its task waits for the socket to drain.
PUSH_BUFFER_LIMIT = 4 * MAX_SEND_SIZE


class TermEnded(Exception):
    """The current term cannot go on (higher term seen, Postgres gone, recovery failed)."""


class ProposerFatal(Exception):
    """A condition under which the proposer must not run at all (mismatching system, lost WAL)."""


@dataclass(frozen=True)
class SafekeeperAddr:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> SafekeeperAddr:
        host, sep, port = text.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"a safekeeper address is host:port, not {text!r}")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_safekeepers(text: str | Sequence[str]) -> list[SafekeeperAddr]:
    """`neon.safekeepers` style: "h1:p1,h2:p2,…" (or a list of such entries)."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    addrs = [SafekeeperAddr.parse(p) for p in parts if p.strip()]
    if not addrs:
        raise ValueError("no safekeepers configured")
    if len(addrs) >= 32:
        raise ValueError(f"at most 31 safekeepers are supported, got {len(addrs)}")
    return addrs


@dataclass
class ProposerConf:
    safekeepers: list[SafekeeperAddr]
    tenant_id: TenantId
    timeline_id: TimelineId
    # The compute (None in sync mode): where to connect for replication and SQL.
    pg_host: str | None = None
    pg_port: int = 5432
    pg_user: str = "cloud_admin"
    # Where the compute's WAL begins (its basebackup LSN): the timeline start for a new timeline.
    basebackup_lsn: Lsn | None = None
    pg_version: int = 150000  # sync mode only; otherwise the server's server_version_num
    wal_seg_size: int = DEFAULT_WAL_SEG_SIZE
    reconnect_timeout: float = 1.0  # neon.safekeeper_reconnect_timeout
    connect_timeout: float = 10.0  # neon.safekeeper_connect_timeout
    auth_token: str | None = None  # NEON_AUTH_TOKEN
    slot_name: str | None = SLOT_NAME
    # The spool keeps at most this much WAL; a safekeeper further behind catches up over its own
    # replication connection (`catchup`).
    max_spool_bytes: int = 256 * 1024 * 1024


@dataclass
class Safekeeper:
    """The proposer's view of one safekeeper in the current term."""

    index: int
    addr: SafekeeperAddr
    state: str = "offline"
    flush_lsn: Lsn = LSN_ZERO  # last reported (kept while offline: truncateLsn uses it)
    commit_lsn: Lsn = LSN_ZERO  # last reported persisted commit LSN
    streaming_at: Lsn = LSN_ZERO
    sent_commit_lsn: Lsn = LSN_ZERO  # the commit LSN the last AppendRequest sent to it carried
    catchup: CatchUpReader | None = None  # while it needs WAL older than the spool holds
    feedback: PageserverFeedback | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # While a session streams to it: where `_push` writes, and whether its task is inside a
    # catch-up read (then only the task may send: it records what it sent after an await).
    stream: CopyStream | None = None
    proto: ProposerProtocol | None = None
    busy: bool = False
    last_sent: float = 0.0  # monotonic time of the last AppendRequest (heartbeats)
    connects: int = 0
    responses: int = 0  # AppendResponses received in this term
    unanswered: int = 0  # AppendRequests with WAL sent since its last response
    last_error: str | None = None


class _Term:
    """One election and the streaming under its term."""

    def __init__(self, proposer: WalProposer) -> None:
        self.p = proposer
        conf = proposer.conf
        self.conf = conf
        self.election = Election(len(conf.safekeepers))
        self.sks = [Safekeeper(i, a) for i, a in enumerate(conf.safekeepers)]
        self.term_chosen = asyncio.Event()
        self.elected = asyncio.Event()
        self.streaming_ready = asyncio.Event()  # spool and positions set up after the election
        self._commit_broadcast: asyncio.TimerHandle | None = None
        self.done = asyncio.Event()  # sync mode: finished
        self.result: ElectionResult | None = None
        self.spool: WalSpool | None = None
        self.available_lsn = Lsn(0)
        self.truncate_lsn = Lsn(0)
        self.quorum = Lsn(0)
        self.reported = Lsn(0)
        self.system_id = 0
        self.pg_version = conf.pg_version
        self.pg_flush = Lsn(0)
        self.proposer_id = os.urandom(16)
        self.pg_stream: ReplicationStream | None = None
        self.pg_conn: PgConnection | None = None
        self.failure: BaseException | None = None
        self.sync_lsn: Lsn | None = None

    # --- running the term --------------------------------------------------------------------
    async def run(self) -> Lsn | None:
        sync = self.conf.pg_host is None
        tasks: list[asyncio.Task[None]] = []
        try:
            if not sync:
                await self._open_postgres()
            tasks = [asyncio.create_task(self._safekeeper_loop(sk), name=f"sk-{sk.addr}") for sk in self.sks]
            tasks.append(asyncio.create_task(self._after_election(sync), name="elected"))
            if not sync:
                tasks.append(asyncio.create_task(self._status_loop(), name="status"))
            waiter = asyncio.create_task(self.done.wait())
            stopping = asyncio.create_task(self.p.stopping.wait())
            await asyncio.wait([waiter, stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopping.cancel()
            exc = self.failure
            for t in tasks:
                if exc is None and t.done() and not t.cancelled():
                    exc = t.exception()
            if exc is not None:
                if not isinstance(exc.__cause__ or exc, NewerTermSeen):
                    # The quorum LSN is still this term's truth: let the safekeepers commit it.
                    await self._spread_commit_lsn()
                raise exc
            if self.p.stopping.is_set() and not self.done.is_set():
                await self._spread_commit_lsn()
            return self.sync_lsn
        finally:
            if self._commit_broadcast is not None:
                self._commit_broadcast.cancel()
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await t
            if self.pg_conn is not None:
                with contextlib.suppress(Exception):
                    await self.pg_conn.close()

    async def _spread_commit_lsn(self, timeout: float = 5.0) -> None:
        """Before a clean exit: make sure the safekeepers know the last quorum LSN as their commit
        LSN (it travels in the next AppendRequest), so they serve the compute's last WAL, e.g. its
        shutdown checkpoint, to the pageserver without waiting for the next compute."""
        active = [s for s in self.sks if s.state == "active"]
        if self.result is None or not active:
            return
        seen = {s.index: s.responses for s in active}
        self._wake_all()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while any(s.state == "active" and s.responses <= seen[s.index] for s in active):
                    await asyncio.sleep(0.01)  # answers arrive on the safekeepers' reader tasks
        log.info("spread the commit LSN before exiting", commit_lsn=str(self.quorum))

    def _fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
            # Stop reporting at once: nothing computed in this term may reach Postgres from now on.
            self.pg_stream = None
        self.done.set()

    # --- Postgres ------------------------------------------------------------------------------
    async def _open_postgres(self) -> None:
        conf = self.conf
        assert conf.pg_host is not None
        conn = await connect(
            conf.pg_host,
            conf.pg_port,
            conf.pg_user,
            replication=True,
            application_name=APPLICATION_NAME,
            connect_timeout=conf.connect_timeout,
        )
        self.pg_conn = conn
        ident = await conn.identify_system()
        if ident.timeline != PG_TLI:
            raise ProposerFatal(f"the compute is on Postgres timeline {ident.timeline}; safekeepers keep timeline 1")
        self.system_id = ident.systemid
        self.pg_flush = ident.xlogpos
        rows = await conn.query("SHOW server_version_num")
        self.pg_version = int(str(rows[0][0]))
        rows = await conn.query("SHOW wal_segment_size")
        seg = _parse_size(str(rows[0][0]))
        if seg != conf.wal_seg_size:
            raise ProposerFatal(f"the compute's wal_segment_size is {seg}, the proposer expects {conf.wal_seg_size}")

    async def _stream_postgres(self, start: Lsn) -> None:
        """Forward the compute's WAL into the spool from `start`; the term ends with the stream."""
        assert self.pg_conn is not None and self.spool is not None
        stream = await self.pg_conn.start_replication(start, timeline=PG_TLI)
        self.pg_stream = stream
        self._report(force=True)
        try:
            async for msg in stream:
                if isinstance(msg, XLogData):
                    if msg.data:
                        self.spool.append(msg.wal_start, msg.data)
                        self.available_lsn = self.spool.end_lsn
                        if len(self.spool) > self.conf.max_spool_bytes:
                            self.spool.trim(self.spool.end_lsn - self.conf.max_spool_bytes)
                        for sk in self.sks:
                            self._push(sk)
                elif isinstance(msg, PrimaryKeepalive) and msg.reply_requested:
                    self._report(force=True)
        except (ConnectionLost, PgError, ProtocolViolation, OSError) as e:
            raise TermEnded(f"the compute's replication stream ended: {e}") from e
        # The compute finished streaming (a clean shutdown: everything it sent is acknowledged);
        # the term's end spreads the commit LSN, so its shutdown checkpoint becomes committed.
        self.pg_stream = None
        raise TermEnded("the compute ended its replication stream")

    def _report(self, *, force: bool = False) -> None:
        """`'r'` with write = flush = apply = the quorum LSN of this term (monotonic), written at
        once: it is what releases the waiting commits."""
        stream = self.pg_stream
        if stream is None or self.failure is not None:
            return
        lsn = max(self.reported, self.quorum)
        if lsn == self.reported and not force:
            return
        self.reported = lsn
        try:
            stream.send_status_nowait(lsn, lsn, lsn)
        except (ConnectionLost, OSError, PgError, LocalProtocolError) as e:
            self._fail(TermEnded(f"cannot report to the compute: {e}"))

    async def _status_loop(self) -> None:
        """A periodic `'r'` (so wal_sender_timeout never fires while the quorum LSN stands still)
        and the retention slot; progress itself is reported as it happens (`_on_progress`)."""
        slot_at = Lsn(0)
        while True:
            await asyncio.sleep(1.0)  # a period, not a synchronisation
            self._report(force=True)
            if self.conf.slot_name and self.truncate_lsn > slot_at and self.pg_stream is not None:
                try:
                    await self.p.advance_slot(self.truncate_lsn)
                    slot_at = self.truncate_lsn
                except (ConnectionLost, OSError, PgError, TimeoutError) as e:
                    log.warning("cannot advance the retention slot", slot=self.conf.slot_name, error=str(e))

    # --- election --------------------------------------------------------------------------------
    async def _after_election(self, sync: bool) -> None:
        await self.elected.wait()
        result = self.result
        assert result is not None
        log.info(
            "elected",
            term=result.term,
            donor=str(self.sks[result.donor].addr),
            epoch_start_lsn=str(result.epoch_start_lsn),
            truncate_lsn=str(result.truncate_lsn),
            timeline_start_lsn=str(result.timeline_start_lsn),
            bootstrapped=result.bootstrapped,
        )
        if sync and (result.epoch_start_lsn == 0 or result.truncate_lsn >= result.epoch_start_lsn):
            self.sync_lsn = result.epoch_start_lsn
            self.done.set()
            return
        spool = WalSpool(min(result.truncate_lsn, result.epoch_start_lsn))
        if result.needs_recovery:
            await self._recover_from_donor(spool, result)
        self.spool = spool
        self.available_lsn = result.epoch_start_lsn
        self.truncate_lsn = result.truncate_lsn
        self.streaming_ready.set()
        self._wake_all()
        if sync:
            await self.done.wait()  # the safekeepers' answers decide when it is finished
        else:
            if self.pg_flush < result.epoch_start_lsn:
                raise ProposerFatal(
                    f"the safekeepers hold WAL up to {result.epoch_start_lsn} but the compute has flushed only"
                    f" {self.pg_flush}: this compute did not start from the timeline's latest state"
                )
            await self._stream_postgres(result.epoch_start_lsn)

    async def _recover_from_donor(self, spool: WalSpool, result: ElectionResult) -> None:
        """WAL [truncateLsn, epochStartLsn) from the donor (§2.6.4): what lagging voters may lack."""
        donor = self.sks[result.donor].addr
        log.info(
            "recovering WAL from the donor",
            donor=str(donor),
            start=str(spool.start_lsn),
            end=str(result.epoch_start_lsn),
        )
        end = result.epoch_start_lsn
        reader = self._donor_reader(result)
        try:
            async with asyncio.timeout(self.conf.connect_timeout * 6):
                while spool.end_lsn < end:
                    # Never past epochStartLsn (the donor's flush): beyond it is not our history.
                    spool.append(spool.end_lsn, await reader.read(spool.end_lsn, end - spool.end_lsn))
        except (CatchUpError, TimeoutError) as e:
            raise TermEnded(f"recovery from donor {donor} failed: {e}") from e
        finally:
            await reader.close()

    # --- one safekeeper --------------------------------------------------------------------------
    async def _safekeeper_loop(self, sk: Safekeeper) -> None:
        while True:
            try:
                await self._safekeeper_session(sk)
            except (NewerTermSeen, VoteRefused, ProposerFatal) as e:
                if isinstance(e, ProposerFatal):
                    self._fail(e)
                else:
                    ended = TermEnded(str(e))
                    ended.__cause__ = e
                    self._fail(ended)
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # any connection failure: offline, retried
                sk.last_error = f"{type(e).__name__}: {e}"
                if sk.state != "offline":
                    log.warning("safekeeper connection lost", safekeeper=str(sk.addr), error=sk.last_error)
            sk.state = "offline"
            await asyncio.sleep(self.conf.reconnect_timeout)

    async def _safekeeper_session(self, sk: Safekeeper) -> None:
        conf = self.conf
        sk.state = "connecting"
        conn = await connect(
            sk.addr.host,
            sk.addr.port,
            "cloud_admin",
            dbname="replication",
            password=conf.auth_token,
            options=self.p.options(),
            connect_timeout=conf.connect_timeout,
        )
        try:
            stream = await conn.copy_both("START_WAL_PUSH")
            proto = ProposerProtocol()
            sk.connects += 1

            async def send(msg: object) -> None:
                await stream.write(proto.send(msg))  # type: ignore[arg-type]

            async def receive() -> object:
                async with asyncio.timeout(conf.connect_timeout):
                    data = await stream.read()
                if data is None:
                    raise ConnectionLost("the safekeeper ended the stream")
                return proto.receive(data)

            await send(self._greeting())
            sk.state = "handshake"
            greeting = await receive()
            assert isinstance(greeting, AcceptorGreeting)
            self.election.on_greeting(greeting.term)
            if self.election.term_chosen:
                self.term_chosen.set()
            sk.state = "voting"
            await self.term_chosen.wait()
            await send(VoteRequest(term=self.election.term, proposer_id=self.proposer_id))
            vote = await receive()
            assert isinstance(vote, VoteResponse)
            counted = self.election.on_vote(sk.index, vote)
            sk.flush_lsn = vote.flush_lsn
            if counted and self.election.has_quorum_of_votes and self.result is None:
                self.result = self.election.elect(bootstrap_lsn=None if conf.pg_host is None else conf.basebackup_lsn)
                self.elected.set()
            sk.state = "idle"
            await self.streaming_ready.wait()
            result = self.result
            assert result is not None and self.spool is not None
            start = start_streaming_at(
                result.history, result.term, vote.term_history, vote.flush_lsn, self.truncate_lsn, self.available_lsn
            )
            await send(
                ProposerElected(
                    term=result.term,
                    start_streaming_at=start,
                    term_history=result.history,
                    timeline_start_lsn=result.timeline_start_lsn,
                )
            )
            sk.streaming_at = start
            sk.unanswered = 0
            sk.last_sent = time.monotonic()
            sk.stream, sk.proto = stream, proto
            sk.state = "active"
            log.info("streaming to safekeeper", safekeeper=str(sk.addr), start=str(start), term=result.term)
            reader = asyncio.create_task(self._read_responses(sk, receive))
            try:
                await self._stream_to(sk, send, reader)
            finally:
                sk.stream = sk.proto = None
                sk.busy = False
                await self._end_catch_up(sk)
                reader.cancel()
                with contextlib.suppress(BaseException):
                    await reader
        finally:
            with contextlib.suppress(Exception):
                await conn.close()

    def _greeting(self) -> ProposerGreeting:
        return ProposerGreeting(
            tenant_id=self.conf.tenant_id,
            timeline_id=self.conf.timeline_id,
            pg_version=self.pg_version,
            system_id=self.system_id,
            wal_seg_size=self.conf.wal_seg_size,
            proposer_id=self.proposer_id,
        )

    async def _stream_to(self, sk: Safekeeper, send, reader: asyncio.Task[None]) -> None:  # type: ignore[no-untyped-def]
        """What `_push` leaves to sk's task: WAL older than the spool (catch-up reads), waiting
        for a full socket buffer to drain, and empty AppendRequests as heartbeat or to spread a
        new commit LSN."""
        assert self.spool is not None and self.result is not None and sk.stream is not None
        result = self.result
        stream = sk.stream
        reader.add_done_callback(lambda _t: sk.wake.set())
        while True:
            if reader.done():
                reader.result()  # raises what ended it
                return
            # Cleared before looking for work: a wake-up arriving while we send is kept for the wait.
            woken = sk.wake.is_set()
            sk.wake.clear()
            sent = await self._send_catch_up(sk, send, result)
            if sk.catchup is not None and sk.streaming_at >= self.spool.start_lsn:
                await self._end_catch_up(sk)
            sent = self._push(sk) or sent
            await stream.drain()
            held = sk.unanswered > 0 and sk.streaming_at < self.available_lsn  # the response sends it
            now = time.monotonic()
            if not sent and not held and (woken or now - sk.last_sent >= self.conf.reconnect_timeout):
                await send(self._append(sk, result, sk.streaming_at, b""))
                sk.last_sent = now
            if not sk.wake.is_set():
                # The reader's end sets the event too (above), so one wait covers both.
                left = self.conf.reconnect_timeout - (time.monotonic() - sk.last_sent)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, left)):
                        await sk.wake.wait()

    async def _send_catch_up(self, sk: Safekeeper, send, result: ElectionResult) -> bool:  # type: ignore[no-untyped-def]
        """WAL the spool no longer holds, read from the compute or the donor."""
        assert self.spool is not None
        sent = False
        sk.busy = True
        try:
            while sk.streaming_at < min(self.available_lsn, self.spool.start_lsn):
                if sk.unanswered and self.available_lsn - sk.streaming_at < COALESCE_BELOW:
                    break
                data = await self._catch_up(sk).read(
                    sk.streaming_at, min(MAX_SEND_SIZE, self.spool.start_lsn - sk.streaming_at)
                )
                if not data:
                    break
                await send(self._append(sk, result, sk.streaming_at, data))
                sk.streaming_at = Lsn(sk.streaming_at + len(data))
                sk.unanswered += 1
                sent = True
        finally:
            sk.busy = False
        if sent:
            sk.last_sent = time.monotonic()
        return sent

    def _push(self, sk: Safekeeper) -> bool:
        """Write sk the spool's WAL it may take now, from the caller: the Postgres reader when
        WAL arrives, sk's response reader when an answer frees held WAL, sk's task otherwise.
        No task wakes for the common case (three fewer task switches per commit). Less than
        `COALESCE_BELOW` waits while an append is unanswered. What cannot be done here (catch-up,
        a full socket buffer) is left to sk's task, which this wakes. Returns whether it sent."""
        stream, proto, spool, result = sk.stream, sk.proto, self.spool, self.result
        if (
            stream is None
            or proto is None
            or spool is None
            or result is None
            or sk.busy
            or sk.catchup is not None
            or sk.streaming_at < spool.start_lsn
        ):
            sk.wake.set()
            return False
        sent = False
        try:
            while sk.streaming_at < self.available_lsn:
                if sk.unanswered and self.available_lsn - sk.streaming_at < COALESCE_BELOW:
                    break
                if stream.write_buffer_size() > PUSH_BUFFER_LIMIT:
                    sk.wake.set()
                    break
                data = spool.read(sk.streaming_at, MAX_SEND_SIZE)
                if not data:
                    break
                stream.write_nowait(proto.send(self._append(sk, result, sk.streaming_at, data)))
                sk.streaming_at = Lsn(sk.streaming_at + len(data))
                sk.unanswered += 1
                sent = True
        except (ConnectionLost, LocalProtocolError, OSError):
            sk.wake.set()  # the connection is broken: the task's next write or read ends the session
        if sent:
            sk.last_sent = time.monotonic()
        return sent

    def _catch_up(self, sk: Safekeeper) -> CatchUpReader:
        if sk.catchup is None:
            result = self.result
            assert result is not None
            if self.conf.pg_host is not None and sk.streaming_at >= result.epoch_start_lsn:
                # WAL of this term: the compute keeps it (the retention slot is at truncateLsn).
                sk.catchup = CatchUpReader(
                    self.conf.pg_host,
                    self.conf.pg_port,
                    user=self.conf.pg_user,
                    application_name=CATCHUP_APPLICATION_NAME,
                    connect_timeout=self.conf.connect_timeout,
                )
            else:
                sk.catchup = self._donor_reader(result)
            log.info("catching up", safekeeper=str(sk.addr), start=str(sk.streaming_at), source=str(sk.catchup))
        return sk.catchup

    def _donor_reader(self, result: ElectionResult) -> CatchUpReader:
        """WAL up to the donor's flush, as `wal_proposer_recovery` (spec §4.2)."""
        donor = self.sks[result.donor].addr
        return CatchUpReader(
            donor.host,
            donor.port,
            application_name=RECOVERY_APPLICATION_NAME,
            options=self.p.options(),
            connect_timeout=self.conf.connect_timeout,
        )

    async def _end_catch_up(self, sk: Safekeeper) -> None:
        reader, sk.catchup = sk.catchup, None
        if reader is not None:
            await reader.close()

    def _append(self, sk: Safekeeper, result: ElectionResult, begin: Lsn, data: bytes) -> AppendRequest:
        sk.sent_commit_lsn = self.quorum
        return AppendRequest.build(
            term=result.term,
            epoch_start_lsn=result.epoch_start_lsn,
            begin_lsn=begin,
            commit_lsn=self.quorum,
            truncate_lsn=self.truncate_lsn,
            wal=data,
            proposer_id=self.proposer_id,
        )

    async def _read_responses(self, sk: Safekeeper, receive) -> None:  # type: ignore[no-untyped-def]
        result = self.result
        assert result is not None
        while True:
            resp = await receive()
            assert isinstance(resp, AppendResponse)
            if resp.term > result.term:
                raise NewerTermSeen(resp.term, result.term, f"append response from {sk.addr}")
            sk.flush_lsn = resp.flush_lsn
            sk.commit_lsn = resp.commit_lsn
            sk.responses += 1
            held = sk.unanswered > 0 and sk.streaming_at < self.available_lsn
            sk.unanswered = 0
            if resp.pageserver_feedback is not None:
                sk.feedback = resp.pageserver_feedback
            self._on_progress()  # first: release commits, and the held WAL carries the new commit LSN
            if held:
                self._push(sk)

    def _on_progress(self) -> None:
        result = self.result
        assert result is not None
        q = quorum_lsn([s.flush_lsn for s in self.sks], result.epoch_start_lsn)
        if q > self.quorum:
            self.quorum = q
            self._report()
            if self.conf.pg_host is None:
                self._wake_all()  # sync mode: spread the commit LSN now, completion depends on it
            elif self._commit_broadcast is None:
                # The next AppendRequest carries the new commit LSN anyway; only if none goes out
                # soon does a safekeeper get an empty one (saves three messages per commit).
                self._commit_broadcast = asyncio.get_running_loop().call_later(
                    COMMIT_BROADCAST_DELAY, self._broadcast_commit
                )
        horizon = min(s.flush_lsn for s in self.sks)
        if horizon > self.truncate_lsn:
            self.truncate_lsn = Lsn(horizon)
            if self.spool is not None:
                self.spool.trim(min(horizon, *(s.streaming_at for s in self.sks if s.state == "active")))
        if self.conf.pg_host is None:
            self._check_sync_done(result)

    def _broadcast_commit(self) -> None:
        self._commit_broadcast = None
        for s in self.sks:
            if s.state == "active" and s.sent_commit_lsn < self.quorum:
                s.wake.set()

    def _check_sync_done(self, result: ElectionResult) -> None:
        target = result.epoch_start_lsn
        live = [s for s in self.sks if s.state == "active"]
        if (
            all(s.commit_lsn >= target for s in live)
            and sum(s.commit_lsn >= target for s in live) >= self.election.quorum
        ):
            self.sync_lsn = target
            self._wake_all()
            self.done.set()

    def _wake_all(self) -> None:
        for s in self.sks:
            s.wake.set()

    def status(self) -> dict[str, object]:
        return {
            "term": self.election.term,
            "elected": self.result is not None,
            "epoch_start_lsn": str(self.result.epoch_start_lsn) if self.result else None,
            "quorum_lsn": str(self.quorum),
            "truncate_lsn": str(self.truncate_lsn),
            "available_lsn": str(self.available_lsn),
            "safekeepers": [
                {
                    "addr": str(s.addr),
                    "state": s.state,
                    "flush_lsn": str(s.flush_lsn),
                    "commit_lsn": str(s.commit_lsn),
                    "connects": s.connects,
                    "last_error": s.last_error,
                }
                for s in self.sks
            ],
        }


def _parse_size(text: str) -> int:
    units = {"kB": 1024, "MB": 1024**2, "GB": 1024**3}
    for unit, mult in units.items():
        if text.endswith(unit):
            return int(text[: -len(unit)]) * mult
    return int(text)


class WalProposer:
    """Runs terms one after another until stopped (normal mode), or one sync run."""

    def __init__(self, conf: ProposerConf) -> None:
        self.conf = conf
        self.current: _Term | None = None
        self.terms_run = 0
        self.last_term = 0
        self.stopping = asyncio.Event()
        self._sql_conn: PgConnection | None = None

    def options(self) -> str:
        return f"-c timeline_id={self.conf.timeline_id} tenant_id={self.conf.tenant_id}"

    async def sync_safekeepers(self) -> Lsn:
        """Elect without a compute and return the LSN a new compute must start from."""
        if self.conf.pg_host is not None:
            raise ValueError("sync_safekeepers runs without a compute (pg_host=None)")
        while True:
            term = _Term(self)
            self.current = term
            try:
                lsn = await term.run()
                assert lsn is not None
                return lsn
            except TermEnded as e:
                self.last_term = max(self.last_term, term.election.term)
                log.warning("sync-safekeepers term ended; electing again", error=str(e))
                await asyncio.sleep(self.conf.reconnect_timeout)

    async def run(self) -> None:
        """Normal mode: elect, stream, and start over with a higher term whenever a term ends."""
        if self.conf.pg_host is None:
            raise ValueError("run() needs a compute (pg_host)")
        try:
            await self._run_terms()
        finally:
            if self._sql_conn is not None:
                with contextlib.suppress(Exception):
                    await self._sql_conn.close()

    async def _run_terms(self) -> None:
        await self._ensure_slot()
        while not self.stopping.is_set():
            term = _Term(self)
            self.current = term
            self.terms_run += 1
            try:
                await term.run()
            except (TermEnded, ConnectionLost, OSError, PgError) as e:
                log.warning("term ended; electing again", term=term.election.term, error=str(e))
            self.last_term = max(self.last_term, term.election.term)
            if not self.stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.conf.reconnect_timeout):
                        await self.stopping.wait()

    def stop(self) -> None:
        """End `run()` cleanly: the current term spreads its commit LSN, then everything closes."""
        self.stopping.set()

    # --- retention slot (spec §2.6.8 / §10.6, "Postgres retention") -------------------------------
    async def _sql(self) -> PgConnection:
        """One SQL connection to the compute for the slot, reopened when it was lost."""
        assert self.conf.pg_host is not None
        if self._sql_conn is None or self._sql_conn.closed:
            self._sql_conn = await connect(
                self.conf.pg_host, self.conf.pg_port, self.conf.pg_user, dbname="postgres", connect_timeout=10.0
            )
        return self._sql_conn

    async def _ensure_slot(self) -> None:
        if not self.conf.slot_name:
            return
        conn = await self._sql()
        rows = await conn.query(f"SELECT 1 FROM pg_replication_slots WHERE slot_name = '{self.conf.slot_name}'")
        if not rows:
            await conn.query(f"SELECT pg_create_physical_replication_slot('{self.conf.slot_name}', true)")

    async def advance_slot(self, lsn: Lsn) -> None:
        """Keep the compute's WAL from truncateLsn on (a safekeeper may still need it)."""
        if not self.conf.slot_name:
            return
        conn = await self._sql()
        try:
            await conn.query(
                f"SELECT pg_replication_slot_advance('{self.conf.slot_name}', '{lsn}') "
                f"FROM pg_replication_slots WHERE slot_name = '{self.conf.slot_name}' AND restart_lsn < '{lsn}'"
            )
        except BaseException:
            await conn.close()  # a broken connection is opened again next time
            raise

    def status(self) -> dict[str, object]:
        return {
            "terms_run": self.terms_run,
            "last_term": self.last_term,
            **(self.current.status() if self.current else {}),
        }


__all__ = [
    "APPLICATION_NAME",
    "ProposerConf",
    "ProposerFatal",
    "SafekeeperAddr",
    "TermEnded",
    "TermHistory",
    "WalProposer",
    "parse_safekeepers",
]
