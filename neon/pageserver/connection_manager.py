"""Which safekeeper a timeline streams its WAL from (spec pageserver §10.1-10.2), sans IO.

`ConnectionManagerState` is fed broker messages (the latest `SafekeeperTimelineInfo` per
safekeeper with its receive time), the current connection's progress and the timeline's
`last_record_lsn`, all stamped with a caller-supplied monotonic `now`, and answers
`next_action(now)`: `Connect`, `Disconnect` or None. The rules and thresholds are Neon's
connection manager's (`lagging_wal_timeout`, `max_lsn_wal_lag`, `walreceiver_connect_timeout`,
per-safekeeper retry back-off 0.1 s, times 1.5, up to 15 s). The asyncio driver is
`broker_walreceiver.BrokerWalReceiver`; one streaming connection is `walreceiver.stream_wal`.
"""

from __future__ import annotations

import enum
from collections import Counter, deque
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import structlog

from neon.broker.client import SafekeeperTimelineInfo
from neon.utils.id import TenantId, TimelineId
from neon.utils.lsn import Lsn

if TYPE_CHECKING:
    from .tenant_config import TenantConf

log = structlog.get_logger("walreceiver.connection_manager")

# Neon's per-safekeeper reconnect back-off (connection_manager.rs WALCONNECTION_RETRY_*).
RETRY_MIN_BACKOFF = 0.1
RETRY_MAX_BACKOFF = 15.0
RETRY_BACKOFF_MULTIPLIER = 1.5
DEFAULT_SAFEKEEPER_PORT = 5432


# --- configuration -------------------------------------------------------------------------------
def _seconds(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


@dataclass(frozen=True)
class WalReceiverConf:
    """The thresholds of the selection rules (seconds, bytes); defaults are Neon's."""

    wal_connect_timeout: float = 10.0  # tenant `walreceiver_connect_timeout`
    lagging_wal_timeout: float = 10.0  # tenant `lagging_wal_timeout`
    max_lsn_wal_lag: int = 10 * 1024 * 1024  # tenant `max_lsn_wal_lag`
    availability_zone: str | None = None  # pageserver `availability_zone`

    @classmethod
    def from_tenant_conf(cls, conf: TenantConf, availability_zone: str | None = None) -> WalReceiverConf:
        return cls(
            wal_connect_timeout=_seconds(conf.walreceiver_connect_timeout),
            lagging_wal_timeout=_seconds(conf.lagging_wal_timeout),
            max_lsn_wal_lag=int(conf.max_lsn_wal_lag),
            availability_zone=availability_zone,
        )


def parse_safekeeper_connstr(connstr: str) -> tuple[str, int]:
    """`host[:port]` as safekeepers publish it (port 5432 when absent; `[v6]:port`; a host that is a
    directory means a unix socket, as everywhere in our client)."""
    s = connstr.strip()
    if not s:
        raise ValueError("empty safekeeper connection string")
    if s.startswith("["):
        host, sep, rest = s[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"invalid safekeeper address {connstr!r}")
        port_text = rest[1:] if rest else ""
    else:
        host, sep, port_text = s.rpartition(":")
        if not sep:
            host, port_text = s, ""
    if not host:
        raise ValueError(f"invalid safekeeper address {connstr!r}: no host")
    if not port_text:
        return host, DEFAULT_SAFEKEEPER_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"invalid safekeeper address {connstr!r}: bad port {port_text!r}")
    return host, int(port_text)


# --- the selection core --------------------------------------------------------------------------
class ReconnectReason(enum.StrEnum):
    """Why the manager (re)connects; Neon's `ReconnectReason` names, also the switch metric label."""

    NO_EXISTING_CONNECTION = "NoExistingConnection"
    LAGGING_WAL = "LaggingWal"
    SWITCH_AVAILABILITY_ZONE = "SwitchAvailabilityZone"
    NO_WAL_TIMEOUT = "NoWalTimeout"
    NO_KEEPALIVES = "NoKeepAlives"


@dataclass(frozen=True)
class Connect:
    """Drop the current connection (if any) and stream from this safekeeper."""

    safekeeper_id: int
    connstr: str
    reason: ReconnectReason
    availability_zone: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class Disconnect:
    """Drop the current connection without a replacement."""

    reason: str


Action = Connect | Disconnect


@dataclass
class BrokerCandidate:
    """The latest broker message of one safekeeper and when it arrived (monotonic seconds)."""

    info: SafekeeperTimelineInfo
    received_at: float


@dataclass
class RetryInfo:
    """Back-off state of one safekeeper: no connection before `next_retry_at`."""

    next_retry_at: float | None = None
    retry_duration: float = RETRY_MIN_BACKOFF


