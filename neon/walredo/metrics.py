"""Prometheus metrics of the redo path (names as Neon's pageserver exports them)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

_REDO_SECONDS_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5)
_RECORDS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class WalRedoMetrics:
    """One set per daemon; pass its registry to the /metrics endpoint."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.redo_seconds = Histogram(
            "pageserver_wal_redo_seconds", "Time spent on WAL redo", buckets=_REDO_SECONDS_BUCKETS, registry=r
        )
        self.wait_seconds = Histogram(
            "pageserver_wal_redo_wait_seconds",
            "Time spent waiting for a WAL redo process",
            buckets=_REDO_SECONDS_BUCKETS,
            registry=r,
        )
        self.records = Histogram(
            "pageserver_wal_redo_records_histogram",
            "Number of WAL records per redo request",
            buckets=_RECORDS_BUCKETS,
            registry=r,
        )
        self.bytes = Histogram(
            "pageserver_wal_redo_bytes_histogram",
            "Bytes of WAL records per redo request",
            buckets=(1024, 8192, 65536, 262144, 1 << 20, 4 << 20),
            registry=r,
        )
        self.replayed_records = Counter(
            "pageserver_replayed_wal_records", "Number of WAL records replayed by redo", registry=r
        )
        self.process_restarts = Counter(
            "pageserver_wal_redo_process_restarts", "WAL redo processes killed after a failure", registry=r
        )
        self.failures = Counter("pageserver_wal_redo_failures", "Redo requests that failed after retry", registry=r)
