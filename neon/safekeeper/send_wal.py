"""The walsender: `START_REPLICATION` on the WAL service port (spec safekeeper-and-broker §4.2-§4.5,
§4.7, §4.8).

Two modes, chosen by the connection's application_name:

* normal (pageservers, replicas): WAL up to the timeline's **commit_lsn** only;
* recovery (`wal_proposer_recovery`, or anything starting with `safekeeper`): up to the local
  **flush_lsn**; with `(term='N')` in the command every read first checks the term is still N.

The sender streams XLogData (at most 128 KiB each, never across a segment boundary, starting
exactly at the requested position) whose `wal_end` is the current end for this client, and a
keepalive (reply requested) after each second without new WAL. A concurrent task reads the
client's 'r' / 'h' / 'z' messages and records them on the timeline (feedback aggregation is the
timeline's job). A pageserver that has persisted everything while no compute is connected is
sent the ErrorResponse `ending streaming to ...` with SQLSTATE 00000, as Neon does.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from neon.pq.errors import PgError, ProtocolViolation, SqlState
from neon.pq.replication import (
    HotStandbyFeedback,
    PageserverFeedback,
    PrimaryKeepalive,
    StandbyStatusUpdate,
    XLogData,
    decode_client_message,
    pg_now,
)
from neon.pq.server import CopyBothStream, Session
from neon.safekeeper.timeline import Timeline, Timelines, WalsenderEntry
from neon.safekeeper.wal_storage import MAX_SEND_SIZE, WalReader, WalStorageError
from neon.utils.id import TenantId, TimelineId
from neon.utils.logging import get_logger
from neon.utils.lsn import Lsn

log = get_logger("safekeeper.send_wal")

KEEPALIVE_INTERVAL = 1.0
# WAL read per worker-thread call; sent as several XLogData messages.
READ_AHEAD = 16 * MAX_SEND_SIZE

# Unanchored at the end: stock libpqwalreceiver appends ` TIMELINE 1`, which is ignored.
_START_REPLICATION = re.compile(
    r"^START_REPLICATION(?:\s+SLOT\s+(?:\"[^\"]*\"|\S+))?(?:\s+PHYSICAL)?\s+([0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8})"
    r"(?:\s+\(\s*term\s*=\s*'(\d+)'\s*\))?",
    re.IGNORECASE,
)


def is_recovery_client(application_name: str | None) -> bool:
    """Recovery clients (proposer recovery, peer safekeepers) may read uncommitted WAL."""
    name = application_name or ""
    return name == "wal_proposer_recovery" or name.startswith("safekeeper")


@dataclass(frozen=True, slots=True)
class StartReplication:
    start_lsn: Lsn
    term: int | None


def parse_start_replication(text: str) -> StartReplication:
    m = _START_REPLICATION.match(text.strip())
    if m is None:
        raise PgError(f"invalid START_REPLICATION command: {text[:200]!r}")
    return StartReplication(Lsn.parse(m.group(1)), int(m.group(2)) if m.group(2) else None)


async def handle_start_replication(
    session: Session, timelines: Timelines, tenant_id: TenantId, timeline_id: TimelineId, text: str
) -> None:
    cmd = parse_start_replication(text)
    tl = timelines.get(tenant_id, timeline_id)
    state = tl.state
    if state.local_start_lsn == 0:
        raise PgError(f"timeline {tl.ttid}: state uninitialized, no data to read")
    first_segment = state.timeline_start_lsn.segment_start(state.server.wal_seg_size)
    if cmd.start_lsn < first_segment:
        raise PgError(f"requested start {cmd.start_lsn} is before the start of the timeline {state.timeline_start_lsn}")
    try:
        reader = tl.wal_reader()
    except WalStorageError as e:
        raise PgError(str(e)) from None
    appname = session.application_name or ""
    sender = WalSender(session, tl, reader, appname, cmd)
    await sender.run()


class WalSender:
    def __init__(self, session: Session, timeline: Timeline, reader: WalReader, appname: str, cmd: StartReplication):
        self.session = session
        self.timeline = timeline
        self.reader = reader
        self.appname = appname
        self.recovery = is_recovery_client(appname)
        self.term = cmd.term if self.recovery else None
        self.pos = cmd.start_lsn

    def _end(self) -> Lsn:
        tl = self.timeline
        return tl.flush_lsn if self.recovery else tl.commit_lsn

    async def run(self) -> None:
        tl = self.timeline
        if self.pos > self._end():
            log.warning("start position beyond the end of WAL, waiting", start=str(self.pos), end=str(self._end()))
        stream = await self.session.copy_both()
        entry = tl.register_walsender(self.session.id, str(self.session.peer), self.appname)
        log.info("walsender started", ttid=tl.ttid, conn=self.session.id, appname=self.appname, start=str(self.pos))
        tasks = [
            asyncio.create_task(self._send(stream, entry), name=f"walsender-{self.session.id}"),
            asyncio.create_task(self._read_replies(stream, entry), name=f"walsender-replies-{self.session.id}"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            tl.unregister_walsender(self.session.id)
            log.info("walsender stopped", ttid=tl.ttid, conn=self.session.id, sent_up_to=str(self.pos))
        for t in tasks:
            if t in done and not t.cancelled():
                error = t.exception()
                if error is not None:
                    raise error

    def _check_term(self) -> None:
        if self.term is not None and self.timeline.term != self.term:
            raise PgError(f"failed to acquire term {self.term}, current term {self.timeline.term}")

    async def _send(self, stream: CopyBothStream, entry: WalsenderEntry) -> None:
        tl = self.timeline
        while True:
            tl.check_usable()
            self._check_term()
            changed = tl.changed()
            end = self._end()
            if self.pos < end:
                upto = min(end, self.pos + READ_AHEAD)
                chunks = self.reader.chunks_in_memory(self.pos, upto)
                if chunks is None:
                    try:
                        chunks = await asyncio.to_thread(_read_chunks, self.reader, self.pos, upto)
                    except WalStorageError as e:
                        raise PgError(str(e)) from None
                for lsn, data in chunks:
                    await stream.write(XLogData(lsn, end, pg_now(), data).encode())
                self.pos = Lsn(upto)
                continue
            try:
                async with asyncio.timeout(KEEPALIVE_INTERVAL):
                    await changed.wait()
                continue
            except TimeoutError:
                pass
            if self._caught_up_without_computes(entry):
                raise PgError(
                    f'ending streaming to "{self.appname}" at {self.pos}, '
                    "receiver is caughtup and there is no computes",
                    SqlState.SUCCESSFUL_COMPLETION,
                )
            await stream.write(PrimaryKeepalive(end, pg_now(), True).encode())

    def _caught_up_without_computes(self, entry: WalsenderEntry) -> bool:
        tl = self.timeline
        if self.recovery or tl.connected_computes > 0 or not entry.is_pageserver:
            return False
        commit = tl.commit_lsn
        return commit == 0 or entry.ps_feedback.remote_consistent_lsn >= commit

    async def _read_replies(self, stream: CopyBothStream, entry: WalsenderEntry) -> None:
        tl = self.timeline
        while True:
            data = await stream.read()
            if data is None:
                return  # the client ended the copy
            if data[:1] not in (b"r", b"h", b"z"):
                log.info("ignoring unknown replication message", tag=repr(data[:1]), conn=self.session.id)
                continue
            try:
                msg = decode_client_message(data)
            except ProtocolViolation as e:
                raise PgError(f"invalid replication feedback: {e}") from None
            if isinstance(msg, PageserverFeedback):
                tl.record_pageserver_feedback(entry, msg)
            elif isinstance(msg, StandbyStatusUpdate):
                tl.record_standby_reply(entry, msg)
            elif isinstance(msg, HotStandbyFeedback):
                tl.record_hs_feedback(entry, msg)


def _read_chunks(reader: WalReader, start: int, end: int) -> list[tuple[Lsn, bytes]]:
    return list(reader.chunks(start, end))
