"""Metrics of the redo path (names as Neon's pageserver exports them)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from neon.utils.metrics import MetricSet

_REDO_SECONDS_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5)
_RECORDS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class WalRedoMetrics(MetricSet):
    """One set per daemon; its registry feeds the /metrics endpoint."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        self.redo_seconds = self.histogram(
            "pageserver_wal_redo_seconds", "Time spent on WAL redo", _REDO_SECONDS_BUCKETS
        )
        self.wait_seconds = self.histogram(
            "pageserver_wal_redo_wait_seconds", "Time spent waiting for a WAL redo process", _REDO_SECONDS_BUCKETS
        )
        self.records = self.histogram(
            "pageserver_wal_redo_records_histogram", "Number of WAL records per redo request", _RECORDS_BUCKETS
        )
        self.replayed_records = self.counter("pageserver_replayed_wal_records_total", "WAL records replayed by redo")
        self.process_restarts = self.counter(
            "pageserver_wal_redo_process_restarts_total", "WAL redo processes killed after a failure"
        )
        self.failures = self.counter("pageserver_wal_redo_failures_total", "Redo requests that failed after retry")
        self.register()
