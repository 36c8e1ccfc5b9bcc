"""The broker-driven WAL receiver: the selection rules of `ConnectionManagerState` with synthetic
broker messages and a fake clock (no sockets), and one run against real processes — a broker
subprocess and a stock PG15 primary advertised, next to a dead "safekeeper", through the broker.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from neon.broker.client import BrokerClient, SafekeeperTimelineInfo
from neon.pageserver.broker_walreceiver import BrokerWalReceiver, broker_backoff
from neon.pageserver.connection_manager import (
    RETRY_MAX_BACKOFF,
    RETRY_MIN_BACKOFF,
    Connect,
    ConnectionManagerState,
    Disconnect,
    ReconnectReason,
    WalReceiverConf,
    parse_safekeeper_connstr,
)
from neon.pageserver.page_cache import MaterializedPageCache
from neon.pageserver.tenant import Tenant
from neon.pageserver.tenant_config import TenantConf
from neon.pageserver.walreceiver import FeedbackMode, pageserver_feedback, safekeeper_startup_options
from neon.pq.client import PgConnection, connect
from neon.pq.replication import PageserverFeedback, decode_client_message
from neon.pq.server import PqServer, Session
from neon.utils.id import TenantId, TimelineId
from neon.utils.lsn import Lsn
from neon.walredo.launcher import PostgresRedoLauncher, scratch_parent
from neon.walredo.manager import WalRedoManager
from tests.fixtures.vanilla import VanillaPostgres
from tests.test_broker import TL_SUBS, BrokerProc, start_broker, stop_broker, wait_metric

T, L = TenantId.generate(), TimelineId.generate()
CONF = WalReceiverConf(wal_connect_timeout=10.0, lagging_wal_timeout=10.0, max_lsn_wal_lag=1000)
BASE = 0x1000_0000


def info(sk: int, commit: int, connstr: str | None = None, **kw: object) -> SafekeeperTimelineInfo:
    return SafekeeperTimelineInfo(
        safekeeper_id=sk,
        tenant_id=T,
        timeline_id=L,
        commit_lsn=Lsn(commit),
        flush_lsn=Lsn(commit),
        safekeeper_connstr=f"sk{sk}:5454" if connstr is None else connstr,
        **kw,  # type: ignore[arg-type]
    )


def state(last_record_lsn: int = BASE, conf: WalReceiverConf = CONF) -> ConnectionManagerState:
    return ConnectionManagerState(T, L, conf, last_record_lsn=last_record_lsn)


def connected_to(st: ConnectionManagerState, sk: int, now: float, commit: int) -> None:
    """Connect to `sk` as the manager would, and stream up to `commit`."""
    action = st.next_action(now)
    assert isinstance(action, Connect) and action.safekeeper_id == sk, action
    st.on_connect(action, now)
    st.on_connected(now, commit)
    st.on_message(now, commit_lsn=commit, streaming_lsn=commit)
    st.on_wal_processed()


# --- candidate choice ----------------------------------------------------------------------------
def test_picks_the_greatest_commit_lsn_among_usable_candidates() -> None:
    st = state()
    assert st.next_action(0.0) is None  # no candidates at all
    st.register_broker_update(info(1, BASE + 100), 0.0)
    st.register_broker_update(info(2, BASE + 300), 0.0)
    st.register_broker_update(info(3, BASE + 200), 0.0)
    st.register_broker_update(info(4, BASE + 900, connstr=""), 0.0)  # no address
    st.register_broker_update(info(5, 0), 0.0)  # no WAL
    st.register_broker_update(info(6, BASE + 950, connstr="sk6:notaport"), 0.0)  # bad address
    # another timeline's message is not ours
    other = SafekeeperTimelineInfo(7, T, TimelineId.generate(), commit_lsn=Lsn(BASE + 10_000), safekeeper_connstr="x:1")
    assert not st.register_broker_update(other, 0.0)
    action = st.next_action(0.0)
    assert action == Connect(2, "sk2:5454", ReconnectReason.NO_EXISTING_CONNECTION)


def test_ignores_candidates_not_ahead_of_us() -> None:
    st = state(last_record_lsn=BASE + 500)
    st.register_broker_update(info(1, BASE + 400), 0.0)  # behind us: nothing to give
    assert st.next_action(0.0) is None
    st.register_broker_update(info(2, BASE + 500), 0.0)  # caught up: fine when nobody is ahead
    action = st.next_action(0.0)
    assert isinstance(action, Connect) and action.safekeeper_id == 2
    st.register_broker_update(info(3, BASE + 501), 0.0)  # ahead of us: preferred
    action = st.next_action(0.0)
    assert isinstance(action, Connect) and action.safekeeper_id == 3


def test_keeps_a_healthy_connection() -> None:
    st = state()
    st.register_broker_update(info(1, BASE + 100), 0.0)
    connected_to(st, 1, 0.0, BASE + 100)
    st.register_broker_update(info(2, BASE + 100 + CONF.max_lsn_wal_lag - 1), 1.0)  # not far enough
    for t in (1.0, 5.0, 9.9):
        st.register_broker_update(info(1, BASE + 100), t)
        st.register_broker_update(info(2, BASE + 100 + CONF.max_lsn_wal_lag - 1), t)
        st.on_message(t, commit_lsn=BASE + 100)  # keepalives
        assert st.next_action(t) is None


# --- switching rules -----------------------------------------------------------------------------
def test_switches_when_the_current_one_delivers_no_wal_for_lagging_wal_timeout() -> None:
    st = state()
    st.register_broker_update(info(1, BASE + 100), 0.0)
    connected_to(st, 1, 0.0, BASE + 100)
    # Safekeeper 2 gets more WAL; ours keeps answering keepalives but sends no WAL.
    for t in (1.0, 4.0, 8.0, 10.5):
        st.register_broker_update(info(1, BASE + 100), t)
        st.register_broker_update(info(2, BASE + 200), t)
        st.on_message(t, commit_lsn=BASE + 100)
        assert st.next_action(t) is None, f"switched too early at {t}"
    # lagging_wal_timeout after the newer WAL was first seen (t=1.0), not after the last WAL (t=0)
    st.register_broker_update(info(2, BASE + 200), 11.1)
    st.on_message(11.1, commit_lsn=BASE + 100)
    action = st.next_action(11.1)
    assert isinstance(action, Connect) and action.safekeeper_id == 2
    assert action.reason is ReconnectReason.NO_WAL_TIMEOUT


def test_switches_when_the_current_one_has_wal_it_does_not_send() -> None:
    st = state()
    st.register_broker_update(info(1, BASE + 100), 0.0)
    connected_to(st, 1, 0.0, BASE + 100)
    st.on_message(0.5, commit_lsn=BASE + 300)  # our source says it has up to +300 but sends nothing
    st.register_broker_update(info(2, BASE + 400), 0.5)
    assert st.next_action(0.5) is None
    st.register_broker_update(info(2, BASE + 400), 10.2)
    st.on_message(10.2, commit_lsn=BASE + 300)
    action = st.next_action(10.2)  # measured from the last WAL message (t=0)
    assert isinstance(action, Connect) and action.reason is ReconnectReason.NO_WAL_TIMEOUT


def test_switches_when_another_is_ahead_by_max_lsn_wal_lag() -> None:
    st = state()
    st.register_broker_update(info(1, BASE + 100), 0.0)
    connected_to(st, 1, 0.0, BASE + 100)
    st.register_broker_update(info(2, BASE + 100 + CONF.max_lsn_wal_lag - 1), 0.5)
    assert st.next_action(0.5) is None
    st.register_broker_update(info(2, BASE + 100 + CONF.max_lsn_wal_lag), 0.6)
    action = st.next_action(0.6)
    assert isinstance(action, Connect) and action.safekeeper_id == 2
    assert action.reason is ReconnectReason.LAGGING_WAL


def test_switches_when_the_connection_goes_silent() -> None:
    st = state()
    st.register_broker_update(info(1, BASE + 100), 0.0)
    connected_to(st, 1, 0.0, BASE + 100)
    st.register_broker_update(info(2, BASE + 100), 9.0)
    assert st.next_action(9.0) is None
    st.register_broker_update(info(2, BASE + 100), 10.5)
    action = st.next_action(10.5)  # nothing at all for > walreceiver_connect_timeout
    assert isinstance(action, Connect) and action.reason is ReconnectReason.NO_KEEPALIVES


def test_no_switch_while_still_connecting_except_on_timeout() -> None:
    st = state()
    st.register_broker_update(info(1, BASE + 100), 0.0)
    action = st.next_action(0.0)
    assert isinstance(action, Connect)
    st.on_connect(action, 0.0)
    st.register_broker_update(info(2, BASE + 100 + 10 * CONF.max_lsn_wal_lag), 1.0)
    assert st.next_action(1.0) is None  # far ahead, but we are not connected yet
    st.register_broker_update(info(2, BASE + 100 + 10 * CONF.max_lsn_wal_lag), 10.1)
    action = st.next_action(10.1)
    assert isinstance(action, Connect) and action.reason is ReconnectReason.NO_KEEPALIVES


def test_switches_to_our_availability_zone() -> None:
    st = state(conf=WalReceiverConf(max_lsn_wal_lag=1000, availability_zone="az-a"))
    st.register_broker_update(info(1, BASE + 100, availability_zone="az-b"), 0.0)
    connected_to(st, 1, 0.0, BASE + 100)
    st.register_broker_update(info(2, BASE + 99, availability_zone="az-a"), 0.1)
    assert st.next_action(0.1) is None  # behind the current one
    st.register_broker_update(info(2, BASE + 100, availability_zone="az-a"), 0.2)
    action = st.next_action(0.2)
    assert isinstance(action, Connect) and action.reason is ReconnectReason.SWITCH_AVAILABILITY_ZONE


def test_drops_a_silent_connection_whose_safekeeper_left_the_broker() -> None:
    st = state()
    st.register_broker_update(info(1, BASE + 100), 0.0)
    connected_to(st, 1, 0.0, BASE + 100)
    st.register_broker_update(info(1, BASE + 100), 5.0)
    assert st.next_action(10.5) is None  # silent, but still publishing: keep it (Neon)
    action = st.next_action(15.1)
    assert isinstance(action, Disconnect) and "NoKeepAlives" in action.reason
    st.on_connection_ended(15.1)
    assert st.connection is None and st.next_action(15.2) is None


# --- back-off and expiry -------------------------------------------------------------------------
def test_backs_off_per_safekeeper_after_failures() -> None:
    st = state()
    st.register_broker_update(info(1, BASE + 300), 0.0)
    st.register_broker_update(info(2, BASE + 200), 0.0)
    action = st.next_action(0.0)
    assert isinstance(action, Connect) and action.safekeeper_id == 1
    st.on_connect(action, 0.0)
    st.on_connection_ended(0.01, "ConnectionRefusedError: refused")
    assert st.retries[1].next_retry_at == pytest.approx(RETRY_MIN_BACKOFF)
    action = st.next_action(0.01)  # 1 is backing off: the next best
    assert isinstance(action, Connect) and action.safekeeper_id == 2
    st.on_connect(action, 0.01)
    st.on_connection_ended(0.02, "ConnectionRefusedError: refused")
    assert st.next_action(0.02) is None  # both backing off
    assert st.time_until_next_retry(0.02) == pytest.approx(RETRY_MIN_BACKOFF - 0.02)
    # Retry when the back-off is over; each failure makes the next wait 1.5 times longer, up to 15 s.
    del st.candidates[2]
    expected = RETRY_MIN_BACKOFF
    now = 0.1
    for _ in range(14):
        st.register_broker_update(info(1, BASE + 300), now)  # keep it fresh
        assert st.next_action(now - 0.001) is None, now  # still backing off
        action = st.next_action(now)
        assert isinstance(action, Connect) and action.safekeeper_id == 1, now
        st.on_connect(action, now)
        st.on_connection_ended(now, "refused")
        expected = min(expected * 1.5, RETRY_MAX_BACKOFF)
        assert st.retries[1].next_retry_at == pytest.approx(now + expected)
        now += expected
    assert expected == RETRY_MAX_BACKOFF
    assert st.connection_failures[1] == 15 and st.last_error == "refused"


def test_processed_wal_clears_the_back_off() -> None:
    st = state()
    st.register_broker_update(info(1, BASE + 300), 0.0)
    for i in range(3):
        action = st.next_action(float(i))
        assert isinstance(action, Connect)
        st.on_connect(action, float(i))
        st.on_connection_ended(float(i), "refused")
    assert st.retries[1].retry_duration > RETRY_MIN_BACKOFF
    st.register_broker_update(info(1, BASE + 300), 5.0)
    connected_to(st, 1, 5.0, BASE + 300)
    assert 1 not in st.retries
    st.register_broker_update(info(1, BASE + 300), 100.0)
    st.on_connection_ended(100.0, "lost")  # it lived long: retry at once
    assert isinstance(st.next_action(100.0), Connect)


def test_stale_broker_entries_are_dropped_with_their_retry_state() -> None:
    st = state()
    st.register_broker_update(info(1, BASE + 300), 0.0)
    st.register_broker_update(info(2, BASE + 200), 5.0)
    action = st.next_action(5.0)
    assert isinstance(action, Connect) and action.safekeeper_id == 1
    st.on_connect(action, 5.0)
    st.on_connection_ended(5.0, "refused")
    assert 1 in st.retries
    action = st.next_action(10.0)  # entry of 1 is exactly lagging_wal_timeout old: gone
    assert 1 not in st.candidates and 1 not in st.retries
    assert isinstance(action, Connect) and action.safekeeper_id == 2
    st.on_connect(action, 10.0)
    st.on_connection_ended(10.0, "refused")
    assert st.next_action(15.1) is None and not st.candidates


def test_status_reports_connection_candidates_and_counters() -> None:
    st = state()
    st.register_broker_update(info(1, BASE + 300), 0.0)
    st.register_broker_update(info(2, BASE + 200), 0.0)
    action = st.next_action(0.0)
    assert isinstance(action, Connect)
    st.on_connect(action, 0.0)
    st.on_connection_ended(0.0, "refused")
    connected_to(st, 2, 0.05, BASE + 200)
    report = st.status(1.0)
    assert report["connection"]["safekeeper_id"] == 2
    assert report["connection"]["safekeeper_connstr"] == "sk2:5454"
    assert report["connection"]["streaming_lsn"] == str(Lsn(BASE + 200))
    assert [c["commit_lsn"] for c in report["candidates"]] == [str(Lsn(BASE + 300)), str(Lsn(BASE + 200))]
    assert report["candidates"][0]["next_retry_in_seconds"] == 0.0
    assert report["connection_attempts"] == {"1": 1, "2": 1}
    assert report["connection_failures"] == {"1": 1}
    assert report["switches"] == {"NoExistingConnection": 2}
    assert report["last_error"] == "refused"
    assert "streaming WAL from node 2" in st.human_readable(1.0)


# --- helpers -------------------------------------------------------------------------------------
def test_helpers() -> None:
    assert parse_safekeeper_connstr("sk-1.local:5454") == ("sk-1.local", 5454)
    assert parse_safekeeper_connstr("10.0.0.1") == ("10.0.0.1", 5432)
    assert parse_safekeeper_connstr("[::1]:6500") == ("::1", 6500)
    assert parse_safekeeper_connstr("/tmp/sock dir:5433") == ("/tmp/sock dir", 5433)
    for bad in ("", ":5432", "h:0", "h:x", "[::1"):
        with pytest.raises(ValueError):
            parse_safekeeper_connstr(bad)
    assert safekeeper_startup_options(T, L) == f"-c timeline_id={L} tenant_id={T}"
    assert safekeeper_startup_options(T, L, "az-1").endswith(" availability_zone=az-1")
    assert [broker_backoff(n) for n in (0, 1, 2)] == [0.0, pytest.approx(1.1), pytest.approx(1.21)]
    assert broker_backoff(100) == 3.0
    conf = WalReceiverConf.from_tenant_conf(TenantConf(), availability_zone="z")
    assert conf == WalReceiverConf(10.0, 10.0, 10 * 1024 * 1024, "z")


def test_pageserver_feedback_carries_the_timeline_positions() -> None:
    class FakeTimeline:
        logical_size = 12345
        disk_consistent_lsn = Lsn(BASE)

    fb = pageserver_feedback(FakeTimeline(), BASE + 64)  # type: ignore[arg-type]
    wire = fb.encode()
    assert wire[:1] == b"z"
    decoded = PageserverFeedback.decode_body(wire[9:])
    assert decoded.current_timeline_size == 12345
    assert decoded.last_received_lsn == BASE + 64
    assert decoded.disk_consistent_lsn == BASE
    assert decoded.remote_consistent_lsn == 0 and decoded.replytime > 0


# --- against real processes ----------------------------------------------------------------------
WAIT = 30.0


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProc]:
    b = start_broker(tmp_path)
    yield b
    stop_broker(b)


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: connecting is refused


@pytest.fixture
async def primary_and_timeline(test_root: Path) -> AsyncIterator[tuple[VanillaPostgres, Tenant]]:
    pg = VanillaPostgres(test_root / "pg").init()
    pg.configure(["wal_keep_size = '1GB'", "autovacuum = off", "wal_sender_timeout = '5s'"])
    initdb_copy = pg.copy_datadir(test_root / "initdb")
    shm = Path(tempfile.mkdtemp(dir=scratch_parent())) if os.access("/dev/shm", os.W_OK) else test_root
    shm.chmod(0o755)
    tid = TenantId.generate()
    mgr = WalRedoManager(str(tid), PostgresRedoLauncher(shm / "walredo"), timeout=30)
    tenant = Tenant.create(
        test_root / "tenants", tid, walredo=mgr, page_cache=MaterializedPageCache(), scratch_dir=test_root
    )
    await tenant.import_timeline(TimelineId.generate(), initdb_copy)
    pg.start()
    yield pg, tenant
    pg.cleanup()
    await tenant.shutdown(flush=False)
    await mgr.shutdown()
    shutil.rmtree(shm, ignore_errors=True)


async def test_picks_the_primary_after_the_best_one_fails(
    broker: BrokerProc, primary_and_timeline: tuple[VanillaPostgres, Tenant]
) -> None:
    pg, tenant = primary_and_timeline
    (tl,) = tenant.timelines.values()
    pg.safe_psql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pg.safe_psql("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 3000) g")
    flush = Lsn.parse(pg.safe_psql("SELECT pg_current_wal_flush_lsn()")[0][0])
    assert tl.last_record_lsn < flush
    dead = SafekeeperTimelineInfo(
        1,
        tenant.tenant_id,
        tl.timeline_id,
        commit_lsn=Lsn(flush + 64 * 1024),
        safekeeper_connstr=f"127.0.0.1:{_dead_port()}",
    )
    primary = SafekeeperTimelineInfo(
        2, tenant.tenant_id, tl.timeline_id, commit_lsn=flush, safekeeper_connstr=f"{pg.sockdir}:{pg.port}"
    )

    async def once_in_a_while() -> AsyncIterator[SafekeeperTimelineInfo]:
        while True:  # as safekeepers do; the subscription only sees what is published after it
            yield dead
            yield primary
            await asyncio.sleep(0.2)

    publisher_client = BrokerClient(broker.endpoint)
    receiver_client = BrokerClient(broker.endpoint)
    receiver = BrokerWalReceiver(
        tl,
        receiver_client,
        WalReceiverConf.from_tenant_conf(tenant.conf()),
        feedback=FeedbackMode.STANDBY_STATUS,  # a stock primary rejects 'z' and our startup options
        broker_backoff_base=0.05,
    )
    receiver.start()
    publisher: asyncio.Task[None] | None = None
    try:
        await wait_metric(broker, TL_SUBS, 1)  # subscribed: it will see the first batch whole
        publisher = asyncio.create_task(publisher_client.publish(once_in_a_while()))
        await tl.wait_lsn(flush, WAIT)
        report = receiver.status_report()
        rows = pg.safe_psql("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'pageserver'")
    finally:
        await receiver.stop()
        if publisher is not None:
            publisher.cancel()
            await asyncio.gather(publisher, return_exceptions=True)
        await publisher_client.close()
        await receiver_client.close()
    assert tl.last_record_lsn >= flush
    assert rows == [(1,)]
    # The best (dead) one was tried first, failed, and the primary took over.
    connects = [(c["safekeeper_id"], c["reason"]) for c in report["recent_connects"]]
    assert connects[:2] == [(1, "NoExistingConnection"), (2, "NoExistingConnection")]
    assert report["connection"]["safekeeper_id"] == 2 and report["connection"]["has_processed_wal"]
    assert report["connection_failures"].get("1", 0) >= 1 and "2" not in report["connection_failures"]
    assert "Connect" in (report["last_error"] or "") or "refused" in (report["last_error"] or "").lower()
    assert report["wal_source_connstr"] == f"{pg.sockdir}:{pg.port}"
    assert report["last_received_msg_lsn"] is not None and report["last_received_msg_ts"]
    assert {c["safekeeper_id"] for c in report["candidates"]} == {1, 2}
    assert report["broker"]["messages"] > 0
    assert receiver.connection_failed.is_set() and not receiver.status.connected


class RelayingSafekeeper:
    """A stand-in safekeeper for one connection: answers IDENTIFY_SYSTEM and START_REPLICATION by
    relaying the primary's walsender, and records what the pageserver sends back."""

    def __init__(self, session: Session, pg: VanillaPostgres, seen: list[Session], feedback: list[object]) -> None:
        self.session = session
        self.pg = pg
        self.feedback = feedback
        self.upstream: PgConnection | None = None
        seen.append(session)

    async def _upstream(self) -> PgConnection:
        if self.upstream is None:
            self.upstream = await connect(str(self.pg.sockdir), self.pg.port, "cloud_admin", replication=True)
        return self.upstream

    async def query(self, sql: str) -> None:
        up = await self._upstream()
        if sql == "IDENTIFY_SYSTEM":
            ident = await up.identify_system()
            cols = ["systemid", "timeline", "xlogpos", "dbname"]
            await self.session.send_rows(cols, [(ident.systemid, ident.timeline, str(ident.xlogpos), None)])
            return
        assert sql.startswith("START_REPLICATION PHYSICAL "), sql
        upstream = await up.start_replication(sql.rsplit(" ", 1)[1])
        down = await self.session.copy_both()

        async def pageserver_to_primary() -> None:
            async for data in down:
                msg = decode_client_message(data)
                self.feedback.append(msg)
                if isinstance(msg, PageserverFeedback):  # the primary wants its own kind of status
                    await upstream.send_status(msg.last_received_lsn, msg.last_received_lsn, msg.last_received_lsn)

        back = asyncio.create_task(pageserver_to_primary())
        try:
            async for msg in upstream:
                await down.write(msg.encode())
        finally:
            back.cancel()
            await asyncio.gather(back, return_exceptions=True)
            await up.close()


