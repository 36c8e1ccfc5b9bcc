"""WAL ingest throughput of the pageserver engine vs the rate stock Postgres generates that WAL.

One stock PG15 cluster (run as the unprivileged user; fsync=off, as `VanillaPostgres` sets it,
so the baseline is the WAL generation rate without any fsync cost) runs, in order:

  (1) `pgbench -i -s S`: a bulk load through COPY (multi-insert records) and index builds;
  (2) `pgbench -c 4 -j 2 -T D -n`: TPC-B transactions, after a CHECKPOINT, so each first touch
      of a page after it logs a full-page image, as in steady state;
  (3) a bulk `INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, N)` (one heap insert
      record per row), N chosen for about --insert-mb of WAL.

For each step the vanilla rate is the step's WAL bytes (`pg_wal_lsn_diff` of `pg_current_wal_lsn`
before and after) over its wall time. The data directory copied right after initdb, before the
first start, is imported into a fresh tenant (default tenant config unless overridden), and the
cluster's WAL is then ingested from the segment files: everything before a step untimed, then the
step's own records timed, the final `freeze_and_flush` (writing the layer file) included. Reading
and decoding the segment files is part of the timed ingest, as decoding the stream is in the
pageserver. Printed per step: vanilla MB/s, engine MB/s of WAL and records/s, the ratio
engine/vanilla (target >= 0.5x), the CPU time of this process and the layer files written.

`--profile` runs each measured step's ingest under cProfile (its rates are then not
representative) and prints the top functions by cumulative and by own time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg

from benchmarks._pageserver_bench import (
    Engine,
    RecordStream,
    Scratch,
    layer_file_names,
    print_table,
    profiled,
    quiet_logging,
)
from neon.pageserver.import_datadir import WalImporter
from neon.pageserver.page_cache import DEFAULT_PAGE_CACHE_SIZE
from neon.pageserver.tenant_config import TenantConf, TenantConfOverrides
from neon.utils.id import TimelineId
from neon.utils.lsn import Lsn
from tests.fixtures.vanilla import VanillaPostgres

TARGET_RATIO = 0.5
INSERT_WAL_PER_ROW = 96  # bytes of WAL per row of the bulk INSERT (measured on PG15: ~92)
MB = 1 << 20


@dataclass
class Step:
    name: str
    start: Lsn
    end: Lsn
    wal_bytes: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.wal_bytes / MB / self.seconds


@dataclass
class Ingested:
    step: Step
    records: int
    seconds: float
    flush_seconds: float  # the final freeze_and_flush (writing the layer file), part of `seconds`
    cpu: float
    layers: int
    profiled: bool = False

    @property
    def mb_per_s(self) -> float:
        return self.step.wal_bytes / MB / self.seconds

    @property
    def ratio(self) -> float:
        return self.mb_per_s / self.step.mb_per_s


# --- the vanilla side -----------------------------------------------------------------------------------
def current_lsn(conn: psycopg.Connection) -> Lsn:
    row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return Lsn(row[0])


def wal_diff(conn: psycopg.Connection, end: Lsn, start: Lsn) -> int:
    row = conn.execute("SELECT pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn)", (str(end), str(start))).fetchone()
    assert row is not None
    return int(row[0])


def run_workload(pg: VanillaPostgres, args: argparse.Namespace) -> list[Step]:
    steps: list[Step] = []
    with pg.connect() as conn:

        def measured(name: str, fn: Callable[[], object]) -> None:
            start = current_lsn(conn)
            t0 = time.perf_counter()
            fn()
            secs = time.perf_counter() - t0
            end = current_lsn(conn)
            steps.append(Step(name, start, end, wal_diff(conn, end, start), secs))

        measured(f"pgbench -i -s {args.scale}", lambda: pg.pgbench(["-i", "-s", str(args.scale), "-q"]))
        conn.execute("CHECKPOINT")
        measured(
            f"pgbench -c {args.clients} -T {args.duration}",
            lambda: pg.pgbench(["-c", str(args.clients), "-j", "2", "-T", str(args.duration), "-n"]),
        )
        conn.execute("CREATE TABLE t (id int, v text) WITH (autovacuum_enabled = off)")
        rows = args.insert_mb * MB // INSERT_WAL_PER_ROW
        measured(
            f"INSERT {rows / 1e6:.2f}M rows",
            lambda: conn.execute("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, %s) g", (rows,)),
        )
    return steps


# --- the engine side ----------------------------------------------------------------------------------
async def ingest(
    args: argparse.Namespace, scratch: Scratch, pg: VanillaPostgres, pgdata: Path, steps: list[Step]
) -> list[Ingested]:
    overrides = TenantConfOverrides()
    if args.checkpoint_distance:
        overrides = TenantConfOverrides(checkpoint_distance=args.checkpoint_distance * MB)
    engine = Engine.create(scratch, cache_pages=DEFAULT_PAGE_CACHE_SIZE, overrides=overrides)
    results: list[Ingested] = []
    try:
        t0 = time.perf_counter()
        tl = await engine.tenant.import_timeline(TimelineId.generate(), pgdata)
        conf = engine.tenant.conf()
        print(
            f"imported the initdb copy in {time.perf_counter() - t0:.1f} s at {Lsn(tl.last_record_lsn)}; "
            "tenant config: "
            f"{'default' if overrides.is_empty() else overrides.to_json_dict()} "
            f"(checkpoint_distance {conf.checkpoint_distance // MB} MiB"
            f"{', the default' if conf.checkpoint_distance == TenantConf().checkpoint_distance else ''})"
        )
        stream = RecordStream(pg.wal_segments(), tl.last_record_lsn)
        imp = WalImporter(tl)
        for step in steps:
            # Untimed: everything before the step, flushed, so the timed part starts from an empty open layer.
            await imp.ingest_record_batches(stream.until(step.start))
            await tl.freeze_and_flush()
            before = set(layer_file_names(tl))
            n0 = imp.records

            flush_started = 0.0

            async def timed(step: Step = step) -> None:
                nonlocal flush_started
                await imp.ingest_record_batches(stream.until(step.end))
                flush_started = time.perf_counter()
                await tl.freeze_and_flush()

            cpu0, t0 = time.process_time(), time.perf_counter()
            if args.profile:
                await profiled(timed, top=args.profile_top, title=f"ingest of '{step.name}'")
            else:
                await timed()
            t1 = time.perf_counter()
            secs, cpu, flush = t1 - t0, time.process_time() - cpu0, t1 - flush_started
            if tl.last_record_lsn < step.end:
                raise SystemExit(f"{step.name}: ingest stopped at {Lsn(tl.last_record_lsn)}, before {step.end}")
            new_layers = len(set(layer_file_names(tl)) - before)
            results.append(Ingested(step, imp.records - n0, secs, flush, cpu, new_layers, args.profile))
        await imp.ingest_record_batches(stream.until(1 << 63))  # the shutdown checkpoint
        await tl.freeze_and_flush()
        total_layers = len(layer_file_names(tl))
        size = sum((tl.path / n).stat().st_size for n in layer_file_names(tl))
        print(
            f"ingested to {Lsn(tl.last_record_lsn)}: {imp.records} records; "
            f"the timeline has {total_layers} layer files, {size / MB:.0f} MiB"
        )
    finally:
        await engine.close()
    return results


def report(args: argparse.Namespace, results: list[Ingested]) -> bool:
    print()
    print_table(
        [
            "step",
            "WAL MB",
            "vanilla s",
            "vanilla MB/s",
            "records",
            "ingest s",
            "of which flush s",
            "ingest MB/s",
            "records/s",
            "CPU s",
            "layers",
            "ratio",
        ],
        [
            (
                r.step.name,
                r.step.wal_bytes / MB,
                r.step.seconds,
                r.step.mb_per_s,
                r.records,
                r.seconds,
                r.flush_seconds,
                r.mb_per_s,
                r.records / r.seconds,
                r.cpu,
                r.layers,
                f"{r.ratio:.2f}x",
            )
            for r in results
        ],
    )
    print(
        "vanilla: fsync=off (WAL generation rate without fsync cost), "
        f"{os.cpu_count()} CPUs shared by the server, pgbench and this process; "
        "engine: one Python event loop plus the flush thread; 'CPU s' is this process, all threads"
    )
    if args.profile:
        print("NOTE: ingest ran under cProfile: its rates are not representative")
        return True
    ok = True
    for r in results:
        met = r.ratio >= TARGET_RATIO
        ok &= met
        print(
            f"target engine/vanilla >= {TARGET_RATIO}x, {r.step.name}: {r.ratio:.2f}x -> {'MET' if met else 'MISSED'}"
        )
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    ap.add_argument("--scale", type=int, help="pgbench scale (default 10, --quick 2)")
    ap.add_argument("--clients", type=int, default=4, help="pgbench clients")
    ap.add_argument("--duration", type=int, help="pgbench run seconds (default 15, --quick 3)")
    ap.add_argument("--insert-mb", type=int, help="approximate WAL of the bulk INSERT (default 200, --quick 30)")
    ap.add_argument("--checkpoint-distance", type=int, default=0, help="tenant override in MiB (0: default config)")
    ap.add_argument("--port", type=int, default=55441)
    ap.add_argument("--profile", action="store_true", help="run the measured ingest under cProfile")
    ap.add_argument("--profile-top", type=int, default=15)
    args = ap.parse_args()
    args.scale = args.scale or (2 if args.quick else 10)
    args.duration = args.duration or (3 if args.quick else 15)
    args.insert_mb = args.insert_mb or (30 if args.quick else 200)
    quiet_logging()

    t_start = time.perf_counter()
    scratch = Scratch("neon-bench-ingest-")
    pg: VanillaPostgres | None = None
    try:
        pg = VanillaPostgres(scratch.root / "pg", port=args.port).init()
        pg.configure(
            [
                "wal_keep_size = '4GB'",
                "max_wal_size = '4GB'",
                "autovacuum = off",
                "checkpoint_timeout = '1h'",  # no timed checkpoint inside a step
            ]
        )
        pgdata = pg.copy_datadir(scratch.root / "initdb-copy")
        pg.start()
        try:
            steps = run_workload(pg, args)
        finally:
            pg.stop()
        for s in steps:
            print(f"vanilla {s.name}: {s.wal_bytes / MB:.1f} MB of WAL in {s.seconds:.2f} s ({s.start}..{s.end})")
        results = asyncio.run(ingest(args, scratch, pg, pgdata, steps))
        ok = report(args, results)
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        if pg is not None:
            pg.cleanup()
        scratch.cleanup()
    print(f"\ntotal {time.perf_counter() - t_start:.1f} s{'' if ok else ' (target missed)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
