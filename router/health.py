"""Active health checks: `GET /health` on every worker, ejection after consecutive failures, re-admission.

A healthy worker is probed every `health_interval_s`. An ejected one is probed with exponential
backoff (interval × 2^k, capped at `health_max_backoff_s`) and re-admitted on its first success.
Requests that cannot reach a worker count as failures too (the proxy records them), so a dead worker
is usually ejected before its next probe; all the requests one crash fails count as one failure
(`WorkerRegistry.record_request_failure`), so a crash under load does not jump the backoff to its cap.
While requests are being refused for want of a healthy worker of a role, its ejected workers are probed
every `WANTED_PROBE_S` whatever their backoff (`wanted`): the backoff spares a worker that nobody waits
for, and a restarted instance is serving within about that long of being healthy.
"""

from __future__ import annotations

import asyncio
import logging

from router.background import BackgroundLoop
from router.config import RouterConfig
from router.upstream import UpstreamError, UpstreamPool, build_request
from router.workers import Worker, WorkerRegistry

log = logging.getLogger("router.health")

# How often an ejected worker is probed while requests wait for its role (at most every health interval).
WANTED_PROBE_S = 0.5


class HealthChecker:
    def __init__(self, registry: WorkerRegistry, pool: UpstreamPool, config: RouterConfig) -> None:
        self._registry = registry
        self._pool = pool
        self._interval = config.health_interval_s
        self._timeout = config.health_timeout_s
        self._threshold = config.health_failure_threshold
        self._max_backoff = config.health_max_backoff_s
        self._loop = BackgroundLoop("router-health")
        self._wake = asyncio.Event()  # set by `wanted`: a probe became due sooner than the loop sleeps
        self._last_probe: dict[Worker, float] = {}  # loop time of each worker's last probe

    def start(self) -> None:
        if self._interval > 0:
            self._loop.start(self._run)

    async def close(self) -> None:
        await self._loop.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            workers = self._registry.all_workers()
            due = [w for w in workers if w.next_probe_at <= now]
            if due:
                await asyncio.gather(*(self.probe(w) for w in due))
            pending = [w.next_probe_at for w in self._registry.all_workers()]
            wait = min(pending, default=now + self._interval) - loop.time()
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), min(max(wait, 0.01), self._interval))
            except asyncio.TimeoutError:
                pass

    def wanted(self, workers: list[Worker]) -> None:
        """A request found no healthy worker among `workers` (one role): probe the ejected ones within
        `WANTED_PROBE_S` of their last probe, not after their backoff (the health loop wakes for it)."""
        if not self._loop.running:
            return
        now = asyncio.get_running_loop().time()
        gap = min(WANTED_PROBE_S, self._interval)
        for worker in workers:
            if not worker.healthy and not worker.draining:
                soon = max(now, self._last_probe.get(worker, 0.0) + gap)
                if soon < worker.next_probe_at:
                    worker.next_probe_at = soon
                    self._wake.set()

    async def probe(self, worker: Worker) -> bool:
        """One health probe; updates the worker's health and schedules its next probe."""
        loop = asyncio.get_running_loop()
        ok, reason = False, ""
        try:
            conn = await self._pool.request(
                worker.host, worker.port, build_request("GET", "/health", worker.netloc, b""),
                loop.time() + self._timeout,
            )
            await conn.read_all()
            ok = 200 <= conn.status < 300
            reason = f"/health answered {conn.status}"
        except UpstreamError as exc:
            reason = str(exc)
        now = loop.time()
        self._last_probe[worker] = now
        if ok:
            self._registry.record_success(worker)
            worker.next_probe_at = now + self._interval
        else:
            self._registry.record_failure(worker, self._threshold, reason)
            if worker.healthy:
                worker.next_probe_at = now + self._interval
            else:
                k = max(0, worker.consecutive_failures - self._threshold)
                worker.next_probe_at = now + min(self._interval * (2**min(k, 16)), self._max_backoff)
        return ok
