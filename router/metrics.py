"""Router metrics: plain counters on the hot path, turned into Prometheus text only when scraped.

Why not prometheus_client's Counter/Histogram objects: each `labels(...).inc()` / `observe()` takes a
lock and costs microseconds per call, and the router's whole budget is ~200 µs of CPU per request.
Here a request bumps ints and one bisect per histogram; `render()` builds metric families from them
through a custom collector (prometheus_client is imported lazily, on the first scrape).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.workers import WorkerRegistry

# Seconds. TTFT and latency of LLM requests span milliseconds to minutes.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    """Cumulative-bucket histogram with Prometheus semantics (le = upper bound, +Inf implied)."""

    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


@dataclass
class WorkerStats:
    """What one worker has done for this router process."""

    requests: int = 0
    errors: int = 0
    ttft: Histogram = field(default_factory=Histogram)
    latency: Histogram = field(default_factory=Histogram)


@dataclass
class RouterStats:
    """Router-wide counters. `requests` is keyed by (endpoint, mode) with mode `pd` or `decode_only`."""

    requests: dict[tuple[str, str], int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    rejected_backpressure: int = 0

    def count_request(self, endpoint: str, mode: str) -> None:
        key = (endpoint, mode)
        self.requests[key] = self.requests.get(key, 0) + 1

    def count_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class _Collector:
    def __init__(self, stats: RouterStats, registry: WorkerRegistry) -> None:
        self._stats = stats
        self._registry = registry

    def collect(self) -> Iterator[object]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        s = self._stats
        req = CounterMetricFamily("router_requests", "Requests accepted", labels=["endpoint", "mode"])
        for (endpoint, mode), n in sorted(s.requests.items()):
            req.add_metric([endpoint, mode], n)
        yield req
        err = CounterMetricFamily("router_errors", "Requests that ended in an error", labels=["kind"])
        for kind, n in sorted(s.errors.items()):
            err.add_metric([kind], n)
        yield err
        yield GaugeMetricFamily("router_in_flight", "Requests being served", value=s.in_flight)
        yield CounterMetricFamily(
            "router_rejected_backpressure", "Requests refused by --max-inflight", value=s.rejected_backpressure
        )
        labels = ["worker", "role"]
        w_req = CounterMetricFamily("router_worker_requests", "Requests sent to a worker", labels=labels)
        w_err = CounterMetricFamily("router_worker_errors", "Failed requests per worker", labels=labels)
        w_inf = GaugeMetricFamily("router_worker_in_flight", "Requests in flight per worker", labels=labels)
        w_up = GaugeMetricFamily("router_worker_healthy", "1 when the worker takes traffic", labels=labels)
        ttft = HistogramMetricFamily("router_worker_ttft_seconds", "Time to first byte from decode", labels=labels)
        lat = HistogramMetricFamily("router_worker_latency_seconds", "Request latency", labels=labels)
        for w in self._registry.all_workers():
            lv = [w.url, w.role.value]
            w_req.add_metric(lv, w.stats.requests)
            w_err.add_metric(lv, w.stats.errors)
            w_inf.add_metric(lv, w.in_flight)
            w_up.add_metric(lv, 1.0 if w.takes_traffic else 0.0)
            for fam, h in ((ttft, w.stats.ttft), (lat, w.stats.latency)):
                if h.count:
                    fam.add_metric(lv, h.cumulative(), h.total)
        yield from (w_req, w_err, w_inf, w_up, ttft, lat)


class MetricsExporter:
    """Owns a private Prometheus registry (so several routers can live in one test process)."""

    def __init__(self, stats: RouterStats, registry: WorkerRegistry) -> None:
        self._collector = _Collector(stats, registry)
        self._prom_registry: object | None = None

    def render(self) -> tuple[bytes, str]:
        """Prometheus text exposition and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        if self._prom_registry is None:
            reg = CollectorRegistry(auto_describe=False)
            reg.register(self._collector)  # type: ignore[arg-type]
            self._prom_registry = reg
        return generate_latest(self._prom_registry), CONTENT_TYPE_LATEST  # type: ignore[arg-type]

