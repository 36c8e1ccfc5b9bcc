"""Shared pieces of the pageserver benchmarks (`ingest.py`, `getpage_local.py`).

An in-process engine (one tenant, its WAL-redo manager with the real helper, a page cache),
scratch directories the Postgres user can traverse, splitting a WAL record stream at LSNs,
latency percentiles, a cProfile report and a plain-text table.
"""

from __future__ import annotations

import cProfile
import io
import logging
import pstats
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import structlog

from neon.pageserver.layers import try_parse_layer_file_name
from neon.pageserver.page_cache import MaterializedPageCache
from neon.pageserver.tenant import Tenant
from neon.pageserver.tenant_config import TenantConfOverrides
from neon.pageserver.timeline import Timeline
from neon.postgres.errors import WalDecodeError
from neon.postgres.walfiles import read_wal_file_batches
from neon.postgres.walformat import parse_wal_file_name
from neon.utils.id import TenantId
from neon.walredo.launcher import PostgresRedoLauncher, scratch_parent
from neon.walredo.manager import WalRedoManager
from tests.fixtures.vanilla import make_test_root

WAL_SEGMENT_SIZE = 16 * 1024 * 1024
REDO_TIMEOUT = 30.0
T = TypeVar("T")


def quiet_logging() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


# --- scratch directories ----------------------------------------------------------------------------
@dataclass
class Scratch:
    """`root` on disk (vanilla clusters, tenants) and `shm` on tmpfs (the redo helper's data dir)."""

    prefix: str
    root: Path = field(init=False)
    shm: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root = make_test_root(prefix=self.prefix)
        self.shm = Path(tempfile.mkdtemp(prefix=self.prefix, dir=scratch_parent()))
        self.shm.chmod(0o755)

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.shm, ignore_errors=True)


# --- the engine ---------------------------------------------------------------------------------------
@dataclass
class Engine:
    """One tenant with its own WAL-redo manager (one helper process), as the pageserver runs it."""

    tenant: Tenant
    walredo: WalRedoManager

    @classmethod
    def create(
        cls,
        scratch: Scratch,
        *,
        cache_pages: int,
        overrides: TenantConfOverrides | None = None,
        name: str = "tenants",
    ) -> Engine:
        tid = TenantId.generate()
        mgr = WalRedoManager(str(tid), PostgresRedoLauncher(scratch.shm / f"walredo-{tid}"), timeout=REDO_TIMEOUT)
        tenant = Tenant.create(
            scratch.root / name,
            tid,
            walredo=mgr,
            page_cache=MaterializedPageCache(cache_pages),
            overrides=overrides or TenantConfOverrides(),
            scratch_dir=scratch.root,
        )
        return cls(tenant, mgr)

    @classmethod
    def load(cls, scratch: Scratch, path: Path, *, cache_pages: int) -> Engine:
        """Open an existing tenant directory again (e.g. with another page cache)."""
        mgr = WalRedoManager(
            path.name, PostgresRedoLauncher(scratch.shm / f"walredo-{path.name}"), timeout=REDO_TIMEOUT
        )
        tenant = Tenant.load(path, walredo=mgr, page_cache=MaterializedPageCache(cache_pages), scratch_dir=scratch.root)
        return cls(tenant, mgr)

    async def close(self) -> None:
        try:
            await self.tenant.shutdown()
        finally:
            await self.walredo.shutdown()


def layer_file_names(tl: Timeline) -> list[str]:
    """The layer files in the timeline's directory."""
    return sorted(p.name for p in tl.path.iterdir() if try_parse_layer_file_name(p.name) is not None)


# --- WAL -----------------------------------------------------------------------------------------------
def segments_from(files: Sequence[Path], lsn: int) -> list[Path]:
    """The segment files from the one holding `lsn` on."""
    seg = lsn // WAL_SEGMENT_SIZE
    return [f for f in files if parse_wal_file_name(f.name)[1] >= seg]


class RecordStream:
    """The raw records of segment files from `start_lsn`, handed out in consecutive LSN slices.

    `until(lsn)` yields lists of the records that start before `lsn` (the decoder's own batches,
    as WAL ingest takes them) and keeps the rest for the next slice; the first invalid record ends
    the stream (the end of the WAL)."""

    def __init__(self, files: Sequence[Path], start_lsn: int) -> None:
        self._it = read_wal_file_batches(segments_from(files, start_lsn), start_lsn=start_lsn)
        self._pending: list[tuple[int, int, bytes]] = []
        self.exhausted = False

    def until(self, lsn: int) -> Iterator[list[tuple[int, int, bytes]]]:
        batch = self._pending
        self._pending = []
        while True:
            if batch:
                if batch[-1][0] >= lsn:
                    cut = next(i for i, r in enumerate(batch) if r[0] >= lsn)
                    if cut:
                        yield batch[:cut]
                    self._pending = batch[cut:]
                    return
                yield batch
            if self.exhausted:
                return
            try:
                batch = next(self._it)
            except (StopIteration, WalDecodeError):
                self.exhausted = True
                return

    def collect(self, lsn: int) -> list[tuple[int, int, bytes]]:
        return [rec for batch in self.until(lsn) for rec in batch]


# --- measuring and reporting -----------------------------------------------------------------------------
def percentile(sorted_values: Sequence[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


async def profiled(coro_fn: Callable[[], Awaitable[T]], *, top: int, title: str) -> T:
    """Run `coro_fn()` under cProfile (this thread only) and print the top functions two ways."""
    prof = cProfile.Profile()
    prof.enable()
    try:
        result = await coro_fn()
    finally:
        prof.disable()
    for order in ("cumulative", "tottime"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).strip_dirs().sort_stats(order).print_stats(top)
        lines = out.getvalue().splitlines()
        start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
        print(f"\ncProfile of {title}, top {top} by {order} (event-loop thread only):")
        for line in lines[start : start + top + 1]:
            print("  " + line.rstrip()[:170])
    return result


def print_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Left-align the first column, right-align the others."""
    body = [[_cell(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    print(line(headers))
    print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    for r in body:
        print(line(r))


def _cell(v: object) -> str:
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)
