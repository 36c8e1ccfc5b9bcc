"""WAL redo throughput and latency through the real helper (pgxn/neon_walredo) vs a pipe echo.

Real records come from a stock PG15 cluster: single-row INSERTs (one statement each) into a
table with a btree index; heap block 0 and the index's first leaf then have chains of 150+
records, each starting with a record that initialises the page. Measured, all in one run, on
ONE helper process driven through `WalRedoManager` + `PostgresRedoLauncher` (the pageserver's
path) and through the raw `WalRedoProcess.request`:

  (a) short requests: push page + 1 record + get page, from 1 and from N concurrent tasks;
  (b) long chains: the whole chain (no base image), records/s and µs per record;
  (c) the baseline: an 8 KiB message echoed by `cat` over the same asyncio pipes.

For each: requests/s, p50/p99 latency, and CPU per request of this process ("py") and of the
child ("child", from /proc/<pid>/sched). Measurements are split into --rounds interleaved
rounds, so that the (virtual) machine's drifts hit every case alike. Then the ratios (a)/(c)
and the issue's targets (short-request latency within 1.5x the echo round trip; long chains
>= 300k records/s). If the latency target is missed (or with --profile) it shows where the time
of a short request goes: the manager's own Python cost (with a stub process), the cost of
asyncio's 256 KiB pipe reads, blocking-pipe round trips without asyncio, and a cProfile of the
1-task manager loop. `--loop uvloop` runs it all on uvloop (whose subprocess_exec does not take
user/group, so the helper then drops privileges in a preexec_fn instead).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import io
import logging
import os
import pstats
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import structlog

from benchmarks._walredo_records import RM_BTREE_ID, RM_HEAP_ID, Chain, collect_chains, run_insert_workload
from neon.postgres.pg_distrib import PgDistrib, PostgresUser
from neon.walredo.launcher import PostgresRedoLauncher, helper_command, make_scratch_dir, scratch_parent
from neon.walredo.manager import WalRedoManager
from neon.walredo.process import WalRedoProcess
from neon.walredo.protocol import PAGE_SIZE, redo_request
from neon.walredo.records import BufferTag
from tests.fixtures.vanilla import VanillaPostgres, make_test_root

TIMEOUT = 30.0
LATENCY_TARGET = 1.5  # short request p50 / echo p50
RECORDS_TARGET = 300_000  # records/s on long chains


# --- measuring ---------------------------------------------------------------------------------
def child_cpu_seconds(pid: int) -> float:
    """CPU time the process has used so far: ns-precise from /proc/<pid>/sched when there is one."""
    try:
        with open(f"/proc/{pid}/sched") as f:
            for line in f:
                if line.startswith("se.sum_exec_runtime"):
                    return float(line.split(":")[1]) / 1000.0
    except OSError:
        pass
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    name: str
    tasks: int
    n: int
    wall: float
    lat_ns: list[int]
    py_cpu: float
    child_cpu: float
    records_per_request: int = 0

    @property
    def rps(self) -> float:
        return self.n / self.wall

    def pct_us(self, p: float) -> float:
        return self.lat_ns[min(len(self.lat_ns) - 1, int(p * len(self.lat_ns)))] / 1000.0

    @property
    def p50(self) -> float:
        return self.pct_us(0.50)

    @property
    def p99(self) -> float:
        return self.pct_us(0.99)

    @property
    def records_per_s(self) -> float:
        return self.rps * self.records_per_request


async def measure(
    name: str,
    fn: Callable[[], Awaitable[bytes]],
    *,
    tasks: int,
    seconds: float,
    max_requests: int,
    warmup: int,
    child_pid: int,
    records_per_request: int = 0,
) -> Result:
    for _ in range(warmup):
        await fn()
    lat: list[int] = []
    deadline = time.perf_counter() + seconds
    limit = max_requests or sys.maxsize

    async def worker() -> None:
        clock = time.perf_counter_ns
        while len(lat) < limit and time.perf_counter() < deadline:
            t0 = clock()
            await fn()
            lat.append(clock() - t0)

    cpu0, child0, t0 = time.process_time(), child_cpu_seconds(child_pid), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    wall = time.perf_counter() - t0
    py_cpu, child_cpu = time.process_time() - cpu0, child_cpu_seconds(child_pid) - child0
    lat.sort()
    return Result(name, tasks, len(lat), wall, lat, py_cpu, child_cpu, records_per_request)


ECHO = "(c) echo 8 KiB via cat"
MGR_SHORT = "(a) short, WalRedoManager"
RAW_SHORT = "(a) short, raw process.request"


def long_label(chain: Chain) -> str:
    return f"(b) {chain.name} chain x{len(chain.records)}"


@dataclass
class Case:
    name: str
    fn: Callable[[], Awaitable[bytes]]
    tasks: int
    child_pid: int
    records_per_request: int = 0


def merge(parts: list[Result]) -> Result:
    first = parts[0]
    lat = sorted(x for p in parts for x in p.lat_ns)
    return Result(
        first.name,
        first.tasks,
        sum(p.n for p in parts),
        sum(p.wall for p in parts),
        lat,
        sum(p.py_cpu for p in parts),
        sum(p.child_cpu for p in parts),
        first.records_per_request,
    )


def print_table(results: list[Result]) -> None:
    hdr = (
        f"{'test':<34} {'tasks':>5} {'requests':>9} {'req/s':>9} {'p50 µs':>8} {'p99 µs':>8} "
        f"{'py CPU µs/req':>13} {'child CPU µs/req':>16} {'records/s':>10} {'µs/record':>9}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        recs = f"{r.records_per_s:>10.0f} {1e6 / r.records_per_s:>9.2f}" if r.records_per_request else ""
        print(
            f"{r.name:<34} {r.tasks:>5} {r.n:>9} {r.rps:>9.0f} {r.p50:>8.1f} {r.p99:>8.1f} "
            f"{r.py_cpu / r.n * 1e6:>13.1f} {r.child_cpu / r.n * 1e6:>16.1f} {recs}"
        )


# --- the helper's page ----------------------------------------------------------------------------
def page_lsn(page: bytes) -> int:
    hi, lo = struct.unpack_from("<II", page, 0)
    return hi << 32 | lo


def check_page(page: bytes, what: str, lsn: int) -> None:
    if len(page) != PAGE_SIZE:
        raise SystemExit(f"{what}: helper returned {len(page)} bytes")
    if not any(page):
        raise SystemExit(f"{what}: helper returned an all-zero page")
    if page_lsn(page) != lsn:
        raise SystemExit(f"{what}: page LSN {page_lsn(page):X}, expected {lsn:X}")


# --- profile: where a short request's time goes ------------------------------------------------------
def _read_exactly(fd: int, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise SystemExit("child closed its stdout")
        buf += chunk
    return bytes(buf)


def sync_round_trips(proc: subprocess.Popen[bytes], request: bytes, seconds: float) -> tuple[float, float, float]:
    """p50 µs, py CPU µs and child CPU µs per request, blocking pipes, no event loop."""
    assert proc.stdin is not None and proc.stdout is not None
    win, rout = proc.stdin.fileno(), proc.stdout.fileno()
    for _ in range(200):
        os.write(win, request)
        _read_exactly(rout, PAGE_SIZE)
    lat = []
    cpu0, child0 = time.process_time(), child_cpu_seconds(proc.pid)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter_ns()
        view = memoryview(request)
        while view:
            view = view[os.write(win, view) :]
        _read_exactly(rout, PAGE_SIZE)
        lat.append(time.perf_counter_ns() - t0)
    py_cpu, child_cpu = time.process_time() - cpu0, child_cpu_seconds(proc.pid) - child0
    lat.sort()
    return lat[len(lat) // 2] / 1000, py_cpu / len(lat) * 1e6, child_cpu / len(lat) * 1e6


class _StubProcess:
    """Stands in for the helper: answers at once, so only the manager's own Python cost remains."""

    alive = True
    pid = 0

    def __init__(self, page: bytes) -> None:
        self.page = page

    async def request(self, data: bytes, timeout: float) -> bytes:
        return self.page