async def test_speaks_the_safekeeper_protocol(
    broker: BrokerProc, primary_and_timeline: tuple[VanillaPostgres, Tenant]
) -> None:
    pg, tenant = primary_and_timeline
    (tl,) = tenant.timelines.values()
    pg.safe_psql("CREATE TABLE z (i int); INSERT INTO z SELECT generate_series(1, 2000)")
    flush = Lsn.parse(pg.safe_psql("SELECT pg_current_wal_flush_lsn()")[0][0])
    sessions: list[Session] = []
    feedback: list[object] = []
    server = await PqServer(lambda s: RelayingSafekeeper(s, pg, sessions, feedback)).start()
    sk = SafekeeperTimelineInfo(
        7, tenant.tenant_id, tl.timeline_id, commit_lsn=flush, safekeeper_connstr=f"127.0.0.1:{server.port}"
    )

    async def forever() -> AsyncIterator[SafekeeperTimelineInfo]:
        while True:
            yield sk
            await asyncio.sleep(0.2)

    publisher_client, receiver_client = BrokerClient(broker.endpoint), BrokerClient(broker.endpoint)
    publisher = asyncio.create_task(publisher_client.publish(forever()))
    receiver = BrokerWalReceiver(tl, receiver_client, WalReceiverConf.from_tenant_conf(tenant.conf()))
    receiver.start()
    try:
        await tl.wait_lsn(flush, WAIT)
        for _ in range(200):  # the feedback for the last message may still be on its way
            if any(isinstance(m, PageserverFeedback) and m.last_received_lsn >= flush for m in feedback):
                break
            await asyncio.sleep(0.01)
    finally:
        await receiver.stop()
        publisher.cancel()
        await asyncio.gather(publisher, return_exceptions=True)
        await publisher_client.close()
        await receiver_client.close()
        await server.stop()
    assert sessions and sessions[0].options == f"-c timeline_id={tl.timeline_id} tenant_id={tenant.tenant_id}"
    assert sessions[0].application_name == "pageserver" and sessions[0].params.get("replication") == "true"
    assert feedback and all(isinstance(m, PageserverFeedback) for m in feedback)  # never 'r'
    last = feedback[-1]
    assert isinstance(last, PageserverFeedback) and last.last_received_lsn >= flush
    assert last.disk_consistent_lsn == tl.disk_consistent_lsn and last.replytime > 0
    assert receiver.status_report()["connection_failures"] == {}
