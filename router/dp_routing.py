"""DP-aware routing (`--dp-routing router`): the attention-DP group of the chosen decode instance and of the
chosen prefill instance that a request runs on, picked by load and sent as `data_parallel_rank` (decode's
group) and `disagg_prefill_dp_rank` (prefill's group) in the one body both instances get.

Why: left to themselves the instances choose blindly where load matters most. A prefill instance runs a
request on group `bootstrap_room % dp` (a random draw: two long prompts land on one group while the other
idles), and a decode instance picks its least loaded group by request count, blind to a long prompt's KV.

What the router knows of a group's load, from two sources:
- its own requests, counted the moment it sends them (exact, no delay): per (worker, group), the tokens of
  the requests it has in flight there (prefill: the prompt, until prefill answers; decode: the prompt and
  the output budget, until the answer ends);
- the worker's own report, polled from `GET /get_load` every `dp_load_interval_s`: each group's tokens in
  flight (what it holds or waits for), requests, and free pages. Polled, not pushed: workers do not know
  which routers exist (they come and go through `/workers`, several processes each), and a poll is one
  small GET per worker and interval on connections the router keeps open anyway. The report adds what this
  router did not send (its sibling processes, clients talking to the worker directly) and gives the size.

A group's score is its own tokens in flight plus the reported tokens the router cannot account for
(`max(0, reported - the most of its own it had there while the report can have been made)`: a report is up to
a few tenths of a second old, and requests of its own that ended since must not count as someone else's);
the lowest score wins, ties go round the groups.
Until a worker's first report the router does not know its `dp_size` and leaves the choice to it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import TYPE_CHECKING, Any

import orjson

from kvtransfer.protocol import DATA_PARALLEL_RANK, ROUTED_DP_RANK
from router.background import BackgroundLoop
from router.errors import BadRequest
from router.upstream import UpstreamError, UpstreamPool, build_request

if TYPE_CHECKING:
    from router.inbound import InboundRequest
    from router.workers import Worker

log = logging.getLogger("router.dp_routing")

DP_ROUTING_MODES = ("internal", "router")
# How many poll intervals back a report may describe (the ranks report every 0.2 s, polls come every 0.1 s).
REPORT_LAG_POLLS = 4
# A worker that does not serve /get_load (an older worker) is asked again this rarely.
_UNSUPPORTED_RETRY_S = 30.0
_SINGLE_GROUP_RETRY_S = 5.0  # and one with a single DP group this rarely
# Output tokens a decode group is charged for a request that names no limit (SGLang's /generate default).
DEFAULT_OUTPUT_BUDGET = 128
_OUTPUT_LIMITS = ("max_tokens", "max_completion_tokens", "max_new_tokens", "max_output_tokens")


class DpGroups:
    """One worker's attention-DP groups as the router sees them. `size` is 0 until the worker reports."""

    __slots__ = ("size", "own", "own_requests", "reported", "own_at_report", "free_pages", "reported_at",
                 "_turn", "next_poll_at", "peaks", "epoch")

    def __init__(self) -> None:
        self.size = 0
        self.own: list[int] = []  # tokens of this router's requests in flight per group
        self.own_requests: list[int] = []
        self.reported: list[int] = []  # the worker's last report: tokens in flight per group
        # The most of `own` the group held while that report can have been made (see `peaks`).
        self.own_at_report: list[int] = []
        self.free_pages: list[int] = []
        self.reported_at = 0.0  # loop time of the last report
        self._turn = itertools.count()
        self.next_poll_at = 0.0
        # The most of `own` per group in each of the last REPORT_LAG_POLLS poll intervals (newest last): a
        # report describes the worker up to that long ago, when more of the router's requests may have been
        # there, and those must not count as load the router did not send.
        self.peaks: list[list[int]] = [[]]
        self.epoch = 0  # counts resizes (a restarted worker with another dp_size): older charges lapse

    def resize(self, size: int) -> None:
        if size != self.size:
            self.size = size
            self.epoch += 1
            self.own, self.own_requests = [0] * size, [0] * size
            self.reported, self.own_at_report, self.free_pages = [0] * size, [0] * size, [0] * size
            self.peaks = [[0] * size]

    def update(self, groups: list[dict[str, Any]], now: float) -> None:
        """Takes a `/get_load` report (one entry per group, `dp_rank` and `tokens_in_flight` at least)."""
        for group in groups:
            g = group.get("dp_rank")
            if isinstance(g, int) and 0 <= g < self.size:
                self.reported[g] = int(group.get("tokens_in_flight", 0))
                self.free_pages[g] = int(group.get("free_pages", 0))
                self.own_at_report[g] = max(self.own[g], *(peak[g] for peak in self.peaks))
        self.reported_at = now
        self.peaks = [*self.peaks[-(REPORT_LAG_POLLS - 1):], list(self.own)]

    def charged(self, g: int) -> None:
        """`own[g]` grew: remembered as this interval's peak."""
        peak = self.peaks[-1]
        if self.own[g] > peak[g]:
            peak[g] = self.own[g]

    def score(self, g: int) -> int:
        """Tokens in flight on group `g`: the router's own, plus what the worker reported beyond them."""
        return self.own[g] + max(0, self.reported[g] - self.own_at_report[g])

    def least_loaded(self) -> int:
        """The group with the lowest score; equal scores are taken in turn (none is favoured when idle)."""
        start = next(self._turn) % self.size
        order = [(start + i) % self.size for i in range(self.size)]
        return min(order, key=lambda g: (self.score(g), self.own_requests[g]))

    def describe(self) -> list[dict[str, int]]:
        return [{"dp_rank": g, "score": self.score(g), "router_tokens": self.own[g],
                 "router_requests": self.own_requests[g], "reported_tokens": self.reported[g],
                 "free_pages": self.free_pages[g]} for g in range(self.size)]


