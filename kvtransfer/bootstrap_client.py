"""The client of bootstrap services (`kvtransfer.bootstrap`): registration for prefill ranks, cached lookups.

A decode rank looks a prefill instance up from its decode loop, once per request it admits, so a lookup must
not wait on the network while the instance is known: a cached lookup older than `CACHE_TTL_S` is still
returned at once and fetched again on a thread of its own (stale-while-revalidate); the caller waits only for
an instance it has no usable lookup of (the first time, after `invalidate`, after a failed refresh, or after
`STALE_LIMIT_S` without any lookup of it).
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import msgspec

from kvtransfer.messages import Deregistration, InstanceInfo, RankRegistration, decode_json, encode_json
from kvtransfer.state import KVBootstrapError, KVProtocolError

log = logging.getLogger(__name__)


class BootstrapUnreachable(KVBootstrapError):
    """No answer from the service: refused, reset, or timed out (a dead or blackholed host)."""


class BootstrapNotReady(KVBootstrapError):
    """The service answered, but not every rank of the instance's layout has registered yet: it is starting,
    or an elastic scale just switched it to a layout whose new ranks are still registering."""


@dataclass(frozen=True)
class _Cached:
    info: InstanceInfo
    fetched: float  # time.monotonic() when the service answered


class BootstrapClient:
    """Talks to bootstrap services; lookups are cached per instance address — safe to share between threads.

    Supports: `register` / `deregister` (blocking, each request bounded by `timeout_s`) and `lookup`, which
    blocks only when it has no usable cached lookup and otherwise refreshes in the background:
      - younger than `CACHE_TTL_S`: returned as it is;
      - older (up to `STALE_LIMIT_S`, or while a refresh of it runs): returned as it is, and one refresh per
        instance starts on a thread; a refresh that answers replaces it (the same object when nothing
        changed: callers compare by identity), one that fails drops it, so the next lookup fetches itself
        and raises the failure (an unreachable service is remembered for `FAILURE_TTL_S` as below);
      - none (first use, after `invalidate`, after a failed refresh, or unused past `STALE_LIMIT_S`):
        fetched by the caller. A failure to reach the service is remembered for `FAILURE_TTL_S`: lookups
        within it fail at once.
    `invalidate` drops the cached lookup and discards the result of every fetch already under way, so the
    next lookup fetches one begun after it (a peer restarted or died).
    Attributes: `timeout_s`, `auth_token`.

    Args:
        timeout_s: bound on each HTTP request, a refresh's included (so no lookup is served older than
            `STALE_LIMIT_S + timeout_s`, even while its service hangs).
        auth_token: sent as `Authorization: Bearer <auth_token>` with registrations and deletions.
    Call `close()` to join the refreshes under way (each ends within `timeout_s`).
    """

    # A failed lookup is remembered this long: a dead or blackholed prefill host costs one timeout per
    # period instead of one per request (each of which would stall its caller for `timeout_s`).
    FAILURE_TTL_S = 2.0
    # A lookup is trusted this long, then fetched again (in the background): a prefill instance restarted on
    # the same port has new sessions and control endpoints, and requests sent to the old ones would wait out
    # the peer timeout; an elastic instance's ranks join and leave under one id. One small GET per second
    # per prefill instance in use is the price.
    CACHE_TTL_S = 1.0
    # A lookup nobody asked for this long is not served while it refreshes: the caller fetches. An instance
    # in use is refreshed about every `CACHE_TTL_S`; one left idle may have restarted since, and its first
    # request would otherwise go to the old ranks and wait out the peer timeout.
    STALE_LIMIT_S = 5.0
    # Refreshes that may run at once (each of another instance).
    REFRESH_THREADS = 4

    def __init__(self, timeout_s: float = 5.0, auth_token: str | None = None) -> None:
        self.timeout_s = timeout_s
        self.auth_token = auth_token
        self._lock = threading.Lock()
        self._cache: dict[str, _Cached] = {}  # address -> the last lookup
        self._failures: dict[str, tuple[float, str]] = {}  # address -> (expiry, why)
        # Bumped by `invalidate`: a fetch begun under an older generation stores nothing.
        self._generations: dict[str, int] = {}
        self._refreshing: dict[str, Future[None]] = {}  # address -> its refresh, queued or under way
        # Refreshes run on pooled threads, made on first need: starting a thread per refresh held the
        # caller until the new thread first ran (up to the interpreter's 5 ms switch interval, measured).
        self._refreshers: ThreadPoolExecutor | None = None
        self._closed = False

    # --- prefill ranks ------------------------------------------------------------------------------
    def register(self, address: str, registration: RankRegistration) -> None:
        """Register a rank; retries while the service is not up yet (rank 0 may still be starting it)."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                self._request("PUT", f"http://{address}/v1/ranks", encode_json(registration))
                return
            except KVBootstrapError as exc:
                if not isinstance(exc, BootstrapUnreachable) or time.monotonic() > deadline:
                    raise
            time.sleep(0.05)

    def deregister(self, address: str, rank: int, session: str) -> None:
        self._request("DELETE", f"http://{address}/v1/ranks", encode_json(Deregistration(rank=rank, session=session)))

    # --- lookups ------------------------------------------------------------------------------------
    def lookup(self, host: str, port: int) -> InstanceInfo:
        """The prefill instance at host:port with every rank registered; `KVBootstrapError` otherwise.
        Returns at once while a usable cached lookup exists (see the class docstring)."""
        address = f"{host}:{port}"
        with self._lock:
            now = time.monotonic()
            cached = self._cache.get(address)
            if cached is not None:
                age = now - cached.fetched
                if age < self.CACHE_TTL_S:
                    return cached.info
                refreshing = address in self._refreshing
                if refreshing or (age < self.STALE_LIMIT_S and not self._closed):
                    if not refreshing:
                        self._start_refresh(address)
                    return cached.info
            failed = self._failures.get(address)
            generation = self._generations.get(address, 0)
        if failed is not None and failed[0] > now:
            raise KVBootstrapError(f"{failed[1]} (failed {now - failed[0] + self.FAILURE_TTL_S:.1f} s ago)")
        return self._fetch_and_store(address, generation)

    def lookup_ready(self, host: str, port: int, wait_s: float, poll_s: float = 0.05) -> InstanceInfo:
        """``lookup``, polling for up to ``wait_s`` while the instance answers that it is not ready: an elastic
        scale switches the service to its new layout as the ranks switch, and a new rank's registration may
        land a moment later. Blocks: for threads that may wait (the decode HTTP process's admission check),
        never a rank loop."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self.lookup(host, port)
            except BootstrapNotReady:
                if time.monotonic() + poll_s > deadline:
                    raise
            time.sleep(poll_s)

    def invalidate(self, host: str, port: int) -> None:
        """Forget the lookup of host:port: the next one fetches, and refreshes under way store nothing."""
        address = f"{host}:{port}"
        with self._lock:
            self._cache.pop(address, None)
            self._generations[address] = self._generations.get(address, 0) + 1

    @property
    def num_cached(self) -> int:
        return len(self._cache)

    @property
    def num_refreshing(self) -> int:
        return len(self._refreshing)

    def close(self) -> None:
        """Start no more refreshes and join those under way; lookups fetch for themselves from now on.
        Idempotent."""
        with self._lock:
            self._closed = True
            refreshers, self._refreshers = self._refreshers, None
        if refreshers is not None:
            refreshers.shutdown(wait=True)

    # --- internals ----------------------------------------------------------------------------------
    def _start_refresh(self, address: str) -> None:
        """Queue one refresh of `address` (lock held)."""
        if self._refreshers is None:
            # A few threads: one blackholed host must not hold up the refreshes of the others.
            self._refreshers = ThreadPoolExecutor(self.REFRESH_THREADS, thread_name_prefix="kv-lookup-refresh")
        generation = self._generations.get(address, 0)
        self._refreshing[address] = self._refreshers.submit(self._refresh, address, generation)

    def _refresh(self, address: str, generation: int) -> None:
        try:
            self._fetch_and_store(address, generation)
        except KVBootstrapError as exc:  # dropped from the cache: the next lookup fetches and raises it
            log.warning("refreshing the lookup of the prefill instance at %s failed: %s", address, exc)
        except Exception:  # a bug: keep the stale lookup, and say so; the next lookup tries again
            log.exception("refreshing the lookup of the prefill instance at %s failed", address)
        finally:
            with self._lock:
                self._refreshing.pop(address, None)

    def _fetch_and_store(self, address: str, generation: int) -> InstanceInfo:
        """Fetch `address` and cache the answer — or the failure: an unreachable service is remembered, and
        any failure drops the cached lookup — unless an `invalidate` came since `generation` was read."""
        try:
            info = self._fetch(address)
        except KVBootstrapError as exc:
            with self._lock:
                if self._generations.get(address, 0) == generation:
                    self._cache.pop(address, None)
                    # Not "still starting": that answer is quick, and soon different.
                    if isinstance(exc, BootstrapUnreachable):
                        self._failures[address] = (time.monotonic() + self.FAILURE_TTL_S, str(exc))
            raise
        with self._lock:
            cached = self._cache.get(address)
            if cached is not None and cached.info == info:
                info = cached.info  # unchanged: callers may keep comparing by identity
            if self._generations.get(address, 0) == generation:
                self._cache[address] = _Cached(info, time.monotonic())
                self._failures.pop(address, None)
        return info

    def _fetch(self, address: str) -> InstanceInfo:
        body = self._request("GET", f"http://{address}/v1/instance")
        try:
            info = decode_json(body, InstanceInfo)
        except KVProtocolError as exc:
            raise KVBootstrapError(f"bootstrap service at {address} answered nonsense: {exc}") from None
        if not info.complete:
            raise BootstrapNotReady(
                f"prefill instance at {address} is not ready: {len(info.ranks)} of {info.tp_size} ranks registered"
            )
        return info

    def _request(self, method: str, url: str, body: bytes | None = None) -> bytes:
        request = urllib.request.Request(url, data=body, method=method)
        request.add_header("Content-Type", "application/json")
        if method != "GET" and self.auth_token is not None:
            request.add_header("Authorization", f"Bearer {self.auth_token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            raise KVBootstrapError(f"{method} {url} failed with {exc.code}: {_error_message(exc.read())}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise BootstrapUnreachable(f"bootstrap service at {url} is unreachable: {reason}") from None


def _error_message(body: bytes) -> Any:
    try:
        return msgspec.json.decode(body)["error"]["message"]
    except (msgspec.DecodeError, KeyError, TypeError):
        return body[:200].decode(errors="replace")
