"""Garbage collection (spec pageserver §5.10): removing layers no read at or above the cutoff needs.

For each timeline: the cutoff is `gc_horizon` bytes of WAL behind `last_record_lsn` (never above
`disk_consistent_lsn`), further limited by `pitr_interval` (the LSN of the commit that many
seconds ago). Branch points of child timelines are retained. `latest_gc_cutoff_lsn` moves up
first (so reads and branch creation below it are refused from then on), then every historic layer
that is entirely below the cutoff, needed by no branch point, and superseded by newer image layers
over its whole key range is deleted, with the metadata rewritten before the files go.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from neon.utils.lsn import Lsn

from .layer_map import HistoricLayer

if TYPE_CHECKING:
    from .tenant import Tenant
    from .timeline import Timeline

_PG_EPOCH_UNIX = 946_684_800  # 2000-01-01 in Unix seconds


@dataclass
class GcResult:
    layers_total: int = 0
    layers_needed_by_cutoff: int = 0
    layers_needed_by_pitr: int = 0
    layers_needed_by_branches: int = 0
    layers_not_updated: int = 0
    layers_removed: int = 0
    elapsed: int = 0  # milliseconds

    def add(self, other: GcResult) -> None:
        for name in (
            "layers_total",
            "layers_needed_by_cutoff",
            "layers_needed_by_pitr",
            "layers_needed_by_branches",
            "layers_not_updated",
            "layers_removed",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_json(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class GcInfo:
    horizon_cutoff: int
    pitr_cutoff: int
    retain_lsns: tuple[int, ...]


async def gc_info(tenant: Tenant, tl: Timeline, gc_horizon: int) -> GcInfo | None:
    """Spec §5.10 step 1 for one timeline; None when it has less WAL than the horizon."""
    last = tl.last_record_lsn
    if last < gc_horizon:
        return None
    horizon_cutoff = last - gc_horizon
    retain = tuple(sorted(t.ancestor_lsn for t in tenant.timelines.values() if t.ancestor is tl))
    pitr = tenant.conf().pitr_interval.total_seconds()
    if pitr <= 0:
        pitr_cutoff = horizon_cutoff
    else:
        ts = int((time.time() - pitr - _PG_EPOCH_UNIX) * 1_000_000)
        kind, lsn = await tl.find_lsn_for_timestamp(ts, tl.latest_gc_cutoff_lsn, last)
        if kind == "present":
            pitr_cutoff = lsn
        elif kind == "future":
            pitr_cutoff = horizon_cutoff
        else:  # past or nodata: nothing older than the interval is known to be unneeded
            pitr_cutoff = tl.latest_gc_cutoff_lsn
    return GcInfo(horizon_cutoff, pitr_cutoff, retain)


def _covered_by_newer_images(layer: HistoricLayer, images: tuple[HistoricLayer, ...], cutoff: int) -> bool:
    """Whether image layers with LSN in [layer end, cutoff) cover the layer's whole key range."""
    spans = sorted((i.key_start, i.key_end) for i in images if layer.lsn_end <= i.lsn_start < cutoff and i is not layer)
    pos = layer.key_start
    for start, end in spans:
        if start > pos:
            break
        if end > pos:
            pos = end
        if pos >= layer.key_end:
            return True
    return pos >= layer.key_end


async def gc_timeline(tl: Timeline, info: GcInfo) -> GcResult:
    """Spec §5.10 step 2 for one timeline (under its layer-removal lock)."""
    started = time.monotonic()
    result = GcResult()
    async with tl.layer_removal_lock:
        horizon = min(info.horizon_cutoff, tl.disk_consistent_lsn)
        new_cutoff = min(horizon, info.pitr_cutoff)
        layers = tl.layers.historic
        result.layers_total = len(layers)
        if tl.latest_gc_cutoff_lsn >= new_cutoff:
            result.elapsed = int((time.monotonic() - started) * 1000)
            return result
        # First the cutoff: from now on no read or branch below it is served.
        tl.latest_gc_cutoff_lsn = Lsn(new_cutoff)
        images = tl.layers.images
        doomed: list[HistoricLayer] = []
        for layer in layers:
            if layer.lsn_end > horizon:
                result.layers_needed_by_cutoff += 1
            elif layer.lsn_end > info.pitr_cutoff:
                result.layers_needed_by_pitr += 1
            elif any(r >= layer.lsn_start for r in info.retain_lsns):
                result.layers_needed_by_branches += 1
            elif not _covered_by_newer_images(layer, images, new_cutoff):
                result.layers_not_updated += 1
            else:
                doomed.append(layer)
        loop = asyncio.get_running_loop()
        # The metadata with the new cutoff is durable before any file disappears.
        await loop.run_in_executor(None, tl.save_metadata)
        if doomed:
            tl.layers.replace(doomed, [])
            for layer in doomed:
                layer.close()
                await loop.run_in_executor(None, os.unlink, layer.path)
            tl.log.info("garbage collected layers", removed=len(doomed), cutoff=str(Lsn(new_cutoff)))
        result.layers_removed = len(doomed)
    result.elapsed = int((time.monotonic() - started) * 1000)
    return result


async def gc_iteration(tenant: Tenant, target: Timeline | None = None, gc_horizon: int | None = None) -> GcResult:
    """One GC pass over the tenant (or one timeline); holds the tenant's GC lock, which branch
    creation takes too, so no branch appears below a cutoff that is being moved."""
    total = GcResult()
    started = time.monotonic()
    horizon = tenant.conf().gc_horizon if gc_horizon is None else gc_horizon
    async with tenant.gc_lock:
        timelines = [target] if target is not None else [t for t in tenant.timelines.values() if t.state == "Active"]
        for tl in timelines:
            info = await gc_info(tenant, tl, horizon)
            if info is not None:
                total.add(await gc_timeline(tl, info))
            else:
                total.layers_total += len(tl.layers.historic)
    total.elapsed = int((time.monotonic() - started) * 1000)
    return total
