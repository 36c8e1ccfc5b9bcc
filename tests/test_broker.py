"""The storage broker: a real `neon-broker` subprocess, our client, and raw gRPC where the client
would refuse to build the request; plus unit tests of the client conversions and the broadcast ring.

Synchronisation is by conditions, never by sleeping: the broker's port comes from its "listening"
log line, readiness from a connected channel, "the subscription is registered" from the
subscriber gauges on `/metrics`, and "the broker has processed a publish" from the publish call
returning (the broker answers only after consuming the whole stream).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest

from neon.broker.client import (
    BrokerClient,
    BrokerInvalidArgument,
    BrokerMalformedMessage,
    BrokerUnavailable,
    SafekeeperTimelineInfo,
    parse_endpoint,
    subscribe_request,
)
from neon.broker.server import Broadcast, Lagged, broker_pb2, broker_pb2_grpc  # generated on import
from neon.utils.id import TenantId, TimelineId
from neon.utils.lsn import Lsn

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 15.0
STEP_TIMEOUT = 5.0


@dataclass
class BrokerProc:
    proc: subprocess.Popen[bytes]
    port: int
    http_port: int
    log_path: Path

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def _free_port() -> int:
    # Only for the HTTP port; the gRPC port is bound as 0 by the broker and read from its log.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_broker(tmp_path: Path, *extra: str) -> BrokerProc:
    log_path = tmp_path / "storage_broker.log"
    http_port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "neon.broker.main",
        "--listen-addr",
        "127.0.0.1:0",
        "--listen-http",
        f"127.0.0.1:{http_port}",
        "--log-format",
        "json",
        *extra,
    ]
    with log_path.open("wb") as logf:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT
    port: int | None = None
    while port is None:
        for line in log_path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == "listening":
                port = int(rec["port"])
        if port is not None:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"broker did not start (rc={proc.poll()}):\n{log_path.read_text()}")
        time.sleep(0.02)  # polling a log file for a condition, with a deadline
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        grpc.channel_ready_future(ch).result(timeout=START_TIMEOUT)
    return BrokerProc(proc, port, http_port, log_path)


def stop_broker(b: BrokerProc) -> None:
    if b.proc.poll() is None:
        b.proc.send_signal(signal.SIGTERM)
        try:
            b.proc.wait(timeout=STEP_TIMEOUT)
        except subprocess.TimeoutExpired:
            b.proc.kill()
            b.proc.wait()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProc]:
    b = start_broker(tmp_path)
    yield b
    stop_broker(b)


@pytest.fixture
async def client(broker: BrokerProc) -> AsyncIterator[BrokerClient]:
    c = BrokerClient(broker.endpoint)
    yield c
    await c.close()


async def metric(b: BrokerProc, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(f"{b.http}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not exported:\n{text}")


async def wait_metric(b: BrokerProc, name: str, value: float, timeout: float = STEP_TIMEOUT) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = await metric(b, name)
        if got == value:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{name} is {got}, expected {value}")
        await asyncio.sleep(0.01)  # re-checking a condition, with a deadline


ALL_SUBS = "storage_broker_all_keys_active_subscribers"
TL_SUBS = "storage_broker_per_timeline_active_subscribers"


def info(sk: int, tenant: TenantId, timeline: TimelineId, commit: int = 0, **kw: object) -> SafekeeperTimelineInfo:
    return SafekeeperTimelineInfo(
        safekeeper_id=sk, tenant_id=tenant, timeline_id=timeline, commit_lsn=Lsn(commit), **kw
    )  # type: ignore[arg-type]


async def items(*msgs: SafekeeperTimelineInfo | broker_pb2.SafekeeperTimelineInfo) -> AsyncIterator:
    for m in msgs:
        yield m


class Subscription:
    """A subscription drained by a task into a queue, so tests can wait on it with timeouts."""

    def __init__(self, client: BrokerClient, tenant: TenantId | None = None, timeline: TimelineId | None = None):
        self.queue: asyncio.Queue[SafekeeperTimelineInfo | BaseException] = asyncio.Queue()
        self.task = asyncio.create_task(self._run(client, tenant, timeline))

    async def _run(self, client: BrokerClient, tenant: TenantId | None, timeline: TimelineId | None) -> None:
        try:
            async for m in client.subscribe(tenant, timeline):
                self.queue.put_nowait(m)
        except Exception as e:
            self.queue.put_nowait(e)

    async def get(self, timeout: float = STEP_TIMEOUT) -> SafekeeperTimelineInfo:
        item = await asyncio.wait_for(self.queue.get(), timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


T1, L1 = TenantId.generate(), TimelineId.generate()
T2, L2 = TenantId.generate(), TimelineId.generate()


# ---- against a real broker ----


async def test_subscribe_all_two_publishers(broker: BrokerProc, client: BrokerClient) -> None:
    sub = Subscription(client)
    await wait_metric(broker, ALL_SUBS, 1)
    other = BrokerClient(broker.endpoint)
    try:
        # Two concurrent publish streams, each kept open until both have sent.
        gate = asyncio.Event()

        async def stream(m: SafekeeperTimelineInfo) -> AsyncIterator[SafekeeperTimelineInfo]:
            yield m
            await gate.wait()

        p1 = asyncio.create_task(client.publish(stream(info(1, T1, L1, 100, availability_zone="az-1"))))
        p2 = asyncio.create_task(other.publish(stream(info(2, T2, L2, 200))))
        got = {(m := await sub.get()).safekeeper_id: m for _ in range(2)}
        await wait_metric(broker, "storage_broker_active_publishers", 2)
        gate.set()
        await asyncio.wait_for(asyncio.gather(p1, p2), STEP_TIMEOUT)
        assert got[1] == info(1, T1, L1, 100, availability_zone="az-1")
        assert got[2] == info(2, T2, L2, 200)
        assert got[2].availability_zone is None
        await wait_metric(broker, "storage_broker_active_publishers", 0)
    finally:
        await sub.close()
        await other.close()
    await wait_metric(broker, ALL_SUBS, 0)


async def test_subscribe_one_timeline_filters(broker: BrokerProc, client: BrokerClient) -> None:
    sub = Subscription(client, T1, L1)
    await wait_metric(broker, TL_SUBS, 1)
    # Same tenant other timeline, and other tenant same timeline, must both be filtered out.
    await client.publish(items(info(1, T1, L2, 1), info(1, T2, L1, 2), info(1, T1, L1, 3), info(1, T2, L2, 4)))
    assert (await sub.get()).commit_lsn == 3
    await client.publish(items(info(1, T1, L1, 5)))
    assert (await sub.get()).commit_lsn == 5
    assert sub.queue.empty()
    await sub.close()
    await wait_metric(broker, TL_SUBS, 0)


async def test_late_subscriber_gets_no_history(broker: BrokerProc, client: BrokerClient) -> None:
    await client.publish(items(info(1, T1, L1, 10)))  # processed: the call has returned
    sub_all = Subscription(client)
    sub_one = Subscription(client, T1, L1)
    await wait_metric(broker, ALL_SUBS, 1)
    await wait_metric(broker, TL_SUBS, 1)
    await client.publish(items(info(1, T1, L1, 20)))
    assert (await sub_all.get()).commit_lsn == 20
    assert (await sub_one.get()).commit_lsn == 20
    await sub_all.close()
    await sub_one.close()


async def test_invalid_requests(broker: BrokerProc, client: BrokerClient) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{broker.port}") as ch:
        stub = broker_pb2_grpc.BrokerServiceStub(ch)

        async def subscribe_error(req: broker_pb2.SubscribeSafekeeperInfoRequest) -> grpc.aio.AioRpcError:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await asyncio.wait_for(stub.SubscribeSafekeeperInfo(req).read(), STEP_TIMEOUT)
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value
            return ei.value

        e = await subscribe_error(broker_pb2.SubscribeSafekeeperInfoRequest())
        assert e.details() == "missing subscription key"
        bad_tenant = broker_pb2.TenantTimelineId(tenant_id=b"\x01" * 15, timeline_id=bytes(L1))
        e = await subscribe_error(broker_pb2.SubscribeSafekeeperInfoRequest(tenant_timeline_id=bad_tenant))
        assert "malformed tenant_id" in (e.details() or "")
        bad_timeline = broker_pb2.TenantTimelineId(tenant_id=bytes(T1), timeline_id=b"")
        e = await subscribe_error(broker_pb2.SubscribeSafekeeperInfoRequest(tenant_timeline_id=bad_timeline))
        assert "malformed timeline_id" in (e.details() or "")

    # A published message without an id, through our client (raw protobuf passes as is).
    with pytest.raises(BrokerInvalidArgument, match="missing tenant_timeline_id"):
        await client.publish(items(broker_pb2.SafekeeperTimelineInfo(safekeeper_id=1)))
    bad = broker_pb2.SafekeeperTimelineInfo(safekeeper_id=1, tenant_timeline_id=bad_timeline)
    with pytest.raises(BrokerInvalidArgument, match="malformed timeline_id"):
        await client.publish(items(bad))
    # The broker is fine afterwards and nothing leaked.
    await wait_metric(broker, "storage_broker_active_publishers", 0)
    assert await metric(broker, ALL_SUBS) == 0
    assert await metric(broker, TL_SUBS) == 0


async def test_publish_source_error_is_reraised(broker: BrokerProc, client: BrokerClient) -> None:
    async def failing() -> AsyncIterator[SafekeeperTimelineInfo]:
        yield info(1, T1, L1, 1)
        raise RuntimeError("timeline went away")

    with pytest.raises(RuntimeError, match="timeline went away"):
        await asyncio.wait_for(client.publish(failing()), STEP_TIMEOUT)
    await wait_metric(broker, "storage_broker_active_publishers", 0)
    await client.publish(items(info(1, T1, L1, 2)))  # the client is still usable


async def test_cancelled_publish_ends_the_stream(broker: BrokerProc, client: BrokerClient) -> None:
    sent = asyncio.Event()

    async def endless() -> AsyncIterator[SafekeeperTimelineInfo]:
        yield info(1, T1, L1, 1)
        sent.set()
        await asyncio.Event().wait()

    pub = asyncio.create_task(client.publish(endless()))
    await asyncio.wait_for(sent.wait(), STEP_TIMEOUT)
    await wait_metric(broker, "storage_broker_active_publishers", 1)
    pub.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pub
    await wait_metric(broker, "storage_broker_active_publishers", 0)


async def test_garbage_bytes_do_not_hurt(broker: BrokerProc, client: BrokerClient) -> None:
    payloads = [
        b"\x00\xff" * 4096,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(512),  # valid preface, garbage frames
    ]
    for data in payloads:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", broker.port), STEP_TIMEOUT)
        w.write(data)
        await w.drain()
        # The broker closes the connection (possibly after a GOAWAY); wait for EOF.
        try:
            while await asyncio.wait_for(r.read(65536), STEP_TIMEOUT):
                pass
        except ConnectionResetError:
            pass
        w.close()
    assert broker.proc.poll() is None
    sub = Subscription(client)
    await wait_metric(broker, ALL_SUBS, 1)
    await client.publish(items(info(7, T1, L1, 77)))
    assert (await sub.get()).safekeeper_id == 7
    await sub.close()


async def test_sigterm_exits_promptly(broker: BrokerProc, client: BrokerClient) -> None:
    sub = Subscription(client)
    await wait_metric(broker, ALL_SUBS, 1)
    forever = asyncio.Event()

    async def endless() -> AsyncIterator[SafekeeperTimelineInfo]:
        yield info(1, T1, L1, 1)
        await forever.wait()

    pub = asyncio.create_task(client.publish(endless()))
    await sub.get()  # both streams are live
    start = time.monotonic()
    broker.proc.send_signal(signal.SIGTERM)
    rc = await asyncio.to_thread(broker.proc.wait, STEP_TIMEOUT)
    assert rc == 0, broker.log_text()
    assert time.monotonic() - start < 3.0
    # Both streams fail with a clear error rather than hanging.
    with pytest.raises(BrokerUnavailable):
        await sub.get()
    with pytest.raises(BrokerUnavailable):
        await asyncio.wait_for(pub, STEP_TIMEOUT)
    events = [json.loads(line).get("event") for line in broker.log_text().splitlines() if line.startswith("{")]
    assert "storage broker stopped" in events
    await sub.close()


async def test_slow_subscriber_does_not_block(tmp_path: Path) -> None:
    b = start_broker(tmp_path, "--timeline-chan-size", "8", "--all-keys-chan-size", "8")
    fast_client = BrokerClient(b.endpoint)
    slow_channel = grpc.aio.insecure_channel(f"127.0.0.1:{b.port}")
    try:
        # The slow one subscribes with raw gRPC (its own connection) and does not read for now.
        slow_call = broker_pb2_grpc.BrokerServiceStub(slow_channel).SubscribeSafekeeperInfo(subscribe_request(T1, L1))
        fast = Subscription(fast_client, T1, L1)
        fast_all = Subscription(fast_client)
        await wait_metric(b, TL_SUBS, 2)
        await wait_metric(b, ALL_SUBS, 1)

        n = 3000
        pad = "x" * 2000  # ~6 MB in all: more than the slow reader's HTTP/2 windows hold
        msgs = [info(1, T1, L1, i, safekeeper_connstr=pad) for i in range(1, n + 1)]
        await asyncio.wait_for(fast_client.publish(items(*msgs)), 10.0)

        async def until_last(s: Subscription) -> int:
            seen = 0
            while True:
                m = await s.get()
                seen += 1
                if m.commit_lsn == n:
                    return seen

        # The fast readers may skip (the queues are tiny) but always get the newest message.
        await until_last(fast)
        await until_last(fast_all)
        # The slow stream was not dropped: reading it now yields the newest message too, after
        # skipping the ones that did not fit, and the broker counted the skipped ones.
        last = 0
        while last != n:
            last = (await asyncio.wait_for(slow_call.read(), STEP_TIMEOUT)).commit_lsn
        assert await metric(b, "storage_broker_dropped_messages_total") > 0
        assert await metric(b, "storage_broker_published_messages_total") == n
        slow_call.cancel()
        await fast.close()
        await fast_all.close()
    finally:
        await fast_client.close()
        await slow_channel.close()
        stop_broker(b)
    assert b.proc.returncode == 0


async def test_status_and_404(broker: BrokerProc) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{broker.http}/status") as r:
            assert r.status == 200
            assert await r.read() == b""
        async with s.get(f"{broker.http}/nope") as r:
            assert r.status == 404


async def test_unreachable_broker_is_a_clear_error() -> None:
    port = _free_port()  # nothing listens there
    async with BrokerClient(f"http://127.0.0.1:{port}") as c:
        with pytest.raises(BrokerUnavailable):
            async for _ in c.subscribe():
                pass
        with pytest.raises(BrokerUnavailable):
            await c.publish(items(info(1, T1, L1)))
        with pytest.raises(BrokerUnavailable):
            await c.wait_ready(0.2)


# ---- unit tests: conversions and the broadcast ring ----


def test_timeline_info_round_trip() -> None:
    full = SafekeeperTimelineInfo(
        safekeeper_id=3,
        tenant_id=T1,
        timeline_id=L1,
        term=7,
        last_log_term=6,
        flush_lsn=Lsn("0/16B3748"),
        commit_lsn=Lsn("0/16B3700"),
        backup_lsn=Lsn("0/1000000"),
        remote_consistent_lsn=Lsn("0/1500000"),
        peer_horizon_lsn=Lsn("0/1400000"),
        local_start_lsn=Lsn("0/1000028"),
        safekeeper_connstr="sk-3:5454",
        http_connstr="sk-3:7676",
        availability_zone="",
    )
    p = full.to_proto()
    assert p.tenant_timeline_id.tenant_id == bytes(T1)
    assert p.tenant_timeline_id.timeline_id == bytes(L1)
    assert p.flush_lsn == 0x16B3748
    assert p.HasField("availability_zone")  # "" is a value, distinct from "not set"
    wire = broker_pb2.SafekeeperTimelineInfo.FromString(p.SerializeToString())
    back = SafekeeperTimelineInfo.from_proto(wire)
    assert back == full
    assert type(back.tenant_id) is TenantId and type(back.timeline_id) is TimelineId
    assert type(back.commit_lsn) is Lsn

    minimal = SafekeeperTimelineInfo(safekeeper_id=1, tenant_id=T2, timeline_id=L2)
    assert not minimal.to_proto().HasField("availability_zone")
    assert SafekeeperTimelineInfo.from_proto(minimal.to_proto()).availability_zone is None


def test_field_numbers_match_neon() -> None:
    fields = {f.name: f.number for f in broker_pb2.SafekeeperTimelineInfo.DESCRIPTOR.fields}
    assert fields == {
        "safekeeper_id": 1,
        "tenant_timeline_id": 2,
        "last_log_term": 3,
        "flush_lsn": 4,
        "commit_lsn": 5,
        "backup_lsn": 6,
        "remote_consistent_lsn": 7,
        "peer_horizon_lsn": 8,
        "local_start_lsn": 9,
        "safekeeper_connstr": 10,
        "availability_zone": 11,
        "term": 12,
        "http_connstr": 13,
    }
    assert broker_pb2.DESCRIPTOR.package == "storage_broker"
    service = broker_pb2.DESCRIPTOR.services_by_name["BrokerService"]
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert methods == {"SubscribeSafekeeperInfo": (False, True), "PublishSafekeeperInfo": (True, False)}


def test_from_proto_rejects_malformed_ids() -> None:
    with pytest.raises(BrokerMalformedMessage, match="without tenant_timeline_id"):
        SafekeeperTimelineInfo.from_proto(broker_pb2.SafekeeperTimelineInfo(safekeeper_id=1))
    bad = broker_pb2.SafekeeperTimelineInfo(
        tenant_timeline_id=broker_pb2.TenantTimelineId(tenant_id=b"\x00" * 17, timeline_id=bytes(L1))
    )
    with pytest.raises(BrokerMalformedMessage, match="malformed"):
        SafekeeperTimelineInfo.from_proto(bad)


def test_subscribe_request() -> None:
    assert subscribe_request().WhichOneof("subscription_key") == "all"
    r = subscribe_request(T1, L1)
    assert r.WhichOneof("subscription_key") == "tenant_timeline_id"
    assert (r.tenant_timeline_id.tenant_id, r.tenant_timeline_id.timeline_id) == (bytes(T1), bytes(L1))
    r = subscribe_request(TenantId(str(T2)), TimelineId(str(L2)))
    assert r.tenant_timeline_id.tenant_id == bytes(T2)
    with pytest.raises(ValueError, match="both"):
        subscribe_request(T1, None)
    with pytest.raises(ValueError, match="both"):
        subscribe_request(None, L1)
    assert subscribe_request().HasField("all")


def test_parse_endpoint() -> None:
    assert parse_endpoint("http://127.0.0.1:50051").target == "127.0.0.1:50051"
    assert parse_endpoint("http://127.0.0.1:50051/") == parse_endpoint("http://127.0.0.1:50051")
    assert not parse_endpoint("http://broker:50051").tls
    ep = parse_endpoint("https://broker.internal")
    assert (ep.target, ep.tls) == ("broker.internal:443", True)
    assert parse_endpoint("http://broker").target == "broker:80"
    assert parse_endpoint("http://[::1]:50051").target == "[::1]:50051"
    for bad in ("127.0.0.1:50051", "grpc://h:1", "http://", "http://h:1/path", "http://h:port"):
        with pytest.raises(ValueError, match="invalid broker endpoint"):
            parse_endpoint(bad)


async def test_broadcast_ring_lag() -> None:
    chan: Broadcast[int] = Broadcast(4)
    assert not chan.send(0)  # nobody listens: dropped
    rx = chan.subscribe()
    for i in range(1, 11):
        assert chan.send(i)
    assert await rx.recv() == Lagged(6)  # 1..6 overwritten
    assert [await rx.recv() for _ in range(4)] == [7, 8, 9, 10]
    late = chan.subscribe()
    chan.send(11)
    assert await rx.recv() == 11
    assert await late.recv() == 11
    waiting = asyncio.create_task(rx.recv())
    await asyncio.sleep(0)
    assert not waiting.done()
    other = asyncio.create_task(late.recv())
    await asyncio.sleep(0)
    other.cancel()  # one waiter cancelled must not disturb the other
    chan.send(12)
    assert await asyncio.wait_for(waiting, 1.0) == 12
    rx.close()
    late.close()
    assert chan.receivers == 0