async def manager_overhead_us(tag: BufferTag, lsn: int, base: tuple[int, bytes], records: list, n: int) -> float:
    """µs of Python per `request_redo` of one record when the process costs nothing."""
    stub = _StubProcess(base[1])

    async def launcher(log: object) -> _StubProcess:
        return stub

    mgr = WalRedoManager("stub", launcher)  # type: ignore[arg-type]
    await mgr.request_redo(tag, lsn, base, records)
    t0 = time.perf_counter()
    for _ in range(n):
        await mgr.request_redo(tag, lsn, base, records)
    return (time.perf_counter() - t0) / n * 1e6


_PIPE_READ_PROBE = """
import os, sys, time
size, n = int(sys.argv[1]), int(sys.argv[2])
r, w = os.pipe()
data = os.urandom(8192)
t0 = time.perf_counter()
for _ in range(n):
    os.write(w, data)
    os.read(r, size)
print((time.perf_counter() - t0) / n * 1e6)
"""


def pipe_read_us(read_size: int, *, fresh: bool, n: int = 20_000) -> float:
    """µs to write 8 KiB into a pipe and read it back with os.read(fd, read_size), in this process
    or in a fresh interpreter (whose malloc has not yet raised its mmap threshold)."""
    if fresh:
        out = subprocess.run(
            [sys.executable, "-c", _PIPE_READ_PROBE, str(read_size), str(n)], capture_output=True, text=True, check=True
        )
        return float(out.stdout)
    r, w = os.pipe()
    data = os.urandom(PAGE_SIZE)
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            os.write(w, data)
            os.read(r, read_size)
        return (time.perf_counter() - t0) / n * 1e6
    finally:
        os.close(r)
        os.close(w)


