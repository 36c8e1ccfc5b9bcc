"""The broker-driven WAL receiver of one timeline (spec pageserver §10): a storage-broker
subscription (re-subscribing with back-off), the `ConnectionManagerState` selection rules, and at
most one `walreceiver.stream_wal` connection to the chosen safekeeper at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from neon.broker.client import BrokerClient, BrokerError
from neon.utils.lsn import Lsn

from .connection_manager import (
    Connect,
    ConnectionManagerState,
    Disconnect,
    WalReceiverConf,
    parse_safekeeper_connstr,
)
from .walreceiver import (
    FeedbackMode,
    StreamProgress,
    StreamTarget,
    WalReceiverStatus,
    safekeeper_startup_options,
    stream_wal,
)

if TYPE_CHECKING:
    from .timeline import Timeline


log = structlog.get_logger("walreceiver.broker")

# Neon's utils::backoff defaults, used for re-subscribing to the broker.
BROKER_BACKOFF_BASE = 0.1
BROKER_BACKOFF_MAX = 3.0


# --- the asyncio driver --------------------------------------------------------------------------
def broker_backoff(attempt: int, base: float = BROKER_BACKOFF_BASE, maximum: float = BROKER_BACKOFF_MAX) -> float:
    """Neon's `exponential_backoff_duration_seconds`: 0 for the first attempt, then (1+base)^n."""
    return 0.0 if attempt == 0 else min((1.0 + base) ** attempt, maximum)


@dataclass
class _BrokerState:
    subscribed: bool = False
    attempts: int = 0
    messages: int = 0
    last_error: str | None = None


@dataclass
class _LastReceived:
    lsn: int = 0
    ts_us: int = 0  # µs since the Unix epoch, as Neon's TimelineInfo.last_received_msg_ts
    connstr: str = ""


@dataclass
class _Running:
    """The current streaming task, tagged so a late report from an old one is ignored."""

    generation: int
    action: Connect
    task: asyncio.Task[None]


