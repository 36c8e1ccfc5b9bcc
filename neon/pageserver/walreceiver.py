"""The WAL receiver (spec pageserver §10.3): streams a timeline's WAL from a WAL source and ingests it.

`stream_wal` is one replication connection, shared by both receivers: connect (with the startup
`options` naming the timeline towards a safekeeper), `IDENTIFY_SYSTEM`, `START_REPLICATION
PHYSICAL`, decode and ingest, and report progress back, either with Neon's `'z'`
PageserverFeedback (safekeepers) or with standard `'r'` status updates (a stock primary's
walsender rejects `'z'`).

`WalReceiver` follows one fixed source given by connection string (`wal_source`), e.g. a stock
PG15 primary; `broker_walreceiver.BrokerWalReceiver` picks a safekeeper through the broker. The
receiver connects with `replication=true`, checks the system identifier, asks for WAL from the
timeline's `last_record_lsn`, decodes and ingests it as it arrives, and reports its positions with
standard `'r'` status updates (write = received, flush = apply = ingested). A lost connection
is retried with exponential backoff; ingest always resumes at `last_record_lsn`, so nothing is
skipped or applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from neon.postgres.constants import XLOG_BLCKSZ
from neon.postgres.controlfile import ControlFileData
from neon.postgres.errors import WalDecodeError
from neon.postgres.waldecoder import WalStreamDecoder
from neon.pq.client import ReplicationStream, connect
from neon.pq.errors import PgError, SqlState
from neon.pq.replication import PageserverFeedback, PrimaryKeepalive, XLogData, pg_now
from neon.utils.id import TenantId, TimelineId
from neon.utils.lsn import Lsn

from .datadir_mapping import DatadirModification
from .timeline import Timeline
from .walingest import WalIngest

log = structlog.get_logger("walreceiver")


class WalReceiverError(Exception):
    """The source cannot serve this timeline (another system, WAL gone, a gap in the stream)."""


@dataclass(frozen=True)
class WalSource:
    """Where to stream from: host (a directory means a unix socket), port, user, optional password."""

    host: str
    port: int
    user: str = "cloud_admin"
    password: str | None = None
    dbname: str | None = None

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    @classmethod
    def parse(cls, connstr: str) -> WalSource:
        """From a libpq key=value connection string (host, port, user, password, dbname)."""
        values: dict[str, str] = {}
        for item in connstr.split():
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"invalid connection string item {item!r}: expected key=value")
            if key not in ("host", "port", "user", "password", "dbname"):
                raise ValueError(f"unsupported connection string key {key!r}")
            values[key] = value.strip("'")
        if "host" not in values:
            raise ValueError("connection string has no host")
        try:
            port = int(values.get("port", "5432"))
        except ValueError:
            raise ValueError(f"invalid port {values['port']!r}") from None
        user = values.get("user", "cloud_admin")
        return cls(values["host"], port, user, values.get("password"), values.get("dbname"))

    def connstr(self) -> str:
        parts = [f"host={self.host}", f"port={self.port}", f"user={self.user}"]
        if self.password is not None:
            parts.append(f"password={self.password}")
        if self.dbname is not None:
            parts.append(f"dbname={self.dbname}")
        return " ".join(parts)


@dataclass
class WalReceiverStatus:
    """What the receiver last saw, for the management API and tests."""

    connected: bool = False
    source: str = ""
    connects: int = 0
    last_error: str | None = None
    last_received_lsn: int = 0
    server_wal_end: int = 0
    last_message_at: float = 0.0
    errors: list[str] = field(default_factory=list)


# --- one replication connection ------------------------------------------------------------------
class FeedbackMode(enum.Enum):
    """How the connection reports progress to its source."""

    PAGESERVER = "z"  # Neon's PageserverFeedback: what safekeepers expect (spec §10.4)
    STANDBY_STATUS = "r"  # standard standby status update: for a stock Postgres walsender


@dataclass(frozen=True)
class StreamTarget:
    """Where and how to connect for one streaming attempt."""

    host: str
    port: int
    user: str = "cloud_admin"
    password: str | None = None  # the JWT (NEON_AUTH_TOKEN) for safekeepers that require auth
    options: str | None = None  # startup `options`; None for a stock primary, which rejects ours
    application_name: str = "pageserver"

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def safekeeper_startup_options(
    tenant_id: TenantId, timeline_id: TimelineId, availability_zone: str | None = None
) -> str:
    """The startup `options` Neon's pageserver sends a safekeeper (spec §10.3)."""
    opts = f"-c timeline_id={timeline_id} tenant_id={tenant_id}"
    if availability_zone is not None:
        opts += f" availability_zone={availability_zone}"
    return opts