class Charge:
    """Tokens charged to one group of one worker while a request is in flight there; `release()` once."""

    __slots__ = ("groups", "group", "tokens", "_live", "_epoch")

    def __init__(self, groups: DpGroups, group: int, tokens: int) -> None:
        self.groups, self.group, self.tokens = groups, group, tokens
        self._epoch = groups.epoch
        self._live = group < groups.size
        if self._live:
            groups.own[group] += tokens
            groups.own_requests[group] += 1
            groups.charged(group)

    def release(self) -> None:
        groups = self.groups
        if self._live and self._epoch == groups.epoch:  # a resize in between dropped the counts already
            groups.own[self.group] -= self.tokens
            groups.own_requests[self.group] -= 1
        self._live = False


def requested_dp_rank(inbound: InboundRequest, name: str) -> tuple[str, int | None]:
    """(the field, the DP group) the client named itself (`data_parallel_rank` or `routed_dp_rank` for
    decode, `disagg_prefill_dp_rank` for prefill), type-checked; the range is checked by `DpRouter.pick`."""
    names = (DATA_PARALLEL_RANK, ROUTED_DP_RANK) if name == DATA_PARALLEL_RANK else (name,)
    for field in names:
        value = inbound.doc.get(field)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise BadRequest(f"'{field}' must be a non-negative integer, got {value!r}", param=field)
        return field, value
    return name, None


def output_budget(doc: dict[str, Any]) -> int:
    """The output tokens a request may produce, as its body says (top level or `sampling_params`)."""
    params = doc.get("sampling_params")
    for source in (doc, params if isinstance(params, dict) else {}):
        for name in _OUTPUT_LIMITS:
            value = source.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
    return DEFAULT_OUTPUT_BUDGET