class BrokerWalReceiver:
    """One timeline's WAL receiver fed by the storage broker: picks the safekeeper, streams from it.

    Same lifecycle as `walreceiver.WalReceiver` (`start()`, `await stop()`, `.status` as a
    `WalReceiverStatus`, `.connection_failed`), so the tenant can hold either; `status_report()`
    has the manager's view for the HTTP API.

    `feedback` says what the peers are: `PAGESERVER` (safekeepers: startup options naming the
    timeline, 'z' feedback) or `STANDBY_STATUS` (stock primaries: no options, 'r' updates).
    """

    def __init__(
        self,
        timeline: Timeline,
        broker: BrokerClient,
        conf: WalReceiverConf | None = None,
        *,
        feedback: FeedbackMode = FeedbackMode.PAGESERVER,
        auth_token: str | None = None,
        user: str = "cloud_admin",
        application_name: str = "pageserver",
        status_interval: float = 1.0,
        broker_backoff_base: float = BROKER_BACKOFF_BASE,
        broker_backoff_max: float = BROKER_BACKOFF_MAX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeline = timeline
        self.broker = broker
        self.conf = conf or WalReceiverConf()
        self.feedback = feedback
        self.auth_token = auth_token
        self.user = user
        self.application_name = application_name
        self.status_interval = status_interval
        self.broker_backoff_base = broker_backoff_base
        self.broker_backoff_max = broker_backoff_max
        self.clock = clock
        self.state = ConnectionManagerState(
            timeline.tenant_id, timeline.timeline_id, self.conf, last_record_lsn=timeline.last_record_lsn
        )
        self.status = WalReceiverStatus(source="broker")
        self.connection_failed = asyncio.Event()  # set at each failed connection (tests wait on it)
        self.log = timeline.log.bind(component="broker_wal_receiver")
        self._broker_state = _BrokerState()
        self._last_received = _LastReceived()
        self._wake = asyncio.Event()
        self._running: _Running | None = None
        self._generation = 0
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._stop_connection()
        self.status.connected = False

    # --- the manager loop -------------------------------------------------------------------
    async def _run(self) -> None:
        broker_task = asyncio.get_running_loop().create_task(self._broker_loop())
        try:
            while True:
                now = self.clock()
                self.state.last_record_lsn = self.timeline.last_record_lsn
                action = self.state.next_action(now)
                if isinstance(action, Connect):
                    self.log.info(
                        "switching WAL source",
                        safekeeper_id=action.safekeeper_id,
                        connstr=action.connstr,
                        reason=action.reason.value,
                        detail=action.detail,
                    )
                    await self._stop_connection()
                    self._start_connection(action, self.clock())
                elif isinstance(action, Disconnect):
                    self.log.info("dropping WAL source", reason=action.reason)
                    await self._stop_connection()
                    self.state.on_connection_ended(self.clock())
                self._refresh_status()
                # Time-based rules need a look now and then even without events.
                timeout = min(1.0, self.conf.lagging_wal_timeout / 4, self.conf.wal_connect_timeout / 4)
                retry_in = self.state.time_until_next_retry(self.clock())
                if retry_in is not None:
                    timeout = min(timeout, retry_in + 0.001)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(timeout, 0.001))
                self._wake.clear()
        finally:
            broker_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await broker_task

    async def _broker_loop(self) -> None:
        """Subscribe for this timeline forever; a failure re-subscribes after Neon's back-off."""
        tl = self.timeline
        bs = self._broker_state
        attempt = 0
        while True:
            await asyncio.sleep(broker_backoff(attempt, self.broker_backoff_base, self.broker_backoff_max))
            attempt += 1
            bs.attempts += 1
            try:
                bs.subscribed = True
                async for info in self.broker.subscribe(tl.tenant_id, tl.timeline_id):
                    attempt = 0  # the subscription works: a later failure starts the back-off over
                    bs.messages += 1
                    if self.state.register_broker_update(info, self.clock()):
                        self._wake.set()
            except BrokerError as e:
                bs.last_error = str(e)
                self.log.info("broker subscription failed", attempt=attempt, error=str(e))
            finally:
                bs.subscribed = False

    # --- the streaming task -----------------------------------------------------------------
    def _start_connection(self, action: Connect, now: float) -> None:
        self.state.on_connect(action, now)
        self._generation += 1
        generation = self._generation
        host, port = parse_safekeeper_connstr(action.connstr)
        tl = self.timeline
        options = None
        if self.feedback is FeedbackMode.PAGESERVER:
            options = safekeeper_startup_options(tl.tenant_id, tl.timeline_id, self.conf.availability_zone)
        target = StreamTarget(host, port, self.user, self.auth_token, options, self.application_name)

        def current() -> bool:
            return self._running is not None and self._running.generation == generation

        def connected(commit_lsn: int) -> None:
            if current():
                self.state.on_connected(self.clock(), commit_lsn)
                self.status.connected = True
                self.status.connects += 1
                self._wake.set()

        def message(commit_lsn: int, streaming_lsn: int | None) -> None:
            if current():
                self.state.on_message(self.clock(), commit_lsn=commit_lsn, streaming_lsn=streaming_lsn)
                self.status.last_message_at = time.monotonic()
                self.status.server_wal_end = max(self.status.server_wal_end, commit_lsn)
                if streaming_lsn is not None:
                    self.status.last_received_lsn = streaming_lsn

        def wal_processed() -> None:
            if current():
                self.state.on_wal_processed()
                self._wake.set()

        def feedback_sent(lsn: int) -> None:
            if current():
                self._last_received = _LastReceived(lsn, time.time_ns() // 1000, action.connstr)

        progress = StreamProgress(connected, message, wal_processed, feedback_sent)

        async def run() -> None:
            error: str | None = None
            try:
                await stream_wal(
                    tl,
                    target,
                    progress,
                    feedback=self.feedback,
                    connect_timeout=self.conf.wal_connect_timeout,
                    status_interval=self.status_interval,
                )
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                error = f"connect to {action.connstr} timed out after {self.conf.wal_connect_timeout}s"
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
            if not current():
                return
            if error is not None:
                self.log.warning("WAL receiver connection failed", safekeeper_id=action.safekeeper_id, error=error)
                self.status.last_error = error
                self.status.errors = [*self.status.errors[-9:], error]
                self.connection_failed.set()
            else:
                self.log.info("WAL receiver connection ended", safekeeper_id=action.safekeeper_id)
            self.state.on_connection_ended(self.clock(), error)
            self.status.connected = False
            self._wake.set()

        self.status.source = action.connstr
        self._running = _Running(generation, action, asyncio.get_running_loop().create_task(run()))

    async def _stop_connection(self) -> None:
        running, self._running = self._running, None
        if running is None:
            return
        running.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await running.task
        self.status.connected = False

    # --- status -------------------------------------------------------------------------------
    def _refresh_status(self) -> None:
        conn = self.state.connection
        self.status.connected = bool(conn and conn.status.is_connected)
        self.status.source = conn.connstr if conn else self.status.source

    def status_report(self) -> dict[str, Any]:
        """For the HTTP API: the manager's view plus Neon's TimelineInfo fields
        (`wal_source_connstr`, `last_received_msg_lsn`, `last_received_msg_ts`, `walreceiver_status`)."""
        now = self.clock()
        report = self.state.status(now)
        last = self._last_received
        conn = self.state.connection
        report["wal_source_connstr"] = conn.connstr if conn is not None else (last.connstr or None)
        report["last_received_msg_lsn"] = str(Lsn(last.lsn)) if last.ts_us else None
        report["last_received_msg_ts"] = last.ts_us or None
        report["walreceiver_status"] = self.state.human_readable(now)
        report["feedback"] = self.feedback.name.lower()
        bs = self._broker_state
        report["broker"] = {
            "endpoint": self.broker.endpoint,
            "subscribed": bs.subscribed,
            "subscribe_attempts": bs.attempts,
            "messages": bs.messages,
            "last_error": bs.last_error,
        }
        return report


__all__ = ["BrokerWalReceiver", "broker_backoff"]
