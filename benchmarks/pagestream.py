"""GetPage over the page service's TCP pagestream, and pgbench -S on a compute, each next to a baseline.

(1) Page service vs. an echo server. A stock PG15 cluster gets `pgbench -i -s S` and is stopped
    cleanly; a child process (multiprocessing, spawn) imports a copy of its data directory into a
    fresh tenant (every block an image, the default page cache) and serves it with `PqServer` +
    `PageServiceHandler` on 127.0.0.1. This process is the client: `neon.pq.client.connect`, then
    `copy_both("pagestream <tenant> <timeline>")`, GetPage(latest) requests for pgbench_accounts
    blocks (a working set that fits the page cache, warmed by one pass in which every page is
    checked against the data directory's file), one request in flight per client (request, wait
    for the response, repeat), with 1 client and with C clients (each its own connection, all on
    this process's event loop). Baseline, measured in the same run with the same client pattern: an
    asyncio TCP server in another child process that answers each 32-byte request (a framed GetPage)
    with 8198 bytes (a framed GetPage response). Both clients frame by hand and read exactly.
    Printed: requests/s, p50/p99 latency, the ratio of the page service's p50 to the echo p50
    (target: within 3x with one client).

(2) pgbench -S (select-only, -n, -c 1 and -c C, T seconds each) against a compute endpoint
    (`neon.compute.Endpoint`) started from the basebackup of a real `neon-pageserver` daemon, after
    `pgbench -i -s S` on that compute and after the pageserver has ingested all of its WAL; next to
    the same pgbench on a vanilla PG15 with the compute's `shared_buffers`. The compute is a stock
    Postgres with a full local data directory, so the TPS should be near parity. The daemon's CPU
    time during the pgbench runs is printed too (it should be idle).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import random
import re
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _pagestream_bench as srv
from benchmarks._pageserver_bench import Scratch, percentile, print_table, quiet_logging
from neon.compute import Endpoint
from neon.pageserver import pagestream as ps
from neon.pageserver.key import RelTag
from neon.postgres.constants import BLCKSZ, RELSEG_SIZE
from neon.pq.client import connect
from neon.utils.lsn import Lsn
from tests.fixtures.vanilla import VanillaPostgres
from tests.test_pageserver_daemon import Daemon, free_port

PAGE_CASE = "page service GetPage (image)"
ECHO_CASE = "baseline: asyncio echo, 8 KiB reply"
P50_TARGET = 3.0  # page service p50 / echo p50, one client
DEFAULTTABLESPACE_OID = 1663
COMPUTE_SHARED_BUFFERS = "16MB"  # what neon.compute.endpoint writes into the compute's postgresql.conf
_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.M)


@dataclass
class Result:
    name: str
    clients: int
    n: int
    wall: float
    lat_ns: list[int]
    cpu: float
    note: str = ""
    server_cpu: float = float("nan")

    @property
    def rps(self) -> float:
        return self.n / self.wall

    def pct_us(self, p: float) -> float:
        return percentile(self.lat_ns, p) / 1000


@dataclass
class Bench:
    name: str
    clients: int
    tps: float
    txns: int
    note: str = ""


# --- child processes -----------------------------------------------------------------------------------
class Child:
    """A server in a spawned process; `ready` is what it sent once listening."""

    def __init__(self, target: Callable[..., None], *args: Any, timeout: float = 300.0) -> None:
        ctx = mp.get_context("spawn")
        self.pipe, child_end = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child_end, *args), daemon=True)
        self.proc.start()
        child_end.close()
        if not self.pipe.poll(timeout):
            self.close()
            raise SystemExit(f"{target.__name__}: no answer in {timeout:.0f} s")
        kind, info = self.pipe.recv()
        if kind != "ready":
            self.close()
            raise SystemExit(f"{target.__name__} failed:\n{info}")
        self.ready: dict[str, Any] = info

    def stats(self) -> dict[str, Any]:
        self.pipe.send("stats")
        return self.pipe.recv()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.pipe.send("stop")
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.pipe.close()


# --- clients ---------------------------------------------------------------------------------------------
class PagestreamClient:
    """One pagestream connection. The libpq start-up and the `pagestream` command go through
    `neon.pq.client`; the requests and responses are then framed by hand (CopyData header plus
    payload, one write, exact reads), as a compute's C code does and as the echo client does, so
    that the figure is the page service's cost and not our general-purpose Python client's."""

    def __init__(self, port: int, ids: str) -> None:
        self.port, self.ids = port, ids

    async def open(self) -> PagestreamClient:
        self.conn = await connect(port=self.port)
        await self.conn.copy_both(f"pagestream {self.ids}")
        self.reader, self.writer = self.conn._reader, self.conn._writer
        return self

    @staticmethod
    def frame(req: bytes) -> bytes:
        """A request as the CopyData message the client writes."""
        return b"d" + (4 + len(req)).to_bytes(4, "big") + req

    async def get(self, framed: bytes) -> bytes:
        self.writer.write(framed)
        hdr = await self.reader.readexactly(5)
        if hdr[:1] != b"d":
            raise SystemExit(f"the page service answered with a {hdr[:1]!r} message instead of CopyData")
        body = await self.reader.readexactly(int.from_bytes(hdr[1:], "big") - 4)
        if body[:1] != bytes([ps.TAG_GETPAGE_RESPONSE]):
            raise SystemExit(f"GetPage failed: {ps.decode_response(body)!r}")
        return body[1:]

    async def close(self) -> None:
        # As a compute does: just disconnect (CopyDone ends a pagestream with an error, as in Neon).
        await self.conn.close()


class EchoClient:
    def __init__(self, port: int) -> None:
        self.port = port

    async def open(self) -> EchoClient:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def get(self, req: bytes) -> bytes:
        self.writer.write(req)
        return await self.reader.readexactly(len(srv.ECHO_RESPONSE))

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def measure(name: str, clients: list[Any], reqs: list[bytes], seconds: float) -> Result:
    """Each client: request, wait for the response, repeat, until the deadline."""
    lat: list[int] = []
    n = len(reqs)
    deadline = time.perf_counter() + seconds

    async def worker(c: Any, start: int) -> None:
        clock, get, i = time.perf_counter_ns, c.get, start
        while time.perf_counter() < deadline:
            req = reqs[i % n]
            i += 1
            t0 = clock()
            await get(req)
            lat.append(clock() - t0)

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(c, k * (n // len(clients))) for k, c in enumerate(clients)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    lat.sort()
    return Result(name, len(clients), len(lat), wall, lat, cpu)


# --- (1) page service vs. echo -------------------------------------------------------------------------------
def prepare_cluster(pg: VanillaPostgres, scale: int) -> tuple[int, int, int]:
    """pgbench -i; (database oid, pgbench_accounts relfilenode, its blocks)."""
    pg.pgbench(["-i", "-s", str(scale), "-q"])
    with pg.connect() as conn:

        def one(sql: str) -> int:
            row = conn.execute(sql).fetchone()
            assert row is not None
            return int(row[0])

        db = one("SELECT oid FROM pg_database WHERE datname = current_database()")
        rel = one("SELECT pg_relation_filenode('pgbench_accounts')")
        blocks = one("SELECT pg_relation_size('pgbench_accounts')") // BLCKSZ
    return db, rel, blocks


async def bench_getpage(args: argparse.Namespace, pgdata: Path, db: int, rel: int, n_blocks: int) -> list[Result]:
    results: list[Result] = []
    pserver = Child(srv.serve_pagestream, str(pgdata))
    try:
        info = pserver.ready
        print(
            f"(1) child process imported the data directory in {info['import_s']:.1f} s at {Lsn(info['lsn'])}; "
            f"page service on 127.0.0.1:{info['port']}, page cache {info['cache_pages']} pages"
        )
        ids = f"{info['tenant']} {info['timeline']}"
        tag = RelTag(DEFAULTTABLESPACE_OID, db, rel, 0)
        n_ws = min(n_blocks, RELSEG_SIZE, args.working_set, info["cache_pages"] * 3 // 4)
        blocks = random.Random(42).sample(range(min(n_blocks, RELSEG_SIZE)), n_ws)
        reqs = [
            PagestreamClient.frame(ps.encode_request(ps.GetPageRequest(True, Lsn(info["lsn"]), tag, b))) for b in blocks
        ]

        # One warm-up pass, checking every page against the data directory's file.
        warm = await PagestreamClient(info["port"], ids).open()
        with open(pgdata / "base" / str(db) / str(rel), "rb") as f:
            for b, req in zip(blocks, reqs, strict=True):
                f.seek(b * BLCKSZ)
                if await warm.get(req) != f.read(BLCKSZ):
                    raise SystemExit(f"pgbench_accounts block {b}: the page service's page differs from the file's")
        await warm.close()
        print(f"    warmed and checked {n_ws} pgbench_accounts pages (of {n_blocks}) over the pagestream")

        echo = Child(srv.serve_echo)
        try:
            eport = echo.ready["port"]
            ereqs = [bytes(srv.ECHO_REQUEST_SIZE)] * 16
            # Rounds alternating the two servers, so that both see the same machine (noisy neighbours,
            # CPU frequency); each case's figures are over all of its rounds' samples.
            slot = args.seconds / args.rounds
            for clients in (1, args.clients):
                pconns = [await PagestreamClient(info["port"], ids).open() for _ in range(clients)]
                econns = [await EchoClient(eport).open() for _ in range(clients)]
                for c in econns:
                    for _ in range(200):
                        await c.get(ereqs[0])
                page_rounds: list[Result] = []
                echo_rounds: list[Result] = []
                hits = lookups = 0
                for _ in range(args.rounds):
                    s0 = pserver.stats()
                    r = await measure(PAGE_CASE, pconns, reqs, slot)
                    s1 = pserver.stats()
                    hits += s1["hits"] - s0["hits"]
                    lookups += s1["hits"] + s1["misses"] - s0["hits"] - s0["misses"]
                    r.server_cpu = s1["cpu"] - s0["cpu"]
                    page_rounds.append(r)
                    s0 = echo.stats()
                    r = await measure(ECHO_CASE, econns, ereqs, slot)
                    r.server_cpu = echo.stats()["cpu"] - s0["cpu"]
                    echo_rounds.append(r)
                # The materialized page cache only holds pages produced by WAL redo: images are read from
                # the image layer (the OS page cache) on every request, so its hit rate here is 0%.
                results.append(merge(page_rounds, f"page cache hits {hits / max(1, lookups):.0%}"))
                results.append(merge(echo_rounds))
                for c in [*pconns, *econns]:
                    await c.close()
        finally:
            echo.close()
    finally:
        pserver.close()
    return results


def merge(rounds: list[Result], note: str = "") -> Result:
    lat = sorted(x for r in rounds for x in r.lat_ns)
    r0 = rounds[0]
    out = Result(r0.name, r0.clients, len(lat), sum(r.wall for r in rounds), lat, sum(r.cpu for r in rounds), note)
    out.server_cpu = sum(r.server_cpu for r in rounds)
    return out


# --- (2) pgbench -S on a compute vs. vanilla ---------------------------------------------------------------------
def proc_cpu(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pgbench_tps(out: str) -> tuple[float, int]:
    m = _TPS.search(out)
    t = re.search(r"^number of transactions actually processed: (\d+)", out, re.M)
    if m is None or t is None:
        raise SystemExit(f"cannot parse pgbench's output:\n{out}")
    return float(m.group(1)), int(t.group(1))


async def bench_compute(args: argparse.Namespace, scratch: Scratch, vanilla: VanillaPostgres) -> list[Bench]:
    results: list[Bench] = []
    t0 = time.perf_counter()
    daemon = Daemon(scratch.root / "ps")
    init = daemon.init()
    if init.returncode != 0:
        raise SystemExit(f"neon-pageserver --init failed: {init.stderr}")
    daemon.start()
    ep: Endpoint | None = None
    try:
        await daemon.wait_ready()
        status, tenant = await asyncio.to_thread(daemon.http, "POST", "/v1/tenant", {})
        if status != 201 or not isinstance(tenant, str):
            raise SystemExit(f"POST /v1/tenant: {status} {tenant}")
        timeline = "11" * 16
        status, body = await asyncio.to_thread(
            daemon.http, "POST", f"/v1/tenant/{tenant}/timeline", {"new_timeline_id": timeline}
        )
        if status != 201:
            raise SystemExit(f"POST timeline: {status} {body}")
        ep = Endpoint(
            scratch.root / "compute",
            tenant_id=tenant,
            timeline_id=timeline,
            pageserver_pg=("127.0.0.1", daemon.pg_port),
            pageserver_http=("127.0.0.1", daemon.http_port),
            pg_port=free_port(),
        )
        await ep.create()
        await ep.start()
        t1 = time.perf_counter()
        await asyncio.to_thread(ep.run_client, "pgbench", ["-i", "-s", str(args.scale), "-q", "postgres"])
        t2 = time.perf_counter()
        lsn = await ep.wait_caught_up(timeout=300)
        t3 = time.perf_counter()
        ((rows,),) = ep.safe_psql("SELECT count(*) FROM pgbench_accounts")
        if rows != args.scale * 100_000:
            raise SystemExit(f"the compute's pgbench_accounts has {rows} rows, expected {args.scale * 100_000}")
        # Both clusters start the measurements checkpointed and with their tables read once.
        for run in (ep.safe_psql, vanilla.safe_psql):
            run("CHECKPOINT")
            run("SELECT sum(abalance) FROM pgbench_accounts")
        print(
            f"(2) daemon + compute from basebackup in {t1 - t0:.1f} s; pgbench -i -s {args.scale} on the compute "
            f"in {t2 - t1:.1f} s; the pageserver caught up to {lsn} {t3 - t2:.1f} s later"
        )
        (sb,) = ep.safe_psql("SHOW shared_buffers")
        assert daemon.proc is not None
        warm = ["-S", "-n", "-T", "1", "postgres"]
        await asyncio.to_thread(ep.run_client, "pgbench", warm)
        vanilla.pgbench(warm[:-1])
        half = max(1, args.pgbench_seconds // 2)
        for clients in (1, args.clients):
            bench = ["-S", "-n", "-c", str(clients), "-j", str(clients), "-T", str(half), "postgres"]
            runs: dict[str, list[tuple[float, int]]] = {"compute": [], "vanilla": []}
            cpu0 = proc_cpu(daemon.proc.pid)
            for order in (("compute", "vanilla"), ("vanilla", "compute")):  # ABBA, T/2 seconds each
                for which in order:
                    if which == "compute":
                        out = await asyncio.to_thread(ep.run_client, "pgbench", bench)
                    else:
                        out = await asyncio.to_thread(vanilla.pgbench, bench[:-1])
                    runs[which].append(pgbench_tps(out))
            cpu = proc_cpu(daemon.proc.pid) - cpu0
            for which, name, note in (
                ("compute", "compute (basebackup, neon-pageserver)", f"pageserver CPU {cpu:.2f} s in both"),
                ("vanilla", "baseline: vanilla PG15", f"shared_buffers {sb[0]}"),
            ):
                tps = sum(t for t, _ in runs[which]) / len(runs[which])
                results.append(Bench(name, clients, tps, sum(n for _, n in runs[which]), note))
        await ep.stop()
    finally:
        if ep is not None:
            ep.destroy()
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()
    log = daemon.log.read_text() if daemon.log.exists() else ""
    if "Traceback" in log:
        raise SystemExit(f"the pageserver logged a traceback:\n{log[-3000:]}")
    return results


# --- report --------------------------------------------------------------------------------------------------
def report(args: argparse.Namespace, gp: list[Result], pb: list[Bench]) -> bool:
    print()
    print_table(
        [
            "(1) case",
            "clients",
            "requests",
            "req/s",
            "p50 µs",
            "p99 µs",
            "server CPU µs/req",
            "client CPU µs/req",
            "note",
        ],
        [
            (
                r.name,
                r.clients,
                r.n,
                r.rps,
                r.pct_us(0.5),
                r.pct_us(0.99),
                r.server_cpu / r.n * 1e6,
                r.cpu / r.n * 1e6,
                r.note,
            )
            for r in gp
        ],
    )
    by = {(r.name.split(" ")[0], r.clients): r for r in gp}
    met = True
    for clients in (1, args.clients):
        p, e = by["page", clients], by["baseline:", clients]
        ratio = p.pct_us(0.5) / e.pct_us(0.5)
        line = (
            f"  {clients} client(s): page service p50 / echo p50 = {ratio:.2f}x "
            f"({p.pct_us(0.5):.0f} vs {e.pct_us(0.5):.0f} µs); req/s {p.rps / e.rps:.2f}x of echo"
        )
        if clients == 1:
            ok = ratio <= P50_TARGET
            met = met and ok
            line += f"  -> target <= {P50_TARGET:.0f}x {'MET' if ok else 'MISSED'}"
        print(line)
    print()
    print_table(
        ["(2) pgbench -S", "clients", "transactions", "tps", "note"],
        [(b.name, b.clients, b.txns, b.tps, b.note) for b in pb],
    )
    for clients in (1, args.clients):
        c = next(b for b in pb if b.clients == clients and b.name.startswith("compute"))
        v = next(b for b in pb if b.clients == clients and b.name.startswith("baseline"))
        print(f"  -c {clients}: compute / vanilla tps = {c.tps / v.tps:.3f}x ({c.tps:,.0f} vs {v.tps:,.0f})")
    return met


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    ap.add_argument("--scale", type=int, default=5, help="pgbench scale (both parts)")
    ap.add_argument("--seconds", type=float, help="duration of each GetPage measurement (default 5, --quick 2)")
    ap.add_argument("--pgbench-seconds", type=int, help="duration of each pgbench -S run (default 15, --quick 4)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds per case in (1) and (2)")
    ap.add_argument("--working-set", type=int, default=4096, help="pgbench_accounts pages read in (1)")
    args = ap.parse_args()
    args.seconds = args.seconds or (2.0 if args.quick else 5.0)
    args.pgbench_seconds = args.pgbench_seconds or (4 if args.quick else 15)
    quiet_logging()

    t_start = time.perf_counter()
    scratch = Scratch("neon-bench-pagestream-")
    pg: VanillaPostgres | None = None
    try:
        pg = VanillaPostgres(scratch.root / "pg", port=free_port()).init()
        pg.configure([f"shared_buffers = '{COMPUTE_SHARED_BUFFERS}'"])
        pg.start()
        try:
            db, rel, n_blocks = prepare_cluster(pg, args.scale)
        finally:
            pg.stop()
        pgdata = pg.copy_datadir(scratch.root / "import-copy")
        pgdata.chmod(0o755)
        print(
            f"cluster: pgbench -i -s {args.scale}, pgbench_accounts {n_blocks} blocks; "
            f"setup {time.perf_counter() - t_start:.1f} s"
        )
        gp = asyncio.run(bench_getpage(args, pgdata, db, rel, n_blocks))
        pg.start()
        pb = asyncio.run(bench_compute(args, scratch, pg))
        met = report(args, gp, pb)
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        if pg is not None:
            pg.cleanup()
        scratch.cleanup()
    print(f"\ntotal {time.perf_counter() - t_start:.1f} s{'' if met else ' (target missed)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
