"""Metrics cheap enough for per-request hot paths, exposed through a prometheus_client registry.

prometheus_client's own Histogram takes a lock and walks its buckets in Python on every
observation (~2 µs); these keep plain counters and build the samples only when scraped.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric


class Counter:
    __slots__ = ("help", "name", "value")

    def __init__(self, name: str, help: str) -> None:
        self.name = name
        self.help = help
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def collect(self) -> Metric:
        m = CounterMetricFamily(self.name, self.help)
        m.add_metric([], self.value)
        return m


class Histogram:
    __slots__ = ("bounds", "counts", "help", "name", "sum")

    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.help = help
        self.bounds = sorted(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def collect(self) -> Metric:
        cumulative = []
        total = 0
        for bound, n in zip([*self.bounds, float("inf")], self.counts, strict=True):
            total += n
            cumulative.append((str(bound) if bound != float("inf") else "+Inf", total))
        m = HistogramMetricFamily(self.name, self.help)
        m.add_metric([], cumulative, self.sum)
        return m


class MetricSet:
    """A group of metrics registered together as one prometheus collector."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._metrics: list[Counter | Histogram] = []
        self.registry = registry or CollectorRegistry()

    def counter(self, name: str, help: str) -> Counter:
        c = Counter(name, help)
        self._metrics.append(c)
        return c

    def histogram(self, name: str, help: str, buckets: Sequence[float]) -> Histogram:
        h = Histogram(name, help, buckets)
        self._metrics.append(h)
        return h

    def register(self) -> None:
        self.registry.register(self)  # type: ignore[arg-type]

    def collect(self) -> Iterator[Metric]:
        for m in self._metrics:
            yield m.collect()
