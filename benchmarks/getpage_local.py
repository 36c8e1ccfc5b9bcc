"""GetPage@LSN per second, in-process: image hits and pages that need 10 records of WAL redo.

One stock PG15 cluster (run as the unprivileged user, `full_page_writes = off`) gets
`pgbench -i -s S` and a table `redo_t` with fillfactor 10 and rows of ~500 bytes, so that each
of its N rows sits alone on its page (checked by ctid). The cluster is stopped cleanly and its
data directory imported into a fresh tenant, which stores every block as an image at the import
LSN. The cluster is started again and, in one transaction, runs 10 rounds of
`UPDATE redo_t SET v = v + 1`: HOT updates (no index; ample room on each page; pruning cannot
remove the versions of the still-running transaction), i.e. exactly one heap record per page
per round and no full-page images (fpw off). That WAL is ingested and flushed; the layers are then
checked to hold, for every page of `redo_t`, exactly 10 records above its image.

Measured at the timeline's last record LSN:

  (a) image hits: random blocks of pgbench_accounts, page cache disabled (`MaterializedPageCache(0)`),
      one task; baseline: `os.pread` of the same 8 KiB blocks from the imported data directory's
      files (a plain loop, from the OS page cache); then the same reads with the default cache;
  (b) redo: the N pages of redo_t, cache disabled, so each read replays 10 records through the
      WAL-redo helper; one task, then 16 concurrent tasks (the redo manager's counters are checked to
      show 10 records per request); then with the default cache after one pass (cache hits).

Reads/s, p50/p99 latency, CPU per read of this process; the image-hit target is >= 20k reads/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._pageserver_bench import Engine, Scratch, percentile, print_table, profiled, quiet_logging
from neon.pageserver.import_datadir import WalImporter
from neon.pageserver.key import rel_block_key_bytes
from neon.pageserver.page_cache import DEFAULT_PAGE_CACHE_SIZE
from neon.pageserver.timeline import Timeline
from neon.pageserver.value import Image, decode_value
from neon.postgres.constants import BLCKSZ, RELSEG_SIZE
from neon.postgres.page import page_get_lsn, page_get_max_offset_number
from neon.utils.id import TimelineId
from neon.utils.lsn import Lsn
from tests.fixtures.vanilla import VanillaPostgres

IMAGE_TARGET = 20_000  # image hits per second, cache disabled, one task
DEFAULTTABLESPACE_OID = 1663
ROUNDS = 10


@dataclass
class Cluster:
    """What the benchmark needs to know about the vanilla cluster."""

    db: int
    accounts_rel: int
    accounts_blocks: int
    redo_rel: int
    redo_blocks: list[int]
    update_end: int = 0  # the LSN after the updates' commit


@dataclass
class Result:
    name: str
    tasks: int
    n: int
    wall: float
    lat_ns: list[int]
    cpu: float
    note: str = ""

    @property
    def rps(self) -> float:
        return self.n / self.wall

    def pct_us(self, p: float) -> float:
        return percentile(self.lat_ns, p) / 1000


# --- the vanilla cluster ----------------------------------------------------------------------------
def prepare_cluster(pg: VanillaPostgres, args: argparse.Namespace) -> Cluster:
    """pgbench -i and redo_t, one row per page; returns the relations' numbers."""
    pg.pgbench(["-i", "-s", str(args.scale), "-q"])
    with pg.connect() as conn:
        conn.execute("CREATE TABLE redo_t (id int, v int, pad text) WITH (fillfactor = 10, autovacuum_enabled = off)")
        conn.execute("INSERT INTO redo_t SELECT g, 0, repeat('x', 500) FROM generate_series(1, %s) g", (args.pages,))

        def one(sql: str) -> int:
            row = conn.execute(sql).fetchone()
            assert row is not None
            return int(row[0])

        db = one("SELECT oid FROM pg_database WHERE datname = current_database()")
        accounts_rel = one("SELECT pg_relation_filenode('pgbench_accounts')")
        accounts_blocks = one("SELECT pg_relation_size('pgbench_accounts')") // BLCKSZ
        redo_rel = one("SELECT pg_relation_filenode('redo_t')")
        rows = conn.execute("SELECT (ctid::text::point)[0]::int AS blk FROM redo_t ORDER BY blk").fetchall()
    blocks = [int(r[0]) for r in rows]
    if len(set(blocks)) != len(blocks) or len(blocks) != args.pages:
        raise SystemExit(f"redo_t: {len(blocks)} rows on {len(set(blocks))} pages, expected one row per page")
    return Cluster(db, accounts_rel, accounts_blocks, redo_rel, blocks)


