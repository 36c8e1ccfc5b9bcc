"""Full basebackups against a stock PG15: a timeline built from a real cluster's WAL is written as
a tar, untarred with GNU tar as the Postgres user, and started. It must start without recovery,
answer queries exactly as the original cluster's snapshot does, pass pg_amcheck, and continue the
WAL right after the synthesized checkpoint. Snapshot A (mid-workload, with a prepared transaction)
is served from the same timeline. Bad requests fail before any byte is written."""

from __future__ import annotations

import io
import itertools
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from neon.pageserver.basebackup import BasebackupError, BasebackupInfo, BasebackupLsnError, write_basebackup
from neon.pageserver.timeline import Timeline
from neon.postgres.checkpoint import CheckPoint
from neon.postgres.controlfile import ControlFileData
from neon.postgres.walfiles import read_wal_files
from neon.utils.id import TimelineId
from neon.utils.lsn import Lsn
from neon.walredo.launcher import PostgresRedoLauncher, scratch_parent
from neon.walredo.manager import WalRedoManager
from tests.fixtures.vanilla import VanillaPostgres, make_test_root
from tests.storage_oracle import Snapshot, WorkloadRun
from tests.test_storage_core_pg import Env

pytestmark = pytest.mark.asyncio(loop_scope="module")

# The workload's settings that matter for starting on its data (it prepares transactions).
COMPUTE_CONFIG = ["max_prepared_transactions = 5", "autovacuum = off", "wal_keep_size = '1GB'"]
RECOVERY_SIGNS = ("database system was interrupted", "redo starts", "was not properly shut down", "automatic recovery")


@dataclass
class Built:
    env: Env
    main: Timeline
    """The timeline with the workload's whole WAL ingested (last_record_lsn = snap_b.lsn)."""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def built(storage_workload: WorkloadRun) -> AsyncIterator[Built]:
    """One timeline for the module: initdb imported, then all of the workload's WAL ingested."""
    scratch = Path(tempfile.mkdtemp(dir=scratch_parent())) if os.access("/dev/shm", os.W_OK) else None
    root = make_test_root(prefix="neon-basebackup-")
    (scratch or root).chmod(0o755)
    mgr = WalRedoManager("0123456789abcdef0123456789abcdef", PostgresRedoLauncher((scratch or root) / "walredo"))
    env = Env(root, storage_workload, mgr)
    try:
        env.create_tenant()
        main = await env.import_initdb()
        assert await env.ingest(main) == storage_workload.snap_b.lsn
        yield Built(env, main)
    finally:
        if env.tenant is not None:
            await env.tenant.shutdown(flush=False)
        await mgr.shutdown()
        shutil.rmtree(root, ignore_errors=True)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


# --- helpers ------------------------------------------------------------------------------------
async def backup_to_file(tl: Timeline, path: Path, **kwargs: Any) -> BasebackupInfo:
    with open(path, "wb") as f:
        info = await write_basebackup(tl, f, **kwargs)
    path.chmod(0o644)  # GNU tar reads it as the Postgres user
    assert info.bytes == path.stat().st_size
    return info


def compute_from_tar(workdir: Path, tar_path: Path) -> VanillaPostgres:
    """A stock PG15 on a fresh data directory (0700, the Postgres user's) untarred from `tar_path`."""
    pg = VanillaPostgres(workdir)
    pg.user.make_dir(pg.datadir, 0o700)
    pg.user.run(["tar", "-xf", tar_path, "-C", pg.datadir])
    configure(pg)
    return pg


def reference_from_snapshot(workdir: Path, snap: Snapshot) -> VanillaPostgres:
    """A stock PG15 on a copy of the original cluster's snapshot."""
    pg = VanillaPostgres(workdir)
    shutil.copytree(snap.datadir, pg.datadir, symlinks=True)
    for dirpath, _dirs, files in os.walk(pg.datadir):
        pg.user.own(dirpath)
        for name in files:
            pg.user.own(os.path.join(dirpath, name))
    pg.datadir.chmod(0o700)
    configure(pg)
    return pg


def configure(pg: VanillaPostgres) -> None:
    pg.configure(
        [
            "listen_addresses = ''",
            f"unix_socket_directories = '{pg.sockdir}'",
            f"port = {pg.port}",
            "fsync = off",
            *COMPUTE_CONFIG,
        ]
    )


