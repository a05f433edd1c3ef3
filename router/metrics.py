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
from typing import TYPE_CHECKING, Any

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


def snapshot(stats: RouterStats, registry: WorkerRegistry) -> dict[str, Any]:
    """This process's metrics as plain JSON-able data (what `--workers N` siblings send each other)."""
    workers = {}
    for w in registry.all_workers():
        workers[w.url] = {
            "role": w.role.value,
            "requests": w.stats.requests,
            "errors": w.stats.errors,
            "in_flight": w.in_flight,
            "healthy": 1 if w.takes_traffic else 0,
            "ttft": [w.stats.ttft.counts, w.stats.ttft.total],
            "latency": [w.stats.latency.counts, w.stats.latency.total],
        }
    return {
        "processes": 1,
        "requests": [[endpoint, mode, n] for (endpoint, mode), n in stats.requests.items()],
        "errors": dict(stats.errors),
        "in_flight": stats.in_flight,
        "rejected_backpressure": stats.rejected_backpressure,
        "workers": workers,
    }


def _add_histogram(into: list[Any], other: list[Any]) -> None:
    into[0] = [a + b for a, b in zip(into[0], other[0], strict=True)]
    into[1] += other[1]


def merge(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum snapshots of several processes: counters, in-flight gauges and histogram buckets add up; a
    worker counts as healthy when any process sends it traffic."""
    merged = {"processes": 0, "requests": [], "errors": {}, "in_flight": 0, "rejected_backpressure": 0,
              "workers": {}}  # fmt: skip
    requests: dict[tuple[str, str], int] = {}
    for snap in snapshots:
        merged["processes"] += snap["processes"]
        merged["in_flight"] += snap["in_flight"]
        merged["rejected_backpressure"] += snap["rejected_backpressure"]
        for endpoint, mode, n in snap["requests"]:
            requests[(endpoint, mode)] = requests.get((endpoint, mode), 0) + n
        for kind, n in snap["errors"].items():
            merged["errors"][kind] = merged["errors"].get(kind, 0) + n
        for url, w in snap["workers"].items():
            into = merged["workers"].get(url)
            if into is None:
                merged["workers"][url] = {**w, "ttft": [list(w["ttft"][0]), w["ttft"][1]],
                                          "latency": [list(w["latency"][0]), w["latency"][1]]}  # fmt: skip
                continue
            for key in ("requests", "errors", "in_flight"):
                into[key] += w[key]
            into["healthy"] = max(into["healthy"], w["healthy"])
            _add_histogram(into["ttft"], w["ttft"])
            _add_histogram(into["latency"], w["latency"])
    merged["requests"] = [[e, m, n] for (e, m), n in requests.items()]
    return merged


def _cumulative(counts: list[int]) -> list[tuple[str, int]]:
    """Prometheus buckets (upper bound, running count) of a snapshot's histogram counts; every router
    histogram has the LATENCY_BUCKETS_S bounds (snapshots carry counts only)."""
    out, running = [], 0
    for bound, n in zip((*LATENCY_BUCKETS_S, float("inf")), counts, strict=True):
        running += n
        out.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return out


class _Collector:
    """Prometheus families from a snapshot: this process's, merged with `extra` (siblings') when set."""

    def __init__(self, stats: RouterStats, registry: WorkerRegistry) -> None:
        self._stats = stats
        self._registry = registry
        self.extra: list[dict[str, Any]] = []

    def collect(self) -> Iterator[object]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        s = merge([snapshot(self._stats, self._registry), *self.extra])
        yield GaugeMetricFamily("router_processes", "Router processes these metrics sum over", value=s["processes"])
        req = CounterMetricFamily("router_requests", "Requests accepted", labels=["endpoint", "mode"])
        for endpoint, mode, n in sorted(s["requests"]):
            req.add_metric([endpoint, mode], n)
        yield req
        err = CounterMetricFamily("router_errors", "Requests that ended in an error", labels=["kind"])
        for kind, n in sorted(s["errors"].items()):
            err.add_metric([kind], n)
        yield err
        yield GaugeMetricFamily("router_in_flight", "Requests being served", value=s["in_flight"])
        yield CounterMetricFamily(
            "router_rejected_backpressure", "Requests refused by --max-inflight", value=s["rejected_backpressure"]
        )
        labels = ["worker", "role"]
        w_req = CounterMetricFamily("router_worker_requests", "Requests sent to a worker", labels=labels)
        w_err = CounterMetricFamily("router_worker_errors", "Failed requests per worker", labels=labels)
        w_inf = GaugeMetricFamily("router_worker_in_flight", "Requests in flight per worker", labels=labels)
        w_up = GaugeMetricFamily("router_worker_healthy", "1 when the worker takes traffic", labels=labels)
        ttft = HistogramMetricFamily("router_worker_ttft_seconds", "Time to first byte from decode", labels=labels)
        lat = HistogramMetricFamily("router_worker_latency_seconds", "Request latency", labels=labels)
        for url, w in s["workers"].items():
            lv = [url, w["role"]]
            w_req.add_metric(lv, w["requests"])
            w_err.add_metric(lv, w["errors"])
            w_inf.add_metric(lv, w["in_flight"])
            w_up.add_metric(lv, float(w["healthy"]))
            for fam, (counts, total) in ((ttft, w["ttft"]), (lat, w["latency"])):
                if sum(counts):
                    fam.add_metric(lv, _cumulative(counts), total)
        yield from (w_req, w_err, w_inf, w_up, ttft, lat)


class MetricsExporter:
    """Owns a private Prometheus registry (so several routers can live in one test process)."""

    def __init__(self, stats: RouterStats, registry: WorkerRegistry) -> None:
        self._stats = stats
        self._registry = registry
        self._collector = _Collector(stats, registry)
        self._prom_registry: object | None = None

    def snapshot(self) -> dict[str, Any]:
        return snapshot(self._stats, self._registry)

    def render(self, siblings: list[dict[str, Any]] | None = None) -> tuple[bytes, str]:
        """Prometheus text exposition and its content type; `siblings`: other processes' snapshots to add."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        if self._prom_registry is None:
            reg = CollectorRegistry(auto_describe=False)
            reg.register(self._collector)  # type: ignore[arg-type]
            self._prom_registry = reg
        self._collector.extra = siblings or []
        try:
            return generate_latest(self._prom_registry), CONTENT_TYPE_LATEST  # type: ignore[arg-type]
        finally:
            self._collector.extra = []
