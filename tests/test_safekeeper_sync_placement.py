"""Where the safekeeper's WAL fdatasync runs (`neon.safekeeper.sync_placement`): on the event loop
while one timeline receives WAL, in worker threads once two do, back on the loop when one
proposer leaves. Driven through `Timelines` and `Timeline.process_batch` as the WAL service
drives them, with fsync on and real PG15 WAL."""

from __future__ import annotations

import threading
from pathlib import Path

from neon.safekeeper.protocol import (
    AcceptorGreeting,
    AppendRequest,
    AppendResponse,
    ProposerElected,
    ProposerGreeting,
    TermHistory,
    VoteRequest,
    VoteResponse,
)
from neon.safekeeper.timeline import Timeline, Timelines
from neon.utils.id import TenantId, TimelineId
from neon.utils.lsn import Lsn
from tests.test_safekeeper_wal_storage import SEG, PgWal, pg_wal  # noqa: F401  (fixture)

TENANT = TenantId("31" * 16)
PG_VERSION = 150004


class Streamer:
    """One proposer's view of one timeline: elected in term 1, appending record by record."""

    def __init__(self, tl: Timeline, wal: PgWal) -> None:
        self.tl = tl
        self.wal = wal
        self.pos = wal.start
        self.sync_threads: list[int] = []
        storage = tl.acceptor.wal
        real = storage._fdatasync

        def recording(fd: int) -> None:
            self.sync_threads.append(threading.get_ident())
            real(fd)

        storage._fdatasync = recording  # type: ignore[method-assign]

    async def elect(self) -> None:
        wal = self.wal
        greeting = ProposerGreeting(
            tenant_id=self.tl.tenant_id,
            timeline_id=self.tl.timeline_id,
            pg_version=PG_VERSION,
            system_id=wal.sysid,
            wal_seg_size=SEG,
        )
        elected = ProposerElected(
            term=1,
            start_streaming_at=Lsn(wal.start),
            term_history=TermHistory.of((1, wal.start)),
            timeline_start_lsn=Lsn(wal.start),
        )
        replies = await self.tl.process_batch([greeting, VoteRequest(term=1), elected])
        assert isinstance(replies[0], AcceptorGreeting) and isinstance(replies[1], VoteResponse)

    async def append_records(self, n: int) -> None:
        """The next `n` records in one AppendRequest; its reply shows them flushed."""
        i = self.wal.ends.index(self.pos) if self.pos in self.wal.ends_set else -1
        end = self.wal.ends[i + n]
        req = AppendRequest.build(
            term=1,
            epoch_start_lsn=self.wal.start,
            begin_lsn=self.pos,
            commit_lsn=0,
            truncate_lsn=self.wal.start,
            wal=self.wal.bytes(self.pos, end),
        )
        (reply,) = await self.tl.process_batch([req])
        assert isinstance(reply, AppendResponse) and reply.flush_lsn == end
        self.pos = end


async def test_fdatasync_on_the_loop_only_while_one_timeline_receives(tmp_path: Path, pg_wal: PgWal) -> None:  # noqa: F811
    timelines = Timelines(tmp_path, node_id=1, no_sync=False)
    placement = timelines.sync_placement
    loop_thread = threading.get_ident()
    streamers = []
    for conn_id, timeline in enumerate((TimelineId("41" * 16), TimelineId("42" * 16))):
        greeting = ProposerGreeting(
            tenant_id=TENANT, timeline_id=timeline, pg_version=PG_VERSION, system_id=pg_wal.sysid, wal_seg_size=SEG
        )
        tl = await timelines.get_or_create_for_greeting(TENANT, timeline, greeting)
        assert tl.sync_placement is placement
        s = Streamer(tl, pg_wal)
        await s.elect()
        await s.append_records(3)  # the first write opens the segment (worker thread)
        s.sync_threads.clear()
        streamers.append((conn_id, s))
    a, b = (s for _, s in streamers)

    # One timeline receiving: appends into its open segment sync on the event loop.
    a.tl.register_walreceiver(0)
    assert placement.receiving == 1
    await a.append_records(2)
    await a.append_records(2)
    assert a.sync_threads == [loop_thread, loop_thread]

    # A second connection to the same timeline changes nothing; a second timeline does.
    a.tl.register_walreceiver(1)
    assert placement.receiving == 1
    b.tl.register_walreceiver(2)
    assert placement.receiving == 2
    await a.append_records(2)
    await b.append_records(2)
    assert len(a.sync_threads) == 3 and a.sync_threads[-1] != loop_thread
    assert len(b.sync_threads) == 1 and b.sync_threads[-1] != loop_thread

    # The second timeline's proposer leaves: back on the loop.
    b.tl.unregister_walreceiver(2)
    b.tl.unregister_walreceiver(2)  # twice: counted once
    assert placement.receiving == 1
    await a.append_records(2)
    assert a.sync_threads[-1] == loop_thread
    a.tl.unregister_walreceiver(0)
    a.tl.unregister_walreceiver(1)
    assert placement.receiving == 0
    assert placement.flushes_on_loop == 3 and placement.flushes_in_thread == 2
    for _, s in streamers:
        s.tl.acceptor.wal.close()
