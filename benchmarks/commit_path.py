"""The durable commit path: `pgbench -N` through compute + proposer + 3 safekeepers next to vanilla
PG15 with and without a synchronous standby, and the safekeeper's append throughput next to raw
fdatasync bandwidth. Everything below is measured in one run, on this machine, with real fsyncs.

(1) `pgbench -N -n -c C -j C -T T` (simple-update TPC-B: three UPDATE/INSERT statements and a
    COMMIT per transaction), C = 1 and C = `--clients`, after `pgbench -i -s S`, on three set-ups:

    a. neon: a compute (stock PG15 + `neon-walproposer`, `synchronous_standby_names =
       'walproposer'`) over a real `neon-broker`, three `neon-safekeeper`s (fsync on) and a
       `neon-pageserver` following them (`tests.fixtures.storage_env.StorageEnv`). A COMMIT
       returns once two of the three safekeepers have fdatasync'ed its WAL.
    b. vanilla, no standby: PG15 with `fsync = on`, `synchronous_commit = on`: a COMMIT waits
       for the local WAL fdatasync only.
    c. vanilla + sync standby: a PG15 primary like (b) plus a streaming standby made with
       `pg_basebackup -R` (its own data directory, port and socket, `fsync = on`,
       `application_name=standby1`), with `synchronous_standby_names = 'standby1'` on the primary
       (checked as `sync` in `pg_stat_replication` before measuring): a COMMIT waits for the
       local fdatasync and the standby's flush.

    All three run `shared_buffers = 16MB` (what the compute is configured with) and start each
    measurement just after a CHECKPOINT. Set-ups alternate in rounds (a b c, then c b a, ...), so
    machine noise hits all of them alike. After each neon run the pageserver is waited for until it
    has ingested everything the compute flushed, so its catch-up never runs during a vanilla
    measurement (the pageserver, safekeepers and compute share this machine's cores during the
    neon runs; their CPU time is printed). Printed: TPS and pgbench's "latency average" per set-up
    and client count (mean over rounds, min-max TPS), neon / vanilla ratios, and the target:
    neon TPS at C clients >= 0.8x vanilla-with-sync-standby.

(2) Safekeeper append throughput. A lone `neon-safekeeper` (fresh data directory, fsync on, no
    broker) is driven by a proposer in this process (`neon.pq.client` + `neon.safekeeper.protocol`:
    greeting, vote, elected) that streams real PG15 WAL: what `pgbench -i` wrote on a vanilla
    cluster (16 MiB segments), from the insert LSN right after a CHECKPOINT (a record start) to
    the end of the shutdown checkpoint record. The WAL goes in 128 KiB AppendRequests (the
    protocol's maximum), pipelined with at most `--window-kib` sent beyond the last flush_lsn
    reported; the clock stops when an AppendResponse's flush_lsn reaches the end. Baselines, on
    the same filesystem with the same bytes in the same 128 KiB writes to a fresh file:
    fdatasync after every write (the worst case), fdatasync every k writes where k is the
    safekeeper's own writes-per-fdatasync in this run (its group commit), and one fdatasync at
    the end (the best case). Note the safekeeper also zero-fills and fsyncs each 16 MiB segment
    before writing WAL into it (as Postgres does), i.e. it writes every byte twice.

(3) The floor under every message of (1): one asyncio (uvloop) round trip of a 500-byte message
    over loopback TCP between two processes, the transport every hop of the commit path uses
    (compute -> proposer -> safekeepers -> proposer -> compute, safekeeper -> pageserver): wall
    time and the CPU time of both processes per round trip, and (1)'s neon CPU per transaction
    expressed in such round trips.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._pageserver_bench import Scratch, print_table, quiet_logging
from neon.compute import Endpoint
from neon.postgres.controlfile import ControlFileData
from neon.postgres.waldecoder import WalStreamDecoder
from neon.postgres.walformat import parse_wal_file_name
from neon.pq.client import CopyStream, PgConnection, connect
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
from tests.fixtures.storage_env import Process, StorageEnv, wait_until
from tests.fixtures.vanilla import VanillaPostgres
from tests.test_pageserver_daemon import free_port

TARGET = 0.8  # neon TPS / vanilla-with-sync-standby TPS at --clients clients
SHARED_BUFFERS = "16MB"  # what neon.compute.endpoint gives the compute
TIMELINE = "11" * 16
SEG = 16 * 1024 * 1024
CHUNK = 128 * 1024  # neon.safekeeper.wal_storage.MAX_SEND_SIZE
STANDBY_NAME = "standby1"
NEON, NO_STANDBY, SYNC_STANDBY = "neon: compute + 3 safekeepers", "vanilla, no standby", "vanilla + sync standby"
_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.M)
_LAT = re.compile(r"^latency average = ([0-9.]+) ms", re.M)
_TXNS = re.compile(r"^number of transactions actually processed: (\d+)", re.M)


# --- helpers --------------------------------------------------------------------------------------
def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a live process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_pgbench(out: str) -> tuple[float, float, int]:
    tps, lat, txns = _TPS.search(out), _LAT.search(out), _TXNS.search(out)
    if tps is None or lat is None or txns is None:
        raise RuntimeError(f"cannot parse pgbench's output:\n{out}")
    return float(tps.group(1)), float(lat.group(1)), int(txns.group(1))


def log_problems(path: Path, patterns: tuple[str, ...] = ("Traceback", "ERROR", "FATAL", "PANIC")) -> list[str]:
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    return [f"{path.name}: {line.strip()[:200]}" for line in lines if any(p in line for p in patterns)]


# --- (1) the three set-ups ----------------------------------------------------------------------------
@dataclass
class Setup:
    name: str
    pgbench: Callable[[list[str]], str]  # args without the database name; returns stdout
    sql: Callable[[str], list[tuple[object, ...]]]
    after_run: Callable[[], object] | None = None  # an async hook (neon: wait for the pageserver)
    cpu_pids: dict[str, int] = field(default_factory=dict)  # daemons whose CPU time is reported


@dataclass
class Run:
    setup: str
    clients: int
    round: int
    tps: float
    lat_ms: float
    txns: int
    cpu: dict[str, float]
    catch_up_s: float = float("nan")


async def start_neon(scratch: Scratch, scale: int) -> tuple[StorageEnv, Endpoint, Setup]:
    env = await StorageEnv.start(scratch.root / "neon")
    tenant = await env.create_tenant()
    await env.create_timeline(tenant, TIMELINE)
    ep = await env.started("compute", tenant, TIMELINE)
    t0 = time.perf_counter()
    await asyncio.to_thread(ep.run_client, "pgbench", ["-i", "-s", str(scale), "-q", "postgres"])
    t1 = time.perf_counter()
    lsn = await ep.wait_caught_up(timeout=300)
    print(
        f"  neon: pgbench -i -s {scale} in {t1 - t0:.1f} s; pageserver caught up to {lsn} "
        f"{time.perf_counter() - t1:.1f} s later"
    )
    assert ep.proposer is not None and env.pageserver.proc is not None
    pids = {sk.name: sk.proc.pid for sk in env.safekeepers if sk.proc is not None}
    pids["walproposer"] = ep.proposer.pid
    pids["pageserver"] = env.pageserver.proc.pid

    async def after() -> float:
        t = time.perf_counter()
        await ep.wait_caught_up(timeout=300)
        return time.perf_counter() - t

    setup = Setup(
        NEON,
        lambda args: ep.run_client("pgbench", [*args, "postgres"]),
        ep.safe_psql,
        after,
        pids,
    )
    return env, ep, setup


def vanilla_conf(pg: VanillaPostgres) -> None:
    pg.configure(["fsync = on", "synchronous_commit = on", f"shared_buffers = '{SHARED_BUFFERS}'"])


def start_no_standby(scratch: Scratch, scale: int) -> tuple[VanillaPostgres, Setup]:
    pg = VanillaPostgres(scratch.root / "vanilla", port=free_port()).init()
    vanilla_conf(pg)
    pg.start()
    pg.pgbench(["-i", "-s", str(scale), "-q"])
    return pg, Setup(NO_STANDBY, pg.pgbench, pg.safe_psql)


async def start_sync_standby(scratch: Scratch, scale: int) -> tuple[VanillaPostgres, VanillaPostgres, Setup]:
    primary = VanillaPostgres(scratch.root / "primary", port=free_port()).init()
    vanilla_conf(primary)
    primary.start()
    standby = VanillaPostgres(scratch.root / "standby", port=free_port())
    primary.user.run(
        [
            primary.pg_bin("pg_basebackup"),
            "-D",
            standby.datadir,
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
            "-d",
            f"host={primary.sockdir} port={primary.port} user=cloud_admin",
        ]
    )
    standby.configure(
        [
            f"unix_socket_directories = '{standby.sockdir}'",
            f"port = {standby.port}",
            "fsync = on",
            "hot_standby = on",
        ]
    )
    # postgresql.auto.conf (where -R put its primary_conninfo) is read last: this line wins.
    with open(standby.datadir / "postgresql.auto.conf", "a") as f:
        f.write(
            f"primary_conninfo = 'host={primary.sockdir} port={primary.port} user=cloud_admin "
            f"application_name={STANDBY_NAME}'\n"
        )
    standby.start()
    primary.configure([f"synchronous_standby_names = '{STANDBY_NAME}'"])
    primary.safe_psql("SELECT pg_reload_conf()")

    def sync_state() -> str | None:
        rows = primary.safe_psql(
            f"SELECT sync_state FROM pg_stat_replication WHERE application_name = '{STANDBY_NAME}'"
        )
        return str(rows[0][0]) if rows else None

    await wait_until("the standby to be synchronous", lambda: sync_state() == "sync")
    primary.pgbench(["-i", "-s", str(scale), "-q"])
    (state,) = primary.safe_psql(
        "SELECT application_name, state, sync_state, flush_lsn = pg_current_wal_flush_lsn() FROM pg_stat_replication"
    )
    print(f"  sync standby: pg_stat_replication {state}")
    if state[2] != "sync":
        raise RuntimeError(f"the standby is not synchronous: {state}")
    return primary, standby, Setup(SYNC_STANDBY, primary.pgbench, primary.safe_psql)


async def bench_commit(args: argparse.Namespace, scratch: Scratch, problems: list[str]) -> list[Run]:
    env: StorageEnv | None = None
    pgs: list[VanillaPostgres] = []
    runs: list[Run] = []
    try:
        t0 = time.perf_counter()
        env, ep, neon = await start_neon(scratch, args.scale)
        b, no_standby = start_no_standby(scratch, args.scale)
        pgs.append(b)
        primary, standby, sync_standby = await start_sync_standby(scratch, args.scale)
        pgs += [primary, standby]
        print(f"  set-ups ready in {time.perf_counter() - t0:.1f} s")
        setups = [neon, no_standby, sync_standby]
        for s in setups:  # warm up: one short run each, not measured
            await asyncio.to_thread(s.pgbench, ["-N", "-n", "-T", "1"])
            if s.after_run is not None:
                await s.after_run()  # type: ignore[misc]
        for rnd in range(args.rounds):
            order = setups if rnd % 2 == 0 else setups[::-1]
            for s in order:
                for clients in (1, args.clients):
                    await asyncio.to_thread(s.sql, "CHECKPOINT")
                    cpu0 = {k: proc_cpu(p) for k, p in s.cpu_pids.items()}
                    c = str(clients)
                    out = await asyncio.to_thread(s.pgbench, ["-N", "-n", "-c", c, "-j", c, "-T", str(args.seconds)])
                    cpu = {k: proc_cpu(p) - cpu0[k] for k, p in s.cpu_pids.items()}
                    tps, lat, txns = parse_pgbench(out)
                    run = Run(s.name, clients, rnd, tps, lat, txns, cpu)
                    if s.after_run is not None:
                        run.catch_up_s = await s.after_run()  # type: ignore[misc]
                    runs.append(run)
                    print(f"  round {rnd + 1} {s.name:<30} -c {clients}: {tps:8.1f} tps, {lat:6.2f} ms")
        # Anything the daemons or Postgres complained about during the run.
        for log in [env.pageserver.log, env.broker.log, *(sk.log for sk in env.safekeepers)]:
            problems += log_problems(log)
        problems += log_problems(ep.proposer_log)
        problems += log_problems(ep.logfile, ("ERROR", "FATAL", "PANIC"))
        for pg in pgs:
            problems += [f"{pg.workdir.name}/{p}" for p in log_problems(pg.logfile, ("ERROR", "FATAL", "PANIC"))]
        await ep.stop()
    finally:
        for pg in pgs:
            pg.cleanup()
        if env is not None:
            await env.stop()
    return runs


# --- (2) safekeeper appends --------------------------------------------------------------------------
@dataclass
class Wal:
    data: bytes  # WAL [start, end)
    start: int
    end: int
    sysid: int
    pg_version: int


def produce_wal(scratch: Scratch, scale: int) -> Wal:
    """The WAL of `pgbench -i -s scale` on a vanilla cluster, from a record start after a CHECKPOINT
    to the end of the shutdown checkpoint record."""
    pg = VanillaPostgres(scratch.root / "walsrc", port=free_port()).init()
    pg.configure(["wal_keep_size = '4GB'", "max_wal_size = '4GB'", "checkpoint_timeout = '1h'", "autovacuum = off"])
    pg.start()
    try:
        pg.safe_psql("CHECKPOINT")
        start = Lsn.parse(pg.current_wal_lsn())
        pg.pgbench(["-i", "-s", str(scale), "-q"])
        pg_version = int(pg.safe_psql("SHOW server_version_num")[0][0])
    finally:
        pg.stop()
    control = ControlFileData.read(pg.datadir / "global" / "pg_control")
    ckpt = int(control.checkpoint)
    segs = {parse_wal_file_name(p.name, SEG)[1]: p for p in pg.wal_segments()}
    first, last = start // SEG, ckpt // SEG + (1 if ckpt // SEG + 1 in segs else 0)
    raw = b"".join(segs[n].read_bytes() for n in range(first, last + 1))
    base = first * SEG
    dec = WalStreamDecoder(ckpt, seg_size=SEG)
    dec.feed(raw[ckpt - base : ckpt - base + 4 * 8192])
    rec = dec.poll()
    if rec is None:
        raise RuntimeError(f"no record at the shutdown checkpoint {Lsn(ckpt)}")
    end = rec[1]
    data = raw[start - base : end - base]
    pg.cleanup()
    return Wal(data, int(start), end, control.system_identifier, pg_version)


class LoneSafekeeper(Process):
    name = "safekeeper"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.datadir = root / "sk"
        self.pg_port = free_port()
        self.http_port = free_port()

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "neon.safekeeper.main",
            "--id",
            "1",
            "-D",
            str(self.datadir),
            "--listen-pg",
            f"127.0.0.1:{self.pg_port}",
            "--listen-http",
            f"127.0.0.1:{self.http_port}",
            "--broker-endpoint",
            "http://127.0.0.1:1",
        ]

    def get(self, path: str) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
                return r.read().decode()
        except (ConnectionError, urllib.error.URLError):
            return None

    async def wait_ready(self) -> None:
        def up() -> bool:
            if not self.running:
                raise RuntimeError(f"the safekeeper exited: {self.log.read_text()[-3000:]}")
            return self.get("/v1/status") is not None

        await wait_until("the safekeeper to answer /v1/status", up)

    def metric(self, name: str) -> float:
        text = self.get("/metrics") or ""
        for line in text.splitlines():
            sample, _, value = line.rpartition(" ")
            if sample == name:
                return float(value)
        return float("nan")


@dataclass
class AppendResult:
    name: str
    seconds: float
    nbytes: int
    note: str = ""

    @property
    def mbps(self) -> float:
        return self.nbytes / self.seconds / 1e6


async def stream_to_safekeeper(sk: LoneSafekeeper, wal: Wal, window: int) -> float:
    """Elect and stream `wal` pipelined; seconds from the first AppendRequest to flush_lsn == end."""
    tenant, timeline = TenantId.generate(), TimelineId.generate()
    conn: PgConnection = await connect(
        "127.0.0.1",
        sk.pg_port,
        "cloud_admin",
        dbname="replication",
        options=f"-c timeline_id={timeline} tenant_id={tenant}",
    )
    try:
        copy: CopyStream = await conn.copy_both("START_WAL_PUSH")
        proto = ProposerProtocol()

        async def recv() -> object:
            async with asyncio.timeout(60):
                data = await copy.read()
            if data is None:
                raise RuntimeError("the safekeeper ended the stream")
            return proto.receive(data)

        await copy.write(
            proto.send(
                ProposerGreeting(
                    tenant_id=tenant,
                    timeline_id=timeline,
                    pg_version=wal.pg_version,
                    system_id=wal.sysid,
                    wal_seg_size=SEG,
                )
            )
        )
        assert isinstance(await recv(), AcceptorGreeting)
        await copy.write(proto.send(VoteRequest(term=1)))
        vote = await recv()
        assert isinstance(vote, VoteResponse) and vote.vote_given, vote
        await copy.write(
            proto.send(
                ProposerElected(
                    term=1,
                    start_streaming_at=Lsn(wal.start),
                    term_history=TermHistory.of((1, wal.start)),
                    timeline_start_lsn=Lsn(wal.start),
                )
            )
        )
        flushed = wal.start
        cond = asyncio.Condition()

        async def reader() -> None:
            nonlocal flushed
            while flushed < wal.end:
                msg = await recv()
                if isinstance(msg, AppendResponse):
                    async with cond:
                        flushed = max(flushed, int(msg.flush_lsn))
                        cond.notify_all()

        t0 = time.perf_counter()
        task = asyncio.create_task(reader())
        try:
            pos = wal.start
            while pos < wal.end:
                async with cond:
                    await cond.wait_for(lambda at=pos: task.done() or at - flushed < window)
                if task.done():
                    break
                n = min(CHUNK, wal.end - pos)
                off = pos - wal.start
                req = AppendRequest.build(
                    term=1,
                    epoch_start_lsn=wal.start,
                    begin_lsn=pos,
                    commit_lsn=0,
                    truncate_lsn=wal.start,
                    wal=wal.data[off : off + n],
                )
                await copy.write(proto.send(req))
                pos += n
            async with asyncio.timeout(300):
                await task  # returns once flush_lsn reached the end (or raises)
        finally:
            task.cancel()
        return time.perf_counter() - t0
    finally:
        await conn.close()


def fdatasync_baseline(path: Path, data: bytes, every: int | None) -> float:
    """Write `data` in CHUNK writes to a fresh file, fdatasync every `every` writes (None: once at the end)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t0 = time.perf_counter()
        view = memoryview(data)
        for i, off in enumerate(range(0, len(data), CHUNK)):
            piece = view[off : off + CHUNK]
            while piece:
                piece = piece[os.write(fd, piece) :]
            if every is not None and (i + 1) % every == 0:
                os.fdatasync(fd)
        os.fdatasync(fd)
        return time.perf_counter() - t0
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


