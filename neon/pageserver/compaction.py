"""Compaction (spec pageserver §5.9): image layer creation and L0 → L1 delta compaction.

`compact` runs both for one timeline, as Neon's `Timeline::compact` does: first it partitions
the live key space at the disk-consistent LSN and writes an image layer for every partition
with `image_creation_threshold` L1 deltas above its newest image, then, once
`compaction_threshold` L0 layers have piled up, it merges the oldest contiguous run of L0s into
L1 deltas cut by key range at about `checkpoint_distance` bytes. File writing, merging and zstd
run in worker threads; page reconstruction for images goes through the timeline's async read
path; layers are swapped into the layer map in one step on the event loop.

Simplifications against Neon, none visible in answers: a single key whose history exceeds the
target size is not split by LSN (its file just grows), and no split points are forced at
key-space holes under image layers.
"""

from __future__ import annotations

import asyncio
import heapq
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from neon.postgres.constants import BLCKSZ
from neon.utils.lsn import Lsn

from .datadir_mapping import ZERO_PAGE, iter_range_keys
from .key import Key, is_rel_fsm_block_key, is_rel_vm_block_key
from .layer_map import HistoricLayer
from .layers import KEY_MIN, DeltaLayerWriter, ImageLayerWriter, try_parse_layer_file_name
from .timeline import PageReconstructError, Timeline

IMAGE_BATCH = 256  # pages reconstructed on the event loop between two writer calls in a thread


class CompactionCancelled(Exception):
    """The timeline is shutting down; the compaction stopped without changing anything."""


@dataclass
class CompactionResult:
    image_layers: list[str] = field(default_factory=list)
    l0_compacted: int = 0
    l1_created: list[str] = field(default_factory=list)


# --- partitioning --------------------------------------------------------------------------------
def partition_keyspace(ranges: list[tuple[bytes, bytes]], target_keys: int) -> list[list[tuple[bytes, bytes]]]:
    """Pack consecutive key ranges into partitions of about `target_keys` keys; cut larger ranges."""
    parts: list[list[tuple[bytes, bytes]]] = []
    current: list[tuple[bytes, bytes]] = []
    size = 0
    for start, end in ranges:
        s = Key.from_bytes(start).to_int()
        e = Key.from_bytes(end).to_int()
        n = e - s
        if size + n > target_keys and current:
            parts.append(current)
            current, size = [], 0
        while n > target_keys:
            cut = s + target_keys
            parts.append([(_key(s), _key(cut))])
            s, n = cut, n - target_keys
        current.append((_key(s), _key(e)))
        size += n
    if current:
        parts.append(current)
    return parts


def _key(v: int) -> bytes:
    return v.to_bytes(18, "big")


def _overlaps(layer: HistoricLayer, start: bytes, end: bytes) -> bool:
    return layer.key_start < end and start < layer.key_end


def deltas_above_image(tl: Timeline, start: bytes, end: bytes) -> int:
    """L1 delta layers over [start, end) newer than the newest image layer covering it."""
    image_lsn = max((i.lsn_start for i in tl.layers.images if _overlaps(i, start, end)), default=-1)
    return sum(1 for d in tl.layers.deltas if not d.is_l0 and _overlaps(d, start, end) and d.lsn_end > image_lsn + 1)