@dataclass
class ConnectionStatus:
    """What the current connection has reported (Neon's `WalConnectionStatus`)."""

    is_connected: bool = False
    has_processed_wal: bool = False
    latest_connection_update: float = 0.0  # any message (or the connection start)
    latest_wal_update: float = 0.0  # XLogData (or the connection start)
    streaming_lsn: int | None = None  # end of the WAL received on this connection
    commit_lsn: int | None = None  # the source's end of WAL, from its messages


@dataclass
class NewCommittedWal:
    """WAL beyond our source's end seen on another safekeeper, and since when."""

    lsn: int
    discovered_at: float


@dataclass
class CurrentConnection:
    safekeeper_id: int
    connstr: str
    availability_zone: str | None
    started_at: float
    status: ConnectionStatus
    discovered_new_wal: NewCommittedWal | None = None


class ConnectionManagerState:
    """Candidates, retry state and the current connection of one timeline; decides switches.

    No I/O and no clock of its own: every event and query carries `now` (monotonic seconds).
    """

    def __init__(
        self,
        tenant_id: TenantId,
        timeline_id: TimelineId,
        conf: WalReceiverConf | None = None,
        *,
        last_record_lsn: int = 0,
    ) -> None:
        self.tenant_id = tenant_id
        self.timeline_id = timeline_id
        self.conf = conf or WalReceiverConf()
        self.last_record_lsn = last_record_lsn  # the driver refreshes it before each decision
        self.candidates: dict[int, BrokerCandidate] = {}
        self.retries: dict[int, RetryInfo] = {}
        self.connection: CurrentConnection | None = None
        self.connection_attempts: Counter[int] = Counter()
        self.connection_failures: Counter[int] = Counter()
        self.switches: Counter[str] = Counter()
        self.recent_connects: deque[tuple[int, str]] = deque(maxlen=20)  # (safekeeper id, reason)
        self.last_error: str | None = None
        self.log = log.bind(tenant_id=str(tenant_id), timeline_id=str(timeline_id))

    # --- inputs -----------------------------------------------------------------------------
    def register_broker_update(self, info: SafekeeperTimelineInfo, now: float) -> bool:
        """Keep `info` as its safekeeper's latest; False if it is for another timeline."""
        if info.tenant_id != self.tenant_id or info.timeline_id != self.timeline_id:
            return False
        if info.safekeeper_id not in self.candidates:
            self.log.info("new safekeeper candidate", safekeeper_id=info.safekeeper_id, connstr=info.safekeeper_connstr)
        self.candidates[info.safekeeper_id] = BrokerCandidate(info, now)
        return True

    def on_connect(self, action: Connect, now: float) -> None:
        """The driver starts the connection `action` asked for (after stopping the old one)."""
        self._drop_connection(now)
        self.switches[action.reason.value] += 1
        self.connection_attempts[action.safekeeper_id] += 1
        self.recent_connects.append((action.safekeeper_id, action.reason.value))
        self.connection = CurrentConnection(
            safekeeper_id=action.safekeeper_id,
            connstr=action.connstr,
            availability_zone=action.availability_zone,
            started_at=now,
            status=ConnectionStatus(latest_connection_update=now, latest_wal_update=now),
        )

    def on_connected(self, now: float, commit_lsn: int | None = None) -> None:
        """The connection is established (IDENTIFY_SYSTEM answered: its xlogpos is the commit LSN)."""
        if self.connection is None:
            return
        st = self.connection.status
        st.is_connected = True
        st.latest_connection_update = now
        if commit_lsn is not None:
            st.commit_lsn = commit_lsn

    def on_message(self, now: float, *, commit_lsn: int, streaming_lsn: int | None = None) -> None:
        """A replication message: XLogData when `streaming_lsn` is given, otherwise a keepalive."""
        if self.connection is None:
            return
        st = self.connection.status
        st.latest_connection_update = now
        st.commit_lsn = commit_lsn
        if streaming_lsn is not None:
            st.latest_wal_update = now
            st.streaming_lsn = streaming_lsn

    def on_wal_processed(self) -> None:
        """The connection advanced last_record_lsn: its safekeeper works, forget its failures."""
        if self.connection is None:
            return
        self.connection.status.has_processed_wal = True
        self.retries.pop(self.connection.safekeeper_id, None)

    def on_connection_ended(self, now: float, error: str | None = None) -> None:
        """The current connection is over (failed, ended by the source, or dropped by us)."""
        if self.connection is None:
            return
        if error is not None:
            self.connection_failures[self.connection.safekeeper_id] += 1
            self.last_error = error
        self._drop_connection(now)

    def _drop_connection(self, now: float) -> None:
        """Forget the connection and schedule the earliest retry of its safekeeper (Neon's
        `drop_old_connection`): counted from the connection's start, so a connection that lived
        long enough can be retried at once."""
        conn, self.connection = self.connection, None
        if conn is None:
            return
        retry = self.retries.setdefault(conn.safekeeper_id, RetryInfo())
        retry.next_retry_at = conn.started_at + retry.retry_duration
        if retry.next_retry_at > now:
            self.log.info(
                "next connection retry scheduled",
                safekeeper_id=conn.safekeeper_id,
                in_seconds=round(retry.next_retry_at - now, 3),
            )
        retry.retry_duration = max(
            min(retry.retry_duration * RETRY_BACKOFF_MULTIPLIER, RETRY_MAX_BACKOFF), RETRY_MIN_BACKOFF
        )

    # --- decisions ----------------------------------------------------------------------------
    def cleanup_stale_candidates(self, now: float) -> None:
        """Drop safekeepers silent in the broker for `lagging_wal_timeout`, with their retry state."""
        limit = self.conf.lagging_wal_timeout
        for sk_id in [k for k, c in self.candidates.items() if now - c.received_at >= limit]:
            del self.candidates[sk_id]
            self.retries.pop(sk_id, None)
            self.log.info("safekeeper candidate expired", safekeeper_id=sk_id, after_seconds=limit)

    def applicable_candidates(self, now: float) -> list[BrokerCandidate]:
        """Candidates we may connect to: some WAL, an address, no pending back-off, and not behind
        our own last_record_lsn (such a safekeeper has nothing for us)."""
        out = []
        for sk_id, c in self.candidates.items():
            info = c.info
            if info.commit_lsn == 0 or not info.safekeeper_connstr:
                continue
            if info.commit_lsn < self.last_record_lsn:
                continue
            retry = self.retries.get(sk_id)
            if retry is not None and retry.next_retry_at is not None and retry.next_retry_at > now:
                continue
            try:
                parse_safekeeper_connstr(info.safekeeper_connstr)
            except ValueError as e:
                self.log.warning("ignoring safekeeper with a bad address", safekeeper_id=sk_id, error=str(e))
                continue
            out.append(c)
        return out

    def best_candidate(self, now: float, omit: int | None = None) -> BrokerCandidate | None:
        """The applicable candidate with the greatest commit_lsn (ties: the lowest id, for determinism)."""
        pool = [c for c in self.applicable_candidates(now) if c.info.safekeeper_id != omit]
        if not pool:
            return None
        return max(pool, key=lambda c: (c.info.commit_lsn, -c.info.safekeeper_id))

    def next_action(self, now: float) -> Action | None:
        """What to do now, by Neon's rules (`next_connection_candidate`), first match wins."""
        self.cleanup_stale_candidates(now)
        conn = self.connection
        if conn is None:
            best = self.best_candidate(now)
            return None if best is None else self._connect(best, ReconnectReason.NO_EXISTING_CONNECTION)

        st = conn.status
        best = self.best_candidate(now, omit=conn.safekeeper_id)
        silent_for = now - st.latest_connection_update
        if best is None:
            # Neon keeps a silent connection when nobody else is there. We drop it when its
            # safekeeper has also gone from the broker: then it is most likely dead, and a
            # half-open TCP connection would otherwise hang until the OS gives up on it.
            if silent_for > self.conf.wal_connect_timeout and conn.safekeeper_id not in self.candidates:
                return Disconnect(
                    f"{ReconnectReason.NO_KEEPALIVES}: nothing received for {silent_for:.1f}s and "
                    f"safekeeper {conn.safekeeper_id} no longer publishes to the broker"
                )
            return None
        cand = best.info

        if silent_for > self.conf.wal_connect_timeout:
            return self._connect(
                best,
                ReconnectReason.NO_KEEPALIVES,
                f"nothing received for {silent_for:.1f}s (threshold {self.conf.wal_connect_timeout}s)",
            )
        if not st.is_connected:
            return None  # still connecting: only the timeout above may make us give up

        if st.commit_lsn is not None and cand.commit_lsn >= st.commit_lsn:
            advantage = cand.commit_lsn - st.commit_lsn
            if advantage >= self.conf.max_lsn_wal_lag:
                return self._connect(
                    best,
                    ReconnectReason.LAGGING_WAL,
                    f"candidate commit_lsn {Lsn(cand.commit_lsn)} is {advantage} bytes ahead of "
                    f"{Lsn(st.commit_lsn)} (threshold {self.conf.max_lsn_wal_lag})",
                )
            az = self.conf.availability_zone
            if az is not None and conn.availability_zone != az and cand.availability_zone == az:
                return self._connect(best, ReconnectReason.SWITCH_AVAILABILITY_ZONE, f"candidate is in {az}")

        current_lsn = st.streaming_lsn if st.streaming_lsn is not None else self.last_record_lsn
        current_commit_lsn = st.commit_lsn if st.commit_lsn is not None else current_lsn
        discovered = conn.discovered_new_wal
        if discovered is not None and discovered.lsn <= current_commit_lsn:
            discovered = None  # our source caught up with what we saw elsewhere
        if discovered is None and cand.commit_lsn > current_commit_lsn:
            discovered = NewCommittedWal(cand.commit_lsn, now)
        if current_lsn < current_commit_lsn:
            waiting_since: float | None = st.latest_wal_update  # our source has WAL it does not send
        elif discovered is not None:
            waiting_since = max(discovered.discovered_at, st.latest_wal_update)
        else:
            waiting_since = None
        if (
            waiting_since is not None
            and cand.commit_lsn > current_commit_lsn
            and now - waiting_since > self.conf.lagging_wal_timeout
        ):
            return self._connect(
                best,
                ReconnectReason.NO_WAL_TIMEOUT,
                f"no new WAL for {now - waiting_since:.1f}s at {Lsn(current_lsn)} (source end "
                f"{Lsn(current_commit_lsn)}), candidate has {Lsn(cand.commit_lsn)}",
            )
        conn.discovered_new_wal = discovered
        return None

    def _connect(self, cand: BrokerCandidate, reason: ReconnectReason, detail: str = "") -> Connect:
        info = cand.info
        return Connect(info.safekeeper_id, info.safekeeper_connstr, reason, info.availability_zone, detail)

    def time_until_next_retry(self, now: float) -> float | None:
        """Seconds until the earliest pending back-off ends (None: none pending)."""
        pending = [r.next_retry_at for r in self.retries.values() if r.next_retry_at is not None]
        future = [t - now for t in pending if t > now]
        return min(future) if future else None

    # --- reporting ----------------------------------------------------------------------------
    def status(self, now: float) -> dict[str, Any]:
        """JSON-ready summary: the connection, candidates with their commit_lsn, retry counters."""
        conn = self.connection
        connection: dict[str, Any] | None = None
        if conn is not None:
            st = conn.status
            connection = {
                "safekeeper_id": conn.safekeeper_id,
                "safekeeper_connstr": conn.connstr,
                "is_connected": st.is_connected,
                "has_processed_wal": st.has_processed_wal,
                "streaming_lsn": None if st.streaming_lsn is None else str(Lsn(st.streaming_lsn)),
                "commit_lsn": None if st.commit_lsn is None else str(Lsn(st.commit_lsn)),
                "seconds_since_last_message": round(now - st.latest_connection_update, 3),
                "seconds_since_last_wal": round(now - st.latest_wal_update, 3),
            }
        candidates = []
        for sk_id, c in sorted(self.candidates.items()):
            retry = self.retries.get(sk_id)
            wait = None if retry is None or retry.next_retry_at is None else max(0.0, retry.next_retry_at - now)
            candidates.append(
                {
                    "safekeeper_id": sk_id,
                    "safekeeper_connstr": c.info.safekeeper_connstr,
                    "commit_lsn": str(c.info.commit_lsn),
                    "availability_zone": c.info.availability_zone,
                    "seconds_since_update": round(now - c.received_at, 3),
                    "next_retry_in_seconds": None if wait is None else round(wait, 3),
                }
            )
        return {
            "connection": connection,
            "candidates": candidates,
            "connection_attempts": {str(k): v for k, v in sorted(self.connection_attempts.items())},
            "connection_failures": {str(k): v for k, v in sorted(self.connection_failures.items())},
            "switches": dict(sorted(self.switches.items())),
            "recent_connects": [{"safekeeper_id": sk, "reason": r} for sk, r in self.recent_connects],
            "last_error": self.last_error,
        }

    def human_readable(self, now: float) -> str:
        """One line in the spirit of Neon's `walreceiver_status`."""
        conn = self.connection
        if conn is None:
            text = "disconnected"
        elif conn.status.has_processed_wal:
            st = conn.status
            text = (
                f"streaming WAL from node {conn.safekeeper_id}, commit|streaming Lsn: "
                f"{Lsn(st.commit_lsn or 0)}|{Lsn(st.streaming_lsn or 0)}"
            )
        elif conn.status.is_connected:
            text = f"connecting to node {conn.safekeeper_id}"
        else:
            text = f"initializing node {conn.safekeeper_id} connection"
        cands = ", ".join(
            f"({k}|{now - c.received_at:.1f}s ago|{c.info.commit_lsn})" for k, c in sorted(self.candidates.items())
        )
        return f"{text}, safekeeper candidates (id|update|commit_lsn): [{cands}]"