def controldata(pg: VanillaPostgres) -> dict[str, str]:
    out = pg.user.run([pg.pg_bin("pg_controldata"), "-D", pg.datadir], env={**os.environ, "LC_ALL": "C"}).stdout
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v}


def observe(pg: VanillaPostgres) -> dict[str, Any]:
    """What the data looks like through SQL: databases, and per database every permanent user
    table's row count and content hash, plus catalog sizes."""
    seen: dict[str, Any] = {}
    dbs = [r[0] for r in pg.safe_psql("SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1")]
    seen["databases"] = [r[0] for r in pg.safe_psql("SELECT datname FROM pg_database ORDER BY 1")]
    for db in dbs:
        tables = pg.safe_psql(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relkind = 'r' AND c.relpersistence = 'p'"
            " AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') ORDER BY 1",
            dbname=db,
        )
        for (t,) in tables:
            seen[f"{db}:{t}"] = pg.safe_psql(
                f"SELECT count(*), md5(coalesce(string_agg(x::text, ',' ORDER BY x::text), '')) FROM {t} x", dbname=db
            )[0]
        for cat in ("pg_class", "pg_attribute", "pg_proc", "pg_type", "pg_index", "pg_depend"):
            seen[f"{db}:{cat}"] = pg.safe_psql(f"SELECT count(*) FROM {cat}", dbname=db)[0][0]
    if "postgres" in dbs:
        seen["pgbench"] = pg.safe_psql("SELECT count(*), sum(abalance) FROM pgbench_accounts")[0]
        seen["prepared"] = pg.safe_psql("SELECT gid FROM pg_prepared_xacts ORDER BY 1")
    return seen


def assert_started_without_recovery(pg: VanillaPostgres) -> None:
    log = pg.logfile.read_text()
    assert "database system was shut down at" in log, log
    for sign in RECOVERY_SIGNS:
        assert sign not in log, log


def first_records(pg: VanillaPostgres, start: int, n: int) -> list[tuple[int, int, int]]:
    """(start, end, xl_prev) of the first `n` records from `start` in the (stopped) server's pg_wal."""
    recs = itertools.islice(read_wal_files(pg.wal_segments(), start_lsn=start), n)
    return [(s, e, int.from_bytes(raw[8:16], "little")) for s, e, raw in recs]


def tar_members(data: bytes) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
        for m in tf:
            f = tf.extractfile(m)
            out[m.name] = f.read() if f is not None else None
    return out


# --- tests --------------------------------------------------------------------------------------
async def test_full_backup_at_b_starts_without_recovery_and_continues_the_wal(built: Built) -> None:
    env, tl = built.env, built.main
    snap = env.run.snap_b
    tar_path = env.root / "b.tar"
    info = await backup_to_file(tl, tar_path)
    assert (info.lsn, info.prev_lsn) == (snap.lsn, tl.prev_record_lsn) and info.prev_lsn
    assert info.checkpoint_lsn == info.lsn  # not a page boundary here
    assert info.end_lsn >= info.lsn + 120
    assert info.files > 1000

    compute = compute_from_tar(env.root / "compute-b", tar_path)
    ref = reference_from_snapshot(env.root / "ref-b", snap)
    try:
        cd = controldata(compute)
        assert cd["Database cluster state"] == "shut down"
        assert Lsn.parse(cd["Latest checkpoint location"]) == info.checkpoint_lsn
        assert Lsn.parse(cd["Latest checkpoint's REDO location"]) == info.checkpoint_lsn
        compute.start()
        assert_started_without_recovery(compute)
        ref.start()
        expected = observe(ref)
        ref.stop()
        got = observe(compute)
        assert got == expected
        assert "db_keep_wal_log" in got["databases"] and got["pgbench"][0] == 100000
        compute.run_client("pg_amcheck", ["--all", "--install-missing", "--heapallindexed"])

        # The compute writes on, right after the synthesized checkpoint.
        compute.safe_psql("CREATE TABLE after_bb (i int); INSERT INTO after_bb SELECT generate_series(1, 1000)")
        assert Lsn.parse(compute.safe_psql("SELECT pg_current_wal_lsn()::text")[0][0]) > info.end_lsn
        compute.stop()
        (cp_start, cp_end, cp_prev), (first, _, first_prev) = first_records(compute, info.checkpoint_lsn, 2)
        assert (cp_start, cp_end, cp_prev) == (info.checkpoint_lsn, info.end_lsn, info.prev_lsn)
        assert (first, first_prev) == (info.end_lsn, info.lsn)
        compute.start()
        assert compute.safe_psql("SELECT count(*) FROM after_bb") == [(1000,)]
    finally:
        compute.cleanup()
        ref.cleanup()