async def bench_append(args: argparse.Namespace, scratch: Scratch, problems: list[str]) -> list[AppendResult]:
    t0 = time.perf_counter()
    wal = await asyncio.to_thread(produce_wal, scratch, args.wal_scale)
    n = len(wal.data)
    chunks = -(-n // CHUNK)
    print(
        f"(2) WAL of pgbench -i -s {args.wal_scale}: {n / 1e6:.1f} MB, {Lsn(wal.start)}..{Lsn(wal.end)}, "
        f"{chunks} AppendRequests of 128 KiB (made in {time.perf_counter() - t0:.1f} s); "
        f"streamed {args.append_repeat} times, each into a fresh timeline"
    )
    bin_path = scratch.root / "fdatasync.bin"
    window = args.window_kib * 1024
    segments = wal.end // SEG - wal.start // SEG + 1
    worst = batched = best = secs = cpu = fsyncs = fsync_s = 0.0
    per_sync = 1
    sk = LoneSafekeeper(scratch.root / "append")
    sk.start()
    try:
        await sk.wait_ready()
        assert sk.proc is not None
        # Each repetition: the worst-case baseline, the safekeeper (a fresh timeline), the baseline
        # batched as the safekeeper just batched, the best case.
        for _ in range(args.append_repeat):
            worst += await asyncio.to_thread(fdatasync_baseline, bin_path, wal.data, 1)
            cpu0, f0 = proc_cpu(sk.proc.pid), sk.metric("safekeeper_wal_fsyncs_total")
            fs0 = sk.metric("safekeeper_flush_wal_seconds_total")
            secs += await stream_to_safekeeper(sk, wal, window)
            cpu += proc_cpu(sk.proc.pid) - cpu0
            df = sk.metric("safekeeper_wal_fsyncs_total") - f0
            fsyncs += df
            fsync_s += sk.metric("safekeeper_flush_wal_seconds_total") - fs0
            per_sync = max(1, round(chunks / max(1.0, df - segments)))  # minus one zero-fill fsync per segment
            batched += await asyncio.to_thread(fdatasync_baseline, bin_path, wal.data, per_sync)
            best += await asyncio.to_thread(fdatasync_baseline, bin_path, wal.data, None)
    finally:
        if sk.running:
            sk.stop()
        problems += log_problems(sk.log)
    r = args.append_repeat
    total = n * r
    per_batch = chunks * r / max(1.0, fsyncs - segments * r)
    return [
        AppendResult("baseline: 128 KiB write + fdatasync each", worst, total),
        AppendResult(
            "neon-safekeeper, pipelined 128 KiB appends",
            secs,
            total,
            f"{fsyncs / r:.0f} fsyncs/stream ({segments} segment zero-fills), ~{per_batch:.1f} "
            f"appends/fdatasync, {fsync_s:.2f} s in flush, CPU {cpu:.2f} s, window {args.window_kib} KiB",
        ),
        AppendResult(
            f"baseline: fdatasync every {per_sync} writes", batched, total, "the safekeeper's batching (last stream)"
        ),
        AppendResult("baseline: all writes + one fdatasync", best, total),
    ]


# --- report ----------------------------------------------------------------------------------------------
def x(ratio: float) -> str:
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.4f}x"