def run_updates(pg: VanillaPostgres, cluster: Cluster) -> None:
    with pg.connect(autocommit=False) as conn:
        for _ in range(ROUNDS):
            conn.execute("UPDATE redo_t SET v = v + 1")
        conn.commit()
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        cluster.update_end = Lsn(row[0])


# --- checks -------------------------------------------------------------------------------------------
def count_history(tl: Timeline, key: bytes, lsn: int) -> tuple[int, bool]:
    """(records above the newest image, whether an image was found) from the timeline's layer files."""
    if tl.layers.open_layer is not None or tl.layers.frozen_layers:
        raise SystemExit("expected every in-memory layer to be flushed")
    records = 0
    cont = lsn + 1
    for layer in tl.layers.deltas:  # newest first
        if layer.lsn_start >= cont or not layer.key_start <= key < layer.key_end:
            continue
        entries, _complete = layer.delta().get(key, layer.lsn_start, cont)
        for _lsn, _init, raw in entries:
            if isinstance(decode_value(raw), Image):
                return records, True
            records += 1
        cont = layer.lsn_start
    return records, False


def newest_record_lsn(tl: Timeline, key: bytes, lsn: int) -> int:
    for layer in tl.layers.deltas:
        if layer.lsn_start <= lsn and layer.key_start <= key < layer.key_end:
            entries, _ = layer.delta().get(key, layer.lsn_start, lsn + 1)
            if entries:
                return entries[0][0]
    raise SystemExit(f"no entry for key {key.hex()}")


