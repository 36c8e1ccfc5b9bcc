"""The pageserver's tenant map (Neon's `tenant/mgr.rs`): every tenant of a workdir and its state.

This module owns the storage part of the daemon's root object: the one materialized page cache
shared by all tenants (`page_cache_size` pages), one WAL-redo manager per tenant (its helper's
scratch directory lives under a per-process root on tmpfs that the unprivileged Postgres user can
traverse), loading every tenant directory at start-up (a tenant that fails to load is kept as
Broken with its reason, the others still load), creating and deleting tenants, and the state JSON
of tenants (spec pageserver §1.7): `{"slug": ..., "data": ...}` and `attachment_status`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from neon.broker.client import BrokerClient
from neon.postgres.pg_distrib import PgDistrib, PostgresUser
from neon.utils.crashsafe import fsync_path
from neon.utils.failpoints import Failpoints
from neon.utils.id import TenantId
from neon.walredo.launcher import PostgresRedoLauncher, scratch_parent
from neon.walredo.manager import WalRedoManager

from .config import TENANTS_DIR, PageServerConf
from .metrics import PageserverMetrics
from .page_cache import MaterializedPageCache
from .tenant import Tenant, TenantError
from .tenant_config import TenantConfOverrides

__all__ = [
    "IGNORED_TENANT_MARKER",
    "TENANT_DELETED_MARKER",
    "TenantExists",
    "TenantManager",
    "TenantManagerError",
    "TenantNotActive",
    "TenantNotFound",
    "TenantSlot",
    "attachment_status_json",
    "tenant_state_json",
]

log = structlog.get_logger("tenant_manager")

TEMP_SUFFIX = ".___temp"
IGNORED_TENANT_MARKER = "___ignored_tenant"
TENANT_DELETED_MARKER = "deleted"

# Builds the WAL-redo manager of a tenant; tests without Postgres pass a stub.
WalRedoFactory = Callable[[TenantId, Path], WalRedoManager]


class TenantManagerError(Exception):
    pass


class TenantNotFound(TenantManagerError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class TenantExists(TenantManagerError):
    pass


class TenantNotActive(TenantManagerError):
    """The tenant exists but cannot serve the request in its state (Neon: 503)."""


class ShuttingDown(TenantManagerError):
    pass


def tenant_state_json(state: str, broken_reason: str | None = None) -> dict[str, Any]:
    """Neon's adjacently tagged `TenantState` JSON for one of our state names."""
    if state == "Broken":
        return {"slug": "Broken", "data": {"reason": broken_reason or "", "backtrace": ""}}
    if state == "Stopping":
        return {"slug": "Stopping", "data": {}}
    if state == "Activating":
        return {"slug": "Activating", "data": "Loading"}
    return {"slug": state}


def attachment_status_json(state: str, broken_reason: str | None = None) -> dict[str, Any]:
    if state == "Broken":
        return {"slug": "failed", "data": {"reason": broken_reason or ""}}
    if state in ("Attaching", "Stopping"):
        return {"slug": "maybe"}
    return {"slug": "attached"}


@dataclass
class TenantSlot:
    """A tenant in the map: the object (also for a Broken tenant, which has no timelines)."""

    tenant: Tenant
    broken_reason: str | None = None

    @property
    def tenant_id(self) -> TenantId:
        return self.tenant.tenant_id

    @property
    def state(self) -> str:
        return "Broken" if self.broken_reason is not None else self.tenant.state

    def state_json(self) -> dict[str, Any]:
        return tenant_state_json(self.state, self.broken_reason)

    def attachment_status_json(self) -> dict[str, Any]:
        return attachment_status_json(self.state, self.broken_reason)

    def physical_size(self) -> int:
        return sum(h.file_size for tl in self.tenant.timelines.values() for h in tl.layers.historic)


def _traversable_dir(parent: Path, prefix: str) -> Path:
    """A fresh scratch root `<prefix><pid>-<random>` under `parent`; roots left by processes that
    died without cleaning up (SIGKILL) are removed first, so restarts do not pile them up."""
    _remove_stale_roots(parent, prefix)
    # The Postgres user (not us, when we are root) must be able to reach the directories below.
    root = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
    root.chmod(0o755)
    return root


