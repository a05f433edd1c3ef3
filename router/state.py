"""RouterState: the one owner of everything a router process holds (pool, registry, health, tasks)."""

from __future__ import annotations

import asyncio
import logging

import orjson

from router.config import Role, RouterConfig, WorkerSpec
from router.dp_routing import DpRouter
from router.errors import RouterError
from router.group import ProcessGroup
from router.health import HealthChecker
from router.metrics import MetricsExporter, RouterStats
from router.policies import make_policy
from router.upstream import UpstreamError, UpstreamPool, build_request
from router.workers import Worker, WorkerRegistry

log = logging.getLogger("router.state")
_ABORT_TIMEOUT_S = 2.0


class ActiveRequests:
    """Requests in flight by the router's id, and the router's ids by the ids the client knows (which
    need not be unique: clients reuse them), so that `/abort_request` naming a client id finds them."""

    def __init__(self) -> None:
        self._by_rid: dict[str, tuple[Worker | None, Worker, list[str]]] = {}
        self._by_client: dict[str, set[str]] = {}
        self._client_of: dict[str, tuple[str, ...]] = {}

    def add(self, rid: str, client: tuple[str, ...], entry: tuple[Worker | None, Worker, list[str]]) -> None:
        self._by_rid[rid] = entry
        self._client_of[rid] = client
        for cid in client:
            self._by_client.setdefault(cid, set()).add(rid)

    def remove(self, rid: str) -> None:
        self._by_rid.pop(rid, None)
        for cid in self._client_of.pop(rid, ()):
            rids = self._by_client.get(cid)
            if rids is not None:
                rids.discard(rid)
                if not rids:
                    del self._by_client[cid]

    def find(self, client_id: str) -> list[tuple[Worker | None, Worker, list[str]]]:
        """(prefill, decode, worker-side rids) of every request in flight under `client_id`."""
        return [self._by_rid[r] for r in self._by_client.get(client_id, ()) if r in self._by_rid]

    def __len__(self) -> int:
        return len(self._by_rid)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._by_client


class RouterState:
    """Built by `create_app`; `start()` on app start-up, `close()` on shutdown (cancels background
    tasks, closes every upstream connection)."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.registry = WorkerRegistry([*config.prefill, *config.decode])
        self.pool = UpstreamPool(connect_timeout_s=config.connect_timeout_s)
        self.stats = RouterStats()
        self.metrics = MetricsExporter(self.stats, self.registry)
        kw = dict(
            block_chars=config.cache_block_chars,
            match_ratio=config.cache_match_ratio,
            balance_abs=config.cache_balance_abs,
        )
        self.prefill_policy = make_policy(config.prefill_policy, **kw)  # type: ignore[arg-type]
        self.decode_policy = make_policy(config.decode_policy, **kw)  # type: ignore[arg-type]
        self.health = HealthChecker(self.registry, self.pool, config)
        # The attention-DP group of each chosen instance (`--dp-routing`), and their polled load.
        self.dp = DpRouter(config.dp_routing, self.pool, self.registry.all_workers, config.dp_load_interval_s,
                           config.health_timeout_s)
        # Requests in flight, for the router-level `/abort_request`.
        self.active = ActiveRequests()
        self._background: set[asyncio.Task[None]] = set()
        # With `--workers N`: the other processes, for admin changes and /metrics (router.group).
        self.group = ProcessGroup(config.group, self.on_sibling_message) if config.group is not None else None

    async def start(self) -> None:
        if self.group is not None:
            await self.group.start()
        self.health.start()
        self.dp.start()

    async def close(self) -> None:
        if self.group is not None:
            await self.group.close()
        await self.health.close()
        await self.dp.close()
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        self.pool.close()

    async def on_sibling_message(self, message: dict[str, object]) -> dict[str, object]:
        """What a sibling process asks (`router.group`): this process's metrics, or an admin change that
        was made there. Admin changes are idempotent here: the worker may be present or gone already."""
        op = message.get("op")
        if op == "snapshot":
            return self.metrics.snapshot()
        if op == "add":
            spec = WorkerSpec(str(message["url"]), Role(str(message["role"])), message.get("bootstrap_port"))  # type: ignore[arg-type]
            try:
                worker = self.registry.add(spec)
            except RouterError:  # already there with that role (or another: the admin call said 409)
                return {"added": False}
            worker.next_probe_at = 0.0
            return {"added": True}
        if op == "remove":
            try:
                self.registry.remove(str(message["url"]))
            except RouterError:
                return {"removed": False}
            return {"removed": True}
        raise ValueError(f"unknown control op {op!r}")

    @property
    def background_tasks(self) -> int:
        return len(self._background)

    def send_abort(self, worker: Worker, rids: list[str]) -> None:
        """Fire-and-forget `POST /abort_request {"rid": ...}` to `worker` (SGLang's abort endpoint).

        Closing the request's connection already aborts it on workers that watch for disconnects;
        this also covers workers that only abort on request, and a request still queued there."""
        task = asyncio.get_running_loop().create_task(self._abort(worker, rids))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abort(self, worker: Worker, rids: list[str]) -> None:
        deadline = asyncio.get_running_loop().time() + _ABORT_TIMEOUT_S
        for rid in rids:
            body = orjson.dumps({"rid": rid})
            try:
                conn = await self.pool.request(
                    worker.host, worker.port, build_request("POST", "/abort_request", worker.netloc, body), deadline
                )
                await conn.read_all()
            except UpstreamError as exc:
                log.debug("abort of %s on %s failed: %s", rid, worker.url, exc)
                return
