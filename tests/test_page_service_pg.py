"""The page service over the wire (spec pageserver §7.2-7.3, §8): a timeline built from a real PG15
cluster's WAL, served by `PqServer` + `PageServiceHandler` on 127.0.0.1, used with our libpq client.

A fullbackup is fetched and untarred; a pagestream client (written here, pipelining its requests)
reads every block of every relation and compares it with the backup's files; Nblocks, Exists and
DbSize agree with the files. Per-request errors (LSN wait timeout, LSN 0, GC cutoff, unknown
relation) come back as pagestream error responses on a stream that keeps working; malformed
messages, bad commands and unknown ids get an ErrorResponse on a connection that keeps working;
and a fuzz loop of random pagestream messages and libpq garbage leaves another client's reads
correct."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import random
import re
import shutil
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from neon.pageserver import pagestream as ps
from neon.pageserver.basebackup import write_basebackup
from neon.pageserver.key import RelTag
from neon.pageserver.page_service import PageServiceHandler, TenantMapLookup
from neon.pageserver.tenant import Tenant
from neon.pageserver.timeline import Timeline
from neon.postgres.controlfile import ControlFileData
from neon.postgres.page import page_is_new, page_set_checksum
from neon.pq.client import CopyStream, PgConnection, connect
from neon.pq.errors import PgError
from neon.pq.server import PqServer
from neon.utils.id import TenantId, TimelineId
from neon.utils.lsn import Lsn
from neon.walredo.launcher import PostgresRedoLauncher, scratch_parent
from neon.walredo.manager import WalRedoManager
from tests.fixtures.vanilla import make_test_root
from tests.storage_oracle import WorkloadRun
from tests.test_storage_core_pg import Env

pytestmark = pytest.mark.asyncio(loop_scope="module")

BLCKSZ = 8192
WAIT_LSN_TIMEOUT = 1.0
_FORKS = {"": 0, "_fsm": 1, "_vm": 2, "_init": 3}
_REL_FILE = re.compile(r"^(?:base/(\d+)|global)/(\d+)(_fsm|_vm|_init)?(?:\.(\d+))?$")


@dataclass
class Served:
    env: Env
    tenant: Tenant
    tl: Timeline
    server: PqServer

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def ids(self) -> str:
        return f"{self.tenant.tenant_id} {self.tl.timeline_id}"


@dataclass
class Backup:
    files: dict[str, bytes]
    """Every regular file of the fullbackup tar."""
    rels: dict[RelTag, bytes]
    """Each relation fork's contents (its segment files concatenated)."""
    checksums: bool


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(storage_workload: WorkloadRun) -> AsyncIterator[Served]:
    """One timeline (initdb imported, all of the workload's WAL ingested) behind a page service."""
    scratch = Path(tempfile.mkdtemp(dir=scratch_parent())) if os.access("/dev/shm", os.W_OK) else None
    root = make_test_root(prefix="neon-page-service-")
    (scratch or root).chmod(0o755)
    mgr = WalRedoManager("0123456789abcdef0123456789abcdef", PostgresRedoLauncher((scratch or root) / "walredo"))
    env = Env(root, storage_workload, mgr)
    server: PqServer | None = None
    try:
        tenant = env.create_tenant()
        tl = await env.import_initdb()
        assert await env.ingest(tl) == storage_workload.snap_b.lsn
        handler = PageServiceHandler(TenantMapLookup({tenant.tenant_id: tenant}), wait_lsn_timeout=WAIT_LSN_TIMEOUT)
        server = await PqServer(handler).start("127.0.0.1", 0)
        yield Served(env, tenant, tl, server)
    finally:
        if server is not None:
            await server.stop()
        if env.tenant is not None:
            await env.tenant.shutdown(flush=False)
        await mgr.shutdown()
        shutil.rmtree(root, ignore_errors=True)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


async def fetch_tar(port: int, command: str) -> bytes:
    async with await connect(port=port) as conn:
        stream = await conn.copy_out(command)
        chunks = [chunk async for chunk in stream]
        results = await stream.finish()
        assert results[-1].tag == "SELECT 1"
        return b"".join(chunks)


