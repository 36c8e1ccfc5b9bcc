"""The `neon-safekeeper` daemon as a subprocess, driven by a small proposer written here with
`neon.pq.client` + `neon.safekeeper.protocol`, fed real PG15 WAL (1 MiB segments).

Synchronisation is by conditions with deadlines: HTTP readiness, replies carrying the expected
LSNs, broker messages carrying them.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from neon.broker.client import BrokerClient, SafekeeperTimelineInfo
from neon.postgres.crc32c import crc32c
from neon.pq.client import CopyStream, PgConnection, ReplicationStream, connect
from neon.pq.errors import PgError
from neon.pq.replication import PrimaryKeepalive, XLogData
from neon.safekeeper.protocol import (
    AcceptorGreeting,
    AppendRequest,
    AppendResponse,
    ProposerElected,
    ProposerGreeting,
    ProposerProtocol,
    TermHistory,
    VoteRequest,
    VoteResponse,
)
from neon.utils.id import TenantId, TimelineId
from neon.utils.lsn import Lsn
from tests.test_broker import start_broker, stop_broker
from tests.test_safekeeper_wal_storage import SEG, PgWal, pg_wal  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0
PG_VERSION = 150004
TENANT = TenantId("aa" * 16)
TIMELINE = TimelineId("bb" * 16)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Safekeeper:
    datadir: Path
    pg_port: int
    http_port: int
    broker: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.datadir.parent / f"{self.datadir.name}.log"

    def cmd(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "neon.safekeeper.main",
            "-D",
            str(self.datadir),
            "--id",
            "1",
            "--listen-pg",
            f"127.0.0.1:{self.pg_port}",
            "--listen-http",
            f"127.0.0.1:{self.http_port}",
            "--broker-endpoint",
            self.broker,
            "--no-sync",
            "--log-format",
            "json",
        ]

    def start(self) -> Safekeeper:
        with self.log_path.open("ab") as logf:
            self.proc = subprocess.Popen(self.cmd(), cwd=REPO, stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.http_port), timeout=0.5):
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"safekeeper did not start (rc={self.proc.poll()}):\n{self.log_path.read_text()}")
            time.sleep(0.02)  # polling for the listening socket, with a deadline
        return self

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def new_safekeeper(tmp: Path, broker: str = "http://127.0.0.1:1") -> Safekeeper:
    return Safekeeper(tmp / "sk1", _free_port(), _free_port(), broker)


@pytest.fixture
def sk(tmp_path: Path) -> Iterator[Safekeeper]:
    s = new_safekeeper(tmp_path).start()
    yield s
    s.stop()


# --- a minimal proposer -------------------------------------------------------------------------


def options(tenant: TenantId = TENANT, timeline: TimelineId = TIMELINE) -> str:
    return f"-c timeline_id={timeline} tenant_id={tenant}"


class Proposer:
    def __init__(self, conn: PgConnection, copy: CopyStream) -> None:
        self.conn = conn
        self.copy = copy
        self.proto = ProposerProtocol()
        self.last: AppendResponse | None = None

    @classmethod
    async def open(cls, port: int, tenant: TenantId = TENANT, timeline: TimelineId = TIMELINE) -> Proposer:
        conn = await connect("127.0.0.1", port, dbname="replication", options=options(tenant, timeline))
        return cls(conn, await conn.copy_both("START_WAL_PUSH"))

    async def send(self, msg: object) -> None:
        await self.copy.write(self.proto.send(msg))  # type: ignore[arg-type]

    async def recv(self) -> object:
        async with asyncio.timeout(TIMEOUT):
            data = await self.copy.read()
        assert data is not None, "safekeeper ended the stream"
        msg = self.proto.receive(data)
        if isinstance(msg, AppendResponse):
            self.last = msg
        return msg

    async def elect(self, wal: PgWal, term: int = 1) -> VoteResponse:
        await self.send(
            ProposerGreeting(
                tenant_id=TENANT, timeline_id=TIMELINE, pg_version=PG_VERSION, system_id=wal.sysid, wal_seg_size=SEG
            )
        )
        assert isinstance(await self.recv(), AcceptorGreeting)
        await self.send(VoteRequest(term=term))
        vote = await self.recv()
        assert isinstance(vote, VoteResponse) and vote.vote_given
        await self.send(
            ProposerElected(
                term=term,
                start_streaming_at=Lsn(wal.start),
                term_history=TermHistory.of((1, wal.start)),
                timeline_start_lsn=Lsn(wal.start),
            )
        )
        return vote

    async def append(self, wal: PgWal, start: int, end: int, *, commit: int = 0, term: int = 1) -> None:
        pos = start
        while pos < end:
            n = min(100000, end - pos)
            req = AppendRequest.build(
                term=term,
                epoch_start_lsn=wal.start,
                begin_lsn=pos,
                commit_lsn=commit,
                truncate_lsn=wal.start,
                wal=wal.bytes(pos, pos + n),
            )
            await self.send(req)
            pos += n

    async def heartbeat(self, at: int, commit: int, term: int = 1) -> None:
        await self.send(
            AppendRequest.build(term=term, epoch_start_lsn=0, begin_lsn=at, commit_lsn=commit, truncate_lsn=0)
        )

    async def wait_reply(self, flush: int, commit: int | None = None) -> AppendResponse:
        while True:
            await self.recv()
            last = self.last
            if last is not None and last.flush_lsn >= flush and (commit is None or last.commit_lsn >= commit):
                return last

    async def close(self) -> None:
        await self.conn.close()


@dataclass
class Streamed:
    flush: Lsn  # flush LSN after streaming
    commit: Lsn  # commit LSN announced (below flush)


async def stream_wal(port: int, wal: PgWal, proposer: Proposer | None = None) -> tuple[Proposer, Streamed]:
    """Elect, stream ~800 KB of WAL (crossing a segment), announce a commit LSN below the flush."""
    p = proposer or await Proposer.open(port)
    await p.elect(wal)
    end = wal.start + 800000
    await p.append(wal, wal.start, end)
    flush = wal.last_end_at_or_before(end)
    await p.wait_reply(flush)
    commit = wal.last_end_at_or_before(wal.start + 500000)
    await p.heartbeat(end, commit)
    await p.wait_reply(flush)
    return p, Streamed(Lsn(flush), Lsn(commit))


async def http_json(method: str, url: str, **kw: object) -> tuple[int, object]:
    async with aiohttp.ClientSession() as s, s.request(method, url, **kw) as r:  # type: ignore[arg-type]
        text = await r.text()
        return r.status, json.loads(text) if r.content_type == "application/json" else text


def metric(text: str, sample: str) -> int:
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return int(float(value))
    raise AssertionError(f"no sample {sample} in metrics")


async def wait_status(sk: Safekeeper, key: str, value: str) -> dict:
    deadline = time.monotonic() + TIMEOUT
    while True:
        status, body = await http_json("GET", f"{sk.http}/v1/tenant/{TENANT}/timeline/{TIMELINE}")
        if status == 200 and isinstance(body, dict) and body[key] == value:
            return body
        assert time.monotonic() < deadline, f"timeline {key} never became {value}: {body}"
        await asyncio.sleep(0.02)  # re-checking a condition, with a deadline


async def replicate(port: int, appname: str, start: int, until: int) -> tuple[bytes, ReplicationStream, PgConnection]:
    conn = await connect("127.0.0.1", port, options=options(), application_name=appname, replication=True)
    repl = await conn.start_replication(start, timeline=1)
    got = bytearray()
    async with asyncio.timeout(TIMEOUT):
        async for msg in repl:
            if isinstance(msg, XLogData):
                assert msg.wal_start == start + len(got)
                got += msg.data
                if start + len(got) >= until:
                    break
    return bytes(got), repl, conn


# --- tests --------------------------------------------------------------------------------------


async def test_stream_then_serve_wal(sk: Safekeeper, pg_wal: PgWal) -> None:  # noqa: F811
    wal = pg_wal
    p, s = await stream_wal(sk.pg_port, wal)
    assert p.last is not None and p.last.term == 1 and p.last.pageserver_feedback is not None

    conn = await connect("127.0.0.1", sk.pg_port, options=options())
    assert await conn.query("TIMELINE_STATUS") == [(str(s.flush), str(s.commit))]
    other = await connect("127.0.0.1", sk.pg_port, options=options(timeline=TimelineId("cc" * 16)))
    assert await other.query("TIMELINE_STATUS") == []
    with pytest.raises(PgError, match="not found"):
        await other.query("IDENTIFY_SYSTEM")
    with pytest.raises(PgError, match="unsupported command"):
        await conn.query("SELECT 1")
    noids = await connect("127.0.0.1", sk.pg_port)
    with pytest.raises(PgError, match="tenant_id is required") as exc:
        await noids.query("TIMELINE_STATUS")
    assert exc.value.sqlstate == "XX000"
    for c in (conn, other, noids):
        await c.close()

    # A pageserver gets WAL only up to commit_lsn, byte-identical, then keepalives.
    data, repl, ps = await replicate(sk.pg_port, "pageserver", wal.start, s.commit)
    assert data == wal.bytes(wal.start, s.commit)
    async with asyncio.timeout(TIMEOUT):
        async for msg in repl:
            assert isinstance(msg, PrimaryKeepalive), "WAL beyond commit_lsn was sent"
            assert msg.wal_end == s.commit and msg.reply_requested
            break
    await ps.close()
    ps = await connect("127.0.0.1", sk.pg_port, options=options(), application_name="pageserver", replication=True)
    ident = await ps.identify_system()
    assert (ident.systemid, ident.timeline, ident.xlogpos) == (wal.sysid, 1, s.commit)
    await ps.close()

    # A recovering proposer gets everything flushed.
    data, repl, rec = await replicate(sk.pg_port, "wal_proposer_recovery", wal.start, s.flush)
    assert data == wal.bytes(wal.start, s.flush)
    await rec.close()

    # Committing more lets the pageserver go on.
    await p.heartbeat(wal.start + 800000, s.flush)
    await wait_status(sk, "commit_lsn", str(s.flush))
    data, repl, ps = await replicate(sk.pg_port, "pageserver", s.commit, s.flush)
    assert data == wal.bytes(s.commit, s.flush)
    await ps.close()
    await p.close()


async def test_http_api_and_metrics(sk: Safekeeper, pg_wal: PgWal) -> None:  # noqa: F811
    wal = pg_wal
    p, s = await stream_wal(sk.pg_port, wal)
    assert await http_json("GET", f"{sk.http}/v1/status") == (200, {"id": 1})
    status, body = await http_json("GET", f"{sk.http}/v1/tenant/{TENANT}/timeline/{TIMELINE}")
    assert status == 200 and isinstance(body, dict)
    assert body["acceptor_state"] == {"term": 1, "epoch": 1, "term_history": [{"term": 1, "lsn": str(Lsn(wal.start))}]}
    assert body["pg_info"] == {"pg_version": PG_VERSION, "system_id": wal.sysid, "wal_seg_size": SEG}
    assert (body["flush_lsn"], body["commit_lsn"]) == (str(s.flush), str(s.commit))
    assert body["timeline_start_lsn"] == body["local_start_lsn"] == str(Lsn(wal.start))
    assert body["walreceivers"] and body["walreceivers"][0]["status"] == "Streaming"

    status, text = await http_json("GET", f"{sk.http}/metrics")
    assert status == 200 and isinstance(text, str)
    labels = f'{{tenant_id="{TENANT}",timeline_id="{TIMELINE}"}}'
    assert metric(text, f"safekeeper_flush_lsn{labels}") == s.flush
    assert metric(text, f"safekeeper_commit_lsn{labels}") == s.commit
    assert metric(text, f"safekeeper_connected_computes{labels}") == 1
    assert metric(text, 'safekeeper_pg_queries_received_total{query="START_WAL_PUSH"}') == 1
    assert "safekeeper_wal_fsyncs_total" in text and "safekeeper_write_wal_bytes_total" in text
    assert "safekeeper_wal_flushes_on_event_loop_total" in text

    # Explicit creation, idempotent; deletion, repeatable; errors as {"msg"}.
    new_tl = TimelineId("dd" * 16)
    req = {"tenant_id": str(TENANT), "timeline_id": str(new_tl), "pg_version": PG_VERSION, "commit_lsn": "0/2000100"}
    assert await http_json("POST", f"{sk.http}/v1/tenant/timeline", json=req) == (200, None)
    assert await http_json("POST", f"{sk.http}/v1/tenant/timeline", json=req) == (200, None)
    status, created = await http_json("GET", f"{sk.http}/v1/tenant/{TENANT}/timeline/{new_tl}")
    assert status == 200 and isinstance(created, dict)
    assert (created["commit_lsn"], created["local_start_lsn"], created["flush_lsn"]) == (
        "0/2000100",
        "0/2000000",
        "0/2000100",
    )
    status, err = await http_json("POST", f"{sk.http}/v1/tenant/timeline", json={"tenant_id": str(TENANT)})
    assert status == 400 and "msg" in err  # type: ignore[operator]
    url = f"{sk.http}/v1/tenant/{TENANT}/timeline/{new_tl}"
    # Active: its commit_lsn is ahead of the (absent) pageserver's remote_consistent_lsn.
    assert await http_json("DELETE", url) == (200, {"dir_existed": True, "was_active": True})
    assert not (sk.datadir / str(TENANT) / str(new_tl)).exists()
    assert await http_json("DELETE", url) == (200, {"dir_existed": False, "was_active": False})
    status, err = await http_json("POST", f"{sk.http}/v1/tenant/timeline", json=req)
    assert status == 409 and "cancelled" in err["msg"]  # type: ignore[index]
    status, err = await http_json("GET", f"{sk.http}/v1/tenant/{TENANT}/timeline/{'ee' * 16}")
    assert status == 404 and err == {"msg": f"NotFound: timeline {TENANT}/{'ee' * 16} not found"}
    status, err = await http_json("GET", f"{sk.http}/v1/tenant/xyz/timeline/{'ee' * 16}")
    assert status == 400
    # Deleting the tenant deletes the streamed timeline too (it was active: a compute is connected).
    status, res = await http_json("DELETE", f"{sk.http}/v1/tenant/{TENANT}")
    assert status == 200 and res[str(TIMELINE)] == {"dir_existed": True, "was_active": True}  # type: ignore[index]
    assert not (sk.datadir / str(TENANT)).exists()
    await p.close()


async def test_bad_clients_only_hurt_themselves(sk: Safekeeper, pg_wal: PgWal) -> None:  # noqa: F811
    wal = pg_wal
    good, s = await stream_wal(sk.pg_port, wal)

    # Garbage bytes instead of a startup packet.
    reader, writer = await asyncio.open_connection("127.0.0.1", sk.pg_port)
    writer.write(b"\x00\x00\x00\x10garbage-garbage!" * 4)
    await writer.drain()
    async with asyncio.timeout(TIMEOUT):
        await reader.read()  # the server closes this connection
    writer.close()

    async def refused(payload: bytes, needle: str) -> None:
        conn = await connect("127.0.0.1", sk.pg_port, dbname="replication", options=options())
        copy = await conn.copy_both("START_WAL_PUSH")
        await copy.write(payload)
        with pytest.raises(PgError, match=needle) as exc:
            async with asyncio.timeout(TIMEOUT):
                while await copy.read() is not None:
                    pass
        assert exc.value.sqlstate == "XX000"
        await conn.close()

    greeting = ProposerGreeting(
        tenant_id=TENANT, timeline_id=TIMELINE, pg_version=PG_VERSION, system_id=wal.sysid, wal_seg_size=SEG
    )
    await refused(b"\x01\x02garbage", "invalid proposer message")
    await refused(VoteRequest(term=9).encode(), "first proposer message must be ProposerGreeting")
    await refused(greeting.encode()[:50], "invalid proposer message")
    wrong_seg = ProposerGreeting(
        tenant_id=TENANT, timeline_id=TIMELINE, pg_version=PG_VERSION, system_id=wal.sysid, wal_seg_size=2 * SEG
    )
    await refused(wrong_seg.encode(), "wal_seg_size")
    wrong_tenant = ProposerGreeting(
        tenant_id=TenantId("99" * 16), timeline_id=TIMELINE, pg_version=PG_VERSION, system_id=1, wal_seg_size=SEG
    )
    await refused(wrong_tenant.encode(), "invalid tenant ID")

    # A malformed message in the middle of a stream ends that stream only.
    p2 = await Proposer.open(sk.pg_port)
    await p2.send(greeting)
    assert isinstance(await p2.recv(), AcceptorGreeting)
    await p2.copy.write(b"a" + bytes(7) + b"\x00" * 10)
    with pytest.raises(PgError, match="invalid proposer message"):
        await p2.recv()
    await p2.close()

    # The first proposer is still served.
    await good.heartbeat(wal.start + 800000, s.flush)
    reply = await good.wait_reply(s.flush)
    assert reply.term == 1
    await wait_status(sk, "commit_lsn", str(s.flush))
    status, body = await http_json("GET", f"{sk.http}/v1/tenant/{TENANT}/timeline/{TIMELINE}")
    assert status == 200 and body["acceptor_state"]["term"] == 1  # type: ignore[index]
    await good.close()


async def test_restart_and_corrupt_control_file(tmp_path: Path, pg_wal: PgWal) -> None:  # noqa: F811
    wal = pg_wal
    sk = new_safekeeper(tmp_path).start()
    try:
        p, s = await stream_wal(sk.pg_port, wal)
        await p.close()
    finally:
        assert sk.stop() == 0
    assert (sk.datadir / "safekeeper.id").read_text() == "1"
    sk.start()
    try:
        body = await wait_status(sk, "flush_lsn", str(s.flush))
        assert body["acceptor_state"]["term"] == 1
        assert body["acceptor_state"]["term_history"] == [{"term": 1, "lsn": str(Lsn(wal.start))}]
        data, _repl, rec = await replicate(sk.pg_port, "wal_proposer_recovery", wal.start, s.flush)
        assert data == wal.bytes(wal.start, s.flush)
        await rec.close()
        # A new term on the restarted safekeeper sees the stored history and flush LSN.
        p = await Proposer.open(sk.pg_port)
        await p.send(
            ProposerGreeting(
                tenant_id=TENANT, timeline_id=TIMELINE, pg_version=PG_VERSION, system_id=wal.sysid, wal_seg_size=SEG
            )
        )
        assert await p.recv() == AcceptorGreeting(term=1, node_id=1)
        await p.send(VoteRequest(term=2))
        vote = await p.recv()
        assert isinstance(vote, VoteResponse) and vote.vote_given and vote.flush_lsn == s.flush
        await p.close()
    finally:
        assert sk.stop() == 0

    # A different --id is refused.
    bad_id = subprocess.run([*sk.cmd()[:6], "2", *sk.cmd()[7:]], capture_output=True, timeout=30, cwd=REPO)
    assert bad_id.returncode != 0 and b"id mismatch" in bad_id.stderr

    control = sk.datadir / str(TENANT) / str(TIMELINE) / "safekeeper.control"
    good = control.read_bytes()
    flipped = bytearray(good)
    flipped[60] ^= 0x01
    bad_version = bytearray(good)
    bad_version[4:8] = (99).to_bytes(4, "little")
    bad_version[-4:] = crc32c(bytes(bad_version[:-4])).to_bytes(4, "little")
    for corrupt, needle in ((bytes(flipped), b"checksum mismatch"), (bytes(bad_version), b"version 99")):
        control.write_bytes(corrupt)
        run = subprocess.run(sk.cmd(), capture_output=True, timeout=30, cwd=REPO)
        assert run.returncode != 0
        assert needle in run.stderr and str(control).encode() in run.stderr, run.stderr
        assert control.read_bytes() == corrupt  # never rewritten
    control.write_bytes(good)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[object]:
    b = start_broker(tmp_path)
    yield b
    stop_broker(b)


@pytest.fixture
async def broker_sk(tmp_path: Path, broker: object) -> AsyncIterator[Safekeeper]:
    s = new_safekeeper(tmp_path, broker.endpoint).start()  # type: ignore[attr-defined]
    yield s
    s.stop()


async def test_publishes_to_broker(broker: object, broker_sk: Safekeeper, pg_wal: PgWal) -> None:  # noqa: F811
    wal = pg_wal
    client = BrokerClient(broker.endpoint)  # type: ignore[attr-defined]
    seen: asyncio.Queue[SafekeeperTimelineInfo] = asyncio.Queue()

    async def subscribe() -> None:
        async for info in client.subscribe(TENANT, TIMELINE):
            seen.put_nowait(info)

    task = asyncio.create_task(subscribe())
    try:
        p, s = await stream_wal(broker_sk.pg_port, wal)
        async with asyncio.timeout(TIMEOUT):
            while True:
                info = await seen.get()
                if info.commit_lsn == s.commit and info.flush_lsn == s.flush:
                    break
        assert info.safekeeper_id == 1
        assert info.safekeeper_connstr == f"127.0.0.1:{broker_sk.pg_port}"
        assert info.http_connstr == f"127.0.0.1:{broker_sk.http_port}"
        assert (info.term, info.last_log_term, info.local_start_lsn) == (1, 1, wal.start)
        await p.close()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()


async def test_learns_commit_lsn_from_a_peer_in_the_same_epoch(
    broker: object,
    broker_sk: Safekeeper,
    pg_wal: PgWal,  # noqa: F811
) -> None:
    """Spec §5.5: a peer's commit LSN published through the broker advances ours, but only when
    the peer is in our epoch, and never beyond our flush LSN."""
    wal = pg_wal
    p, s = await stream_wal(broker_sk.pg_port, wal)
    await wait_status(broker_sk, "commit_lsn", str(s.commit))
    client = BrokerClient(broker.endpoint)  # type: ignore[attr-defined]

    def peer(last_log_term: int, commit: int) -> SafekeeperTimelineInfo:
        return SafekeeperTimelineInfo(
            safekeeper_id=2,
            tenant_id=TENANT,
            timeline_id=TIMELINE,
            term=last_log_term,
            last_log_term=last_log_term,
            flush_lsn=Lsn(commit),
            commit_lsn=Lsn(commit),
            safekeeper_connstr="127.0.0.1:1",
        )

    async def publish(info: SafekeeperTimelineInfo) -> None:
        async def once():  # type: ignore[no-untyped-def]
            yield info

        await client.publish(once())

    try:
        mid = Lsn(wal.last_end_at_or_before(wal.start + 650000))
        assert s.commit < mid < s.flush
        await publish(peer(2, s.flush))  # another epoch: ignored ...
        await publish(peer(1, mid))  # ... else commit_lsn could not be `mid` now (it never goes back)
        await wait_status(broker_sk, "commit_lsn", str(mid))
        await publish(peer(1, s.flush + 1_000_000))  # bounded by our flush
        await wait_status(broker_sk, "commit_lsn", str(s.flush))
    finally:
        await p.close()
        await client.close()
