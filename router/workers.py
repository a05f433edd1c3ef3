"""The worker registry: which prefill and decode workers exist, which take traffic, and their load."""

from __future__ import annotations

import ipaddress
import logging
import time
from urllib.parse import urlsplit

import orjson

from kvtransfer.protocol import BOOTSTRAP_HOST, BOOTSTRAP_PORT, BOOTSTRAP_ROOM
from router.config import Role, WorkerSpec
from router.dp_routing import DpGroups
from router.errors import RouterError
from router.metrics import WorkerStats

log = logging.getLogger("router.workers")


def _bootstrap_host(hostname: str) -> str:
    # SGLang's routers bracket IPv6 literals so that `host:port` can be formed from the field.
    try:
        ipaddress.IPv6Address(hostname)
    except ValueError:
        return hostname
    return f"[{hostname}]"


class Worker:
    """One worker as the router sees it: address, role, load, health and drain state.

    `in_flight` counts requests sent and not finished; `healthy` turns False after
    `failure_threshold` consecutive failures (health probes or requests that could not reach it) and
    back to True on the next success. `failure_epoch` counts recorded failures: a request remembers it
    when sent, and its failure counts only if no other failure was recorded since (one crash under
    load fails every request in flight at once: that is one failure, not one per request); `draining` is set by removal: no new requests, and the registry
    drops the worker once its in-flight requests have finished.
    """

    __slots__ = (
        "spec", "url", "role", "host", "port", "bootstrap_port", "in_flight", "healthy", "draining",
        "consecutive_failures", "next_probe_at", "stats", "pd_fields_prefix", "added_at", "netloc",
        "bootstrap_host", "failure_epoch", "dp",
    )

    def __init__(self, spec: WorkerSpec) -> None:
        parts = urlsplit(spec.url)
        self.spec = spec
        self.url = spec.url
        self.role = spec.role
        self.host = parts.hostname or ""
        self.port = parts.port or 80
        self.netloc = parts.netloc  # the Host header sent to it
        self.bootstrap_port = spec.bootstrap_port
        self.bootstrap_host = _bootstrap_host(self.host)
        self.in_flight = 0
        self.healthy = True
        self.draining = False
        self.consecutive_failures = 0
        self.failure_epoch = 0
        self.next_probe_at = 0.0
        self.stats = WorkerStats()
        self.dp = DpGroups()  # its attention-DP groups' load (router.dp_routing)
        self.added_at = time.time()
        # The JSON text spliced into request bodies sent to a pair with this prefill (room appended).
        self.pd_fields_prefix = (
            orjson.dumps(BOOTSTRAP_HOST) + b":" + orjson.dumps(self.bootstrap_host)
            + b"," + orjson.dumps(BOOTSTRAP_PORT) + b":" + orjson.dumps(self.bootstrap_port)
            + b"," + orjson.dumps(BOOTSTRAP_ROOM) + b":"
        )

    @property
    def takes_traffic(self) -> bool:
        return self.healthy and not self.draining

    def _record_success(self) -> bool:
        self.consecutive_failures = 0
        if self.healthy:
            return False
        self.healthy = True
        log.info("worker %s (%s) is healthy again: re-admitted", self.url, self.role.value)
        return True

    def _record_failure(self, threshold: int, reason: str) -> bool:
        self.consecutive_failures += 1
        self.failure_epoch += 1
        if not self.healthy or self.consecutive_failures < threshold:
            return False
        self.healthy = False
        log.warning("worker %s (%s) ejected after %d consecutive failures: %s", self.url, self.role.value,
                    self.consecutive_failures, reason)
        return True

    def describe(self) -> dict[str, object]:
        return {
            "url": self.url,
            "role": self.role.value,
            "bootstrap_port": self.bootstrap_port,
            "healthy": self.healthy,
            "draining": self.draining,
            "in_flight": self.in_flight,
            "consecutive_failures": self.consecutive_failures,
            "requests": self.stats.requests,
            "errors": self.stats.errors,
            "dp_size": self.dp.size,
            "dp_groups": self.dp.describe(),
        }


class WorkerRegistry:
    """All workers by role. Candidate lists are cached and rebuilt only when health or membership
    changes, so picking a worker costs no list building on the hot path."""

    def __init__(self, specs: list[WorkerSpec] | None = None) -> None:
        self._by_url: dict[str, Worker] = {}
        self._candidates: dict[Role, list[Worker]] = {Role.PREFILL: [], Role.DECODE: []}
        self._version = -1  # health/membership fingerprint the candidate cache was built for
        for spec in specs or []:
            self.add(spec)

    def add(self, spec: WorkerSpec) -> Worker:
        existing = self._by_url.get(spec.url)
        if existing is not None:
            if existing.draining and existing.role is spec.role:
                existing.draining = False  # re-adding a draining worker cancels its removal
                self.invalidate()
                return existing
            raise RouterError(409, f"worker {spec.url} is already registered as {existing.role.value}",
                              code="worker_exists")
        worker = Worker(spec)
        self._by_url[spec.url] = worker
        self.invalidate()
        log.info("worker %s added as %s", spec.url, spec.role.value)
        return worker

    def remove(self, url: str) -> Worker:
        """Start draining `url`: it takes no new requests and leaves once its in-flight ones end."""
        worker = self._by_url.get(url.rstrip("/"))
        if worker is None:
            raise RouterError(404, f"no worker {url}", code="worker_not_found")
        worker.draining = True
        self.invalidate()
        self.release_if_drained(worker)
        return worker

    def release_if_drained(self, worker: Worker) -> None:
        if worker.draining and worker.in_flight == 0 and self._by_url.get(worker.url) is worker:
            del self._by_url[worker.url]
            self.invalidate()
            log.info("worker %s drained and removed", worker.url)

    def record_success(self, worker: Worker) -> None:
        if worker._record_success():
            self.invalidate()

    def record_failure(self, worker: Worker, threshold: int, reason: str) -> None:
        if worker._record_failure(threshold, reason):
            self.invalidate()

    def record_request_failure(self, worker: Worker, sent_at_epoch: int, threshold: int, reason: str) -> None:
        """A request sent when `worker.failure_epoch` was `sent_at_epoch` failed: counted only if no
        failure was recorded since it was sent (else it is the same outage seen again)."""
        if worker.failure_epoch == sent_at_epoch:
            self.record_failure(worker, threshold, reason)

    def get(self, url: str) -> Worker | None:
        return self._by_url.get(url.rstrip("/"))

    def all_workers(self) -> list[Worker]:
        return list(self._by_url.values())

    def has_role(self, role: Role) -> bool:
        return any(w.role is role for w in self._by_url.values())

    def invalidate(self) -> None:
        self._version = -1

    def candidates(self, role: Role) -> list[Worker]:
        """Workers of `role` that take traffic now (cached; callers must not mutate the list)."""
        if self._version == -1:
            for r in (Role.PREFILL, Role.DECODE):
                self._candidates[r] = [w for w in self._by_url.values() if w.role is r and w.takes_traffic]
            self._version = 0
        return self._candidates[role]
