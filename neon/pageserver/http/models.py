"""Request and response bodies of the management API (Neon's `pageserver_api::models`, spec §9.2-9.4).

Ids are 32-hex strings and LSNs `X/X` strings on the wire; the `from_*` constructors turn our
storage objects into these bodies. Request models reject unknown fields, so a typo is a 400 that
names the field rather than a silently ignored setting.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from neon.pageserver.timeline import Timeline
from neon.utils.id import TenantId, TimelineId
from neon.utils.lsn import Lsn

__all__ = [
    "HistoricLayerInfo",
    "InMemoryLayerInfo",
    "LayerMapInfo",
    "TenantInfo",
    "TimelineCreateRequest",
    "TimelineInfo",
    "timeline_state_json",
]


def _parse_tenant_id(v: Any) -> TenantId:
    if isinstance(v, TenantId):
        return v
    if not isinstance(v, str):
        raise ValueError(f"expected a tenant id string, got {type(v).__name__}")
    return TenantId(v)


def _parse_timeline_id(v: Any) -> TimelineId:
    if isinstance(v, TimelineId):
        return v
    if not isinstance(v, str):
        raise ValueError(f"expected a timeline id string, got {type(v).__name__}")
    return TimelineId(v)


def _parse_lsn(v: Any) -> Lsn:
    if isinstance(v, Lsn):
        return v
    if not isinstance(v, str):
        raise ValueError(f"expected an LSN string like '0/16B3748', got {type(v).__name__}")
    return Lsn.parse(v)


TenantIdField = Annotated[TenantId, BeforeValidator(_parse_tenant_id)]
TimelineIdField = Annotated[TimelineId, BeforeValidator(_parse_timeline_id)]
LsnField = Annotated[Lsn, BeforeValidator(_parse_lsn)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


class TimelineCreateRequest(_Request):
    new_timeline_id: TimelineIdField
    ancestor_timeline_id: TimelineIdField | None = None
    ancestor_start_lsn: LsnField | None = None
    pg_version: Annotated[int, Field(strict=True)] | None = None


def timeline_state_json(state: str, reason: str | None = None) -> Any:
    """Neon's externally tagged `TimelineState`: `"Active"` or `{"Broken": {...}}`."""
    if state == "Broken":
        return {"Broken": {"reason": reason or "", "backtrace": ""}}
    return state


class TimelineInfo(BaseModel):
    tenant_id: str
    timeline_id: str
    ancestor_timeline_id: str | None
    ancestor_lsn: str | None
    last_record_lsn: str
    prev_record_lsn: str
    latest_gc_cutoff_lsn: str
    disk_consistent_lsn: str
    remote_consistent_lsn: str
    remote_consistent_lsn_visible: str
    current_logical_size: int | None
    current_physical_size: int | None
    current_logical_size_non_incremental: int | None
    timeline_dir_layer_file_size_sum: int | None
    wal_source_connstr: str | None
    last_received_msg_lsn: str | None
    last_received_msg_ts: int | None
    pg_version: int
    state: Any
    walreceiver_status: str

    @classmethod
    def from_timeline(cls, tl: Timeline, *, include_non_incremental: bool = False) -> TimelineInfo:
        last = Lsn(tl.last_record_lsn)
        logical: int | None
        try:
            logical = tl.current_logical_size() if last else None
        except Exception:
            # Neon reports null while the size is not known; a read failure must not fail the GET.
            logical = None
        return cls(
            tenant_id=str(tl.tenant_id),
            timeline_id=str(tl.timeline_id),
            ancestor_timeline_id=str(tl.ancestor.timeline_id) if tl.ancestor is not None else None,
            ancestor_lsn=str(Lsn(tl.ancestor_lsn)) if tl.ancestor_lsn else None,
            last_record_lsn=str(last),
            prev_record_lsn=str(Lsn(tl.prev_record_lsn)),
            latest_gc_cutoff_lsn=str(Lsn(tl.latest_gc_cutoff_lsn)),
            disk_consistent_lsn=str(Lsn(tl.disk_consistent_lsn)),
            # No remote storage yet: Neon reports 0/0 then.
            remote_consistent_lsn=str(Lsn(0)),
            remote_consistent_lsn_visible=str(Lsn(0)),
            current_logical_size=logical,
            current_physical_size=sum(h.file_size for h in tl.layers.historic),
            current_logical_size_non_incremental=tl.calculate_logical_size(last) if include_non_incremental else None,
            timeline_dir_layer_file_size_sum=None,
            wal_source_connstr=None,
            last_received_msg_lsn=None,
            last_received_msg_ts=None,
            pg_version=tl.pg_version,
            state=timeline_state_json(tl.state),
            walreceiver_status="",
        )


class TenantInfo(BaseModel):
    id: str
    state: dict[str, Any]
    current_physical_size: int | None
    attachment_status: dict[str, Any]


class InMemoryLayerInfo(BaseModel):
    kind: str
    lsn_start: str
    lsn_end: str | None = None


class HistoricLayerInfo(BaseModel):
    kind: str
    layer_file_name: str
    layer_file_size: int
    lsn_start: str
    lsn_end: str | None = None
    remote: bool = False
    access_stats: dict[str, Any]


# Diagnostic only (tests read kind/name/size/LSNs/remote); no access statistics are kept.
_EMPTY_ACCESS_STATS: dict[str, Any] = {
    "access_count_by_access_kind": {},
    "task_kind_access_flag": [],
    "first": None,
    "accesses_history": {"buffer": [], "buffer_size": 0, "total_count": 0},
    "residence_events_history": {"buffer": [], "buffer_size": 0, "total_count": 0},
}


class LayerMapInfo(BaseModel):
    in_memory_layers: list[InMemoryLayerInfo]
    historic_layers: list[HistoricLayerInfo]

    @classmethod
    def from_timeline(cls, tl: Timeline) -> LayerMapInfo:
        lm = tl.layers
        in_mem = []
        if lm.open_layer is not None:
            in_mem.append(InMemoryLayerInfo(kind="Open", lsn_start=str(Lsn(lm.open_layer.start_lsn))))
        for f in lm.frozen_layers:
            in_mem.append(
                InMemoryLayerInfo(kind="Frozen", lsn_start=str(Lsn(f.start_lsn)), lsn_end=str(Lsn(f.end_lsn)))
            )
        historic = []
        for h in lm.historic:
            historic.append(
                HistoricLayerInfo(
                    kind="Delta" if h.is_delta else "Image",
                    layer_file_name=h.path.name,
                    layer_file_size=h.file_size,
                    lsn_start=str(Lsn(h.lsn_start)),
                    lsn_end=str(Lsn(h.lsn_end)) if h.is_delta else None,
                    access_stats=_EMPTY_ACCESS_STATS,
                )
            )
        return cls(in_memory_layers=in_mem, historic_layers=historic)

    def to_json(self) -> dict[str, Any]:
        out = self.model_dump(mode="json")
        # Neon omits lsn_end for Open and Image layers rather than sending null.
        for layer in out["in_memory_layers"] + out["historic_layers"]:
            if layer.get("lsn_end") is None:
                layer.pop("lsn_end", None)
        return out