async def profile_short(
    short: Callable[[], Awaitable[bytes]],
    request: bytes,
    stub_args: tuple[BufferTag, int, tuple[int, bytes], list],
    scratch_root: Path,
    args: argparse.Namespace,
) -> None:
    print("\nWhere a short request's time goes (1 task):")
    print(
        f"  WalRedoManager Python cost with a stub process: {await manager_overhead_us(*stub_args, 20_000):5.1f} µs/req"
    )
    max_size = getattr(asyncio.unix_events._UnixReadPipeTransport, "max_size", 0)
    if args.loop == "asyncio" and max_size:
        for fresh in (False, True):
            where = "a fresh interpreter" if fresh else "this process"
            big, small = pipe_read_us(max_size, fresh=fresh), pipe_read_us(PAGE_SIZE, fresh=fresh)
            print(
                f"  write 8 KiB + os.read(fd, {max_size // 1024} KiB) as asyncio's pipe transport does, {where}: "
                f"{big:5.1f} µs (reading 8 KiB: {small:4.1f} µs)"
            )
    cat = subprocess.Popen([shutil.which("cat") or "cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    distrib, user = PgDistrib.default(), PostgresUser.resolve()
    scratch = make_scratch_dir(scratch_root / "sync-helper", user)
    helper = subprocess.Popen(
        helper_command(distrib, scratch),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        bufsize=0,
        env={"LD_LIBRARY_PATH": str(distrib.lib_dir), "LC_ALL": "C"},
        cwd="/",
        **user.popen_kwargs(),
    )
    try:
        secs = min(args.seconds, 1.0)
        for label, proc, req in (("cat echo", cat, os.urandom(PAGE_SIZE)), ("helper P+A+G", helper, request)):
            p50, py, child = sync_round_trips(proc, req, secs)
            print(
                f"  blocking pipes, no asyncio, {label:<13} p50 {p50:6.1f} µs   "
                f"py CPU {py:5.1f} µs/req   child CPU {child:5.1f} µs/req"
            )
    finally:
        for proc in (cat, helper):
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(10)

    n = args.profile_requests
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(n):
        await short()
    prof.disable()
    wall = time.perf_counter() - t0
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(args.profile_top)
    print(f"\n  cProfile, {n} manager short requests, 1 task: {wall / n * 1e6:.1f} µs/req under the profiler")
    lines = out.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    for line in lines[start : start + args.profile_top + 1]:
        print("  " + line.rstrip()[:160])


# --- the run ---------------------------------------------------------------------------------------
def make_records(args: argparse.Namespace, root: Path) -> list[Chain]:
    pg = VanillaPostgres(root / "pg", port=args.port).init()
    pg.configure(["autovacuum = off", "wal_keep_size = '1GB'", "max_wal_size = '1GB'"])
    pg.start()
    try:
        rels = run_insert_workload(pg, args.rows)
    finally:
        pg.stop()
    return collect_chains(pg, rels)


def pick_chain(chains: list[Chain], rmid: int, min_records: int) -> Chain | None:
    for c in chains:  # longest first
        if rmid in c.rmids and len(c.records) >= min_records:
            return c
    return None


class PreexecRedoLauncher(PostgresRedoLauncher):
    """PostgresRedoLauncher for uvloop, whose subprocess_exec rejects user/group/extra_groups:
    the same command, dropping to the Postgres user in preexec_fn instead."""

    async def __call__(self, log: Any) -> WalRedoProcess:
        make_scratch_dir(self.scratch_dir, self.user)
        argv = helper_command(
            self.distrib, self.scratch_dir, extension=self.extension, shared_buffers=self.shared_buffers
        )
        env = {"LD_LIBRARY_PATH": str(self.distrib.lib_dir), "LC_ALL": "C"}
        kwargs = {} if self.user.is_self else {"preexec_fn": functools.partial(_become, self.user.uid, self.user.gid)}
        return await WalRedoProcess.launch(argv, env=env, log=log, cwd="/", popen_kwargs=kwargs)


def _become(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


async def bench(args: argparse.Namespace, chains: list[Chain], scratch_root: Path) -> None:
    heap = pick_chain(chains, RM_HEAP_ID, 2)
    btree = pick_chain(chains, RM_BTREE_ID, 2)
    if heap is None:
        raise SystemExit("no heap chain found in the WAL")
    for c in (heap, btree):
        if c is not None:
            kinds = "INIT first" if c.records[0][1].will_init else "FPI first"
            print(f"{c.name} block {c.tag.blk}: {len(c.records)} records, {c.nbytes} bytes ({kinds})")

    many = args.concurrency
    cases: list[Case] = []

    # (c) the baseline: cat echoes the 8192 bytes, which the reader takes as the response.
    echo = await WalRedoProcess.launch([shutil.which("cat") or "cat"], env={"LC_ALL": "C"}, log=structlog.get_logger())
    # One helper process for everything else.
    launcher_cls = PreexecRedoLauncher if args.loop == "uvloop" else PostgresRedoLauncher
    mgr = WalRedoManager("bench", launcher_cls(scratch_root / "helper"), timeout=TIMEOUT)
    try:
        payload = os.urandom(PAGE_SIZE)
        if await echo.request(payload, TIMEOUT) != payload:
            raise SystemExit("cat did not echo the page")

        async def echo_req() -> bytes:
            return await echo.request(payload, TIMEOUT)

        recs = heap.records
        last_lsn, last = recs[-1]
        base_lsn = recs[-2][0]
        base = await mgr.request_redo(heap.tag, base_lsn, None, recs[:-1])
        check_page(base, "base image", base_lsn)
        full = await mgr.request_redo(heap.tag, last_lsn, None, recs)
        check_page(full, "whole chain", last_lsn)
        short_records = [(last_lsn, last)]
        page = await mgr.request_redo(heap.tag, last_lsn, (base_lsn, base), short_records)
        check_page(page, "short request", last_lsn)
        if page != full:
            raise SystemExit("the short request's page differs from the whole chain's")
        print("checked: pages are 8192 bytes, not zero, carry the last record's LSN; short == whole chain")
        proc = mgr.process
        assert proc is not None
        pid = proc.pid
        short_request = redo_request(heap.tag, base, [(last_lsn, last.rec)])
        print(f"short request: {len(short_request)} bytes (B + P + A of {len(last.rec)} bytes + G)")

        async def mgr_short() -> bytes:
            return await mgr.request_redo(heap.tag, last_lsn, (base_lsn, base), short_records)

        async def raw_short() -> bytes:
            return await proc.request(short_request, TIMEOUT)

        for tasks in (1, many):
            cases.append(Case(ECHO, echo_req, tasks, echo.pid))
        for tasks in (1, many):
            cases.append(Case(MGR_SHORT, mgr_short, tasks, pid))
        for tasks in (1, many):
            cases.append(Case(RAW_SHORT, raw_short, tasks, pid))

        # (b) long chains, no base image.
        for chain in (heap, btree):
            if chain is None:
                continue
            n = len(chain.records)
            lsn = chain.records[-1][0]
            check_page(await mgr.request_redo(chain.tag, lsn, None, chain.records), f"{chain.name} chain", lsn)
            whole = redo_request(chain.tag, None, [(end, r.rec) for end, r in chain.records])

            async def mgr_long(chain: Chain = chain, lsn: int = lsn) -> bytes:
                return await mgr.request_redo(chain.tag, lsn, None, chain.records)

            async def raw_long(whole: bytes = whole) -> bytes:
                return await proc.request(whole, TIMEOUT)

            label = long_label(chain)
            for tasks in (1, many):
                cases.append(Case(f"{label}, manager", mgr_long, tasks, pid, n))
            cases.append(Case(f"{label}, raw", raw_long, 1, pid, n))

        # Interleaved rounds, so that drifts of the (virtual) machine hit every case alike.
        rounds = max(1, args.rounds)
        parts: dict[tuple[str, int], list[Result]] = {}
        for _ in range(rounds):
            for c in cases:
                r = await measure(
                    c.name,
                    c.fn,
                    tasks=c.tasks,
                    seconds=args.seconds / rounds,
                    max_requests=-(-args.requests // rounds),
                    warmup=args.warmup if not c.records_per_request else max(5, args.warmup // 20),
                    child_pid=c.child_pid,
                    records_per_request=c.records_per_request,
                )
                parts.setdefault((c.name, c.tasks), []).append(r)
        results = [merge(rs) for rs in parts.values()]
        if not proc.alive or mgr.process is not proc:
            raise SystemExit("the helper process was restarted during the run")

        print()
        print_table(results)
        by = {(r.name, r.tasks): r for r in results}
        echo1, echon = by[ECHO, 1], by[ECHO, many]
        print()
        lat_ok = True
        for name in (MGR_SHORT, RAW_SHORT):
            r1, rn = by[name, 1], by[name, many]
            lat_ratio = r1.p50 / echo1.p50
            tput_ratio = rn.rps / echon.rps
            print(
                f"{name:<32} / echo: p50 latency (1 task) {lat_ratio:.2f}x, throughput ({many} tasks) {tput_ratio:.2f}x"
            )
            if name == MGR_SHORT:
                lat_ok = lat_ratio <= LATENCY_TARGET
        print(
            f"target short-request latency <= {LATENCY_TARGET}x echo (manager, p50, 1 task): "
            f"{'MET' if lat_ok else 'MISSED'}"
        )
        for chain in (heap, btree):
            if chain is None:
                continue
            label = long_label(chain)
            best = max(by[f"{label}, manager", t].records_per_s for t in (1, many))
            print(
                f"target long chains >= {RECORDS_TARGET // 1000}k records/s ({chain.name}, manager, best): "
                f"{best / 1000:.0f}k -> {'MET' if best >= RECORDS_TARGET else 'MISSED'}"
            )

        if args.profile or (not lat_ok and not args.no_profile):
            stub_args = (heap.tag, last_lsn, (base_lsn, base), short_records)
            await profile_short(mgr_short, short_request, stub_args, scratch_root, args)
    finally:
        await mgr.shutdown()
        await echo.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=500, help="single-row INSERT statements in the workload")
    ap.add_argument("--seconds", type=float, default=1.5, help="duration of each measurement (all rounds)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds the measurements are split into")
    ap.add_argument("--requests", type=int, default=0, help="cap on requests per measurement (0: none)")
    ap.add_argument("--warmup", type=int, default=200, help="requests before each measurement")
    ap.add_argument("--concurrency", type=int, default=16, help="tasks of the concurrent measurements")
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    ap.add_argument("--port", type=int, default=55432)
    ap.add_argument("--profile", action="store_true", help="profile short requests even if the target is met")
    ap.add_argument("--no-profile", action="store_true", help="never profile")
    ap.add_argument("--profile-requests", type=int, default=20_000)
    ap.add_argument("--profile-top", type=int, default=15)
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    t0 = time.perf_counter()
    root = make_test_root(prefix="neon-bench-walredo-")
    scratch_root = Path(tempfile.mkdtemp(prefix="neon-bench-walredo-", dir=scratch_parent()))
    scratch_root.chmod(0o755)
    try:
        chains = make_records(args, root)
        print(f"workload: {args.rows} single-row INSERTs; records collected in {time.perf_counter() - t0:.1f} s")
        print(f"event loop: {args.loop}; {os.cpu_count()} CPUs; {args.seconds} s per measurement")
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(bench(args, chains, scratch_root))
        else:
            asyncio.run(bench(args, chains, scratch_root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(scratch_root, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
