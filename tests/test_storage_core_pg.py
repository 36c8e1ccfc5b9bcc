"""The storage core against a real PG15 cluster: ingest its WAL, then every page, size, listing,
SLRU page, relmap and twophase file must equal the stopped cluster's files (snapshot A in the
middle of the workload, snapshot B at its end), with default settings and with layers flushed,
compacted and imaged mid-ingest; a branch at A must answer as A; a restart must change nothing;
and corruption must be reported, never served."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from neon.pageserver.import_datadir import WalImporter
from neon.pageserver.key import RelTag
from neon.pageserver.layers import LayerCorruptionError
from neon.pageserver.metadata import MetadataError
from neon.pageserver.page_cache import MaterializedPageCache
from neon.pageserver.tenant import BranchLsnError, Tenant
from neon.pageserver.tenant_config import TenantConfOverrides
from neon.pageserver.timeline import Timeline
from neon.postgres.errors import WalDecodeError
from neon.postgres.walfiles import read_wal_files
from neon.postgres.walrecord import decode_record
from neon.utils.id import TenantId, TimelineId
from neon.utils.lsn import Lsn
from neon.walredo.launcher import PostgresRedoLauncher, scratch_parent
from neon.walredo.manager import WalRedoManager
from tests.fixtures.vanilla import make_test_root
from tests.storage_oracle import DatadirReader, Snapshot, WorkloadRun, compare_with_datadir, run_storage_workload

TINY = TenantConfOverrides(checkpoint_distance=256 * 1024)


@dataclass
class Env:
    root: Path
    run: WorkloadRun
    mgr: WalRedoManager
    tenant: Tenant | None = None

    def create_tenant(self, overrides: TenantConfOverrides | None = None) -> Tenant:
        self.tenant = Tenant.create(
            self.root / "tenants",
            TenantId.generate(),
            walredo=self.mgr,
            page_cache=MaterializedPageCache(),
            scratch_dir=self.root,
            overrides=overrides,
        )
        return self.tenant

    def reload_tenant(self) -> Tenant:
        assert self.tenant is not None
        self.tenant = Tenant.load(self.tenant.path, walredo=self.mgr, page_cache=MaterializedPageCache())
        return self.tenant

    async def import_initdb(self) -> Timeline:
        assert self.tenant is not None
        return await self.tenant.import_timeline(TimelineId.generate(), self.run.initdb_copy)

    async def ingest(self, tl: Timeline, stop_after: int | None = None) -> int:
        importer = WalImporter(tl)
        return await importer.ingest_files(self.run.wal_files, start_lsn=tl.last_record_lsn, stop_after=stop_after)

    async def mismatches(self, tl: Timeline, snap: Snapshot, lsn: int | None = None) -> list[str]:
        # Under contention Postgres extends a relation by several pages at once and writes them as
        # zeros without WAL; nothing replaying the WAL can see them, and reading past a relation's
        # end gives the same zero page. Any other difference in size is still reported.
        return await compare_with_datadir(
            tl,
            snap.lsn if lsn is None else lsn,
            DatadirReader(snap.datadir),
            self.run.rmids,
            self.mgr.mask,
            allow_trailing_zero_pages=True,
        )


@pytest.fixture
async def env(storage_workload: WorkloadRun) -> AsyncIterator[Env]:
    scratch = Path(tempfile.mkdtemp(dir=scratch_parent())) if os.access("/dev/shm", os.W_OK) else None
    root = make_test_root(prefix="neon-storage-core-")
    redo_base = scratch or root
    redo_base.chmod(0o755)
    mgr = WalRedoManager("0123456789abcdef0123456789abcdef", PostgresRedoLauncher(redo_base / "walredo"), timeout=30)
    e = Env(root, storage_workload, mgr)
    yield e
    if e.tenant is not None:
        await e.tenant.shutdown(flush=False)
    await mgr.shutdown()
    shutil.rmtree(root, ignore_errors=True)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)


async def test_oracle_with_default_settings(env: Env) -> None:
    tenant = env.create_tenant()
    tl = await env.import_initdb()
    assert tl.last_record_lsn > tl.initdb_lsn == tl.prev_record_lsn  # the shutdown checkpoint record
    end = await env.ingest(tl)
    assert end == env.run.snap_b.lsn
    assert await env.mismatches(tl, env.run.snap_a) == []
    assert await env.mismatches(tl, env.run.snap_b) == []
    assert tl.layers.open_layer is not None and not tl.layers.frozen_layers  # all of it in memory so far
    # Flushed to an L0 delta and fully imaged: the same answers from layer files.
    await tl.freeze_and_flush()
    from neon.pageserver.compaction import compact

    result = await compact(tl, force_image_layers=True)
    assert result.image_layers
    assert await env.mismatches(tl, env.run.snap_b) == []
    assert tenant.compaction_errors == 0


async def test_oracle_with_layers_flushed_compacted_and_imaged_mid_ingest(env: Env) -> None:
    tenant = env.create_tenant(TINY)
    flushes: list[Lsn] = []
    tenant.on_timeline_flush = lambda tl: flushes.append(tl.disk_consistent_lsn)
    tl = await env.import_initdb()
    await env.ingest(tl)
    await tl.freeze_and_flush()
    await tenant.wait_for_background_work()
    assert tenant.compaction_errors == 0 and tl.layer_flush_errors == 0
    assert len(flushes) >= 24, f"only {len(flushes)} L0 flushes"
    layers = tl.layers
    l1 = [d for d in layers.deltas if not d.is_l0]
    assert l1, "no L0 -> L1 compaction happened"
    assert len(layers.l0_deltas()) < tenant.conf().compaction_threshold + 2
    mid_ingest_images = [i for i in layers.images if i.lsn_start < env.run.snap_b.lsn - 1024 * 1024]
    assert mid_ingest_images, f"no image layer created before the end of ingest: {[str(i) for i in layers.images]}"
    assert await env.mismatches(tl, env.run.snap_a) == []
    assert await env.mismatches(tl, env.run.snap_b) == []
    # Every file in the directory is a layer the map knows, or the metadata.
    on_disk = {p.name for p in tl.path.iterdir()} - {"metadata"}
    assert on_disk == {str(h) for h in layers.historic}


async def test_branch_at_snapshot_a_answers_as_snapshot_a(env: Env) -> None:
    tenant = env.create_tenant(TINY)
    main = await env.import_initdb()
    with pytest.raises(BranchLsnError, match="GC cutoff"):
        await tenant.branch_timeline(TimelineId.generate(), main.timeline_id, main.initdb_lsn - 8)
    # One branch created while main stands exactly at A (inherits prev_record_lsn) ...
    await env.ingest(main, stop_after=env.run.snap_a.lsn - 1)
    assert main.last_record_lsn == env.run.snap_a.lsn
    at_tip = await tenant.branch_timeline(TimelineId.generate(), main.timeline_id)
    assert at_tip.prev_record_lsn == main.prev_record_lsn != 0
    # ... and one created at A after main has moved on to B.
    await env.ingest(main)
    behind = await tenant.branch_timeline(TimelineId.generate(), main.timeline_id, env.run.snap_a.lsn)
    assert behind.ancestor_lsn == env.run.snap_a.lsn and behind.prev_record_lsn == 0
    assert not any(behind.path.glob("0*")), "a branch must not copy layers"
    for tl in (at_tip, behind):
        assert tl.last_record_lsn == env.run.snap_a.lsn
        assert await env.mismatches(tl, env.run.snap_a) == []
    assert await env.mismatches(main, env.run.snap_a) == []
    assert await env.mismatches(main, env.run.snap_b) == []
    # GetPage at A on main equals the branch, for every block of every relation.
    a = env.run.snap_a.lsn
    for spc, db in main.list_dbdirs(a):
        for tag in main.list_rels(spc, db, a):
            assert main.get_rel_size(tag, a) == behind.get_rel_size(tag, a)
            for blk in range(main.get_rel_size(tag, a)):
                assert await main.get_rel_page_at_lsn(tag, blk, a) == await behind.get_rel_page_at_lsn(tag, blk, a)
    # The branch survives a restart with its ancestor link.
    await tenant.shutdown()
    reloaded = env.reload_tenant().get_timeline(behind.timeline_id)
    assert reloaded.ancestor is not None and reloaded.ancestor.timeline_id == main.timeline_id
    assert await env.mismatches(reloaded, env.run.snap_a) == []


async def test_restart_keeps_answers_and_resumes_ingest(env: Env) -> None:
    tenant = env.create_tenant(TINY)
    tl = await env.import_initdb()
    timeline_id = tl.timeline_id
    await env.ingest(tl, stop_after=env.run.snap_a.lsn - 1)
    await tl.freeze_and_flush()
    # Ingest further, then "crash": what is only in memory is lost.
    mid = env.run.snap_a.lsn + (env.run.snap_b.lsn - env.run.snap_a.lsn) // 2
    await env.ingest(tl, stop_after=mid)
    before_crash = tl.last_record_lsn
    await tenant.shutdown(flush=False)
    tl = env.reload_tenant().get_timeline(timeline_id)
    assert env.run.snap_a.lsn <= tl.disk_consistent_lsn == tl.last_record_lsn <= before_crash
    assert await env.mismatches(tl, env.run.snap_a) == []
    # Resume from disk_consistent_lsn: nothing lost, nothing applied twice.
    assert await env.ingest(tl) == env.run.snap_b.lsn
    assert await env.mismatches(tl, env.run.snap_b) == []
    prev = tl.prev_record_lsn
    # A clean restart at the end: the same LSNs and answers.
    await env.tenant.shutdown()  # type: ignore[union-attr]
    tl = env.reload_tenant().get_timeline(timeline_id)
    assert (tl.last_record_lsn, tl.prev_record_lsn) == (env.run.snap_b.lsn, prev)
    assert await env.mismatches(tl, env.run.snap_b) == []
    assert await env.ingest(tl) == env.run.snap_b.lsn  # nothing more to ingest


async def test_corrupt_layer_is_an_error_naming_the_file(env: Env) -> None:
    tenant = env.create_tenant()
    tl = await env.import_initdb()
    await env.ingest(tl, stop_after=env.run.snap_a.lsn - 1)
    await tl.freeze_and_flush()
    layer = max(tl.layers.deltas, key=lambda d: d.file_size)
    size = layer.path.stat().st_size
    await tenant.shutdown()
    with open(layer.path, "r+b") as f:  # one byte in the middle of the values
        f.seek(size // 2)
        b = f.read(1)
        f.seek(size // 2)
        f.write(bytes([b[0] ^ 0x40]))
    tl = env.reload_tenant().get_timeline(tl.timeline_id)
    problems = await env.mismatches(tl, env.run.snap_a)
    assert problems, "a flipped byte went unnoticed"
    assert all(p.startswith("error:") for p in problems), problems[:5]
    assert all(layer.path.name in p and "LayerCorruptionError" in p for p in problems), problems[:5]
    with pytest.raises(LayerCorruptionError, match=layer.path.name):
        for spc, db in tl.list_dbdirs(tl.last_record_lsn):
            for tag in tl.list_rels(spc, db, tl.last_record_lsn):
                for blk in range(tl.get_rel_size(tag, tl.last_record_lsn)):
                    await tl.get_rel_page_at_lsn(RelTag(*tag), blk, tl.last_record_lsn)


async def test_truncated_metadata_is_a_clear_error_at_load(env: Env) -> None:
    tenant = env.create_tenant()
    tl = await env.import_initdb()
    await tenant.shutdown()
    md = tl.path / "metadata"
    md.write_bytes(md.read_bytes()[:100])
    with pytest.raises(MetadataError, match=rf"{md}.*truncated"):
        env.reload_tenant()


async def test_fast_lane_stores_exactly_what_the_python_path_stores(env: Env) -> None:
    from neon.pageserver import walingest

    if walingest._ingest_simple is None:
        pytest.skip("the ingest fast lane (neon._ingestfast) is not built")
    results = []
    for fast in (walingest._ingest_simple, None):
        tenant = Tenant.create(
            env.root / f"tenants-{fast is None}",
            TenantId.generate(),
            walredo=env.mgr,
            page_cache=MaterializedPageCache(),
            scratch_dir=env.root,
        )
        tl = await tenant.import_timeline(TimelineId.generate(), env.run.initdb_copy)
        importer = WalImporter(tl)
        used = 0

        def counting(*args: object, _fast=fast) -> tuple:  # type: ignore[no-untyped-def]
            nonlocal used
            out = _fast(*args)  # type: ignore[misc]
            used += out[0]
            return out

        importer.ingest.fast_lane = counting if fast is not None else None
        await importer.ingest_files(env.run.wal_files, start_lsn=tl.last_record_lsn)
        layer = tl.layers.open_layer
        assert layer is not None
        results.append(
            (layer.iter_sorted(), layer.size, layer.entry_count, tl.last_record_lsn, tl.prev_record_lsn, used)
        )
        await tenant.shutdown(flush=False)
    (fast_entries, *fast_rest, fast_used), (slow_entries, *slow_rest, _) = results
    assert fast_used > 50_000, "the fast lane took almost no records"
    assert len(fast_entries) == len(slow_entries)
    assert fast_entries == slow_entries
    assert fast_rest == slow_rest


async def test_checkpoint_timeout_flushes_an_idle_timeline_and_logical_size_stays_exact(env: Env) -> None:
    tenant = env.create_tenant(TenantConfOverrides(checkpoint_timeout="1s"))
    tl = await env.import_initdb()
    assert await tl.logical_size_now() == tl.calculate_logical_size(tl.last_record_lsn)  # now maintained
    await env.ingest(tl, stop_after=env.run.snap_a.lsn - 1)
    assert await tl.logical_size_now() == tl.calculate_logical_size(env.run.snap_a.lsn)
    assert tl.disk_consistent_lsn < tl.last_record_lsn  # still only in memory
    flushed = asyncio.Event()
    tenant.on_timeline_flush = lambda _tl: flushed.set()
    tenant.start_background_loops()
    # No more WAL arrives: the timer freezes the layer once it is a second old.
    await asyncio.wait_for(flushed.wait(), timeout=30)
    assert tl.disk_consistent_lsn == tl.last_record_lsn == env.run.snap_a.lsn
    # As after a reload: the size is unknown, the first ask starts the calculation and answers
    # None, and WAL ingested while it runs is added to it.
    tl.logical_size = None
    assert tl.current_logical_size() is None
    ingest = asyncio.create_task(env.ingest(tl))
    await asyncio.sleep(0)  # the ingest task starts; the calculation yields between relations
    assert await tl.logical_size_now() > 0
    await ingest
    assert tl.current_logical_size() == tl.calculate_logical_size(env.run.snap_b.lsn)


@pytest.fixture(scope="module")
def compressed_fpi_workload() -> Iterator[WorkloadRun]:
    root = make_test_root(prefix="neon-storage-lz4-")
    try:
        yield run_storage_workload(root, extra_config=["wal_compression = lz4"])
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_oracle_with_compressed_full_page_images(env: Env, compressed_fpi_workload: WorkloadRun) -> None:
    # Compressed images are not extracted by ingest (spec §4.10): they stay Postgres records with
    # will_init, and the redo helper decompresses them.
    env.run = compressed_fpi_workload
    compressed_fpis = 0
    with contextlib.suppress(WalDecodeError):
        for start, _, raw in read_wal_files(env.run.wal_files):
            rec = decode_record(raw, start)
            if rec.rmid == 0 and rec.info == 0xB0:  # XLOG_FPI
                compressed_fpis += sum(1 for b in rec.blocks if b.image_compressed)
    assert compressed_fpis > 100
    env.create_tenant(TINY)
    tl = await env.import_initdb()
    await env.ingest(tl)
    assert await env.mismatches(tl, env.run.snap_a) == []
    assert await env.mismatches(tl, env.run.snap_b) == []


async def test_lsn_by_commit_timestamp(env: Env) -> None:
    from neon.postgres.records import xact as xact_rec

    env.create_tenant()
    tl = await env.import_initdb()
    await env.ingest(tl)
    commits: list[tuple[int, int]] = []  # (end LSN, commit timestamp)
    with contextlib.suppress(WalDecodeError):
        for start, end, raw in read_wal_files(env.run.wal_files):
            rec = decode_record(raw, start)
            # Only commits after the import: initdb's own WAL lies below the timeline's start.
            if rec.rmid == 1 and rec.info & 0x70 == xact_rec.XLOG_XACT_COMMIT and end > tl.initdb_lsn:
                commits.append((end, xact_rec.XactCommitAbort.unpack(rec.info, rec.main_data).xact_time))
    assert len(commits) > 100
    gc, last = tl.latest_gc_cutoff_lsn, tl.last_record_lsn
    end, ts = commits[len(commits) // 2]
    kind, lsn = await tl.find_lsn_for_timestamp(ts, gc, last)
    assert kind == "present"
    # The answer is where the first commit at or after `ts` is not yet visible, one step before it is.
    assert await tl.is_latest_commit_timestamp_ge_than(ts, lsn + 8, [False, False])
    assert not await tl.is_latest_commit_timestamp_ge_than(ts, lsn, [False, False])
    assert lsn + 8 <= end
    assert await tl.find_lsn_for_timestamp(max(t for _, t in commits) + 1, gc, last) == ("future", last)
    assert await tl.find_lsn_for_timestamp(0, gc, last) == ("past", gc)


async def test_gc_removes_superseded_layers_and_keeps_what_reads_need(env: Env) -> None:
    from neon.pageserver.gc import gc_iteration

    tenant = env.create_tenant(TenantConfOverrides(checkpoint_distance=256 * 1024, pitr_interval="0s"))
    main = await env.import_initdb()
    await env.ingest(main, stop_after=env.run.snap_a.lsn - 1)
    branch = await tenant.branch_timeline(TimelineId.generate(), main.timeline_id)
    await env.ingest(main)
    await main.freeze_and_flush()
    await tenant.wait_for_background_work()
    horizon = 1024 * 1024
    # While the branch exists, every layer that reaches down to its branch point stays.
    kept = await gc_iteration(tenant, main, gc_horizon=horizon)
    assert kept.layers_needed_by_branches > 0, kept
    cutoff = main.latest_gc_cutoff_lsn
    assert env.run.snap_a.lsn < cutoff <= main.disk_consistent_lsn - horizon
    assert await env.mismatches(branch, env.run.snap_a) == []
    with pytest.raises(BranchLsnError, match="GC cutoff"):
        await tenant.branch_timeline(TimelineId.generate(), main.timeline_id, cutoff - 8)
    # Without it, layers below the cutoff that newer image layers supersede go (GC acts only when
    # the cutoff moves, as in Neon: here a smaller horizon moves it).
    await tenant.delete_timeline(branch.timeline_id)
    before = {str(h) for h in main.layers.historic}
    horizon //= 2
    result = await gc_iteration(tenant, main, gc_horizon=horizon)
    assert result.layers_removed > 0 and result.layers_needed_by_branches == 0, result
    after = {str(h) for h in main.layers.historic}
    assert after < before and {p.name for p in main.path.iterdir()} - {"metadata"} == after
    assert await env.mismatches(main, env.run.snap_b) == []  # reads at or above the cutoff: as before
    assert (await gc_iteration(tenant, main, gc_horizon=horizon)).layers_removed == 0
    await tenant.shutdown()
    reloaded = env.reload_tenant().get_timeline(main.timeline_id)
    assert reloaded.latest_gc_cutoff_lsn == main.latest_gc_cutoff_lsn
    assert {str(h) for h in reloaded.layers.historic} == after