def report(args: argparse.Namespace, runs: list[Run], appends: list[AppendResult]) -> bool:
    met = report_pgbench(args, runs) if runs else True
    print()
    print_table(
        ["(2) append / write path", "MB", "seconds", "MB/s", "note"],
        [(a.name, a.nbytes / 1e6, a.seconds, a.mbps, a.note) for a in appends],
    )
    sk = next(a for a in appends if a.name.startswith("neon"))
    for a in appends:
        if a is not sk:
            print(f"  safekeeper / {a.name.removeprefix('baseline: ')}: {sk.mbps / a.mbps:.2f}x")
    return met


def report_pgbench(args: argparse.Namespace, runs: list[Run]) -> bool:
    print()
    rows = []
    agg: dict[tuple[str, int], float] = {}
    for name in (NEON, NO_STANDBY, SYNC_STANDBY):
        for clients in (1, args.clients):
            rs = [r for r in runs if r.setup == name and r.clients == clients]
            tps = statistics.mean(r.tps for r in rs)
            agg[name, clients] = tps
            note = ""
            if name == NEON:
                keys = rs[0].cpu.keys()
                total = sum(r.txns for r in rs)
                note = "CPU ms/txn: " + ", ".join(
                    f"{k.replace('safekeeper', 'sk')} {sum(r.cpu[k] for r in rs) / total * 1e3:.2f}" for k in keys
                )
                note += f"; ps catch-up {max(r.catch_up_s for r in rs):.1f} s max"
            rows.append(
                (
                    name,
                    clients,
                    tps,
                    f"{min(r.tps for r in rs):,.0f}-{max(r.tps for r in rs):,.0f}",
                    statistics.mean(r.lat_ms for r in rs),
                    note,
                )
            )
    print_table(
        [
            f"(1) pgbench -N -s {args.scale}, {args.rounds}x{args.seconds} s",
            "clients",
            "tps",
            "tps range",
            "lat avg ms",
            "note",
        ],
        rows,
    )
    for clients in (1, args.clients):
        n, s, v = agg[NEON, clients], agg[SYNC_STANDBY, clients], agg[NO_STANDBY, clients]
        print(
            f"  -c {clients}: neon / vanilla-sync-standby = {x(n / s)}, neon / vanilla-no-standby = {x(n / v)} "
            f"({n:,.0f} vs {s:,.0f} vs {v:,.0f} tps)"
        )
    ratio = agg[NEON, args.clients] / agg[SYNC_STANDBY, args.clients]
    met = ratio >= TARGET
    verdict = "MET" if met else "MISSED"
    print(f"  target {TARGET}x of vanilla-sync-standby at {args.clients} clients: {x(ratio)} {verdict}")
    return met


