"""The pageserver's Prometheus metrics (spec control-plane §3.7): what `/metrics` serves.

Counters and histograms on hot paths are `neon.utils.metrics` ones (cheap to update); the state
of tenants, timelines, layers, the page cache and the WAL receivers is read when scraped. Names
follow Neon's where Neon has the metric.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from neon.utils.metrics import MetricSet
from neon.walredo.metrics import WalRedoMetrics

if TYPE_CHECKING:
    from .tenant_manager import TenantManager

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class PageserverMetrics(MetricSet):
    """One per daemon. `walredo` is shared by every tenant's WAL-redo manager."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry or CollectorRegistry())
        self.getpage_seconds = self.histogram(
            "pageserver_smgr_query_seconds", "Time to serve a GetPage@LSN request", _LATENCY_BUCKETS
        )
        self.pagestream_errors = self.counter(
            "pageserver_pagestream_errors_total", "Pagestream requests answered with an error"
        )
        self.event_loop_lag = self.histogram(
            "pageserver_event_loop_lag_seconds", "How late the event loop runs a 100 ms timer", _LAG_BUCKETS
        )
        self.register()
        self.walredo = WalRedoMetrics(self.registry)
        self._manager: TenantManager | None = None
        self.registry.register(_StateCollector(self))  # type: ignore[arg-type]

    def attach(self, manager: TenantManager) -> None:
        self._manager = manager

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def measure_event_loop_lag(self, interval: float = 0.1) -> None:
        """Forever: how much later than asked a short sleep returns (a blocked loop shows here)."""
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(interval)
            self.event_loop_lag.observe(max(0.0, loop.time() - start - interval))


class _StateCollector:
    def __init__(self, metrics: PageserverMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        manager = self.metrics._manager
        if manager is None:
            return
        states = GaugeMetricFamily("pageserver_tenant_states_count", "Tenants by state", labels=["state"])
        by_state: dict[str, int] = {}
        last = GaugeMetricFamily(
            "pageserver_last_record_lsn", "Last ingested record LSN", labels=["tenant_id", "timeline_id"]
        )
        disk = GaugeMetricFamily(
            "pageserver_disk_consistent_lsn",
            "LSN up to which layer files are durable",
            labels=["tenant_id", "timeline_id"],
        )
        layers = GaugeMetricFamily(
            "pageserver_layer_count", "Layer files by kind", labels=["tenant_id", "timeline_id", "kind"]
        )
        received = GaugeMetricFamily(
            "pageserver_walreceiver_last_received_lsn",
            "WAL received by the WAL receiver",
            labels=["tenant_id", "timeline_id"],
        )
        for slot in manager.list_tenants():
            by_state[slot.state] = by_state.get(slot.state, 0) + 1
            tenant = slot.tenant
            for tl in list(tenant.timelines.values()):
                ids = [str(tenant.tenant_id), str(tl.timeline_id)]
                last.add_metric(ids, tl.last_record_lsn)
                disk.add_metric(ids, tl.disk_consistent_lsn)
                deltas = tl.layers.deltas
                l0 = sum(1 for d in deltas if d.is_l0)
                layers.add_metric([*ids, "l0"], l0)
                layers.add_metric([*ids, "l1"], len(deltas) - l0)
                layers.add_metric([*ids, "image"], len(tl.layers.images))
                receiver = tenant.wal_receivers.get(tl.timeline_id)
                if receiver is not None:
                    received.add_metric(ids, receiver.status.last_received_lsn)
        for state, n in sorted(by_state.items()):
            states.add_metric([state], n)
        cache = manager.page_cache
        hits = CounterMetricFamily("pageserver_page_cache_hits", "Materialized page cache hits")
        hits.add_metric([], cache.hits)
        misses = CounterMetricFamily("pageserver_page_cache_misses", "Materialized page cache misses")
        misses.add_metric([], cache.misses)
        yield from (states, last, disk, layers, received, hits, misses)
