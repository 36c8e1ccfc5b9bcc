"""A tenant (spec pageserver §1.1, §1.4-1.8): its timelines on disk, their creation, branching and removal.

A tenant directory holds the legacy `config` file and `timelines/<id>/` directories. This module
owns creating the directory, loading every timeline at start (ancestors first), bootstrapping a
timeline with `initdb` run as the unprivileged user, importing an existing data directory,
branching at an LSN without copying anything, deleting a timeline, and the tenant's effective
configuration. One WAL-redo manager serves all timelines of the tenant.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import structlog

from neon.broker.client import BrokerClient
from neon.postgres.pg_distrib import PgDistrib, PostgresUser, initdb
from neon.utils.crashsafe import durable_mkdir, durable_write, fsync_path
from neon.utils.failpoints import Failpoints
from neon.utils.id import TenantId, TimelineId
from neon.utils.lsn import Lsn
from neon.walredo.manager import WalRedoManager

from .broker_walreceiver import BrokerWalReceiver
from .compaction import CompactionCancelled, compact
from .connection_manager import WalReceiverConf
from .gc import gc_iteration
from .import_datadir import WalImporter, check_bootstrap_datadir, import_datadir, wal_segment_files
from .metadata import TimelineMetadata, load_metadata
from .page_cache import MaterializedPageCache
from .tenant_config import TenantConf, TenantConfOverrides, read_tenant_config, write_tenant_config
from .timeline import Timeline
from .walreceiver import WalReceiver, WalSource

UNINIT_MARK = "___uninit"
WAL_SOURCE_FILE = "wal_source"  # the timeline's WAL source connection string (until the broker picks one)
DELETE_MARK = "___delete"
TIMELINES_DIR = "timelines"

log = structlog.get_logger("tenant")


class TenantError(Exception):
    pass


class TimelineNotFound(TenantError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class TimelineExists(TenantError):
    pass


class BranchLsnError(TenantError):
    """The requested branch point cannot be used (below the GC cutoff or the ancestor's own start)."""


class Tenant:
    def __init__(
        self,
        tenant_id: TenantId,
        path: Path,
        *,
        walredo: WalRedoManager,
        page_cache: MaterializedPageCache,
        defaults: TenantConf | None = None,
        overrides: TenantConfOverrides | None = None,
        scratch_dir: Path | None = None,
        pg_distrib: PgDistrib | None = None,
        pg_user: PostgresUser | None = None,
        superuser: str = "cloud_admin",
        broker: BrokerClient | None = None,
        availability_zone: str | None = None,
        failpoints: Failpoints | None = None,
    ) -> None:
        self.tenant_id = tenant_id
        self.failpoints = failpoints if failpoints is not None else Failpoints()
        # Timelines without a fixed `wal_source` follow the safekeepers through this broker.
        self.broker = broker
        self.availability_zone = availability_zone
        self.superuser = superuser  # initdb's bootstrap superuser (initial_superuser_name)
        self.path = path
        self.walredo = walredo
        self.page_cache = page_cache
        self.defaults = defaults or TenantConf()
        self.overrides = overrides or TenantConfOverrides()
        self._conf = TenantConf.merged(self.defaults, self.overrides)
        self.scratch_dir = scratch_dir
        self.pg_distrib = pg_distrib
        self.pg_user = pg_user
        self.timelines: dict[TimelineId, Timeline] = {}
        self.log = log.bind(tenant_id=str(tenant_id))
        self.state = "Loading"
        self.gc_lock = asyncio.Lock()
        self.on_timeline_flush: Callable[[Timeline], None] | None = None
        self._compaction_tasks: dict[TimelineId, asyncio.Task[None]] = {}
        self.compaction_errors = 0
        self._loops: list[asyncio.Task[None]] = []
        self.broken_reason: str | None = None
        self.wal_receivers: dict[TimelineId, WalReceiver | BrokerWalReceiver] = {}

    # --- configuration ------------------------------------------------------------------------
    def conf(self) -> TenantConf:
        return self._conf

    def set_overrides(self, overrides: TenantConfOverrides) -> None:
        """Persist new per-tenant overrides (the legacy `config` file) and use them from now on."""
        write_tenant_config(self.path, overrides)
        self.overrides = overrides
        self._conf = TenantConf.merged(self.defaults, overrides)

    @property
    def timelines_path(self) -> Path:
        return self.path / TIMELINES_DIR

    # --- creation and loading -----------------------------------------------------------------
    @classmethod
    def create(cls, tenants_dir: Path, tenant_id: TenantId, **kwargs: object) -> Tenant:
        """Create the tenant directory (atomically: built under a temp name, then renamed)."""
        final = tenants_dir / str(tenant_id)
        if final.exists():
            raise TenantError(f"tenant {tenant_id} already exists")
        durable_mkdir(tenants_dir)
        tmp = tenants_dir / f"{tenant_id}.___temp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(mode=0o700)
        overrides = kwargs.get("overrides") or TenantConfOverrides()
        write_tenant_config(tmp, overrides)  # type: ignore[arg-type]
        (tmp / TIMELINES_DIR).mkdir(mode=0o700)
        fsync_path(tmp / TIMELINES_DIR)
        fsync_path(tmp)
        os.rename(tmp, final)
        fsync_path(tenants_dir)
        tenant = cls(tenant_id, final, **kwargs)  # type: ignore[arg-type]
        tenant.state = "Active"
        return tenant

    @classmethod
    def load(cls, path: Path, **kwargs: object) -> Tenant:
        """Open a tenant directory: its config, then every timeline (ancestors before branches)."""
        tenant_id = TenantId(path.name)
        kwargs.setdefault("overrides", read_tenant_config(path))
        tenant = cls(tenant_id, path, **kwargs)  # type: ignore[arg-type]
        tenant._load_timelines()
        tenant.state = "Active"
        return tenant

    def _load_timelines(self) -> None:
        tdir = self.timelines_path
        tdir.mkdir(mode=0o700, exist_ok=True)
        metadata: dict[TimelineId, TimelineMetadata] = {}
        # Markers first: they say which directories are not timelines (any more).
        entries = sorted(os.scandir(tdir), key=lambda e: (not e.name.endswith((UNINIT_MARK, DELETE_MARK)), e.name))
        for entry in entries:
            name = entry.name
            if not os.path.lexists(entry.path):
                continue  # removed by a marker above
            if name.endswith(UNINIT_MARK):
                # An interrupted creation: the timeline never existed.
                tl_dir = tdir / name[: -len(UNINIT_MARK)]
                shutil.rmtree(tl_dir, ignore_errors=True)
                os.unlink(entry.path)
                self.log.info("removed unfinished timeline", timeline_id=tl_dir.name)
                continue
            if name.endswith(DELETE_MARK):
                shutil.rmtree(tdir / name[: -len(DELETE_MARK)], ignore_errors=True)
                os.unlink(entry.path)
                continue
            if name.endswith(".___temp") and entry.is_dir():
                shutil.rmtree(entry.path, ignore_errors=True)
                continue
            if not entry.is_dir():
                continue
            try:
                timeline_id = TimelineId(name)
            except ValueError:
                self.log.warning("unexpected entry in timelines directory", name=name)
                continue
            metadata[timeline_id] = load_metadata(entry.path)
        pending = dict(metadata)
        while pending:
            progress = False
            for timeline_id, md in list(pending.items()):
                ancestor = None
                if md.ancestor_timeline is not None:
                    ancestor = self.timelines.get(md.ancestor_timeline)
                    if ancestor is None:
                        if md.ancestor_timeline not in metadata:
                            raise TenantError(
                                f"timeline {timeline_id} has ancestor {md.ancestor_timeline}, which does not exist"
                            )
                        continue
                tl = self._new_timeline(timeline_id, md, ancestor)
                tl.load_layers()
                tl.state = "Active"
                self.timelines[timeline_id] = tl
                del pending[timeline_id]
                progress = True
            if not progress:
                raise TenantError(f"timelines with an ancestor cycle: {sorted(map(str, pending))}")

    def _new_timeline(self, timeline_id: TimelineId, md: TimelineMetadata, ancestor: Timeline | None) -> Timeline:
        tl = Timeline(
            tenant_id=self.tenant_id,
            timeline_id=timeline_id,
            path=self.timelines_path / str(timeline_id),
            metadata=md,
            ancestor=ancestor,
            conf=self.conf,
            walredo=self.walredo,
            page_cache=self.page_cache,
            failpoints=self.failpoints,
        )
        tl.on_flush = self._after_flush
        return tl

    def _after_flush(self, tl: Timeline) -> None:
        if self.on_timeline_flush is not None:
            self.on_timeline_flush(tl)
        if len(tl.layers.l0_deltas()) >= self.conf().compaction_threshold:
            self.schedule_compaction(tl)

    def schedule_compaction(self, tl: Timeline) -> None:
        """Compact `tl` in the background unless a pass for it is already running."""
        task = self._compaction_tasks.get(tl.timeline_id)
        if task is not None and not task.done():
            return
        self._compaction_tasks[tl.timeline_id] = asyncio.get_running_loop().create_task(self._compact_in_background(tl))

    async def _compact_in_background(self, tl: Timeline) -> None:
        try:
            # Flushes that arrive during a pass do not start another: keep going while L0s pile up.
            while True:
                result = await compact(tl)
                if not result.l0_compacted or len(tl.layers.l0_deltas()) < self.conf().compaction_threshold:
                    break
        except CompactionCancelled:
            pass
        except Exception as e:
            self.compaction_errors += 1
            tl.log.error("compaction failed", error=str(e))

    async def compaction_iteration(self) -> None:
        """One pass over every active timeline (the body of the periodic compaction loop)."""
        for tl in list(self.timelines.values()):
            if tl.state == "Active":
                await compact(tl)

    # --- background loops ------------------------------------------------------------------------
    def start_background_loops(self) -> None:
        """The periodic work of an active tenant: compaction every `compaction_period`, and a
        once-a-second check that freezes open layers older than `checkpoint_timeout` even when no
        more WAL arrives (ingest checks it only as records come in)."""
        loop = asyncio.get_running_loop()
        if not self._loops:
            self._loops = [
                loop.create_task(self._compaction_loop()),
                loop.create_task(self._checkpoint_timer()),
                loop.create_task(self._gc_loop()),
            ]
            for tl in self.timelines.values():
                tl.start_logical_size_calculation()
                self._start_wal_receiver(tl)

    # --- WAL sources ---------------------------------------------------------------------------
    def wal_source(self, timeline_id: TimelineId) -> WalSource | None:
        """The stored WAL source of a timeline (None: no receiver runs for it)."""
        path = self.get_timeline(timeline_id).path / WAL_SOURCE_FILE
        try:
            return WalSource.parse(path.read_text().strip())
        except FileNotFoundError:
            return None

    async def set_wal_source(self, timeline_id: TimelineId, source: WalSource | None) -> None:
        """Stream the timeline's WAL from `source` from now on (and after restarts); None goes back
        to following the safekeepers through the broker (when there is one)."""
        tl = self.get_timeline(timeline_id)
        receiver = self.wal_receivers.pop(timeline_id, None)
        if receiver is not None:
            await receiver.stop()
        path = tl.path / WAL_SOURCE_FILE
        if source is None:
            path.unlink(missing_ok=True)
            fsync_path(tl.path)
        else:
            durable_write(path, (source.connstr() + "\n").encode())
        self._start_wal_receiver(tl, asked=True)

    def _start_wal_receiver(self, tl: Timeline, *, asked: bool = False) -> None:
        """A fixed `wal_source` if the timeline has one, else the broker's choice of safekeeper.

        Receivers start with the tenant's background loops, or when `set_wal_source` asks."""
        if tl.timeline_id in self.wal_receivers or not (self._loops or asked):
            return
        source = self.wal_source(tl.timeline_id)
        receiver: WalReceiver | BrokerWalReceiver
        if source is not None:
            receiver = WalReceiver(tl, source)
        elif self.broker is not None:
            conf = WalReceiverConf.from_tenant_conf(self.conf(), availability_zone=self.availability_zone)
            receiver = BrokerWalReceiver(tl, self.broker, conf, auth_token=os.environ.get("NEON_AUTH_TOKEN"))
        else:
            return
        self.wal_receivers[tl.timeline_id] = receiver
        receiver.start()

    async def _stop_wal_receivers(self) -> None:
        receivers, self.wal_receivers = self.wal_receivers, {}
        for receiver in receivers.values():
            await receiver.stop()

    async def _compaction_loop(self) -> None:
        while self.state != "Stopping":
            period = self.conf().compaction_period.total_seconds()
            if period <= 0:
                await asyncio.sleep(1)  # disabled: look at the config again later
                continue
            await asyncio.sleep(period)
            try:
                await self.compaction_iteration()
            except CompactionCancelled:
                return
            except Exception as e:
                self.compaction_errors += 1
                self.log.error("compaction iteration failed", error=str(e))

    async def _gc_loop(self) -> None:
        while self.state != "Stopping":
            conf = self.conf()
            period = conf.gc_period.total_seconds()
            if period <= 0 or conf.gc_horizon == 0:
                await asyncio.sleep(1)  # disabled: look at the config again later
                continue
            await asyncio.sleep(period)
            try:
                await gc_iteration(self)
            except Exception as e:
                self.log.error("gc iteration failed", error=str(e))

    async def _checkpoint_timer(self) -> None:
        while self.state != "Stopping":
            await asyncio.sleep(1)
            for tl in list(self.timelines.values()):
                if tl.state == "Active":
                    tl.check_checkpoint_distance()

    async def wait_for_background_work(self) -> None:
        """Until no flush or compaction is running (tests and shutdown use this)."""
        while True:
            tasks = [t for t in self._compaction_tasks.values() if not t.done()]
            tasks += [tl._flush_task for tl in self.timelines.values() if tl._flush_task is not None]
            if not tasks:
                return
            await asyncio.wait(tasks)

    def get_timeline(self, timeline_id: TimelineId) -> Timeline:
        tl = self.timelines.get(timeline_id)
        if tl is None:
            raise TimelineNotFound(f"timeline {self.tenant_id}/{timeline_id} not found")
        return tl

    # --- new timelines ------------------------------------------------------------------------
    def _begin_create(self, timeline_id: TimelineId, md: TimelineMetadata) -> Path:
        if timeline_id in self.timelines or (self.timelines_path / str(timeline_id)).exists():
            raise TimelineExists(f"timeline {timeline_id} already exists")
        mark = self.timelines_path / f"{timeline_id}{UNINIT_MARK}"
        mark.touch()
        fsync_path(self.timelines_path)
        tl_dir = self.timelines_path / str(timeline_id)
        tl_dir.mkdir(mode=0o700)
        from .metadata import save_metadata

        save_metadata(tl_dir, md)
        fsync_path(self.timelines_path)
        return mark

    def _finish_create(self, mark: Path) -> None:
        os.unlink(mark)
        fsync_path(self.timelines_path)

    async def import_timeline(
        self, timeline_id: TimelineId, pgdata: Path, *, pg_version: int = 15, bootstrap_wal: bool = True
    ) -> Timeline:
        """A new root timeline holding the cleanly stopped cluster at `pgdata` (Neon's bootstrap import)."""
        pgdata_lsn = Lsn(check_bootstrap_datadir(pgdata))
        md = TimelineMetadata(
            disk_consistent_lsn=Lsn(0),
            prev_record_lsn=None,
            ancestor_timeline=None,
            ancestor_lsn=Lsn(0),
            latest_gc_cutoff_lsn=pgdata_lsn,
            initdb_lsn=pgdata_lsn,
            pg_version=pg_version,
        )
        mark = self._begin_create(timeline_id, md)
        tl = self._new_timeline(timeline_id, md, None)
        try:
            await asyncio.get_running_loop().run_in_executor(None, import_datadir, tl, pgdata, pgdata_lsn)
            if bootstrap_wal:
                # The shutdown checkpoint record itself, so that last/prev record LSNs are exact.
                importer = WalImporter(tl)
                await importer.ingest_files(
                    wal_segment_files(pgdata / "pg_wal"), start_lsn=pgdata_lsn, stop_after=pgdata_lsn
                )
            await tl.freeze_and_flush()
        except BaseException:
            await tl.shutdown(flush=False)
            shutil.rmtree(tl.path, ignore_errors=True)
            os.unlink(mark)
            raise
        self._finish_create(mark)
        tl.state = "Active"
        self.timelines[timeline_id] = tl
        self._start_wal_receiver(tl)
        self.log.info("imported timeline", timeline_id=str(timeline_id), lsn=str(Lsn(tl.last_record_lsn)))
        return tl

    async def bootstrap_timeline(self, timeline_id: TimelineId, *, pg_version: int = 15) -> Timeline:
        """Run initdb (as the unprivileged user) and import the result as a new root timeline."""
        distrib = self.pg_distrib or PgDistrib.default()
        user = self.pg_user or PostgresUser.resolve()
        scratch = self.scratch_dir or self.timelines_path
        tmp = scratch / f"basebackup-{timeline_id}.___temp"
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: initdb(distrib, user, tmp, extra_args=["--no-sync"], superuser=self.superuser)
            )
            return await self.import_timeline(timeline_id, tmp, pg_version=pg_version)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    async def branch_timeline(
        self, timeline_id: TimelineId, ancestor_id: TimelineId, start_lsn: int | None = None, *, timeout: float = 60
    ) -> Timeline:
        """A new timeline that shares the ancestor's history up to `start_lsn` (default: its last record)."""
        ancestor = self.get_timeline(ancestor_id)
        if start_lsn is not None:
            start = Lsn(start_lsn).align()
            if start < ancestor.ancestor_lsn:
                raise BranchLsnError(
                    f"invalid branch start lsn: less than timeline ancestor lsn {ancestor.ancestor_lsn}"
                )
            await ancestor.wait_lsn(start, timeout)
        else:
            start = Lsn(ancestor.last_record_lsn)
        async with self.gc_lock:
            if start < ancestor.latest_gc_cutoff_lsn:
                raise BranchLsnError(
                    f"invalid branch start lsn: less than latest GC cutoff {ancestor.latest_gc_cutoff_lsn}"
                )
            prev = ancestor.prev_record_lsn if start == ancestor.last_record_lsn else None
            md = TimelineMetadata(
                disk_consistent_lsn=Lsn(start),
                prev_record_lsn=Lsn(prev) if prev else None,
                ancestor_timeline=ancestor_id,
                ancestor_lsn=Lsn(start),
                latest_gc_cutoff_lsn=ancestor.latest_gc_cutoff_lsn,
                initdb_lsn=ancestor.initdb_lsn,
                pg_version=ancestor.pg_version,
            )
            mark = self._begin_create(timeline_id, md)
            tl = self._new_timeline(timeline_id, md, ancestor)
            self._finish_create(mark)
        tl.state = "Active"
        self.timelines[timeline_id] = tl
        self._start_wal_receiver(tl)
        self.log.info("branched timeline", timeline_id=str(timeline_id), ancestor=str(ancestor_id), lsn=str(start))
        return tl

    async def delete_timeline(self, timeline_id: TimelineId) -> None:
        tl = self.get_timeline(timeline_id)
        children = [t.timeline_id for t in self.timelines.values() if t.ancestor is tl]
        if children:
            raise TenantError(f"timeline {timeline_id} has child timelines: {', '.join(map(str, children))}")
        receiver = self.wal_receivers.pop(timeline_id, None)
        if receiver is not None:
            await receiver.stop()
        mark = self.timelines_path / f"{timeline_id}{DELETE_MARK}"
        mark.touch()
        fsync_path(self.timelines_path)
        del self.timelines[timeline_id]
        await tl.shutdown(flush=False)
        shutil.rmtree(tl.path, ignore_errors=True)
        os.unlink(mark)
        fsync_path(self.timelines_path)

    async def set_broken(self, reason: str) -> None:
        """Stop serving: the background loops end and the timelines stop, without flushing (the data
        may be what broke the tenant); what is on disk stays as it is."""
        self.log.error("tenant is broken", reason=reason)
        self.broken_reason = reason
        await self.shutdown(flush=False)
        self.state = "Broken"

    async def shutdown(self, *, flush: bool = True) -> None:
        self.state = "Stopping"
        await self._stop_wal_receivers()  # no more WAL coming in while timelines flush
        for task in self._loops:
            task.cancel()
        for task in self._loops:
            with contextlib.suppress(BaseException):
                await task
        self._loops = []
        # Compaction runs partly in worker threads, which a task cancellation would not stop:
        # signal the timelines and let each pass end at its next check, before anything closes.
        for tl in self.timelines.values():
            tl.cancelled.set()
        for task in self._compaction_tasks.values():
            with contextlib.suppress(BaseException):
                await task
        # Branches first: their reads may still reach their ancestors.
        for tl in sorted(self.timelines.values(), key=_depth, reverse=True):
            await tl.shutdown(flush=flush)


def _depth(tl: Timeline) -> int:
    n = 0
    while tl.ancestor is not None:
        tl = tl.ancestor
        n += 1
    return n