async def test_backup_at_snapshot_a_shows_snapshot_a(built: Built) -> None:
    env, tl = built.env, built.main
    snap = env.run.snap_a
    assert tl.last_record_lsn > snap.lsn
    # Its prev record is the clean stop's shutdown checkpoint, which snapshot A's pg_control names.
    prev = ControlFileData.read(snap.datadir / "global" / "pg_control").checkpoint
    tar_path = env.root / "a.tar.gz"
    info = await backup_to_file(tl, tar_path, lsn=snap.lsn, prev_lsn=prev, gzip=True)
    assert (info.lsn, info.prev_lsn) == (snap.lsn, prev)
    with tarfile.open(tar_path, "r:gz") as tf:
        signal = tf.extractfile("zenith.signal")
        assert signal is not None and signal.read() == f"PREV LSN: {Lsn(prev)}".encode()

    compute = compute_from_tar(env.root / "compute-a", tar_path)
    ref = reference_from_snapshot(env.root / "ref-a", snap)
    try:
        compute.start()
        assert_started_without_recovery(compute)
        ref.start()
        expected = observe(ref)
        ref.stop()
        got = observe(compute)
        assert got == expected
        assert got["prepared"] == [("left_open",)]
        assert "db_keep_wal_log" not in got["databases"]  # created after A
        # The two-phase state file is usable: the prepared insert commits.
        compute.safe_psql("COMMIT PREPARED 'left_open'")
        assert compute.safe_psql("SELECT payload FROM big WHERE id = -4") == [("left open",)]
        compute.stop()
        (cp_start, _, cp_prev), (first, _, first_prev) = first_records(compute, info.checkpoint_lsn, 2)
        assert (cp_start, cp_prev, first, first_prev) == (info.checkpoint_lsn, prev, info.end_lsn, info.lsn)
    finally:
        compute.cleanup()
        ref.cleanup()


async def test_non_full_backup_to_a_stream_writer(built: Built) -> None:
    """Neon's basebackup (init forks only), through a drain()-style sink, without a known prev."""
    tl = built.main
    snap = built.env.run.snap_a

    class Writer:
        def __init__(self) -> None:
            self.buf = bytearray()
            self.drains = 0

        def write(self, data: bytes) -> None:
            self.buf += data

        async def drain(self) -> None:
            self.drains += 1

    w = Writer()
    info = await write_basebackup(tl, w, lsn=snap.lsn, full=False)
    assert info.prev_lsn == 0 and info.bytes == len(w.buf) and w.drains >= 1
    members = tar_members(bytes(w.buf))
    assert members["zenith.signal"] == b"PREV LSN: invalid"
    assert members["PG_VERSION"] == members["base/5/PG_VERSION"] == b"15\n"
    assert len(members["global/pg_filenode.map"] or b"") == 512
    assert members["pg_hba.conf"] and members["postgresql.conf"] == b""
    assert len(members["global/pg_control"] or b"") == 8192
    wal = [n for n in members if n.startswith("pg_wal/0")]
    assert len(wal) == 1 and len(members[wal[0]] or b"") == 16 * 1024 * 1024
    assert [n for n in members if n.startswith("pg_twophase/")]
    # Relation files only of unlogged relations: the init fork and its copy as the main fork.
    rel_files = [
        n
        for n, data in members.items()
        if data is not None and re.fullmatch(r"(global|base/\d+)/\d+(_\w+)?(\.\d+)?", n)
    ]
    assert all(n.endswith("_init") or f"{n}_init" in members for n in rel_files), rel_files
    cf = ControlFileData.decode(members["global/pg_control"] or b"")
    assert cf.checkpoint == info.checkpoint_lsn and cf.checkpoint_copy.redo == info.checkpoint_lsn