# --- image layers --------------------------------------------------------------------------------
async def create_image_layers(tl: Timeline, *, force: bool = False) -> list[HistoricLayer]:
    lsn = tl.disk_consistent_lsn
    if lsn == 0 or lsn < tl.initdb_lsn:
        return []
    conf = tl.conf()
    target_keys = max(1, conf.compaction_target_size // BLCKSZ)
    partitions = partition_keyspace(tl.collect_keyspace(lsn), target_keys)
    created: list[HistoricLayer] = []
    prev_end = KEY_MIN
    for part in partitions:
        start, end = prev_end, part[-1][1]
        prev_end = end
        exists = any(i.lsn_start == lsn and i.key_start == start and i.key_end == end for i in tl.layers.images)
        if exists:
            continue
        if not force and deltas_above_image(tl, start, end) < conf.image_creation_threshold:
            continue
        created.append(await _write_image_layer(tl, start, end, part, lsn))
    if created:
        tl.layers.replace([], created)
    return created


async def _write_image_layer(
    tl: Timeline, start: bytes, end: bytes, ranges: list[tuple[bytes, bytes]], lsn: int
) -> HistoricLayer:
    loop = asyncio.get_running_loop()
    writer = ImageLayerWriter(tl.path, tl.tenant_id, tl.timeline_id, (start, end), lsn)
    try:
        batch: list[tuple[bytes, bytes]] = []
        for r_start, r_end in ranges:
            for key in iter_range_keys(r_start, r_end):
                batch.append((key, await _image_value(tl, key, lsn)))
                if len(batch) >= IMAGE_BATCH:
                    if tl.cancelled.is_set():
                        raise CompactionCancelled(f"{tl} is shutting down")
                    await loop.run_in_executor(None, _put_all, writer, batch)
                    batch = []
        if batch:
            await loop.run_in_executor(None, _put_all, writer, batch)
        path = await loop.run_in_executor(None, writer.finish)
    except BaseException:
        writer.abort()
        raise
    name = try_parse_layer_file_name(path.name)
    assert name is not None
    tl.log.info("created image layer", layer=path.name)
    return HistoricLayer.at(path, name, tl.tenant_id, tl.timeline_id)


async def _image_value(tl: Timeline, key: bytes, lsn: int) -> bytes:
    try:
        return await tl.get(key, lsn)
    except PageReconstructError:
        k = Key.from_bytes(key)
        if is_rel_fsm_block_key(k) or is_rel_vm_block_key(k):
            # As in Neon: FSM and VM pages are hints; a page that cannot be rebuilt becomes zeros.
            tl.log.warning("could not reconstruct FSM/VM page, writing a zero page", key=str(k))
            return ZERO_PAGE
        raise


def _put_all(writer: ImageLayerWriter, batch: list[tuple[bytes, bytes]]) -> None:
    for key, value in batch:
        writer.put(key, value)


# --- L0 -> L1 --------------------------------------------------------------------------------------
def _contiguous_l0(tl: Timeline) -> list[HistoricLayer]:
    l0 = tl.layers.l0_deltas()
    run: list[HistoricLayer] = []
    for layer in l0:
        if run and layer.lsn_start != run[-1].lsn_end:
            break
        run.append(layer)
    return run


def _merged_entries(inputs: list[HistoricLayer]) -> Iterator[tuple[bytes, int, bool, bytes]]:
    return heapq.merge(*(layer.delta().iter_entries() for layer in inputs), key=lambda e: (e[0], e[1]))


def write_l1_layers(tl: Timeline, inputs: list[HistoricLayer], target_size: int) -> list[Path]:
    """Merge `inputs` (contiguous L0s) into L1 files of about `target_size` bytes (in a worker thread)."""
    lsn_range = (inputs[0].lsn_start, inputs[-1].lsn_end)
    out: list[Path] = []
    writer: DeltaLayerWriter | None = None
    last_key = b""
    try:
        for n, (key, lsn, init, value) in enumerate(_merged_entries(inputs)):
            if n % 1024 == 0 and tl.cancelled.is_set():
                raise CompactionCancelled(f"{tl} is shutting down")
            if key != last_key:
                if writer is not None and writer.bytes_written >= target_size:
                    out.append(writer.finish(Key.from_bytes(last_key).next().to_bytes()))
                    writer = None
                if writer is None:
                    writer = DeltaLayerWriter(tl.path, tl.tenant_id, tl.timeline_id, key, lsn_range)
                last_key = key
            writer.put(key, lsn, init, value)
        if writer is not None:
            out.append(writer.finish(Key.from_bytes(last_key).next().to_bytes()))
            writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        for p in out:
            p.unlink(missing_ok=True)
        raise
    return out


async def compact_level0(tl: Timeline) -> tuple[int, list[HistoricLayer]]:
    conf = tl.conf()
    inputs = _contiguous_l0(tl)
    if len(inputs) < max(conf.compaction_threshold, 1) or len(inputs) < 2:
        return 0, []
    loop = asyncio.get_running_loop()
    paths = await loop.run_in_executor(None, write_l1_layers, tl, inputs, max(conf.checkpoint_distance, 1))
    outputs = []
    for p in paths:
        name = try_parse_layer_file_name(p.name)
        assert name is not None and not name.is_l0
        outputs.append(HistoricLayer.at(p, name, tl.tenant_id, tl.timeline_id))
    tl.layers.replace(inputs, outputs)
    for layer in inputs:
        layer.close()
        os.unlink(layer.path)
    tl.log.info(
        "compacted L0 layers",
        inputs=len(inputs),
        outputs=len(outputs),
        lsn_range=f"{Lsn(inputs[0].lsn_start)}-{Lsn(inputs[-1].lsn_end)}",
    )
    return len(inputs), outputs


async def compact(tl: Timeline, *, force_image_layers: bool = False) -> CompactionResult:
    """One compaction pass over `tl` (excluded against other layer removals of the timeline)."""
    result = CompactionResult()
    if tl.last_record_lsn == 0:
        return result
    async with tl.layer_removal_lock:
        images = await create_image_layers(tl, force=force_image_layers)
        result.image_layers = [str(i) for i in images]
        n, outputs = await compact_level0(tl)
        result.l0_compacted = n
        result.l1_created = [str(o) for o in outputs]
    return result