def pageserver_feedback(timeline: Timeline, last_received_lsn: int) -> PageserverFeedback:
    """The 'z' message for `timeline` now (remote_consistent_lsn 0 while there is no remote storage)."""
    return PageserverFeedback(
        current_timeline_size=timeline.logical_size or 0,
        last_received_lsn=last_received_lsn,
        disk_consistent_lsn=int(timeline.disk_consistent_lsn),
        remote_consistent_lsn=int(getattr(timeline, "remote_consistent_lsn", 0) or 0),
        replytime=pg_now(),
    )


@dataclass
class StreamProgress:
    """Callbacks a streaming connection reports through (all optional)."""

    connected: Callable[[int], None] = lambda commit_lsn: None
    message: Callable[[int, int | None], None] = lambda commit_lsn, streaming_lsn: None
    wal_processed: Callable[[], None] = lambda: None
    feedback_sent: Callable[[int], None] = lambda lsn: None


def _is_normal_end(e: PgError) -> bool:
    # Neon's safekeeper ends a stream it no longer serves with SQLSTATE 00000 "ending streaming …".
    return e.sqlstate == SqlState.SUCCESSFUL_COMPLETION and "ending streaming" in e.message


async def stream_wal(
    timeline: Timeline,
    target: StreamTarget,
    progress: StreamProgress | None = None,
    *,
    feedback: FeedbackMode = FeedbackMode.PAGESERVER,
    connect_timeout: float = 10.0,
    status_interval: float = 1.0,
) -> None:
    """Stream and ingest WAL from `target` until the source ends the stream; raises on failure.

    Ingest resumes at `last_record_lsn`, so a dropped connection loses and repeats nothing.
    """
    tl = timeline
    progress = progress or StreamProgress()
    conn = await connect(
        target.host,
        target.port,
        target.user,
        None,
        target.password,
        application_name=target.application_name,
        options=target.options,
        replication=True,
        connect_timeout=connect_timeout,
    )
    try:
        ident = await conn.identify_system()
        sysid = ControlFileData.decode(tl.get_control_file(tl.last_record_lsn)).system_identifier
        if ident.systemid != sysid:
            raise WalReceiverError(
                f"WAL source {target} is system {ident.systemid}, the timeline belongs to system {sysid}"
            )
        progress.connected(int(ident.xlogpos))
        start = tl.last_record_lsn
        # prev_record_lsn is the start of the last record unless that record began right after a
        # page header; the decoder then only checks that the next xl_prev lies before it.
        prev = tl.prev_record_lsn if tl.prev_record_lsn and tl.prev_record_lsn % XLOG_BLCKSZ else None
        decoder = WalStreamDecoder(start, sysid=sysid, prev_lsn=prev, source=str(target))
        ingest = WalIngest.for_timeline(tl)
        mod = DatadirModification(tl)
        # No TIMELINE clause, as Neon: a safekeeper serves one timeline; a primary its current one.
        stream = await conn.start_replication(Lsn(start))
        log.info("streaming WAL", source=str(target), start_lsn=str(Lsn(start)), server_end=str(ident.xlogpos))
        try:
            await _consume(tl, stream, decoder, ingest, mod, start, target, progress, feedback, status_interval)
        except PgError as e:
            if not _is_normal_end(e):
                raise
            log.info("source ended the stream", source=str(target), message=e.message)
    finally:
        with contextlib.suppress(Exception):
            await conn.close()