def _remove_stale_roots(parent: Path, prefix: str) -> None:
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid_text, sep, _ = entry.name[len(prefix) :].partition("-")
        if not sep or not pid_text.isdigit():
            continue  # not one of ours (or from before roots carried their pid)
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(entry.path, ignore_errors=True)
            log.info("removed a scratch directory left by a dead pageserver", path=entry.path)
        except PermissionError:
            pass  # alive, another user's


class TenantManager:
    def __init__(
        self,
        conf: PageServerConf,
        workdir: str | os.PathLike[str],
        *,
        walredo_factory: WalRedoFactory | None = None,
        pg_distrib: PgDistrib | None = None,
        pg_user: PostgresUser | None = None,
        metrics: PageserverMetrics | None = None,
        broker: BrokerClient | None = None,
        failpoints: Failpoints | None = None,
    ) -> None:
        self.conf = conf
        # The daemon's failpoints (configured from FAILPOINTS and the management API), handed to
        # every tenant and timeline; an empty registry when not given.
        self.failpoints = failpoints if failpoints is not None else Failpoints()
        self.broker = broker  # timelines without a fixed wal_source follow the safekeepers through it
        self.metrics = metrics or PageserverMetrics()
        self.metrics.attach(self)
        self.workdir = Path(workdir).absolute()
        self.tenants_dir = self.workdir / TENANTS_DIR
        self.page_cache = MaterializedPageCache(conf.page_cache_size)
        self._pg_distrib = pg_distrib if pg_distrib is not None else self._distrib_from_conf(conf)
        self._pg_user = pg_user
        self._walredo_factory = walredo_factory or self._postgres_walredo
        self._slots: dict[TenantId, TenantSlot] = {}
        # Per-process scratch roots: redo helpers on tmpfs, initdb output on ordinary disk (a
        # cluster is ~40 MB, and concurrent bootstraps would fill a small /dev/shm).
        self._walredo_root = _traversable_dir(scratch_parent(), "neon-pageserver-walredo-")
        self._initdb_root = _traversable_dir(Path(tempfile.gettempdir()), "neon-pageserver-initdb-")
        self.loaded = False
        self.shutting_down = False

    @staticmethod
    def _distrib_from_conf(conf: PageServerConf) -> PgDistrib | None:
        return PgDistrib(conf.pg_distrib_dir) if conf.pg_distrib_dir is not None else None

    # --- per-tenant resources -----------------------------------------------------------------
    def _postgres_walredo(self, tenant_id: TenantId, scratch: Path) -> WalRedoManager:
        kwargs: dict[str, Any] = {}
        if self._pg_distrib is not None:
            kwargs["distrib"] = self._pg_distrib
        if self._pg_user is not None:
            kwargs["user"] = self._pg_user
        launcher = PostgresRedoLauncher(scratch, **kwargs)
        return WalRedoManager(
            str(tenant_id), launcher, timeout=self.conf.wal_redo_timeout.total_seconds(), metrics=self.metrics.walredo
        )

    def _tenant_kwargs(self, tenant_id: TenantId) -> dict[str, Any]:
        initdb_scratch = self._initdb_root / str(tenant_id)
        initdb_scratch.mkdir(mode=0o755, exist_ok=True)
        initdb_scratch.chmod(0o755)
        return {
            "walredo": self._walredo_factory(tenant_id, self._walredo_root / str(tenant_id)),
            "page_cache": self.page_cache,
            "defaults": self.conf.default_tenant_conf(),
            "scratch_dir": initdb_scratch,
            "pg_distrib": self._pg_distrib,
            "pg_user": self._pg_user,
            "superuser": self.conf.initial_superuser_name,
            "broker": self.broker,
            "availability_zone": self.conf.availability_zone,
            "failpoints": self.failpoints,
        }

    # --- loading ------------------------------------------------------------------------------
    async def load_all(self) -> None:
        """Load every tenant directory; remove leftovers of interrupted creations and deletions."""
        self.tenants_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for entry in sorted(os.scandir(self.tenants_dir), key=lambda e: e.name):
            path = Path(entry.path)
            if entry.name.endswith(TEMP_SUFFIX):
                # A creation (or deletion) that never finished: the tenant never existed (or is gone).
                shutil.rmtree(path, ignore_errors=True)
                log.info("removed temporary tenant directory", path=str(path))
                continue
            if not entry.is_dir():
                continue
            try:
                tenant_id = TenantId(entry.name)
            except ValueError:
                log.warning("unexpected entry in tenants directory", name=entry.name)
                continue
            if (path / TENANT_DELETED_MARKER).exists():
                self._remove_tenant_dir(path)
                continue
            if (path / IGNORED_TENANT_MARKER).exists():
                log.info("skipping ignored tenant", tenant_id=str(tenant_id))
                continue
            self._load_one(tenant_id, path)
        self.loaded = True

    def _load_one(self, tenant_id: TenantId, path: Path) -> TenantSlot:
        kwargs = self._tenant_kwargs(tenant_id)
        try:
            tenant = Tenant.load(path, **kwargs)
        except Exception as e:
            # Neon keeps a tenant that fails to load in the map as Broken, so that the API reports
            # why, instead of it silently vanishing.
            reason = f"{type(e).__name__}: {e}"
            log.error("failed to load tenant", tenant_id=str(tenant_id), reason=reason)
            kwargs.pop("defaults")
            tenant = Tenant(tenant_id, path, defaults=self.conf.default_tenant_conf(), **kwargs)
            tenant.state = "Broken"
            slot = TenantSlot(tenant, broken_reason=reason)
        else:
            slot = TenantSlot(tenant)
            tenant.start_background_loops()
            log.info("loaded tenant", tenant_id=str(tenant_id), timelines=len(tenant.timelines))
        self._slots[tenant_id] = slot
        return slot

    # --- lookups --------------------------------------------------------------------------------
    def get_slot(self, tenant_id: TenantId) -> TenantSlot:
        slot = self._slots.get(tenant_id)
        if slot is None:
            raise TenantNotFound(f"tenant {tenant_id} not found")
        return slot

    def get_tenant(self, tenant_id: TenantId, *, active: bool = False) -> Tenant:
        """The tenant; with `active`, `TenantNotActive` unless it can serve requests."""
        slot = self.get_slot(tenant_id)
        if active and slot.state != "Active":
            raise TenantNotActive(f"Tenant {tenant_id} is not active. Current state: {slot.state}")
        return slot.tenant

    def list_tenants(self) -> list[TenantSlot]:
        return sorted(self._slots.values(), key=lambda s: bytes(s.tenant_id))

    # --- creation and deletion ----------------------------------------------------------------
    def create_tenant(self, tenant_id: TenantId | None = None, overrides: TenantConfOverrides | None = None) -> Tenant:
        """A new empty, active tenant (its background loops started; needs a running event loop)."""
        if self.shutting_down:
            raise ShuttingDown("pageserver is shutting down")
        tenant_id = tenant_id if tenant_id is not None else TenantId.generate()
        if tenant_id in self._slots or (self.tenants_dir / str(tenant_id)).exists():
            raise TenantExists(f"tenant {tenant_id} already exists")
        kwargs = self._tenant_kwargs(tenant_id)
        try:
            tenant = Tenant.create(self.tenants_dir, tenant_id, overrides=overrides or TenantConfOverrides(), **kwargs)
        except TenantError as e:
            raise TenantExists(str(e)) from None
        self._slots[tenant_id] = TenantSlot(tenant)
        tenant.start_background_loops()
        log.info("created tenant", tenant_id=str(tenant_id))
        return tenant

    def set_tenant_config(self, tenant_id: TenantId, overrides: TenantConfOverrides) -> None:
        """Replace the tenant's overrides (persisted in its `config` file)."""
        self.get_tenant(tenant_id).set_overrides(overrides)

    async def delete_tenant(self, tenant_id: TenantId) -> None:
        """Stop the tenant and remove its directory. Crash-safe: the directory is first renamed to a
        temporary name, which start-up removes."""
        slot = self.get_slot(tenant_id)
        tenant = slot.tenant
        if tenant.state == "Stopping":
            raise TenantManagerError(f"tenant {tenant_id} is already being deleted")
        await tenant.shutdown(flush=False)
        await tenant.walredo.shutdown()
        self._remove_tenant_dir(tenant.path)
        del self._slots[tenant_id]
        shutil.rmtree(self._walredo_root / str(tenant_id), ignore_errors=True)
        shutil.rmtree(self._initdb_root / str(tenant_id), ignore_errors=True)
        log.info("deleted tenant", tenant_id=str(tenant_id))

    async def detach_tenant(self, tenant_id: TenantId, *, detach_ignored: bool = False) -> None:
        """Neon's detach: stop the tenant without a final flush and remove its local directory. With
        `detach_ignored`, a tenant present only as an ignored directory is removed too."""
        if tenant_id not in self._slots:
            path = self.tenants_dir / str(tenant_id)
            if detach_ignored and (path / IGNORED_TENANT_MARKER).exists():
                self._remove_tenant_dir(path)
                return
            raise TenantNotFound(f"tenant {tenant_id} not found")
        await self.delete_tenant(tenant_id)

    async def ignore_tenant(self, tenant_id: TenantId) -> None:
        """Stop the tenant and mark its directory so that start-up skips it (data kept)."""
        slot = self.get_slot(tenant_id)
        marker = slot.tenant.path / IGNORED_TENANT_MARKER
        marker.touch()
        fsync_path(slot.tenant.path)
        await slot.tenant.shutdown(flush=slot.broken_reason is None)
        await slot.tenant.walredo.shutdown()
        del self._slots[tenant_id]

    def load_tenant(self, tenant_id: TenantId) -> TenantSlot:
        """Load an ignored (or otherwise unloaded) tenant directory back into the map."""
        if tenant_id in self._slots:
            raise TenantExists(f"tenant {tenant_id} is already loaded")
        path = self.tenants_dir / str(tenant_id)
        if not path.is_dir():
            raise TenantNotFound(f"tenant {tenant_id} has no local directory")
        (path / IGNORED_TENANT_MARKER).unlink(missing_ok=True)
        fsync_path(path)
        return self._load_one(tenant_id, path)

    async def break_tenant(self, tenant_id: TenantId, reason: str = "requested by the testing API") -> None:
        """Testing: mark the tenant Broken (its loops and timelines stop; its data stays on disk)."""
        slot = self.get_slot(tenant_id)
        if slot.broken_reason is not None:
            raise TenantManagerError(f"tenant {tenant_id} is already broken")
        slot.broken_reason = reason
        await slot.tenant.set_broken(reason)

    def _remove_tenant_dir(self, path: Path) -> None:
        if path.exists():
            tmp = path.with_name(path.name + TEMP_SUFFIX)
            shutil.rmtree(tmp, ignore_errors=True)
            os.rename(path, tmp)
            fsync_path(path.parent)
            shutil.rmtree(tmp, ignore_errors=True)

    # --- shutdown -----------------------------------------------------------------------------
    async def shutdown(self) -> None:
        """Flush every tenant's open layers, stop its loops and its redo helper, remove scratch dirs."""
        self.shutting_down = True
        for slot in list(self._slots.values()):
            tenant = slot.tenant
            try:
                # A Broken tenant's data may be what broke it: stop its tasks without flushing.
                await tenant.shutdown(flush=slot.broken_reason is None)
            except Exception as e:
                log.error("tenant shutdown failed", tenant_id=str(slot.tenant_id), error=str(e))
            with contextlib.suppress(Exception):
                await tenant.walredo.shutdown()
        self._slots.clear()
        shutil.rmtree(self._walredo_root, ignore_errors=True)
        shutil.rmtree(self._initdb_root, ignore_errors=True)
