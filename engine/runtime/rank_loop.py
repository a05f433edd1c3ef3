"""The loop every rank of an instance runs.

Rank 0 is the only rank the HTTP process talks to: each iteration it drains its inbox, picks an
attention-DP group for every new request (the group the request names, else the role decides:
least-loaded, or the prefill rule `disagg_prefill_dp_rank` else `room % dp`), and broadcasts the iteration's messages to all ranks, so that every rank sees
the same requests in the same order. Then every rank steps its role's `StepRunner`, and each
DP group's leader (attention-TP rank 0) pushes its outputs back to the HTTP process.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import torch
import torch.distributed as dist
import zmq

from ..server.messages import AbortRequest, GenerateRequest, RankStatus, TokenOutput, decode_to_ranks, encode
from .launch import RankContext

log = logging.getLogger(__name__)

IDLE_WAIT_MS = 20  # how long rank 0 blocks on an empty inbox when no rank has work
# How often DP leaders report pool counts and their group's load to the HTTP process: a router routing by
# DP-group load polls those figures, so they are kept within this of the truth (one small message each).
STATUS_PERIOD_S = 0.2


class StepRunner(Protocol):
    """A role's scheduler on one rank (colocated, prefill or decode)."""

    def add(self, request: GenerateRequest) -> None: ...

    def abort(self, rid: str) -> list[TokenOutput]:
        """Drops the request if this rank holds it; returns its final output (or nothing)."""
        ...

    def num_requests(self) -> int:
        """Requests held by this rank's DP group (waiting, transferring or running)."""
        ...

    def step(self) -> list[TokenOutput]:
        """One scheduler iteration. Every rank calls it every loop turn, so collectives inside
        (TP all-reduce, MoE dispatch) line up across ranks even when this group has no work."""
        ...

    def choose_dp_rank(self, request: GenerateRequest, loads: list[int]) -> int:
        """Rank 0 only: the attention-DP group that runs `request`."""
        ...

    # Optional: `bind_emitter(emit)`. A runner that has it gets, once, a function that sends outputs to the
    # HTTP process right away; it uses it for outputs ready before its forward (a decode request's first
    # token), which `step`'s return would deliver only after the forward.

    def status_counts(self) -> dict[str, int]:
        """Pool and slot counts reported to /server_info (free pages, transfer handles, ...)."""
        ...

    # Optional: `gauges()`: instance-wide values (EPLB's balancedness), the same on every rank, reported
    # beside the counts but not summed over DP groups.

    def close(self) -> None: ...


def least_loaded(loads: list[int]) -> int:
    return min(range(len(loads)), key=loads.__getitem__)


def _drain(sock: zmq.Socket, wait_ms: int) -> list[GenerateRequest | AbortRequest]:
    messages: list[GenerateRequest | AbortRequest] = []
    if wait_ms and not sock.poll(wait_ms):
        return messages
    while True:
        try:
            data = sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return messages
        try:
            messages.append(decode_to_ranks(data))
        except ValueError:
            log.exception("dropping a malformed request message")


def run_rank(ctx: RankContext, runner: StepRunner) -> None:
    """Serves until the process is terminated (the launcher owns the lifetime)."""
    zctx = zmq.Context()
    inbox = outbox = None
    if ctx.rank == 0:
        inbox = zctx.socket(zmq.PULL)
        inbox.bind(ctx.inbox_addr)
    if ctx.attn_tp_rank == 0:
        outbox = zctx.socket(zmq.PUSH)
        outbox.setsockopt(zmq.LINGER, 0)
        outbox.connect(ctx.outbox_addr)
    spec = ctx.spec

    def emit(outputs: list[TokenOutput]) -> None:
        if outbox is not None:  # attention-TP followers hold the same outputs; their leader sends them
            for out in outputs:
                outbox.send(encode(out))

    gauges = getattr(runner, "gauges", None)
    bind_emitter = getattr(runner, "bind_emitter", None)
    if bind_emitter is not None:
        bind_emitter(emit)
    # Control traffic stays on a gloo group even when the model's collectives use NCCL.
    cpu_group = dist.new_group(backend="gloo") if spec.device == "cuda" else None
    last_status = 0.0
    world_loads = torch.zeros(spec.tp_size, dtype=torch.int64)
    load_slots = list(world_loads.split(1))  # all_gather writes each rank's load in place
    my_load = torch.zeros(1, dtype=torch.int64)
    try:
        while True:
            routed: list[tuple[GenerateRequest | AbortRequest, int]] = []
            if inbox is not None:
                group_loads = [int(world_loads[g * spec.attn_tp_size]) for g in range(spec.dp_size)]
                wait = IDLE_WAIT_MS if sum(group_loads) == 0 and runner.num_requests() == 0 else 0
                for msg in _drain(inbox, wait):
                    if isinstance(msg, GenerateRequest):
                        dp_rank = runner.choose_dp_rank(msg, group_loads)
                        group_loads[dp_rank] += 1
                        routed.append((msg, dp_rank))
                    else:
                        routed.append((msg, -1))
            if spec.tp_size > 1:
                box = [routed]
                dist.broadcast_object_list(box, src=0, group=cpu_group)
                routed = box[0]
            outputs: list[TokenOutput] = []
            for msg, dp_rank in routed:
                if isinstance(msg, GenerateRequest):
                    if dp_rank == ctx.dp_rank:
                        runner.add(msg)
                else:
                    outputs.extend(runner.abort(msg.rid))
            outputs.extend(runner.step())
            emit(outputs)
            if outbox is not None:
                now = time.monotonic()
                if now - last_status > STATUS_PERIOD_S:  # the first one also says "ready"
                    last_status = now
                    outbox.send(encode(RankStatus(rank=ctx.rank, dp_rank=ctx.dp_rank,
                                                  num_requests=runner.num_requests(),
                                                  counts=runner.status_counts(), sent_at=time.time(),
                                                  gauges=gauges() if gauges is not None else {})))
            if spec.tp_size > 1:
                my_load[0] = runner.num_requests()
                dist.all_gather(load_slots, my_load, group=cpu_group)
            else:
                world_loads[0] = runner.num_requests()
    finally:
        runner.close()
        for sock in (inbox, outbox):
            if sock is not None:
                sock.close(0)
        zctx.term()
