"""The WAL receiver (spec pageserver §10.3): streams a timeline's WAL from a WAL source and ingests it.

A source is anything that speaks physical replication: at this stage the compute itself (a stock
PG15 primary), later a safekeeper chosen through the broker, behind the same `WalSource`. The
receiver connects with `replication=true`, checks the system identifier, asks for WAL from the
timeline's `last_record_lsn`, decodes and ingests it as it arrives, and reports its positions with
standard `'r'` status updates (write = received, flush = apply = ingested). A lost connection
is retried with exponential backoff; ingest always resumes at `last_record_lsn`, so nothing is
skipped or applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import structlog

from neon.postgres.constants import XLOG_BLCKSZ
from neon.postgres.controlfile import ControlFileData
from neon.postgres.errors import WalDecodeError
from neon.postgres.waldecoder import WalStreamDecoder
from neon.pq.client import connect
from neon.pq.replication import PrimaryKeepalive, XLogData
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
        tl = self.timeline
        src = self.source
        conn = await connect(
            src.host,
            src.port,
            src.user,
            src.dbname,
            src.password,
            application_name=self.application_name,
            replication=True,
            connect_timeout=self.connect_timeout,
        )
        try:
            ident = await conn.identify_system()
            sysid = ControlFileData.decode(tl.get_control_file(tl.last_record_lsn)).system_identifier
            if ident.systemid != sysid:
                raise WalReceiverError(
                    f"WAL source {src} is system {ident.systemid}, the timeline belongs to system {sysid}"
                )
            start = tl.last_record_lsn
            # prev_record_lsn is the start of the last record unless that record began right after a
            # page header; the decoder then only checks that the next xl_prev lies before it.
            prev = tl.prev_record_lsn if tl.prev_record_lsn and tl.prev_record_lsn % XLOG_BLCKSZ else None
            decoder = WalStreamDecoder(start, sysid=sysid, prev_lsn=prev, source=str(src))
            ingest = WalIngest.for_timeline(tl)
            mod = DatadirModification(tl)
            stream = await conn.start_replication(Lsn(start), timeline=ident.timeline)
            self.status.connected = True
            self.status.connects += 1
            self.log.info("streaming WAL", start_lsn=str(Lsn(start)), server_end=str(ident.xlogpos))
            received = start
            last_status = 0.0
            async for msg in stream:
                self.status.last_message_at = time.monotonic()
                reply = False
                if isinstance(msg, XLogData):
                    if msg.wal_start != received:
                        raise WalReceiverError(
                            f"WAL stream jumped from {Lsn(received)} to {Lsn(msg.wal_start)} (a gap in the WAL)"
                        )
                    decoder.feed(msg.data)
                    received = msg.wal_start + len(msg.data)
                    try:
                        for batch in decoder.record_batches():
                            await ingest.ingest_batch(batch, mod)
                    except WalDecodeError as e:
                        raise WalReceiverError(f"invalid WAL from {src}: {e}") from e
                    tl.check_checkpoint_distance()
                    await tl.ingest_backpressure()
                elif isinstance(msg, PrimaryKeepalive):
                    reply = msg.reply_requested
                    tl.check_checkpoint_distance()
                self.status.last_received_lsn = received
                self.status.server_wal_end = stream.server_wal_end
                now = time.monotonic()
                if reply or now - last_status >= self.status_interval:
                    # flush = ingested, not durable in layer files: a stock primary's walsender waits
                    # at shutdown until flush reaches what it sent, and layers may be flushed minutes
                    # later (checkpoint_timeout). The primary keeps its WAL itself; the durable
                    # position is disk_consistent_lsn in the pageserver's API and metrics.
                    await stream.send_status(received, tl.last_record_lsn, tl.last_record_lsn)
                    last_status = now
        finally:
            with contextlib.suppress(Exception):
                await conn.close()