class DpRouter:
    """Picks DP groups and keeps the per-group load fresh (`start()` polls, `close()` stops).

    Args:
        mode: "router" (pick by load) or "internal" (leave the choice to the instances: nothing is sent,
            nothing polled; a client's own `data_parallel_rank` still passes through to the worker).
        interval_s: how often each worker's `/get_load` is polled.
        timeout_s: each poll's timeout.
    """

    def __init__(self, mode: str, pool: UpstreamPool, workers: Any, interval_s: float = 0.1,
                 timeout_s: float = 2.0) -> None:
        if mode not in DP_ROUTING_MODES:
            raise ValueError(f"dp routing must be one of {DP_ROUTING_MODES}, got {mode!r}")
        self.mode = mode
        self._pool = pool
        self._workers = workers  # () -> list[Worker]
        self._interval = interval_s
        self._timeout = timeout_s
        self._loop = BackgroundLoop("router-dp-load")

    @property
    def enabled(self) -> bool:
        return self.mode == "router"

    def pick(self, worker: Worker, requested: tuple[str, int | None]) -> int | None:
        """The group `worker` runs the request on: the group the client named (`requested`: its field and
        value; checked against the worker's size when known: a 400 naming the field when out of range),
        else the least loaded one (router mode and a known size), else None: the instance chooses."""
        groups = worker.dp
        field, group = requested
        if group is not None:
            if groups.size and group >= groups.size:
                raise BadRequest(f"'{field}' {group} is out of range: {worker.role.value} worker {worker.url} "
                                 f"has {groups.size} attention-DP groups (0 to {groups.size - 1})", param=field)
            return group
        if not self.enabled or groups.size <= 1:
            return None
        return groups.least_loaded()

    def start(self) -> None:
        if self.enabled and self._interval > 0:
            self._loop.start(self._run)

    async def close(self) -> None:
        await self._loop.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            due = [w for w in self._workers() if w.takes_traffic and w.dp.next_poll_at <= now]
            if due:
                await asyncio.gather(*(self.poll(w) for w in due))
            await asyncio.sleep(self._interval)

    async def poll(self, worker: Worker) -> bool:
        """One `/get_load` of `worker`; True when it answered with a report."""
        loop = asyncio.get_running_loop()
        groups = worker.dp
        try:
            conn = await self._pool.request(worker.host, worker.port,
                                            build_request("GET", "/get_load", worker.netloc, b""),
                                            loop.time() + self._timeout)
            body = await conn.read_all()
            status = conn.status
        except UpstreamError as exc:
            log.debug("/get_load of %s failed: %s", worker.url, exc)
            return False  # health checks judge the worker; the counts simply age
        report = _parse_report(body) if status == 200 else None
        if report is None:
            if groups.next_poll_at == 0.0:
                log.info("worker %s gives no DP load report (/get_load answered %d): it picks its own DP "
                         "groups", worker.url, status)
            groups.next_poll_at = loop.time() + _UNSUPPORTED_RETRY_S
            return False
        size, rows = report
        groups.resize(size)
        groups.update(rows, loop.time())
        # One group leaves nothing to choose: asked again only now and then, to see a restart with more.
        groups.next_poll_at = loop.time() + _SINGLE_GROUP_RETRY_S if size == 1 else 0.0
        return True


def _parse_report(body: bytes) -> tuple[int, list[dict[str, Any]]] | None:
    """(dp_size, groups) from tandem's `/get_load` ({"dp_size", "dp_groups"}) or SGLang's (a list with
    `dp_rank` and `num_tokens` per group); None for anything else."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(doc, dict) and isinstance(doc.get("dp_size"), int) and isinstance(doc.get("dp_groups"), list):
        rows = [g for g in doc["dp_groups"] if isinstance(g, dict)]
        return (doc["dp_size"], rows) if doc["dp_size"] >= 1 else None
    if isinstance(doc, list) and doc and all(isinstance(g, dict) and isinstance(g.get("dp_rank"), int) for g in doc):
        rows = [{"dp_rank": g["dp_rank"], "tokens_in_flight": g.get("num_tokens", 0)} for g in doc]
        return max(g["dp_rank"] for g in doc) + 1, rows
    return None
