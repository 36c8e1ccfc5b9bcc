"""`START_WAL_PUSH`: one proposer connection (spec safekeeper-and-broker §2.5.1, §2.5.2).

After CopyBothResponse the first CopyData must be a ProposerGreeting; it creates the timeline if
needed. Then two tasks run until the connection ends:

    reader   CopyData → AcceptorProtocol.receive → inbound queue (256)
    acceptor inbound queue → Timeline.process_batch (under the timeline lock; file I/O in a worker
             thread) → each reply written at once

Neon has a third task draining a 16-reply queue; here the socket's write buffer plays that role
(a proposer that stops reading makes the acceptor wait in drain, as a full queue would), and the
commit path saves a task hop.

Group commit: the acceptor takes an AppendRequest and, without waiting, every further message
already queued; the appends are written without fsync and followed by one fdatasync and one
AppendResponse. Each batch is answered, so a proposer streaming back-to-back hears from us at
least once per batch — far more often than the 1 s keepalive rule requires.

Deviation from Neon: a non-append message found while draining a batch is processed after the
batch's flush instead of being silently dropped.

Any error (malformed message, term violation, greeting mismatch, storage failure) ends this
connection with an ErrorResponse (XX000); other connections and the timeline are unaffected.
"""

from __future__ import annotations

import asyncio

from neon.pq.errors import PgError, ProtocolViolation
from neon.pq.server import CopyBothStream, Session
from neon.safekeeper.acceptor import AcceptorError
from neon.safekeeper.protocol import (
    AcceptorMessage,
    AcceptorProtocol,
    AppendRequest,
    ProposerElected,
    ProposerGreeting,
    ProposerMessage,
)
from neon.safekeeper.timeline import Timeline, TimelineError, Timelines
from neon.safekeeper.wal_storage import WalStorageError
from neon.utils.id import TenantId, TimelineId
from neon.utils.logging import get_logger

log = get_logger("safekeeper.receive_wal")

INBOUND_QUEUE = 256


async def handle_wal_push(session: Session, timelines: Timelines, tenant_id: TenantId, timeline_id: TimelineId) -> None:
    stream = await session.copy_both()
    proto = AcceptorProtocol()
    payload = await stream.read()
    if payload is None:
        return  # the proposer ended the copy before saying anything
    try:
        greeting = proto.receive(payload)
    except ProtocolViolation as e:
        raise PgError(f"invalid proposer message: {e}") from None
    assert isinstance(greeting, ProposerGreeting)
    tl = await timelines.get_or_create_for_greeting(tenant_id, timeline_id, greeting)
    await WalPushConnection(session, stream, proto, tl).run(greeting)


class WalPushConnection:
    def __init__(self, session: Session, stream: CopyBothStream, proto: AcceptorProtocol, timeline: Timeline) -> None:
        self.session = session
        self.stream = stream
        self.proto = proto
        self.timeline = timeline
        self.inbound: asyncio.Queue[ProposerMessage | None] = asyncio.Queue(INBOUND_QUEUE)

    async def run(self, greeting: ProposerGreeting) -> None:
        tl = self.timeline
        conn_id = self.session.id
        tl.register_walreceiver(conn_id)
        log.info("proposer connected", ttid=tl.ttid, conn=conn_id, peer=str(self.session.peer))
        try:
            for reply in await self._process([greeting]):
                await self._send(reply)
            tasks = [
                asyncio.create_task(self._read(), name=f"wal-push-read-{conn_id}"),
                asyncio.create_task(self._accept(), name=f"wal-push-accept-{conn_id}"),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            for t in tasks:
                if t in done and not t.cancelled():
                    error = t.exception()
                    if error is not None:
                        raise error
        finally:
            tl.unregister_walreceiver(conn_id)
            log.info("proposer disconnected", ttid=tl.ttid, conn=conn_id)

    async def _process(self, batch: list[ProposerMessage]) -> list[AcceptorMessage]:
        try:
            return await self.timeline.process_batch(batch)
        except (AcceptorError, TimelineError, WalStorageError) as e:
            log.warning("proposer message refused", ttid=self.timeline.ttid, conn=self.session.id, error=str(e))
            raise PgError(str(e)) from None

    async def _read(self) -> None:
        while True:
            payload = await self.stream.read()
            if payload is None:
                await self.inbound.put(None)
                return
            try:
                msg = self.proto.receive(payload)
            except ProtocolViolation as e:
                raise PgError(f"invalid proposer message: {e}") from None
            await self.inbound.put(msg)

    async def _accept(self) -> None:
        while True:
            msg = await self.inbound.get()
            if msg is None:
                return
            batch = [msg]
            ended = False
            if isinstance(msg, AppendRequest):
                # Take whatever is already queued, without waiting: one fsync for all of it.
                while True:
                    try:
                        nxt = self.inbound.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                    if nxt is None:
                        ended = True
                        break
                    batch.append(nxt)
                    if not isinstance(nxt, AppendRequest):
                        break
            if any(isinstance(m, ProposerElected) for m in batch):
                self.timeline.set_walreceiver_streaming(self.session.id)
            for reply in await self._process(batch):
                await self._send(reply)
            if ended:
                return

    async def _send(self, reply: AcceptorMessage) -> None:
        await self.stream.write(self.proto.send(reply))