async def test_bad_requests_fail_before_writing(built: Built, monkeypatch: pytest.MonkeyPatch) -> None:
    env, tl = built.env, built.main
    end = tl.last_record_lsn

    async def fails(match: str, timeline: Timeline = tl, **kwargs: Any) -> None:
        out = io.BytesIO()
        with pytest.raises(BasebackupLsnError, match=match):
            await write_basebackup(timeline, out, **kwargs)
        assert out.getvalue() == b""

    await fails("beyond the end of the timeline's WAL", lsn=end + 8)
    await fails("Timed out", lsn=end + 8, wait_timeout=0.05)
    await fails("not a multiple of 8", lsn=env.run.snap_b.lsn - 4)
    await fails("less than latest GC cutoff", lsn=tl.initdb_lsn - 8)
    await fails("invalid prev lsn", prev_lsn=tl.prev_record_lsn - 8)
    branch = await env.tenant.branch_timeline(TimelineId.generate(), tl.timeline_id, env.run.snap_a.lsn)  # type: ignore[union-attr]
    await fails("less than timeline ancestor lsn", timeline=branch, lsn=env.run.snap_a.lsn - 8)

    # A page that cannot be read half-way through: an error, and no end-of-archive marker.
    calls = 0
    real = tl.get_rel_page_at_lsn

    async def flaky(*args: Any, **kwargs: Any) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 500:
            raise RuntimeError("injected page read failure")
        return await real(*args, **kwargs)

    monkeypatch.setattr(tl, "get_rel_page_at_lsn", flaky)
    out = io.BytesIO()
    with pytest.raises(RuntimeError, match="injected"):
        await write_basebackup(tl, out)
    assert calls >= 500
    assert b"global/pg_control" not in out.getvalue()  # written last: nothing startable came out
    assert issubclass(BasebackupLsnError, BasebackupError)


async def test_counters_pointing_into_missing_slru_pages_are_moved_back(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ingest rounds nextXid up to a multiple of 1024, possibly into a CLOG page nobody created yet;
    stock PG15 refuses to start on that ("could not access status of transaction"). The backup
    moves such counters back to the page start, and the compute creates the page itself."""
    env, tl = built.env, built.main
    stored = CheckPoint.unpack(tl.get_checkpoint(tl.last_record_lsn))
    page_xids, page_multis, page_members = 32768, 2048, 1636
    assert stored.next_xid < 2 * page_xids and stored.next_multi < 2 * page_multis
    assert stored.next_multi_offset < 4 * page_members
    # Pages 2 (CLOG, offsets) and 5 (members) do not exist at B.
    ahead = stored.replace(
        next_xid=2 * page_xids + 1024, next_multi=2 * page_multis + 7, next_multi_offset=5 * page_members + 40
    )
    monkeypatch.setattr(tl, "get_checkpoint", lambda lsn: ahead.pack())
    tar_path = env.root / "ahead.tar"
    await backup_to_file(tl, tar_path)
    compute = compute_from_tar(env.root / "compute-ahead", tar_path)
    try:
        cd = controldata(compute)
        assert cd["Latest checkpoint's NextXID"] == f"0:{2 * page_xids}"
        assert cd["Latest checkpoint's NextMultiXactId"] == str(2 * page_multis)
        assert cd["Latest checkpoint's NextMultiOffset"] == str(5 * page_members)
        compute.start()
        assert_started_without_recovery(compute)
        assert compute.safe_psql("SELECT txid_current()") == [(2 * page_xids,)]
        # A multixact: two sessions share-lock the same row.
        compute.safe_psql("CREATE TABLE mx_ahead (id int); INSERT INTO mx_ahead VALUES (1)")
        with compute.connect(autocommit=False) as c1, compute.connect(autocommit=False) as c2:
            c1.execute("SELECT * FROM mx_ahead FOR SHARE")
            c2.execute("SELECT * FROM mx_ahead FOR SHARE")
            c1.commit()
            c2.commit()
        compute.safe_psql("CHECKPOINT")
        assert compute.safe_psql("SELECT next_multixact_id::text::int FROM pg_control_checkpoint()")[0][0] > (
            2 * page_multis
        )
        compute.run_client("pg_amcheck", ["-d", "postgres", "--install-missing", "-t", "mx_ahead"])
    finally:
        compute.cleanup()
