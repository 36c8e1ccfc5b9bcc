"""Safekeeper timelines: one `Timeline` per `<datadir>/<tenant_id>/<timeline_id>/` and the
`Timelines` registry of all of them (spec safekeeper-and-broker §3.1, §4.5, §5.5, §7, §8).

A `Timeline` owns, for one timeline on this safekeeper:

* its `Acceptor` (control file state + WAL storage) and the asyncio lock that serialises every
  proposer connection's messages (several may be open; the term rules pick the winner);
* the change notification walsenders wait on (commit_lsn / flush_lsn / term moved);
* the registrations of walreceivers (proposer connections) and walsenders (WAL consumers), with
  each walsender's last feedback and the aggregates sent back to the compute (§4.5);
* the "active" flag, the broker record and the HTTP status document;
* deletion (cancel, then remove the directory; the cancelled object stays in the map until the
  process restarts, as in Neon, so the id cannot be re-created before that).

Blocking work (fsync, control-file writes, directory scans, deletion) runs in worker threads; all
other methods are meant for the event loop thread.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neon.broker.client import SafekeeperTimelineInfo
from neon.pq.replication import HotStandbyFeedback, PageserverFeedback, StandbyStatusUpdate, pg_timestamp_to_datetime
from neon.safekeeper import control_file
from neon.safekeeper.acceptor import Acceptor
from neon.safekeeper.control_file import ControlFileError, SafeKeeperState, ServerInfo
from neon.safekeeper.protocol import (
    AcceptorMessage,
    AggregatedHsFeedback,
    AppendRequest,
    AppendResponse,
    ProposerGreeting,
    ProposerMessage,
)
from neon.safekeeper.sync_placement import WalSyncPlacement
from neon.safekeeper.wal_storage import WalReader, WalStorage
from neon.utils.id import HexId, TenantId, TimelineId
from neon.utils.logging import get_logger
from neon.utils.lsn import Lsn

log = get_logger("safekeeper.timeline")


class TimelineError(Exception):
    """A timeline operation failed; the message is meant for the client."""


class TimelineNotFound(TimelineError):
    def __init__(self, tenant_id: TenantId, timeline_id: TimelineId) -> None:
        super().__init__(f"NotFound: timeline {tenant_id}/{timeline_id} not found")


class TimelineCancelled(TimelineError):
    def __init__(self, tenant_id: TenantId, timeline_id: TimelineId) -> None:
        super().__init__(f"Timeline {tenant_id}/{timeline_id} was cancelled and cannot be used anymore")


class TimelineDirExists(TimelineError):
    """The directory exists but the timeline is not loaded (it failed to load): left alone."""


@dataclass(slots=True)
class WalsenderEntry:
    """One WAL consumer connection and its latest feedback."""

    conn_id: int
    addr: str
    appname: str
    # Every consumer counts as a pageserver until it sends standby messages ('r' / 'h').
    is_pageserver: bool = True
    ps_feedback: PageserverFeedback = field(default_factory=PageserverFeedback)
    standby_reply: StandbyStatusUpdate | None = None
    hs_feedback: HotStandbyFeedback | None = None

    def status_json(self, ttid: str) -> dict[str, Any]:
        if self.is_pageserver:
            fb = self.ps_feedback
            feedback: dict[str, Any] = {
                "Pageserver": {
                    "current_timeline_size": fb.current_timeline_size,
                    "last_received_lsn": str(Lsn(fb.last_received_lsn)),
                    "disk_consistent_lsn": str(Lsn(fb.disk_consistent_lsn)),
                    "remote_consistent_lsn": str(Lsn(fb.remote_consistent_lsn)),
                    "replytime": pg_timestamp_to_datetime(fb.replytime).isoformat(),
                }
            }
        else:
            r = self.standby_reply
            h = self.hs_feedback
            feedback = {
                "Standby": {
                    "reply": {
                        "write_lsn": r.write_lsn if r else 0,
                        "flush_lsn": r.flush_lsn if r else 0,
                        "apply_lsn": r.apply_lsn if r else 0,
                        "reply_ts": r.reply_time if r else 0,
                        "reply_requested": bool(r.reply_requested) if r else False,
                    },
                    "hs_feedback": {
                        "ts": h.reply_time if h else 0,
                        "xmin": h.neon_xmin if h else 0,
                        "catalog_xmin": h.neon_catalog_xmin if h else 0,
                    },
                }
            }
        return {"ttid": ttid, "addr": self.addr, "conn_id": self.conn_id, "appname": self.appname, "feedback": feedback}


def timeline_dir(datadir: Path, tenant_id: TenantId, timeline_id: TimelineId) -> Path:
    return datadir / str(tenant_id) / str(timeline_id)


class Timeline:
    """One loaded timeline. Construct with `load` or `create` (both blocking)."""

    def __init__(
        self, directory: Path, acceptor: Acceptor, *, no_sync: bool, sync_placement: WalSyncPlacement | None = None
    ) -> None:
        self.directory = directory
        # Shared by the safekeeper's timelines; a timeline on its own syncs on the event loop.
        self.sync_placement = sync_placement if sync_placement is not None else WalSyncPlacement()
        self.acceptor = acceptor
        self.no_sync = no_sync
        self.tenant_id = acceptor.state.tenant_id
        self.timeline_id = acceptor.state.timeline_id
        self.lock = asyncio.Lock()  # serialises proposer messages across connections
        self.cancelled = False
        self.walreceivers: dict[int, str] = {}  # conn_id -> "Voting" | "Streaming"
        self.walsenders: dict[int, WalsenderEntry] = {}
        self._changed = asyncio.Event()

    # --- construction (blocking) ------------------------------------------------------------
    @classmethod
    def load(
        cls, directory: Path, *, node_id: int, no_sync: bool, sync_placement: WalSyncPlacement | None = None
    ) -> Timeline:
        """Load the control file (ControlFileError names the file; it is never rewritten here)
        and find the end of WAL by decoding from the persisted commit_lsn."""
        state = control_file.load(directory)
        wal = WalStorage.open(
            directory,
            wal_seg_size=state.server.wal_seg_size,
            commit_lsn=state.commit_lsn,
            peer_horizon_lsn=state.peer_horizon_lsn,
            no_sync=no_sync,
        )
        return cls(
            directory,
            cls._acceptor(directory, state, wal, node_id, no_sync),
            no_sync=no_sync,
            sync_placement=sync_placement,
        )

    @classmethod
    def create(
        cls,
        directory: Path,
        state: SafeKeeperState,
        *,
        node_id: int,
        no_sync: bool,
        sync_placement: WalSyncPlacement | None = None,
    ) -> Timeline:
        """Make the directory, persist the initial state, open (empty) WAL storage."""
        directory.parent.mkdir(parents=True, exist_ok=True)
        directory.mkdir()
        control_file.persist(directory, state, no_sync=no_sync)
        wal = WalStorage.open(
            directory, wal_seg_size=state.server.wal_seg_size, commit_lsn=state.commit_lsn, no_sync=no_sync
        )
        return cls(
            directory,
            cls._acceptor(directory, state, wal, node_id, no_sync),
            no_sync=no_sync,
            sync_placement=sync_placement,
        )

    @staticmethod
    def _acceptor(directory: Path, state: SafeKeeperState, wal: WalStorage, node_id: int, no_sync: bool) -> Acceptor:
        def persist(new: SafeKeeperState) -> None:
            control_file.persist(directory, new, no_sync=no_sync)

        return Acceptor(state, wal, persist, node_id=node_id)

    # --- positions ----------------------------------------------------------------------------
    @property
    def state(self) -> SafeKeeperState:
        return self.acceptor.state

    @property
    def term(self) -> int:
        return self.acceptor.term

    @property
    def commit_lsn(self) -> Lsn:
        return self.acceptor.commit_lsn

    @property
    def flush_lsn(self) -> Lsn:
        return self.acceptor.flush_lsn

    @property
    def ttid(self) -> str:
        return f"{self.tenant_id}/{self.timeline_id}"

    def check_usable(self) -> None:
        if self.cancelled:
            raise TimelineCancelled(self.tenant_id, self.timeline_id)

    # --- proposer messages --------------------------------------------------------------------
    async def process_batch(self, msgs: list[ProposerMessage]) -> list[AcceptorMessage]:
        """Run messages through the acceptor under the timeline lock.

        Consecutive AppendRequests are written without fsync and followed by one flush and one
        AppendResponse (group commit, §2.5.2); other messages are handled one by one (a batch
        in progress is flushed first). Waiting walsenders are woken afterwards.

        Where the work runs: appends that touch no file (heartbeats, commit-LSN broadcasts) on
        the event loop; appends whose WAL only goes into the open segment on the event loop too
        (a pwrite into the page cache), with the fdatasync where `sync_placement` says;
        everything else (new segments, truncation, control-file writes) in a worker thread."""
        async with self.lock:
            self.check_usable()
            try:
                if all(isinstance(m, AppendRequest) and self.acceptor.append_is_free(m) for m in msgs):
                    replies = self._run_batch(msgs)
                elif self._appends_stay_in_open_segment(msgs):
                    replies = await self._run_appends(msgs)  # type: ignore[arg-type]
                else:
                    # WAL writes, fsyncs, truncation and control-file writes: off the event loop.
                    replies = await asyncio.to_thread(self._run_batch, msgs)
            finally:
                self.notify()
        return [self.with_feedback(r) for r in replies]

    def _appends_stay_in_open_segment(self, msgs: list[ProposerMessage]) -> bool:
        acceptor = self.acceptor
        wal = acceptor.wal
        pos = wal.write_lsn
        for m in msgs:
            if not isinstance(m, AppendRequest) or not acceptor.append_keeps_control_file(m):
                return False
            if m.wal:
                if m.header.begin_lsn != pos:
                    return False
                pos += len(m.wal)
        return wal.write_stays_in_open_segment(wal.write_lsn, pos - wal.write_lsn)

    async def _run_appends(self, msgs: list[AppendRequest]) -> list[AcceptorMessage]:
        acceptor = self.acceptor
        replies: list[AcceptorMessage] = []
        for msg in msgs:
            reply = acceptor.handle_append(msg, flush=False)
            if reply is not None:
                replies.append(reply)
        ticket = acceptor.begin_flush()
        if ticket is not None and ticket.fd is not None:
            if self.sync_placement.on_loop():
                acceptor.sync(ticket)
            else:
                await asyncio.to_thread(acceptor.sync, ticket)
        replies.append(acceptor.end_flush(ticket))
        return replies

    def _run_batch(self, msgs: list[ProposerMessage]) -> list[AcceptorMessage]:
        acceptor = self.acceptor
        replies: list[AcceptorMessage] = []
        pending_flush = False
        for msg in msgs:
            if isinstance(msg, AppendRequest):
                reply = acceptor.handle_append(msg, flush=False)
                if reply is not None:
                    replies.append(reply)
                pending_flush = True
                continue
            if pending_flush:
                replies.append(acceptor.flush())
                pending_flush = False
            reply = acceptor.process(msg)
            if reply is not None:
                replies.append(reply)
        if pending_flush:
            replies.append(acceptor.flush())
        return replies

    def with_feedback(self, reply: AcceptorMessage) -> AcceptorMessage:
        """Every AppendResponse carries the aggregated hot-standby and pageserver feedback."""
        if not isinstance(reply, AppendResponse):
            return reply
        return AppendResponse(
            term=reply.term,
            flush_lsn=reply.flush_lsn,
            commit_lsn=reply.commit_lsn,
            hs_feedback=self.aggregated_hs_feedback(),
            pageserver_feedback=self.aggregated_ps_feedback(),
        )

    # --- change notification ------------------------------------------------------------------
    def notify(self) -> None:
        """Wake everyone waiting for a new commit/flush LSN or term."""
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def changed(self) -> asyncio.Event:
        """The event the next `notify` sets: take it *before* checking the condition."""
        return self._changed

    async def wait_for_lsn(self, lsn: int, *, recovery: bool, timeout: float) -> Lsn:
        """Wait until the WAL end a consumer may see (commit_lsn, or flush_lsn for recovery)
        passes `lsn`; returns the current end, possibly still <= lsn after `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            event = self.changed()
            end = self.flush_lsn if recovery else self.commit_lsn
            if end > lsn or self.cancelled:
                return end
            left = deadline - loop.time()
            if left <= 0:
                return end
            try:
                await asyncio.wait_for(event.wait(), left)
            except TimeoutError:
                return self.flush_lsn if recovery else self.commit_lsn

    # --- connections --------------------------------------------------------------------------
    def register_walreceiver(self, conn_id: int) -> None:
        if not self.walreceivers:
            self.sync_placement.timeline_started_receiving()
        self.walreceivers[conn_id] = "Voting"

    def set_walreceiver_streaming(self, conn_id: int) -> None:
        if conn_id in self.walreceivers:
            self.walreceivers[conn_id] = "Streaming"

    def unregister_walreceiver(self, conn_id: int) -> None:
        if self.walreceivers.pop(conn_id, None) is not None and not self.walreceivers:
            self.sync_placement.timeline_stopped_receiving()
        self.notify()  # a walsender may end its stream once no compute is left

    @property
    def connected_computes(self) -> int:
        return len(self.walreceivers)

    def register_walsender(self, conn_id: int, addr: str, appname: str) -> WalsenderEntry:
        entry = WalsenderEntry(conn_id=conn_id, addr=addr, appname=appname)
        self.walsenders[conn_id] = entry
        return entry

    def unregister_walsender(self, conn_id: int) -> None:
        self.walsenders.pop(conn_id, None)

    def record_pageserver_feedback(self, entry: WalsenderEntry, feedback: PageserverFeedback) -> None:
        entry.is_pageserver = True
        entry.ps_feedback = feedback
        inmem = self.acceptor.inmem
        inmem.remote_consistent_lsn = Lsn(max(inmem.remote_consistent_lsn, feedback.remote_consistent_lsn))

    def record_standby_reply(self, entry: WalsenderEntry, reply: StandbyStatusUpdate) -> None:
        entry.is_pageserver = False
        entry.standby_reply = reply

    def record_hs_feedback(self, entry: WalsenderEntry, feedback: HotStandbyFeedback) -> None:
        entry.is_pageserver = False
        entry.hs_feedback = feedback

    def aggregated_ps_feedback(self) -> PageserverFeedback:
        """Max of every pageserver connection's LSNs and reply time; the size comes from the one
        with the highest last_received_lsn (§4.5). Connections without feedback count as zeros."""
        best: PageserverFeedback | None = None
        written = flushed = applied = replytime = 0
        for ws in self.walsenders.values():
            if not ws.is_pageserver:
                continue
            fb = ws.ps_feedback
            if best is None or fb.last_received_lsn > best.last_received_lsn:
                best = fb
            written = max(written, fb.last_received_lsn)
            flushed = max(flushed, fb.disk_consistent_lsn)
            applied = max(applied, fb.remote_consistent_lsn)
            replytime = max(replytime, fb.replytime)
        return PageserverFeedback(
            current_timeline_size=best.current_timeline_size if best else 0,
            last_received_lsn=written,
            disk_consistent_lsn=flushed,
            remote_consistent_lsn=applied,
            replytime=replytime,
        )

    def aggregated_hs_feedback(self) -> AggregatedHsFeedback:
        """Minimum non-zero xmin / catalog_xmin over standbys that sent 'h', read as Neon reads
        them (one u64 each); ts stays 0 as in Neon, where the aggregate starts from 0."""
        xmin = catalog_xmin = 0
        for ws in self.walsenders.values():
            h = ws.hs_feedback
            if h is None:
                continue
            if h.neon_xmin and (xmin == 0 or h.neon_xmin < xmin):
                xmin = h.neon_xmin
            if h.neon_catalog_xmin and (catalog_xmin == 0 or h.neon_catalog_xmin < catalog_xmin):
                catalog_xmin = h.neon_catalog_xmin
        return AggregatedHsFeedback(ts=0, xmin=xmin, catalog_xmin=catalog_xmin)

    # --- activity, broker, status -------------------------------------------------------------
    @property
    def remote_consistent_lsn(self) -> Lsn:
        return self.acceptor.inmem.remote_consistent_lsn

    def is_active(self) -> bool:
        """A compute is connected, a complete segment is not backed up, or the pageserver has
        not persisted everything committed (§5.5)."""
        if self.cancelled:
            return False
        inmem = self.acceptor.inmem
        seg = self.state.server.wal_seg_size
        return (
            self.connected_computes > 0
            or inmem.commit_lsn // seg > inmem.backup_lsn // seg
            or inmem.remote_consistent_lsn < inmem.commit_lsn
        )

    async def record_peer_info(self, info: SafekeeperTimelineInfo) -> None:
        """A broker message about this timeline (a peer's, or our own echo): see
        `Acceptor.record_peer_info`; walsenders learn a new commit LSN at once."""
        async with self.lock:
            if self.cancelled:
                return
            before = self.acceptor.commit_lsn
            # It may persist the control file: off the event loop.
            await asyncio.to_thread(
                self.acceptor.record_peer_info,
                commit_lsn=info.commit_lsn,
                last_log_term=info.last_log_term,
                backup_lsn=info.backup_lsn,
                remote_consistent_lsn=info.remote_consistent_lsn,
                peer_horizon_lsn=info.peer_horizon_lsn,
            )
            if self.acceptor.commit_lsn != before:
                self.notify()

    def broker_info(
        self, *, node_id: int, pg_connstr: str, http_connstr: str, availability_zone: str | None
    ) -> SafekeeperTimelineInfo:
        a = self.acceptor
        return SafekeeperTimelineInfo(
            safekeeper_id=node_id,
            tenant_id=self.tenant_id,
            timeline_id=self.timeline_id,
            term=a.term,
            last_log_term=a.epoch,
            flush_lsn=a.reported_flush_lsn,
            commit_lsn=a.inmem.commit_lsn,
            backup_lsn=a.inmem.backup_lsn,
            remote_consistent_lsn=a.inmem.remote_consistent_lsn,
            peer_horizon_lsn=a.inmem.peer_horizon_lsn,
            local_start_lsn=self.state.local_start_lsn,
            safekeeper_connstr=pg_connstr,
            http_connstr=http_connstr,
            availability_zone=availability_zone,
        )

    def status_json(self) -> dict[str, Any]:
        """Neon's TimelineStatus document (HTTP GET timeline)."""
        a = self.acceptor
        s = a.state
        return {
            "tenant_id": str(self.tenant_id),
            "timeline_id": str(self.timeline_id),
            "acceptor_state": {
                "term": s.acceptor_state.term,
                "epoch": a.epoch,
                "term_history": [{"term": e.term, "lsn": str(e.lsn)} for e in s.term_history],
            },
            "pg_info": {
                "pg_version": s.server.pg_version,
                "system_id": s.server.system_id,
                "wal_seg_size": s.server.wal_seg_size,
            },
            "flush_lsn": str(a.flush_lsn),
            "timeline_start_lsn": str(s.timeline_start_lsn),
            "local_start_lsn": str(s.local_start_lsn),
            "commit_lsn": str(a.inmem.commit_lsn),
            "backup_lsn": str(a.inmem.backup_lsn),
            "peer_horizon_lsn": str(a.inmem.peer_horizon_lsn),
            "remote_consistent_lsn": str(a.inmem.remote_consistent_lsn),
            "peers": [],
            "walsenders": [ws.status_json(self.ttid) for ws in self.walsenders.values()],
            "walreceivers": [{"conn_id": cid, "status": st} for cid, st in self.walreceivers.items()],
        }

    def wal_reader(self) -> WalReader:
        s = self.state
        return self.acceptor.wal.reader(
            timeline_start_lsn=s.timeline_start_lsn, local_start_lsn=s.local_start_lsn, sysid=s.server.system_id
        )

    # --- shutdown / deletion ------------------------------------------------------------------
    async def shutdown(self) -> None:
        """Persist lagging in-memory values (a clean stop loses nothing) and close the WAL."""
        async with self.lock:
            if self.cancelled:
                return
            await asyncio.to_thread(self._persist_and_close)

    def _persist_and_close(self) -> None:
        try:
            self.acceptor.persist_if_lagging()
        finally:
            self.acceptor.wal.close()

    async def delete(self) -> tuple[bool, bool]:
        """Cancel and remove the directory: (dir_existed, was_active)."""
        was_active = self.is_active()
        self.cancelled = True
        self.notify()
        async with self.lock:  # let a batch in progress finish first
            await asyncio.to_thread(self.acceptor.wal.close)
            existed = await asyncio.to_thread(_remove_dir, self.directory)
        return existed, was_active


def _remove_dir(path: Path) -> bool:
    if not path.exists():
        return False
    shutil.rmtree(path)
    return True


def _parse_id(name: str, cls: type[HexId]) -> HexId | None:
    if len(name) != 32:
        return None
    try:
        return cls(name)
    except ValueError:
        return None


class Timelines:
    """Every timeline of this safekeeper, keyed by (tenant_id, timeline_id)."""

    def __init__(self, datadir: Path, *, node_id: int, no_sync: bool) -> None:
        self.datadir = datadir
        self.node_id = node_id
        self.no_sync = no_sync
        self._map: dict[tuple[bytes, bytes], Timeline] = {}
        self.sync_placement = WalSyncPlacement()
        self._create_lock = asyncio.Lock()

    def load_all(self) -> None:
        """Load every `<tenant>/<timeline>` directory (blocking). A corrupt control file raises
        ControlFileError naming it; a directory without one is logged and skipped (creation was
        interrupted), and stays unusable, as in Neon."""
        for tenant_dir in sorted(self.datadir.iterdir()):
            tenant_id = _parse_id(tenant_dir.name, TenantId)
            if tenant_id is None or not tenant_dir.is_dir():
                continue
            for tl_dir in sorted(tenant_dir.iterdir()):
                timeline_id = _parse_id(tl_dir.name, TimelineId)
                if timeline_id is None or not tl_dir.is_dir():
                    continue
                if not (tl_dir / control_file.CONTROL_FILE_NAME).exists():
                    log.error("timeline directory without a control file, not loaded", path=str(tl_dir))
                    continue
                tl = Timeline.load(
                    tl_dir, node_id=self.node_id, no_sync=self.no_sync, sync_placement=self.sync_placement
                )
                if bytes(tl.tenant_id) != bytes(tenant_id) or bytes(tl.timeline_id) != bytes(timeline_id):
                    raise ControlFileError(
                        f"control file {tl_dir / control_file.CONTROL_FILE_NAME}: "
                        f"ids {tl.ttid} do not match its directory"
                    )
                self._map[(bytes(tenant_id), bytes(timeline_id))] = tl
                log.info(
                    "loaded timeline",
                    ttid=tl.ttid,
                    term=tl.term,
                    flush_lsn=str(tl.flush_lsn),
                    commit_lsn=str(tl.commit_lsn),
                )

    def all(self) -> list[Timeline]:
        return list(self._map.values())

    def live(self) -> list[Timeline]:
        return [tl for tl in self._map.values() if not tl.cancelled]

    def active(self) -> list[Timeline]:
        return [tl for tl in self._map.values() if tl.is_active()]

    def find(self, tenant_id: TenantId, timeline_id: TimelineId) -> Timeline | None:
        return self._map.get((bytes(tenant_id), bytes(timeline_id)))

    def get(self, tenant_id: TenantId, timeline_id: TimelineId) -> Timeline:
        """A usable timeline, or TimelineNotFound / TimelineCancelled."""
        tl = self.find(tenant_id, timeline_id)
        if tl is None:
            raise TimelineNotFound(tenant_id, timeline_id)
        tl.check_usable()
        return tl

    async def create(self, state: SafeKeeperState) -> tuple[Timeline, bool]:
        """(timeline, created): the loaded timeline if there is one (idempotent), otherwise a new
        directory with `state` persisted. A cancelled id, or an existing unloaded directory,
        cannot be created."""
        async with self._create_lock:
            existing = self.find(state.tenant_id, state.timeline_id)
            if existing is not None:
                existing.check_usable()
                return existing, False
            path = timeline_dir(self.datadir, state.tenant_id, state.timeline_id)
            if path.exists():
                raise TimelineDirExists(
                    f"timeline {state.tenant_id}/{state.timeline_id}: directory {path} exists but is not loaded"
                )
            tl = await asyncio.to_thread(
                Timeline.create,
                path,
                state,
                node_id=self.node_id,
                no_sync=self.no_sync,
                sync_placement=self.sync_placement,
            )
            self._map[(bytes(state.tenant_id), bytes(state.timeline_id))] = tl
            log.info("created timeline", ttid=tl.ttid, commit_lsn=str(state.commit_lsn))
            return tl, True

    async def get_or_create_for_greeting(
        self, tenant_id: TenantId, timeline_id: TimelineId, greeting: ProposerGreeting
    ) -> Timeline:
        """The connection's timeline, created implicitly from the first ProposerGreeting (§8.1);
        the acceptor then checks the greeting against it."""
        tl = self.find(tenant_id, timeline_id)
        if tl is not None:
            tl.check_usable()
            return tl
        server = ServerInfo(
            pg_version=greeting.pg_version, system_id=greeting.system_id, wal_seg_size=greeting.wal_seg_size
        )
        try:
            state = control_file.initial(tenant_id, timeline_id, server)
        except ValueError as e:
            raise TimelineError(f"cannot create timeline: {e}") from None
        tl, _ = await self.create(state)
        return tl

    async def delete(self, tenant_id: TenantId, timeline_id: TimelineId) -> dict[str, bool]:
        tl = self.find(tenant_id, timeline_id)
        if tl is None:
            existed = await asyncio.to_thread(_remove_dir, timeline_dir(self.datadir, tenant_id, timeline_id))
            return {"dir_existed": existed, "was_active": False}
        existed, was_active = await tl.delete()
        return {"dir_existed": existed, "was_active": was_active}

    async def delete_tenant(self, tenant_id: TenantId) -> dict[str, dict[str, bool]]:
        result: dict[str, dict[str, bool]] = {}
        for tl in [t for t in self._map.values() if bytes(t.tenant_id) == bytes(tenant_id)]:
            result[str(tl.timeline_id)] = await self.delete(tl.tenant_id, tl.timeline_id)
        await asyncio.to_thread(_remove_dir, self.datadir / str(tenant_id))
        return result

    async def shutdown(self) -> None:
        for tl in self.live():
            try:
                await tl.shutdown()
            except Exception as e:
                log.error("failed to persist timeline at shutdown", ttid=tl.ttid, error=str(e))


def disk_usage(directory: Path) -> int:
    total = 0
    try:
        for entry in os.scandir(directory):
            if entry.is_file():
                total += entry.stat().st_size
    except FileNotFoundError:
        pass
    return total