# --- measuring ----------------------------------------------------------------------------------------
async def measure(
    name: str,
    read: Callable[[int], Awaitable[bytes]],
    n_items: int,
    *,
    tasks: int,
    seconds: float,
    warmup: int,
    note: str = "",
) -> Result:
    for i in range(min(warmup, n_items)):
        await read(i)
    lat: list[int] = []
    deadline = time.perf_counter() + seconds
    counter = 0

    async def worker() -> None:
        nonlocal counter
        clock = time.perf_counter_ns
        while time.perf_counter() < deadline:
            i = counter % n_items
            counter += 1
            t0 = clock()
            await read(i)
            lat.append(clock() - t0)

    cpu0, t0 = time.process_time(), time.perf_counter()
    if tasks == 1:
        await worker()
    else:
        await asyncio.gather(*(worker() for _ in range(tasks)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    lat.sort()
    return Result(name, tasks, len(lat), wall, lat, cpu, note)


def measure_pread(path: Path, blocks: Sequence[int], seconds: float) -> Result:
    fd = os.open(path, os.O_RDONLY)
    try:
        pread, n = os.pread, len(blocks)
        for b in blocks[:1000]:
            pread(fd, BLCKSZ, b * BLCKSZ)
        lat: list[int] = []
        clock = time.perf_counter_ns
        deadline = time.perf_counter() + seconds
        cpu0, t0 = time.process_time(), time.perf_counter()
        i = 0
        while time.perf_counter() < deadline:
            for _ in range(1000):
                s = clock()
                pread(fd, BLCKSZ, blocks[i % n] * BLCKSZ)
                lat.append(clock() - s)
                i += 1
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        os.close(fd)
    lat.sort()
    return Result("(a) baseline: os.pread of the file", 1, len(lat), wall, lat, cpu, "plain loop, OS page cache")


# --- the run --------------------------------------------------------------------------------------------
async def bench(args: argparse.Namespace, scratch: Scratch, pg: VanillaPostgres, pgdata: Path, c: Cluster) -> bool:
    results: list[Result] = []
    secs = args.seconds
    rng = random.Random(42)
    n_acc = min(c.accounts_blocks, RELSEG_SIZE)  # the first 1 GiB segment file
    acc_blocks = [rng.randrange(n_acc) for _ in range(100_000)]
    acc_keys = [rel_block_key_bytes(DEFAULTTABLESPACE_OID, c.db, c.accounts_rel, 0, b) for b in acc_blocks]
    redo_keys = [rel_block_key_bytes(DEFAULTTABLESPACE_OID, c.db, c.redo_rel, 0, b) for b in c.redo_blocks]
    acc_file = pgdata / "base" / str(c.db) / str(c.accounts_rel)

    engine = Engine.create(scratch, cache_pages=0)
    tenant_path = engine.tenant.path
    try:
        t0 = time.perf_counter()
        tl = await engine.tenant.import_timeline(TimelineId.generate(), pgdata)
        print(f"imported the data directory in {time.perf_counter() - t0:.1f} s at {Lsn(tl.last_record_lsn)}")
        timeline_id = tl.timeline_id
        pg.start()
        try:
            run_updates(pg, c)
        finally:
            pg.stop()
        t0 = time.perf_counter()
        imp = WalImporter(tl)
        await imp.ingest_files(pg.wal_segments(), start_lsn=tl.last_record_lsn)
        await tl.freeze_and_flush()
        lsn = tl.last_record_lsn
        print(
            f"ingested {imp.records} records ({imp.bytes / 2**20:.1f} MB) in {time.perf_counter() - t0:.1f} s "
            f"to {Lsn(lsn)}"
        )
        if lsn < c.update_end:
            raise SystemExit(f"ingest stopped at {Lsn(lsn)}, before the updates' end {Lsn(c.update_end)}")

        # The history of every redo_t page: its image from the import, then exactly 10 records.
        counts = {count_history(tl, k, lsn) for k in redo_keys}
        if counts != {(ROUNDS, True)}:
            raise SystemExit(f"redo_t pages: (records above image, image found) = {sorted(counts)}, expected 10")
        print(f"checked in the layer files: each of the {len(redo_keys)} redo_t pages has an image + {ROUNDS} records")

        # Correctness spot checks.
        with open(acc_file, "rb") as f:
            for b, k in list(zip(acc_blocks, acc_keys, strict=True))[:300]:
                f.seek(b * BLCKSZ)
                if await tl.get(k, lsn) != f.read(BLCKSZ):
                    raise SystemExit(f"pgbench_accounts block {b}: the engine's page differs from the file's")
        m = engine.walredo.metrics
        for k in redo_keys[:50]:
            page = await tl.get(k, lsn)
            if page_get_lsn(page) != newest_record_lsn(tl, k, lsn) or page_get_max_offset_number(page) != ROUNDS + 1:
                raise SystemExit(
                    f"redo_t page {k.hex()}: LSN {Lsn(page_get_lsn(page))}, {page_get_max_offset_number(page)} items"
                )
        print("checked: image hits equal the file's blocks; redo pages carry their last record's LSN and 11 items")

        async def read_acc(i: int) -> bytes:
            return await tl.get(acc_keys[i], lsn)

        async def read_redo(i: int) -> bytes:
            return await tl.get(redo_keys[i], lsn)

        results.append(
            await measure("(a) image hit, cache off", read_acc, len(acc_keys), tasks=1, seconds=secs, warmup=200)
        )
        results.append(measure_pread(acc_file, acc_blocks, secs))
        for tasks in (1, args.concurrency):
            recs0, reqs0 = m.replayed_records.value, m.records.count
            r = await measure(
                "(b) 10-record redo, cache off", read_redo, len(redo_keys), tasks=tasks, seconds=secs, warmup=20
            )
            per = (m.replayed_records.value - recs0) / max(1, m.records.count - reqs0)
            r.note = f"{per:.1f} records/request"
            if per != ROUNDS:
                raise SystemExit(f"{r.name}: {per} records replayed per redo request, expected {ROUNDS}")
            results.append(r)
        if args.profile:
            for what, read, n, keys in (
                ("(a) image hits", read_acc, 20_000, len(acc_keys)),
                ("(b) 10-record redo", read_redo, 2_000, len(redo_keys)),
            ):

                async def loop(read: Callable[[int], Awaitable[bytes]] = read, n: int = n, keys: int = keys) -> None:
                    for i in range(n):
                        await read(i % keys)

                await profiled(loop, top=args.profile_top, title=f"{n} reads of {what}, cache off, 1 task")
    finally:
        await engine.close()

    # The same tenant directory again, with the default page cache.
    engine = Engine.load(scratch, tenant_path, cache_pages=DEFAULT_PAGE_CACHE_SIZE)
    try:
        tl = engine.tenant.get_timeline(timeline_id)
        cache = engine.tenant.page_cache

        async def read_acc_c(i: int) -> bytes:
            return await tl.get(acc_keys[i], lsn)

        async def read_redo_c(i: int) -> bytes:
            return await tl.get(redo_keys[i], lsn)

        h0, m0 = cache.hits, cache.misses
        r = await measure(
            f"(a) image hit, default cache ({DEFAULT_PAGE_CACHE_SIZE})",
            read_acc_c,
            len(acc_keys),
            tasks=1,
            seconds=secs,
            warmup=200,
        )
        r.note = f"cache hit rate {(cache.hits - h0) / max(1, cache.hits + cache.misses - h0 - m0):.0%}"
        results.append(r)
        for tasks in (1, args.concurrency):
            h0, m0 = cache.hits, cache.misses
            r = await measure(
                "(b) 10-record redo, default cache",
                read_redo_c,
                len(redo_keys),
                tasks=tasks,
                seconds=secs,
                warmup=len(redo_keys),
            )
            r.note = (
                f"after one pass; cache hit rate {(cache.hits - h0) / max(1, cache.hits + cache.misses - h0 - m0):.0%}"
            )
            results.append(r)
    finally:
        await engine.close()
    return report(args, results)


def report(args: argparse.Namespace, results: list[Result]) -> bool:
    print()
    print_table(
        ["case", "tasks", "reads", "reads/s", "p50 µs", "p99 µs", "CPU µs/read", "note"],
        [(r.name, r.tasks, r.n, r.rps, r.pct_us(0.5), r.pct_us(0.99), r.cpu / r.n * 1e6, r.note) for r in results],
    )
    by = {(r.name, r.tasks): r for r in results}
    img = by["(a) image hit, cache off", 1]
    base = by["(a) baseline: os.pread of the file", 1]
    print(
        f"\n(a) image hits / os.pread baseline: {img.rps / base.rps:.3f}x ({img.rps:,.0f} vs {base.rps:,.0f} reads/s)"
    )
    one, many = by["(b) 10-record redo, cache off", 1], by["(b) 10-record redo, cache off", args.concurrency]
    print(
        f"(b) 10-record redo: {one.rps:,.0f} reads/s ({one.rps * ROUNDS:,.0f} records/s) with 1 task, "
        f"{many.rps:,.0f} reads/s with {args.concurrency} tasks ({many.rps / one.rps:.2f}x)"
    )
    met = img.rps >= IMAGE_TARGET
    print(
        f"target image hits >= {IMAGE_TARGET // 1000}k reads/s (cache off, 1 task): {img.rps / 1000:.1f}k -> "
        f"{'MET' if met else 'MISSED'}"
    )
    return met


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    ap.add_argument("--scale", type=int, default=5, help="pgbench scale of the imported cluster")
    ap.add_argument("--pages", type=int, default=500, help="pages of redo_t, each getting 10 records")
    ap.add_argument("--seconds", type=float, help="duration of each measurement (default 3, --quick 1)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--port", type=int, default=55442)
    ap.add_argument("--profile", action="store_true", help="after measuring, profile (a) and (b) with cProfile")
    ap.add_argument("--profile-top", type=int, default=15)
    args = ap.parse_args()
    args.seconds = args.seconds or (1.0 if args.quick else 3.0)
    quiet_logging()

    t_start = time.perf_counter()
    scratch = Scratch("neon-bench-getpage-")
    pg: VanillaPostgres | None = None
    try:
        pg = VanillaPostgres(scratch.root / "pg", port=args.port).init()
        pg.configure(
            [
                "full_page_writes = off",
                "autovacuum = off",
                "wal_keep_size = '4GB'",
                "max_wal_size = '4GB'",
                "checkpoint_timeout = '1h'",
            ]
        )
        pg.start()
        try:
            cluster = prepare_cluster(pg, args)
        finally:
            pg.stop()
        pgdata = pg.copy_datadir(scratch.root / "import-copy")
        print(
            f"cluster: pgbench -i -s {args.scale} (pgbench_accounts {cluster.accounts_blocks} blocks), "
            f"redo_t {len(cluster.redo_blocks)} pages; full_page_writes=off; "
            f"setup {time.perf_counter() - t_start:.1f} s"
        )
        met = asyncio.run(bench(args, scratch, pg, pgdata, cluster))
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
