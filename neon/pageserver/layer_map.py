"""The layer map (spec pageserver §5.6): which layers a timeline has, and `search`.

It holds the open in-memory layer, the frozen ones waiting for flush (oldest first), and the
historic layer files. Historic layers are replaced copy-on-write (a new tuple each time), so a
reader on the event loop or in a worker thread always iterates a consistent set while a flush
or a compaction swaps layers in.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from neon.utils.id import TenantId, TimelineId
from neon.utils.lsn import Lsn

from .inmemory_layer import InMemoryLayer
from .layers import DeltaLayer, DeltaLayerName, ImageLayer, LayerName


@dataclass(eq=False)
class HistoricLayer:
    """A delta or image layer file of the timeline, opened on first use."""

    name: LayerName
    path: Path
    tenant_id: TenantId
    timeline_id: TimelineId
    file_size: int
    _reader: DeltaLayer | ImageLayer | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.is_delta = isinstance(self.name, DeltaLayerName)
        self.key_start, self.key_end = self.name.key_range
        lsn_start, lsn_end = self.name.lsn_range
        self.lsn_start = int(lsn_start)
        self.lsn_end = int(lsn_end)  # exclusive; an image layer's is lsn + 1
        self.is_l0 = self.name.is_l0

    @classmethod
    def at(cls, path: Path, name: LayerName, tenant_id: TenantId, timeline_id: TimelineId) -> HistoricLayer:
        return cls(name, path, tenant_id, timeline_id, path.stat().st_size)

    def delta(self) -> DeltaLayer:
        reader = self.reader()
        assert isinstance(reader, DeltaLayer)
        return reader

    def image(self) -> ImageLayer:
        reader = self.reader()
        assert isinstance(reader, ImageLayer)
        return reader

    def reader(self) -> DeltaLayer | ImageLayer:
        reader = self._reader
        if reader is None:
            with self._lock:
                reader = self._reader
                if reader is None:
                    kind = DeltaLayer if self.is_delta else ImageLayer
                    reader = kind(self.path, tenant_id=self.tenant_id, timeline_id=self.timeline_id)
                    self._reader = reader
        return reader

    def close(self) -> None:
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def __str__(self) -> str:
        return str(self.name)


class SearchResult(NamedTuple):
    layer: HistoricLayer
    lsn_floor: int


class LayerMap:
    def __init__(self, next_open_layer_at: int | None) -> None:
        self.open_layer: InMemoryLayer | None = None
        self.next_open_layer_at: Lsn | None = None if next_open_layer_at is None else Lsn(next_open_layer_at)
        self.frozen_layers: list[InMemoryLayer] = []
        # Deltas by LSN end, newest first; images by LSN, newest first.
        self._deltas: tuple[HistoricLayer, ...] = ()
        self._images: tuple[HistoricLayer, ...] = ()

    # --- historic layers -----------------------------------------------------------------------
    @property
    def historic(self) -> tuple[HistoricLayer, ...]:
        return self._deltas + self._images

    @property
    def deltas(self) -> tuple[HistoricLayer, ...]:
        return self._deltas

    @property
    def images(self) -> tuple[HistoricLayer, ...]:
        return self._images

    def l0_deltas(self) -> list[HistoricLayer]:
        """L0 delta layers, oldest first."""
        return sorted((d for d in self._deltas if d.is_l0), key=lambda d: d.lsn_start)

    def replace(self, remove: list[HistoricLayer], add: list[HistoricLayer]) -> None:
        """Swap layers in one step (a reader sees either the old or the new set)."""
        gone = {id(layer) for layer in remove}
        layers = [h for h in self._deltas + self._images if id(h) not in gone] + list(add)
        self._deltas = tuple(sorted((h for h in layers if h.is_delta), key=lambda h: -h.lsn_end))
        self._images = tuple(sorted((h for h in layers if not h.is_delta), key=lambda h: -h.lsn_start))

    # --- search (§5.6) ---------------------------------------------------------------------------
    def search(self, key: bytes, end_lsn: int) -> SearchResult | None:
        """The historic layer with the newest data for `key` below `end_lsn`, and the LSN floor to read to."""
        delta = None
        for d in self._deltas:
            if d.lsn_start < end_lsn and d.key_start <= key < d.key_end:
                delta = d
                break
        image = None
        for i in self._images:
            if i.lsn_start < end_lsn and i.key_start <= key < i.key_end:
                image = i
                break
        if image is None:
            return None if delta is None else SearchResult(delta, delta.lsn_start)
        if delta is None or image.lsn_end >= delta.lsn_end or image.lsn_start == end_lsn - 1:
            return SearchResult(image, image.lsn_start)
        return SearchResult(delta, max(delta.lsn_start, image.lsn_start + 1))

    # --- in-memory layers ---------------------------------------------------------------------
    def open_layer_for_write(self, lsn: int) -> InMemoryLayer:
        layer = self.open_layer
        if layer is None:
            start = self.next_open_layer_at if self.next_open_layer_at is not None else Lsn(lsn)
            if lsn < start:
                raise ValueError(f"cannot write at {Lsn(lsn)}: the next open layer starts at {start}")
            layer = self.open_layer = InMemoryLayer(start)
            self.next_open_layer_at = None
        return layer

    def freeze_open_layer(self, end_lsn: int) -> InMemoryLayer | None:
        layer = self.open_layer
        if layer is None:
            return None
        layer.freeze(end_lsn)
        self.frozen_layers.append(layer)
        self.open_layer = None
        self.next_open_layer_at = Lsn(end_lsn)
        return layer

    def close(self) -> None:
        for h in self.historic:
            h.close()