def untar(data: bytes) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for member in tar:
            if member.isfile():
                f = tar.extractfile(member)
                assert f is not None
                files[member.name] = f.read()
    return files


def relations(files: dict[str, bytes]) -> dict[RelTag, bytes]:
    segments: dict[RelTag, dict[int, bytes]] = {}
    for name, data in files.items():
        m = _REL_FILE.match(name)
        if m is None:
            continue
        db, rel, fork, segno = m.groups()
        tag = (
            RelTag(1663, int(db), int(rel), _FORKS[fork or ""]) if db else RelTag(1664, 0, int(rel), _FORKS[fork or ""])
        )
        segments.setdefault(tag, {})[int(segno or 0)] = data
    return {tag: b"".join(segs[i] for i in sorted(segs)) for tag, segs in segments.items()}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def backup(served: Served) -> Backup:
    files = untar(await fetch_tar(served.port, f"fullbackup {served.ids}"))
    checksums = ControlFileData.decode(files["global/pg_control"]).data_checksum_version != 0
    return Backup(files, relations(files), checksums)


class PagestreamClient:
    """The compute's side of `pagestream`: requests out, responses back in order."""

    def __init__(self, conn: PgConnection, stream: CopyStream) -> None:
        self.conn = conn
        self.stream = stream

    @classmethod
    async def open(cls, conn: PgConnection, ids: str) -> PagestreamClient:
        return cls(conn, await conn.copy_both(f"pagestream {ids}"))

    async def request(self, req: ps.PagestreamRequest) -> ps.PagestreamResponse:
        await self.stream.write(ps.encode_request(req))
        return await self.response()

    async def response(self) -> ps.PagestreamResponse:
        data = await self.stream.read()
        assert data is not None, "the server ended the pagestream"
        return ps.decode_response(data)

    async def pipelined(self, reqs: Iterable[ps.PagestreamRequest], depth: int = 64) -> list[ps.PagestreamResponse]:
        """Keep up to `depth` requests in flight (the responses are small enough for the socket
        buffers either way, so writing a batch before reading cannot deadlock)."""
        out: list[ps.PagestreamResponse] = []
        batch: list[ps.PagestreamRequest] = []
        for req in [*reqs, None]:
            if req is not None:
                batch.append(req)
            if batch and (req is None or len(batch) >= depth):
                for r in batch:
                    await self.stream.write(ps.encode_request(r))
                for _ in batch:
                    out.append(await self.response())
                batch = []
        return out


def same_page(served_page: bytes, file_page: bytes, blkno: int, checksums: bool) -> bool:
    """The backup stamps pd_checksum on pages of a checksummed cluster; GetPage serves them as stored."""
    if served_page == file_page:
        return True
    if checksums and not page_is_new(served_page):
        buf = bytearray(served_page)
        page_set_checksum(buf, blkno)
        return bytes(buf) == file_page
    return False


def source_fork(tag: RelTag, rels: dict[RelTag, bytes]) -> RelTag:
    """The fork the backup copied into this file: an unlogged relation's main fork is its init fork."""
    if tag.fork == 0 and tag._replace(fork=3) in rels:
        return tag._replace(fork=3)
    return tag


# --- backups ------------------------------------------------------------------------------------
async def test_fullbackup_over_the_wire(served: Served, backup: Backup) -> None:
    assert backup.files["zenith.signal"].startswith(b"PREV LSN: ")
    assert "global/pg_control" in backup.files and "PG_VERSION" in backup.files
    assert backup.rels, "no relation files in the fullbackup"
    # The same archive as writing it in-process, but for the synthesized checkpoint's timestamp
    # (in pg_control and the WAL segment) and the tar headers' mtimes.
    local = io.BytesIO()
    await write_basebackup(served.tl, local, full=True)
    here = untar(local.getvalue())
    assert here.keys() == backup.files.keys()
    differ = {name for name, data in here.items() if backup.files[name] != data}
    assert {n for n in differ if not n.startswith("pg_wal/")} <= {"global/pg_control"}


