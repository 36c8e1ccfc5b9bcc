"""WAL decoding throughput: our decoder vs `pg_waldump --stats` on the same pgbench WAL.

Generates at least --min-mb of WAL with pgbench on a stock PG15 (run as the unprivileged user),
then decodes it (stream reassembly + CRC + record structure) and prints MB/s and the ratio to
pg_waldump measured in the same run.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neon.postgres.errors import WalDecodeError
from neon.postgres.walfiles import read_wal_files
from neon.postgres.walrecord import decode_record
from neon.utils.lsn import Lsn
from tests.fixtures.vanilla import VanillaPostgres, make_test_root


def generate_wal(pg: VanillaPostgres, min_mb: int) -> tuple[list[Path], int, int]:
    pg.configure(["wal_keep_size = '8GB'", "max_wal_size = '8GB'", "autovacuum = off"])
    pg.start()
    try:
        start = Lsn(pg.current_wal_lsn())
        # Half bulk load (large multi-insert records), half TPC-B transactions (small records).
        scale = max(1, min_mb // 30)
        pg.pgbench(["-i", "-s", str(scale), "-q"])
        pg.safe_psql("CHECKPOINT")
        while Lsn(pg.current_wal_lsn()) - start < min_mb << 20:
            pg.pgbench(["-c", "4", "-j", "2", "-t", "2000", "-n"])
        end = Lsn(pg.current_wal_lsn())
    finally:
        pg.stop()
    return pg.wal_segments(), start, end


def time_ours(files: list[Path]) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    n = 0
    nbytes = 0
    try:
        for start, _end, rec in read_wal_files(files):
            decode_record(rec, start)
            n += 1
            nbytes += len(rec)
    except WalDecodeError:
        pass  # the end of WAL
    return time.perf_counter() - t0, n, nbytes


def time_pg_waldump(pg: VanillaPostgres, files: list[Path]) -> tuple[float, int]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(pg.pg_bin("pg_waldump")), "--stats", str(files[0]), str(files[-1])],
        capture_output=True,
        text=True,
        check=False,
    )
    secs = time.perf_counter() - t0
    total = [line for line in proc.stdout.splitlines() if line.startswith("Total")]
    nrec = int(total[0].split()[1]) if total else -1
    return secs, nrec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--min-mb", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    root = make_test_root(prefix="neon-bench-waldecode-")
    try:
        pg = VanillaPostgres(root / "pg").init()
        files, start, end = generate_wal(pg, args.min_mb)
        mb = (end - start) / 2**20
        ours = min(time_ours(files) for _ in range(args.repeat))
        theirs, their_nrec = min(time_pg_waldump(pg, files) for _ in range(args.repeat))
        secs, nrec, _ = ours
        if their_nrec != nrec:
            raise SystemExit(f"record counts differ: ours {nrec}, pg_waldump {their_nrec}")
        print(f"WAL: {mb:.1f} MB, {nrec} records in {len(files)} segments")
        print(f"ours:       {mb / secs:8.1f} MB/s  ({secs:.2f} s, {nrec / secs / 1000:.0f}k records/s)")
        print(f"pg_waldump: {mb / theirs:8.1f} MB/s  ({theirs:.2f} s, --stats)")
        print(f"ratio ours/pg_waldump: {theirs / secs:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