# --- (3) the per-message floor ----------------------------------------------------------------------------
_ECHO_SERVER = """
import asyncio, sys, uvloop
async def main():
    async def echo(r, w):
        while data := await r.read(65536):
            w.write(data)
    srv = await asyncio.start_server(echo, "127.0.0.1", 0)
    print(srv.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(3600)
uvloop.install()
asyncio.run(main())
"""


@dataclass
class Floor:
    wall_us: float
    cpu_us: float  # client + server, per round trip


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_floor(rounds: int = 5000) -> Floor:
    import subprocess

    import uvloop

    server = subprocess.Popen([sys.executable, "-c", _ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())

        async def client() -> Floor:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            msg = b"x" * 500
            for _ in range(200):  # warm-up
                writer.write(msg)
                await reader.readexactly(len(msg))
            c0, s0, t0 = time.process_time(), _cpu_seconds(server.pid), time.perf_counter()
            for _ in range(rounds):
                writer.write(msg)
                await reader.readexactly(len(msg))
            t1, c1, s1 = time.perf_counter(), time.process_time(), _cpu_seconds(server.pid)
            writer.close()
            return Floor((t1 - t0) / rounds * 1e6, ((c1 - c0) + (s1 - s0)) / rounds * 1e6)

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(client())
    finally:
        server.kill()
        server.wait()


def report_floor(args: argparse.Namespace, floor: Floor, runs: list[Run]) -> None:
    print()
    print(
        f"(3) asyncio (uvloop) round trip of 500 bytes over loopback TCP between two processes: "
        f"{floor.wall_us:.0f} us wall, {floor.cpu_us:.0f} us of CPU (both sides)"
    )
    for clients in (1, args.clients):
        rs = [r for r in runs if r.setup == NEON and r.clients == clients]
        if rs:
            per_txn = sum(sum(r.cpu.values()) for r in rs) / sum(r.txns for r in rs) * 1e6
            print(
                f"  -c {clients}: neon daemons' CPU per transaction {per_txn:.0f} us = "
                f"{per_txn / floor.cpu_us:.1f} such round trips"
            )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short run (about a minute and a half)")
    ap.add_argument("--scale", type=int, default=1, help="pgbench -i scale for (1)")
    ap.add_argument("--seconds", type=int, help="pgbench -T per run (default 12, --quick 3)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (abc, cba, ...)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--wal-scale", type=int, help="pgbench -i scale producing (2)'s WAL (default 4, --quick 1)")
    ap.add_argument("--append-repeat", type=int, default=3, help="(2): streams (fresh timelines) and baselines")
    ap.add_argument("--window-kib", type=int, default=4096, help="(2): bytes in flight beyond flush_lsn")
    ap.add_argument("--skip-pgbench", action="store_true", help="only (2)")
    args = ap.parse_args()
    args.seconds = args.seconds or (3 if args.quick else 12)
    args.wal_scale = args.wal_scale or (1 if args.quick else 4)
    quiet_logging()

    t_start = time.perf_counter()
    scratch = Scratch("neon-bench-commit-")
    problems: list[str] = []
    try:
        runs: list[Run] = []
        if not args.skip_pgbench:
            print(f"(1) pgbench -N, -s {args.scale}, {args.rounds} rounds of {args.seconds} s per set-up and -c")
            runs = asyncio.run(bench_commit(args, scratch, problems))
        appends = asyncio.run(bench_append(args, scratch, problems))
        floor = bench_floor()
        met = report(args, runs, appends)
        report_floor(args, floor, runs)
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        scratch.cleanup()
    if problems:
        print(f"\nlog lines worth a look ({len(problems)}):")
        for p in problems[:20]:
            print("  " + p)
    print(f"\ntotal {time.perf_counter() - t_start:.1f} s{'' if met else ' (target missed)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
