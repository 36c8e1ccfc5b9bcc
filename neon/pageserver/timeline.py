"""A timeline (spec pageserver §1.1-1.2, §5.1-5.2, §5.7): versioned key → value storage and GetPage@LSN.

This module owns the LSNs of a timeline (last/prev record, disk-consistent, GC cutoff), writing
committed values into the open in-memory layer, freezing and flushing layers (the file writes
run in a worker thread), the read path that walks in-memory layers, historic layers and the
ancestor chain, and reconstruction through the tenant's WAL-redo manager. The Postgres view of
the key space (relations, SLRUs, directories) is `datadir_mapping.DatadirMapping`, mixed in here.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import structlog

from neon.postgres.constants import BLCKSZ
from neon.utils.crashsafe import TEMP_SUFFIX
from neon.utils.failpoints import Failpoints
from neon.utils.id import TenantId, TimelineId
from neon.utils.lsn import Lsn
from neon.walredo.manager import WalRedoManager
from neon.walredo.records import RedoTarget, WalRecord, will_init

from .datadir_mapping import DatadirMapping
from .inmemory_layer import InMemoryLayer
from .key import REL_NAMESPACE, SLRU_NAMESPACE, Key
from .layer_map import HistoricLayer, LayerMap
from .layers import LayerError, is_temp_file_name, try_parse_layer_file_name
from .metadata import TimelineMetadata, save_metadata
from .page_cache import MaterializedPageCache
from .tenant_config import TenantConf
from .value import Image, Value, decode_value

log = structlog.get_logger("timeline")


class PageReconstructError(Exception):
    """A value could not be found or rebuilt at an LSN."""


class TimelineStateError(Exception):
    """An operation the timeline cannot do in its current state (stopping, broken, LSN order)."""


class WaitLsnTimeout(TimeoutError):
    pass


def _redo_target(key: bytes) -> RedoTarget:
    k = Key.from_bytes(key)
    if k.field1 == REL_NAMESPACE:
        return k.to_buffer_tag()
    if k.field1 == SLRU_NAMESPACE:
        return k.to_slru_page()
    raise PageReconstructError(f"key {k} has WAL records but is neither a relation block nor an SLRU page")


class Timeline(DatadirMapping):
    def __init__(
        self,
        *,
        tenant_id: TenantId,
        timeline_id: TimelineId,
        path: Path,
        metadata: TimelineMetadata,
        ancestor: Timeline | None,
        conf: Callable[[], TenantConf],
        walredo: WalRedoManager,
        page_cache: MaterializedPageCache,
        owner: tuple[int, int] | None = None,
        failpoints: Failpoints | None = None,
    ) -> None:
        if (ancestor is None) != (metadata.ancestor_timeline is None):
            raise ValueError("ancestor timeline object and metadata disagree")
        self.tenant_id = tenant_id
        self.timeline_id = timeline_id
        self.path = path
        self.ancestor = ancestor
        self.ancestor_lsn = Lsn(metadata.ancestor_lsn)
        self.pg_version = metadata.pg_version
        self.initdb_lsn = Lsn(metadata.initdb_lsn)
        self.latest_gc_cutoff_lsn = Lsn(metadata.latest_gc_cutoff_lsn)
        self.disk_consistent_lsn = Lsn(metadata.disk_consistent_lsn)
        self.last_record_lsn = Lsn(metadata.disk_consistent_lsn)
        self.prev_record_lsn = Lsn(metadata.prev_record_lsn or 0)
        self.conf = conf
        self.walredo = walredo
        self.page_cache = page_cache
        self.owner = owner
        self.failpoints = failpoints if failpoints is not None else Failpoints()
        self.log = log.bind(tenant_id=str(tenant_id), timeline_id=str(timeline_id))
        self.layers = LayerMap(metadata.disk_consistent_lsn + 1 if metadata.disk_consistent_lsn else None)
        self.state = "Loading"
        self.last_freeze_at = Lsn(metadata.disk_consistent_lsn)
        self.last_freeze_ts = time.monotonic()
        self.rel_size_cache: dict = {}
        self.reldir_cache: dict = {}  # (spc, db) -> (LSN of its newest version, RelDirectory); ingest only
        self.logical_size: int | None = None  # bytes; None until computed after a load
        # Growth ingested while the initial size is being calculated (added to it at the end).
        self.logical_size_pending_delta = 0
        self._logical_size_task: asyncio.Task[int] | None = None
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._waiter_seq = 0
        self._flush_task: asyncio.Task[None] | None = None
        self._layer_flushed = asyncio.Event()  # set (and replaced) after each frozen layer is flushed
        self.on_flush: Callable[[Timeline], None] | None = None  # the tenant's hook: compaction
        self.layer_removal_lock = asyncio.Lock()
        self.cancelled = threading.Event()  # set at shutdown; background work stops at its next check
        self.layer_flush_errors = 0

    # --- metadata ------------------------------------------------------------------------------
    def metadata(self) -> TimelineMetadata:
        prev = self.prev_record_lsn if self.disk_consistent_lsn == self.last_record_lsn else None
        return TimelineMetadata(
            disk_consistent_lsn=Lsn(self.disk_consistent_lsn),
            prev_record_lsn=Lsn(prev) if prev else None,
            ancestor_timeline=self.ancestor.timeline_id if self.ancestor else None,
            ancestor_lsn=Lsn(self.ancestor_lsn),
            latest_gc_cutoff_lsn=Lsn(self.latest_gc_cutoff_lsn),
            initdb_lsn=Lsn(self.initdb_lsn),
            pg_version=self.pg_version,
        )

    def save_metadata(self, md: TimelineMetadata | None = None) -> None:
        save_metadata(self.path, md or self.metadata(), owner=self.owner)

    def load_layers(self) -> None:
        """Pick up the layer files in the timeline directory (at load): temp files are removed,
        files from beyond disk_consistent_lsn (written before a crash, never recorded) set aside."""
        found: list[HistoricLayer] = []
        for entry in sorted(os.scandir(self.path), key=lambda e: e.name):
            name = entry.name
            if name.endswith(TEMP_SUFFIX) or is_temp_file_name(name) or name.startswith("ephemeral-"):
                os.unlink(entry.path)
                continue
            parsed = try_parse_layer_file_name(name)
            if parsed is None:
                continue
            layer = HistoricLayer.at(Path(entry.path), parsed, self.tenant_id, self.timeline_id)
            future = layer.lsn_end > self.disk_consistent_lsn + 1
            if future:
                self.log.warning("layer from beyond disk_consistent_lsn, set aside", layer=name)
                os.replace(entry.path, entry.path + ".old")
                continue
            found.append(layer)
        self.layers.replace([], _without_unrecorded_compactions(found, self.log))

    # --- LSN bookkeeping -----------------------------------------------------------------------
    def advance_last_record_lsn(self, lsn: int, prev: int | None = None) -> None:
        """Make everything up to `lsn` visible. `prev` is the end of the record before (when a batch
        of records is committed at once); by default the previous last_record_lsn."""
        if lsn <= self.last_record_lsn:
            return
        self.prev_record_lsn = self.last_record_lsn if prev is None else prev
        self.last_record_lsn = lsn  # a plain int on the hot path; Lsn() only where it is printed
        waiters = self._waiters
        while waiters and waiters[0][0] <= lsn:
            _, _, fut = heapq.heappop(waiters)
            if not fut.done():
                fut.set_result(None)

    async def wait_lsn(self, lsn: int, timeout: float) -> None:
        """Return once `lsn` has been ingested; `WaitLsnTimeout` after `timeout` seconds."""
        if lsn <= self.last_record_lsn:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiter_seq += 1
        heapq.heappush(self._waiters, (lsn, self._waiter_seq, fut))
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            raise WaitLsnTimeout(
                f"Timed out while waiting for WAL record at LSN {Lsn(lsn)} to arrive, "
                f"last_record_lsn {Lsn(self.last_record_lsn)} disk consistent LSN={self.disk_consistent_lsn}"
            ) from None
        finally:
            # Nobody waits on it any more: cancelled, it is skipped by ingest and by shutdown (which
            # would otherwise set an exception that no one retrieves).
            if not fut.done():
                fut.cancel()

    # --- writing -------------------------------------------------------------------------------
    def layer_for_write(self, lsn: int) -> InMemoryLayer:
        """The open layer, for values at `lsn` (not visible until last_record_lsn reaches it)."""
        if lsn % 8 or lsn <= self.last_record_lsn:
            raise TimelineStateError(
                f"cannot modify relation after advancing last_record_lsn ({Lsn(lsn)} ≤ {Lsn(self.last_record_lsn)})"
            )
        return self.layers.open_layer_for_write(lsn)

    def current_logical_size(self) -> int | None:
        """Bytes of all relations at last_record_lsn, or None while not known yet.

        Ingest keeps the size up to date once known. After a load or a branch it is not known: the
        first call starts the calculation in the background (on the event loop, yielding between
        relations, so a large timeline never stalls getpage) and returns None, as Neon reports a
        size still being calculated."""
        if self.logical_size is None:
            self.start_logical_size_calculation()
        return self.logical_size

    def start_logical_size_calculation(self) -> None:
        """Start the initial logical size calculation unless it is known or already running."""
        if self.logical_size is not None or self._logical_size_task is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (an offline tool): `logical_size_now` computes it when awaited
        self._logical_size_task = loop.create_task(self._calculate_initial_logical_size())

    async def logical_size_now(self) -> int:
        """The current logical size, waiting for its initial calculation if needed."""
        if self.logical_size is not None:
            return self.logical_size
        self.start_logical_size_calculation()
        task = self._logical_size_task
        if task is None:
            return await self._calculate_initial_logical_size()
        return await asyncio.shield(task)

    async def _calculate_initial_logical_size(self) -> int:
        # Sizes are read at a fixed LSN while ingest goes on; what ingest adds meanwhile is
        # collected in logical_size_pending_delta (both updated on this thread, so nothing is lost).
        lsn = self.last_record_lsn
        self.logical_size_pending_delta = 0
        total = 0
        try:
            n = 0
            for spc, db in self.get_dbdir(lsn):
                for tag in self.list_rels(spc, db, lsn):
                    total += self.get_rel_size(tag, lsn) * BLCKSZ
                    n += 1
                    if n % 64 == 0:
                        await asyncio.sleep(0)
        except Exception as e:
            self.log.error("initial logical size calculation failed", lsn=str(Lsn(lsn)), error=str(e))
            self._logical_size_task = None
            raise
        if self.logical_size is None:
            self.logical_size = total + self.logical_size_pending_delta
            self.log.info("initial logical size calculated", lsn=str(Lsn(lsn)), size=self.logical_size)
        self.logical_size_pending_delta = 0
        self._logical_size_task = None
        return self.logical_size

    def open_layer_size(self) -> int:
        layer = self.layers.open_layer
        return 0 if layer is None else layer.size

    def check_checkpoint_distance(self) -> None:
        """Freeze the open layer when it holds `checkpoint_distance` of WAL or is `checkpoint_timeout` old."""
        conf = self.conf()
        distance = self.last_record_lsn - self.last_freeze_at
        if (
            distance >= conf.checkpoint_distance
            or self.open_layer_size() > conf.checkpoint_distance
            or (distance > 0 and time.monotonic() - self.last_freeze_ts >= conf.checkpoint_timeout.total_seconds())
        ):
            self.freeze()

    def freeze(self) -> None:
        frozen = self.layers.freeze_open_layer(self.last_record_lsn + 1)
        self.last_freeze_at = self.last_record_lsn
        self.last_freeze_ts = time.monotonic()
        if frozen is not None:
            self._start_flush()

    async def freeze_and_flush(self) -> None:
        self.freeze()
        while self._flush_task is not None:
            task = self._flush_task
            await asyncio.shield(task)
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def ingest_backpressure(self, max_frozen: int = 2) -> None:
        """Yield to background work; block while more than `max_frozen` layers wait for flush
        (each flushed layer re-checks, so ingest resumes as soon as the backlog is small again)."""
        await asyncio.sleep(0)
        while len(self.layers.frozen_layers) > max_frozen and self._flush_task is not None:
            flushed = asyncio.ensure_future(self._layer_flushed.wait())
            try:
                await asyncio.wait({self._flush_task, flushed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                flushed.cancel()

    def _start_flush(self) -> None:
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        try:
            while self.layers.frozen_layers:
                await self._flush_one(self.layers.frozen_layers[0])
                self._layer_flushed.set()
                self._layer_flushed = asyncio.Event()
                # After every layer, not when the loop drains: under sustained ingest (which
                # resumes while layers still wait) the loop may not drain for a long time, and
                # compaction must not wait for it.
                if self.on_flush is not None:
                    self.on_flush(self)
        except Exception as e:
            self.layer_flush_errors += 1
            self.log.error("layer flush failed", error=str(e))
            raise
        finally:
            self._flush_task = None

    async def _flush_one(self, frozen) -> None:  # type: ignore[no-untyped-def]
        loop = asyncio.get_running_loop()
        path = await loop.run_in_executor(None, frozen.write_delta_layer, self.path, self.tenant_id, self.timeline_id)
        if self.owner is not None:
            os.chown(path, *self.owner)
        layer = HistoricLayer.at(path, try_parse_layer_file_name(path.name), self.tenant_id, self.timeline_id)  # type: ignore[arg-type]
        failpoints = self.failpoints
        if failpoints:
            # Older Neon's name for the pause below, where it stood: the delta file written, the
            # layer map not yet switched to it.
            await failpoints.hit("flush-frozen-before-sync")
        self.layers.replace([], [layer])
        assert self.layers.frozen_layers[0] is frozen
        del self.layers.frozen_layers[0]
        if failpoints:
            # As Neon: the new layer serves reads, disk_consistent_lsn (the metadata) not yet
            # advanced. A crash here leaves a layer file from beyond disk_consistent_lsn.
            await failpoints.hit("flush-frozen-pausable")
            await failpoints.hit("flush-frozen-exit")
        new_disk_consistent = Lsn(frozen.end_lsn - 1)
        if new_disk_consistent > self.disk_consistent_lsn:
            md = replace(self.metadata(), disk_consistent_lsn=new_disk_consistent)
            if new_disk_consistent != self.last_record_lsn:
                md = replace(md, prev_record_lsn=None)
            else:
                md = replace(md, prev_record_lsn=Lsn(self.prev_record_lsn) if self.prev_record_lsn else None)
            await loop.run_in_executor(None, self.save_metadata, md)
            self.disk_consistent_lsn = new_disk_consistent

    # --- reading (§5.7) ------------------------------------------------------------------------
    def _collect(
        self, key: bytes, lsn: int, cached: tuple[int, bytes] | None
    ) -> tuple[tuple[int, bytes] | None, list[tuple[int, Value]]]:
        """The base image and the records newer than it (newest first, decoded) that make `key` at `lsn`."""
        records: list[tuple[int, Value]] = []
        cache_floor = cached[0] + 1 if cached else 0
        timeline: Timeline = self
        cont_lsn = lsn + 1
        prev_cont: int | None = None
        while True:
            if cont_lsn == cache_floor:
                return cached, records
            if prev_cont is not None and cont_lsn >= prev_cont:
                raise PageReconstructError(
                    f"could not find layer with more data for key {Key.from_bytes(key)} at LSN {Lsn(cont_lsn - 1)},"
                    f" request LSN {Lsn(lsn)}"
                )
            if timeline.ancestor is not None and cont_lsn - 1 <= timeline.ancestor_lsn:
                timeline = timeline.ancestor
                prev_cont = None  # the check is per layer read, and the ancestor has not been read yet
                continue
            prev_cont = cont_lsn
            lm = timeline.layers
            source = None
            open_layer = lm.open_layer
            if open_layer is not None and open_layer.start_lsn < cont_lsn:
                source = open_layer
            else:
                for frozen in reversed(lm.frozen_layers):
                    if frozen.start_lsn < cont_lsn:
                        source = frozen
                        break
            if source is not None:
                floor = max(cache_floor, source.start_lsn)
                entries, complete = source.get(key, floor, cont_lsn)
            else:
                found = lm.search(key, cont_lsn)
                if found is None:
                    if timeline.ancestor is not None:
                        cont_lsn = timeline.ancestor_lsn + 1
                        continue
                    raise PageReconstructError(
                        f"could not find data for key {Key.from_bytes(key)} at LSN {Lsn(cont_lsn - 1)},"
                        f" for request at LSN {Lsn(lsn)}"
                    )
                layer, lsn_floor = found
                floor = max(cache_floor, lsn_floor)
                if layer.is_delta:
                    entries, complete = layer.delta().get(key, floor, cont_lsn)
                else:
                    data = layer.image().get(key)
                    if data is None:
                        raise PageReconstructError(
                            f"could not find data for key {Key.from_bytes(key)} at LSN {Lsn(cont_lsn - 1)}"
                            f" (not in image layer {layer}), for request at LSN {Lsn(lsn)}"
                        )
                    return (layer.lsn_start, data), records
            for entry_lsn, _, raw in entries:
                value = decode_value(raw)
                if isinstance(value, Image):
                    return (entry_lsn, value.data), records
                records.append((entry_lsn, value))
            if complete:
                return None, records
            cont_lsn = floor

    def get_image(self, key: bytes, lsn: int) -> bytes:
        """A value stored only as images (directories, sizes, relmap, checkpoint...): no redo."""
        if lsn == 0:
            raise PageReconstructError("Invalid LSN")  # Neon's message for LSN 0
        base, records = self._collect(key, lsn, None)
        if records:
            raise PageReconstructError(f"key {Key.from_bytes(key)} at {Lsn(lsn)} has WAL records, expected an image")
        if base is None:
            raise PageReconstructError(f"base image for {Key.from_bytes(key)} at {Lsn(lsn)} not found")
        return base[1]

    def try_get_image(self, key: bytes, lsn: int) -> bytes | None:
        try:
            return self.get_image(key, lsn)
        except PageReconstructError:
            return None

    async def get(self, key: bytes, lsn: int) -> bytes:
        """The value of `key` at `lsn` (GetPage@LSN), reconstructed through WAL redo when needed."""
        if lsn == 0:
            raise PageReconstructError("Invalid LSN")  # Neon's message for LSN 0
        cached = self.page_cache.lookup(self.timeline_id, key, lsn)
        if cached is not None and cached[0] == lsn:
            return cached[1]
        base, records = self._collect(key, lsn, cached)
        if not records:
            if base is None:
                raise PageReconstructError(f"base image for {Key.from_bytes(key)} at {Lsn(lsn)} not found")
            return base[1]
        recs: list[tuple[int, WalRecord]] = [(rec_lsn, value.rec) for rec_lsn, value in reversed(records)]  # type: ignore[union-attr]
        if base is None and not will_init(recs[0][1]):
            raise PageReconstructError(
                f"no base image for {Key.from_bytes(key)} at {Lsn(lsn)} and the oldest record does not initialise it"
            )
        try:
            page = await self.walredo.request_redo(_redo_target(key), lsn, base, recs)
        except LayerError:
            raise
        except Exception as e:
            raise PageReconstructError(f"could not reconstruct {Key.from_bytes(key)} at {Lsn(lsn)}: {e}") from e
        self.page_cache.memorize(self.timeline_id, key, recs[-1][0], page)
        return page

    # --- lifecycle -----------------------------------------------------------------------------
    async def shutdown(self, *, flush: bool = True) -> None:
        self.state = "Stopping"
        self.cancelled.set()
        if flush:
            await self.freeze_and_flush()
        elif self._flush_task is not None:
            with contextlib.suppress(Exception):
                await self._flush_task
        for _, _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(TimelineStateError("timeline is shutting down"))
        self._waiters.clear()
        self.layers.close()
        self.page_cache.forget_timeline(self.timeline_id)

    def __repr__(self) -> str:
        return f"Timeline({self.tenant_id}/{self.timeline_id} at {Lsn(self.last_record_lsn)})"


def _without_unrecorded_compactions(layers: list[HistoricLayer], log: structlog.typing.FilteringBoundLogger) -> list:
    """Drop L1 layers left by a compaction that was interrupted before it removed its L0 inputs.

    Compaction writes all its L1 outputs before it deletes the L0s, so when L0s that exactly tile
    an L1 set's LSN range are still there, they are complete and the L1s (maybe only some of
    them) are redundant: they are deleted, and the next compaction writes them again."""
    l0 = sorted((h for h in layers if h.is_l0), key=lambda h: h.lsn_start)
    keep: list[HistoricLayer] = []
    for h in layers:
        if h.is_delta and not h.is_l0:
            inside = [x for x in l0 if h.lsn_start <= x.lsn_start and x.lsn_end <= h.lsn_end]
            tiles = (
                bool(inside)
                and inside[0].lsn_start == h.lsn_start
                and inside[-1].lsn_end == h.lsn_end
                and all(a.lsn_end == b.lsn_start for a, b in itertools.pairwise(inside))
            )
            if tiles:
                log.warning("removing L1 layer of an unfinished compaction", layer=str(h))
                os.unlink(h.path)
                continue
        keep.append(h)
    return keep
