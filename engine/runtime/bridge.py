"""The HTTP process's side of an instance: an `EngineBackend` over zmq sockets.

Requests (and aborts) are pushed to rank 0's inbox; every rank that produces outputs pushes each turn's
`TokenOutput`s (one `OutputBatch`) to one outbox that this bridge reads and fans out to per-request queues.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import zmq
import zmq.asyncio

from ..server.messages import (
    AbortRequest,
    GenerateRequest,
    RankStatus,
    RoomsPlaced,
    ScaleInstance,
    ScaleReport,
    TokenOutput,
    decode_from_ranks,
    encode,
)

log = logging.getLogger(__name__)

# What every runner reports per DP group (`StepRunner.status_counts`): requests in its batch, requests
# waiting to join it, and the tokens whose KV it holds or will hold.
GROUP_LOAD_KEYS = ("running_requests", "queued_requests", "tokens_in_flight")


class RankBridge:
    """Owns the two zmq sockets of the HTTP process; `close()` releases them.

    Args:
        inbox_addr: rank 0's PULL address for requests (zmq endpoint, e.g. ``ipc:///tmp/x``).
        outbox_addr: the address this bridge binds its PULL socket to for outputs.
        info: returns load/pool counts for /server_info (read from shared state by the caller).
    """

    def __init__(self, inbox_addr: str, outbox_addr: str, num_dp_groups: int = 1,
                 info: Callable[[], dict[str, Any]] | None = None) -> None:
        self._ctx = zmq.asyncio.Context()
        self._to_ranks = self._ctx.socket(zmq.PUSH)
        self._to_ranks.setsockopt(zmq.LINGER, 0)
        self._to_ranks.connect(inbox_addr)
        self._from_ranks = self._ctx.socket(zmq.PULL)
        self._from_ranks.setsockopt(zmq.LINGER, 0)
        self._from_ranks.bind(outbox_addr)
        self._queues: dict[str, asyncio.Queue[TokenOutput]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._info = info or (lambda: {})
        self.dead_reason: str | None = None
        self.num_dp_groups = num_dp_groups
        self.group_status: dict[int, RankStatus] = {}
        # Elastic EP (engine.runtime.scaling): ranks' reports on a scale, in arrival order.
        self.scale_reports: asyncio.Queue[ScaleReport] = asyncio.Queue()
        # An elastic prefill instance's room placements go to its bootstrap service (`serve`'s hooks).
        self.on_rooms_placed: Callable[[RoomsPlaced], None] | None = None
        self._started = False  # every DP group reported once: later layout changes do not unready the instance

    @property
    def ready(self) -> bool:
        """Every DP group's leader has reported in (once, at start-up) and no rank has died."""
        if self.dead_reason is not None:
            return False
        self._started = self._started or len(self.group_status) >= self.num_dp_groups
        return self._started

    def relayout(self, num_dp_groups: int) -> None:
        """The instance serves with `num_dp_groups` DP groups now: the reports of groups that left stop
        counting (their pools are gone with their ranks)."""
        self.num_dp_groups = num_dp_groups
        for dp_rank in [d for d in self.group_status if d >= num_dp_groups]:
            del self.group_status[dp_rank]

    async def send_scale(self, command: ScaleInstance) -> None:
        await self._to_ranks.send(encode(command))

    @property
    def num_active(self) -> int:
        return len(self._queues)

    def start(self) -> None:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_outputs())

    async def _read_outputs(self) -> None:
        while True:
            data = await self._from_ranks.recv()
            try:
                out = decode_from_ranks(data)
            except ValueError:
                log.exception("dropping a malformed output message")
                continue
            if isinstance(out, RankStatus):
                if out.dp_rank < self.num_dp_groups:  # a leaving group's last report may trail the switch
                    self.group_status[out.dp_rank] = out
                continue
            if isinstance(out, ScaleReport):
                self.scale_reports.put_nowait(out)
                continue
            if isinstance(out, RoomsPlaced):
                if self.on_rooms_placed is not None:
                    self.on_rooms_placed(out)
                continue
            queues = self._queues
            for output in out.outputs:
                queue = queues.get(output.rid)
                if queue is not None:  # outputs of an aborted request may still be in flight
                    queue.put_nowait(output)

    def fail_all(self, reason: str) -> None:
        """The ranks are gone: finish every open request with an error."""
        self.dead_reason = reason
        for rid, queue in self._queues.items():
            queue.put_nowait(TokenOutput(rid=rid, token_ids=[], finished=True, finish_reason="error", error=reason,
                                         error_status=503, error_code="instance_stopped"))

    async def submit(self, request: GenerateRequest) -> AsyncIterator[TokenOutput]:
        if self.dead_reason is not None:
            yield TokenOutput(rid=request.rid, token_ids=[], finished=True, finish_reason="error",
                              error=self.dead_reason, error_status=503, error_code="instance_stopped")
            return
        if request.rid in self._queues:
            yield TokenOutput(rid=request.rid, token_ids=[], finished=True, finish_reason="error",
                              error=f"request id {request.rid!r} is already running", error_status=409,
                              error_code="duplicate_request_id")
            return
        self.start()
        queue: asyncio.Queue[TokenOutput] = asyncio.Queue()
        self._queues[request.rid] = queue
        try:
            await self._to_ranks.send(encode(request))
            while True:
                out = await queue.get()
                yield out
                if out.finished:
                    return
        finally:
            self._queues.pop(request.rid, None)

    async def abort(self, rid: str) -> None:
        await self._to_ranks.send(encode(AbortRequest(rid=rid)))

    def info(self) -> dict[str, Any]:
        totals: dict[str, int] = {}
        for status in self.group_status.values():
            for key, value in status.counts.items():
                totals[key] = totals.get(key, 0) + value
        # The oldest group report: counts summed here are at least this fresh.
        status_time = min((status.sent_at for status in self.group_status.values()), default=0.0)
        # Gauges are the same on every rank: the freshest report's.
        newest = max(self.group_status.values(), key=lambda status: status.sent_at, default=None)
        gauges = dict(newest.gauges) if newest is not None else {}
        return {"active_requests": self.num_active, "ready": self.ready, "status_time": status_time,
                **totals, **gauges, **self._info(), "dp_groups": self.dp_groups()}

    def dp_groups(self) -> list[dict[str, Any]]:
        """Each attention-DP group's load as its leader last reported it (`GROUP_LOAD_KEYS` and its pool's
        pages), in group order; a group that has not reported yet is absent."""
        groups = []
        for dp_rank in sorted(self.group_status):
            status = self.group_status[dp_rank]
            counts = status.counts
            row: dict[str, Any] = {"dp_rank": dp_rank, **{key: counts.get(key, 0) for key in GROUP_LOAD_KEYS}}
            # Pages nobody holds (free, or cached and evictable) are what the group can still give out.
            row["free_pages"] = counts.get("free_pages", 0) + counts.get("evictable_pages", 0)
            row["total_pages"] = counts.get("total_pages", 0)
            row["status_time"] = status.sent_at
            groups.append(row)
        return groups

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        self._to_ranks.close(0)
        self._from_ranks.close(0)
        self._ctx.term()