async def _consume(
    tl: Timeline,
    stream: ReplicationStream,
    decoder: WalStreamDecoder,
    ingest: WalIngest,
    mod: DatadirModification,
    start: int,
    target: StreamTarget,
    progress: StreamProgress,
    feedback: FeedbackMode,
    status_interval: float,
) -> None:
    received = start
    processed = False
    last_status = 0.0
    async for msg in stream:
        feedback_lsn: int | None = None
        if isinstance(msg, XLogData):
            if msg.wal_start != received:
                raise WalReceiverError(
                    f"WAL stream jumped from {Lsn(received)} to {Lsn(msg.wal_start)} (a gap in the WAL)"
                )
            decoder.feed(msg.data)
            received = msg.data_end
            progress.message(msg.wal_end, received)
            try:
                for batch in decoder.record_batches():
                    await ingest.ingest_batch(batch, mod)
            except WalDecodeError as e:
                raise WalReceiverError(f"invalid WAL from {target}: {e}") from e
            feedback_lsn = received
        elif isinstance(msg, PrimaryKeepalive):
            progress.message(msg.wal_end, None)
            if msg.reply_requested:
                feedback_lsn = tl.last_record_lsn
        if not processed and tl.last_record_lsn > start:
            processed = True
            progress.wal_processed()
        tl.check_checkpoint_distance()
        if isinstance(msg, XLogData):
            await tl.ingest_backpressure()
        if feedback is FeedbackMode.PAGESERVER:
            # Neon answers every XLogData and every keepalive that asks for a reply.
            if feedback_lsn is not None:
                await stream.send_neon_feedback(pageserver_feedback(tl, feedback_lsn))
                progress.feedback_sent(feedback_lsn)
        else:
            now = time.monotonic()
            reply = isinstance(msg, PrimaryKeepalive) and msg.reply_requested
            if reply or now - last_status >= status_interval:
                # flush = ingested (not durable): a stock walsender waits at shutdown until flush
                # reaches what it sent; it keeps its WAL itself. See walreceiver.py.
                await stream.send_status(received, tl.last_record_lsn, tl.last_record_lsn)
                progress.feedback_sent(received)
                last_status = now


class WalReceiver:
    def __init__(
        self,
        timeline: Timeline,
        source: WalSource,
        *,
        application_name: str = "pageserver",
        status_interval: float = 1.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 10.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self.timeline = timeline
        self.source = source
        self.application_name = application_name
        self.status_interval = status_interval
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.connect_timeout = connect_timeout
        self.status = WalReceiverStatus(source=str(source))
        self.log = timeline.log.bind(source=str(source))
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.connection_failed = asyncio.Event()  # set at each failed or lost connection (tests wait on it)

    # --- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        self.status.connected = False

    async def _run(self) -> None:
        delay = self.backoff_initial
        while not self._stopping:
            started = time.monotonic()
            try:
                await self._stream_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # any failure: report it, back off, reconnect
                self.status.last_error = f"{type(e).__name__}: {e}"
                self.status.errors = [*self.status.errors[-9:], self.status.last_error]
                self.log.warning("WAL receiver connection ended", error=self.status.last_error)
                self.connection_failed.set()
            self.status.connected = False
            if self._stopping:
                return
            if time.monotonic() - started > 10 * self.backoff_max:
                delay = self.backoff_initial  # it streamed for a while: start over with short waits
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)

    # --- one connection ----------------------------------------------------------------------------
    async def _stream_once(self) -> None:
        src = self.source
        status = self.status

        def connected(_server_end: int) -> None:
            status.connected = True
            status.connects += 1

        def message(server_end: int, received: int | None) -> None:
            status.last_message_at = time.monotonic()
            status.server_wal_end = max(status.server_wal_end, server_end)
            if received is not None:
                status.last_received_lsn = received

        # flush = ingested, not durable in layer files ('r' in `stream_wal`): a stock primary's
        # walsender waits at shutdown until flush reaches what it sent, and layers may be flushed
        # minutes later (checkpoint_timeout). The primary keeps its WAL itself; the durable
        # position is disk_consistent_lsn in the pageserver's API and metrics.
        await stream_wal(
            self.timeline,
            StreamTarget(src.host, src.port, src.user, src.password, None, self.application_name),
            StreamProgress(connected=connected, message=message),
            feedback=FeedbackMode.STANDBY_STATUS,
            connect_timeout=self.connect_timeout,
            status_interval=self.status_interval,
        )