async def test_basebackup_is_full_and_gzip(served: Served, backup: Backup) -> None:
    lsn = Lsn(served.tl.last_record_lsn)
    data = await fetch_tar(served.port, f"basebackup {served.ids} {lsn} --gzip")
    assert data[:2] == b"\x1f\x8b"
    files = untar(data)
    assert relations(files) == backup.rels  # relation data included (DESIGN §2.3)
    plain = untar(await fetch_tar(served.port, f"basebackup {served.ids}"))
    assert plain.keys() == backup.files.keys()
    prev = Lsn(served.tl.prev_record_lsn)
    with_prev = untar(await fetch_tar(served.port, f"basebackup {served.ids} {lsn} {prev} --gzip"))
    assert with_prev["zenith.signal"] == f"PREV LSN: {prev}".encode()


# --- pagestream reads -----------------------------------------------------------------------------
async def test_pagestream_reads_every_block(served: Served, backup: Backup) -> None:
    lsn = Lsn(served.tl.last_record_lsn)
    rels = backup.rels
    async with await connect(port=served.port) as conn:
        client = await PagestreamClient.open(conn, served.ids)
        tags = sorted(rels)
        exists = await client.pipelined(ps.ExistsRequest(True, lsn, source_fork(t, rels)) for t in tags)
        assert all(r == ps.ExistsResponse(True) for r in exists)
        sizes = await client.pipelined(ps.NblocksRequest(True, lsn, source_fork(t, rels)) for t in tags)
        for tag, resp in zip(tags, sizes, strict=True):
            assert resp == ps.NblocksResponse(len(rels[tag]) // BLCKSZ), tag
        blocks = [(tag, blk) for tag in tags for blk in range(len(rels[tag]) // BLCKSZ)]
        assert blocks
        # Every way of asking for "now": latest with the primary's LSN, latest with LSN 0
        # (bootstrap), and exactly last_record_lsn.
        ways = [(True, lsn), (True, Lsn(0)), (False, lsn)]
        reqs = [ps.GetPageRequest(*ways[i % 3], source_fork(t, rels), b) for i, (t, b) in enumerate(blocks)]
        pages = await client.pipelined(reqs, depth=128)
        bad = []
        for (tag, blk), resp in zip(blocks, pages, strict=True):
            assert isinstance(resp, ps.GetPageResponse), (tag, blk, resp)
            if not same_page(resp.page, rels[tag][blk * BLCKSZ : (blk + 1) * BLCKSZ], blk, backup.checksums):
                bad.append((tag, blk))
        assert not bad, f"{len(bad)} of {len(blocks)} pages differ, first {bad[:5]}"
        # Beyond the end of a relation: a zero page (Postgres reads there after a crash-extension).
        tag = source_fork(tags[0], rels)
        nblocks = len(rels[tags[0]]) // BLCKSZ
        assert await client.request(ps.GetPageRequest(True, lsn, tag, nblocks + 5)) == ps.GetPageResponse(bytes(BLCKSZ))


async def test_pagestream_dbsize_and_missing_relations(served: Served, backup: Backup) -> None:
    lsn = Lsn(served.tl.last_record_lsn)
    rels = backup.rels
    expected: dict[int, int] = {}
    async with await connect(port=served.port) as conn:
        client = await PagestreamClient.open(conn, served.ids)
        for tag, data in rels.items():
            if tag.spc != 1663:
                continue
            size = len(data)
            if source_fork(tag, rels) != tag:  # the unlogged main fork's own size counts
                resp = await client.request(ps.NblocksRequest(True, lsn, tag))
                assert isinstance(resp, ps.NblocksResponse)
                size = resp.n_blocks * BLCKSZ
            expected[tag.db] = expected.get(tag.db, 0) + size
        assert len(expected) >= 3  # template0, template1, postgres at least
        for db, size in sorted(expected.items()):
            assert await client.request(ps.DbSizeRequest(True, lsn, db)) == ps.DbSizeResponse(size), db
        # A database that does not exist has no relation directory: an error, as in Neon.
        resp = await client.request(ps.DbSizeRequest(True, lsn, 999_999))
        assert isinstance(resp, ps.ErrorResponse) and "could not find data" in resp.message

        used = {t.rel for t in rels}
        missing = RelTag(1663, min(expected), max(used) + 1000, 0)
        assert await client.request(ps.ExistsRequest(True, lsn, missing)) == ps.ExistsResponse(False)
        # A missing FSM/VM fork has 0 blocks; a missing main fork is an error (the stream goes on).
        assert await client.request(ps.NblocksRequest(True, lsn, missing._replace(fork=1))) == ps.NblocksResponse(0)
        resp = await client.request(ps.NblocksRequest(True, lsn, missing))
        assert isinstance(resp, ps.ErrorResponse) and "does not exist" in resp.message
        resp = await client.request(ps.GetPageRequest(True, lsn, missing._replace(rel=0), 0))
        assert isinstance(resp, ps.ErrorResponse) and "relnode 0" in resp.message
        tag = next(iter(rels))
        assert await client.request(ps.ExistsRequest(True, lsn, tag)) == ps.ExistsResponse(True)


async def test_pagestream_lsn_errors_keep_the_stream(served: Served, backup: Backup) -> None:
    tl = served.tl
    lsn = Lsn(tl.last_record_lsn)
    tag = max(backup.rels, key=lambda t: len(backup.rels[t]))
    tag = source_fork(tag, backup.rels)
    async with await connect(port=served.port) as conn:
        client = await PagestreamClient.open(conn, served.ids)
        future = Lsn(lsn + 0x1000)
        started = time.monotonic()
        resp = await client.request(ps.GetPageRequest(True, future, tag, 0))
        waited = time.monotonic() - started
        assert isinstance(resp, ps.ErrorResponse), resp
        assert f"Timed out while waiting for WAL record at LSN {future} to arrive" in resp.message
        assert WAIT_LSN_TIMEOUT * 0.9 <= waited < WAIT_LSN_TIMEOUT + 5
        good = await client.request(ps.GetPageRequest(True, lsn, tag, 0))
        assert isinstance(good, ps.GetPageResponse)
        assert same_page(good.page, backup.rels[tag][:BLCKSZ], 0, backup.checksums)
        # The same wait applies to an exact (non-latest) LSN in the future.
        resp = await client.request(ps.NblocksRequest(False, future, tag))
        assert isinstance(resp, ps.ErrorResponse) and "Timed out" in resp.message

        resp = await client.request(ps.ExistsRequest(False, Lsn(0), tag))
        assert resp == ps.ErrorResponse("invalid LSN(0) in request")

        old_cutoff = tl.latest_gc_cutoff_lsn
        tl.latest_gc_cutoff_lsn = Lsn(lsn)
        try:
            below = Lsn(tl.initdb_lsn)
            resp = await client.request(ps.GetPageRequest(False, below, tag, 0))
            assert resp == ps.ErrorResponse(
                f"tried to request a page version that was garbage collected. requested at {below} gc cutoff {lsn}"
            )
            # latest with an old LSN reads at last_record_lsn, which is not below the cutoff.
            assert isinstance(await client.request(ps.GetPageRequest(True, below, tag, 0)), ps.GetPageResponse)
        finally:
            tl.latest_gc_cutoff_lsn = old_cutoff
        assert await client.request(ps.NblocksRequest(True, lsn, tag)) == ps.NblocksResponse(
            len(backup.rels[tag]) // BLCKSZ
        )


# --- bad input ------------------------------------------------------------------------------------
async def expect_error(conn: PgConnection, command: str, message: str, sqlstate: str | None = None) -> PgError:
    with pytest.raises(PgError) as info:
        await conn.query_results(command)
    assert message in info.value.message, (command, info.value)
    if sqlstate is not None:
        assert info.value.sqlstate == sqlstate, (command, info.value)
    assert not conn.closed
    return info.value


async def test_bad_commands_keep_the_connection(served: Served) -> None:
    t, tl = str(served.tenant.tenant_id), str(served.tl.timeline_id)
    other_t, other_tl = str(TenantId.generate()), str(TimelineId.generate())
    lsn = Lsn(served.tl.last_record_lsn)
    async with await connect(port=served.port) as conn:
        cases: list[tuple[str, str, str | None]] = [
            ("hello world", "unknown command hello world", "XX000"),
            ("pagestream", "invalid param number for pagestream command", "22023"),
            (f"pagestream {t}", "invalid param number for pagestream command", "22023"),
            (f"pagestream {t} {tl} x", "invalid param number for pagestream command", "22023"),
            (f"pagestream {t}  {tl}", "invalid param number for pagestream command", "22023"),
            (f"pagestream xyz {tl}", "Failed to parse tenant id from 'xyz'", "22023"),
            (f"pagestream {t} {tl[:-1]}g", "Failed to parse timeline id", "22023"),
            (f"pagestream {other_t} {tl}", f"Tenant {other_t} not found", "XX000"),
            (f"pagestream {t} {other_tl}", f"timeline {t}/{other_tl} not found", "XX000"),
            (f"basebackup {t}", "invalid param number for basebackup command", "22023"),
            (f"basebackup {t} {tl} 0/ZZ", "Failed to parse Lsn from '0/ZZ'", "22023"),
            (f"basebackup {t} {tl} 16B5A50", "Failed to parse Lsn", "22023"),
            (f"basebackup {t} {tl} {lsn} --zip", "Parameter in position 3 unknown --zip", "22023"),
            (f"basebackup {t} {tl} {lsn} 0/8 --zip", "Parameter in position 4 unknown --zip", "22023"),
            (f"basebackup {t} {tl} 0/7", "not a multiple of 8", "XX000"),
            (f"basebackup {other_t} {tl}", "not found", "XX000"),
            (f"fullbackup {t} {tl} {lsn} nope", "Failed to parse prev Lsn from 'nope'", "22023"),
            (f"fullbackup {t} {tl} {lsn} 0/8 extra", "invalid param number for fullbackup command", "22023"),
            (f"fullbackup {t} {tl} {lsn} {Lsn(lsn + 8)}", "invalid prev lsn", "XX000"),
            (f"fullbackup {t} {other_tl}", "not found", "XX000"),
            (f"get_last_record_rlsn {t}", "invalid param number", "22023"),
        ]
        for command, message, sqlstate in cases:
            await expect_error(conn, command, message, sqlstate)
        # Waiting for a basebackup LSN is bounded by wait_lsn_timeout too.
        await expect_error(conn, f"basebackup {t} {tl} {Lsn(lsn + 0x1000)}", "Timed out while waiting")
        rows = await conn.query(f"get_last_record_rlsn {t} {tl}")
        assert rows == [(str(Lsn(served.tl.prev_record_lsn)), str(lsn))]
        assert await conn.execute("SET datestyle TO 'ISO'") == "SELECT 1"


async def test_malformed_pagestream_message_ends_the_stream(served: Served, backup: Backup) -> None:
    lsn = Lsn(served.tl.last_record_lsn)
    tag = source_fork(next(iter(sorted(backup.rels))), backup.rels)
    async with await connect(port=served.port) as conn:
        for bad, message in [
            (b"\x07" + bytes(22), "unknown smgr message tag: 7"),
            (b"\x02" + bytes(5), "truncated pagestream GetPage request"),
            (b"", "empty pagestream message"),
        ]:
            client = await PagestreamClient.open(conn, served.ids)
            assert isinstance(await client.request(ps.ExistsRequest(True, lsn, tag)), ps.ExistsResponse)
            await client.stream.write(bad)
            with pytest.raises(PgError, match=message):
                await client.stream.read()
            assert not conn.closed
        # CopyDone from the client is not a way to end a pagestream in Neon either.
        client = await PagestreamClient.open(conn, served.ids)
        await client.stream.done()
        with pytest.raises(PgError, match="unexpected message: CopyDone during COPY"):
            await client.stream.read()
        rows = await conn.query(f"get_last_record_rlsn {served.ids}")
        assert rows[0][1] == str(lsn)


def random_request(rng: random.Random, tags: list[RelTag], lsn: Lsn, initdb_lsn: Lsn) -> ps.PagestreamRequest:
    """Well-formed but arbitrary: real or random relations, forks, blocks and (non-future) LSNs."""
    tag = rng.choice(tags) if rng.random() < 0.6 else RelTag(*(rng.getrandbits(32) for _ in range(3)), 0)
    if rng.random() < 0.3:
        tag = tag._replace(fork=rng.getrandbits(8) if rng.random() < 0.3 else rng.randrange(4))
    latest = rng.random() < 0.5
    req_lsn = Lsn(rng.choice([0, lsn, rng.randrange(initdb_lsn, lsn + 1), rng.randrange(0, max(initdb_lsn, 1))]))
    blkno = rng.choice([0, 1, rng.getrandbits(32), rng.randrange(64)])
    kind = rng.randrange(4)
    if kind == 0:
        return ps.ExistsRequest(latest, req_lsn, tag)
    if kind == 1:
        return ps.NblocksRequest(latest, req_lsn, tag)
    if kind == 2:
        return ps.GetPageRequest(latest, req_lsn, tag, blkno)
    return ps.DbSizeRequest(latest, req_lsn, rng.choice([tag.db, rng.getrandbits(32)]))


async def libpq_garbage(port: int, rng: random.Random) -> None:
    """A connection that speaks nonsense: random bytes, or a real startup followed by random bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if rng.random() < 0.5:
            params = b"user\0fuzz\0\0"
            writer.write((8 + len(params)).to_bytes(4, "big") + (196608).to_bytes(4, "big") + params)
        writer.write(rng.randbytes(rng.randrange(1, 200)))
        if rng.random() < 0.3:
            # A plausible message header with a huge length.
            writer.write(bytes([rng.choice(b"QdXpcfPBES")]) + rng.randbytes(4))
        await writer.drain()
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(0.5):
                await reader.read(65536)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def test_fuzz_keeps_serving_other_clients(served: Served, backup: Backup) -> None:
    rng = random.Random(0x5EED)
    lsn = Lsn(served.tl.last_record_lsn)
    rels = backup.rels
    tags = sorted({source_fork(t, rels) for t in rels})
    blocks = [(t, b) for t in sorted(rels) for b in range(len(rels[t]) // BLCKSZ)]
    stop = asyncio.Event()
    checked = 0

    async def honest_reader() -> None:
        nonlocal checked
        reader_rng = random.Random(7)
        async with await connect(port=served.port) as conn:
            client = await PagestreamClient.open(conn, served.ids)
            while not stop.is_set():
                sample = [blocks[reader_rng.randrange(len(blocks))] for _ in range(16)]
                resps = await client.pipelined(ps.GetPageRequest(True, lsn, source_fork(t, rels), b) for t, b in sample)
                for (t, b), resp in zip(sample, resps, strict=True):
                    assert isinstance(resp, ps.GetPageResponse), resp
                    assert same_page(resp.page, rels[t][b * BLCKSZ : (b + 1) * BLCKSZ], b, backup.checksums)
                    checked += 1

    reader = asyncio.create_task(honest_reader())
    sent = errors = reopened = 0
    try:
        async with await connect(port=served.port) as conn:
            client = await PagestreamClient.open(conn, served.ids)
            for i in range(3000):
                if i % 100 == 50:
                    await libpq_garbage(served.port, rng)
                if rng.random() < 0.03:
                    # Not a request: the stream ends with an ErrorResponse; the connection stays.
                    bad = rng.randbytes(rng.randrange(0, 40))
                    try:
                        ps.decode_request(bad)
                    except ps.PagestreamError:
                        await client.stream.write(bad)
                        with pytest.raises(PgError):
                            await client.stream.read()
                        client = await PagestreamClient.open(conn, served.ids)
                        reopened += 1
                        continue
                req = random_request(rng, tags, lsn, Lsn(served.tl.initdb_lsn))
                resp = await client.request(req)
                sent += 1
                if isinstance(resp, ps.ErrorResponse):
                    errors += 1
                    assert resp.message
                elif isinstance(req, ps.GetPageRequest):
                    assert isinstance(resp, ps.GetPageResponse)
                elif isinstance(req, ps.NblocksRequest):
                    assert isinstance(resp, ps.NblocksResponse)
                elif isinstance(req, ps.ExistsRequest):
                    assert isinstance(resp, ps.ExistsResponse)
                else:
                    assert isinstance(resp, ps.DbSizeResponse)
                assert not reader.done(), reader.exception() if reader.done() else None
    finally:
        stop.set()
        await reader
    assert sent > 2500 and reopened > 10 and 0 < errors < sent
    assert checked > 0
    # The daemon still serves new clients normally.
    async with await connect(port=served.port) as conn:
        assert (await conn.query(f"get_last_record_rlsn {served.ids}"))[0][1] == str(lsn)
