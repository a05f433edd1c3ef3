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

from ..server.messages import (
    GenerateRequest,
    OutputBatch,
    RankStatus,
    ScaleInstance,
    TokenOutput,
    ToRanks,
    decode_to_ranks,
    encode,
)
from .elastic import JOIN_KEY, apply_scale, join_instance, scale_report
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

    # Optional: `notices()`, rank 0 only: messages for the HTTP process about what it just routed (an elastic
    # prefill instance's room placements), sent right after routing, before the turn's forward.
    # Optional: `clock`, an `engine.step_clock.StepClock`: the loop opens and closes each turn on it, and laps
    # the inbox and output phases; the runner laps its own.

    def close(self) -> None: ...


def least_loaded(loads: list[int]) -> int:
    return min(range(len(loads)), key=loads.__getitem__)


def named_or_least_loaded(request: GenerateRequest, loads: list[int]) -> int:
    """The DP group ``request`` names, if it is open, else the least loaded open one. ``loads`` holds only the
    groups open now, and the name was checked on parse against the layout of that moment: while a scale-down
    drains, the leaving groups take nothing (a router that still sees them as the least loaded would keep
    feeding them, and the drain would not end), and a request parsed before the switch may name a group that
    is gone. Either way it runs on an open group rather than on none."""
    if request.data_parallel_rank is not None and request.data_parallel_rank < len(loads):
        return request.data_parallel_rank
    return least_loaded(loads)


def _drain(sock: zmq.Socket, wait_ms: int) -> list[ToRanks]:
    messages: list[ToRanks] = []
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


class _InstanceView:
    """What the loop keeps per layout of the instance: re-made when elastic EP re-forms it."""

    def __init__(self, ctx: RankContext) -> None:
        self.spec = ctx.spec
        # Control traffic stays on a gloo group even when the model's collectives use NCCL.
        self.cpu_group = dist.new_group(backend="gloo") if self.spec.device == "cuda" else None
        self.world_loads = torch.zeros(self.spec.tp_size, dtype=torch.int64)
        self.load_slots = list(self.world_loads.split(1))  # all_gather writes each rank's load in place
        self.my_load = torch.zeros(1, dtype=torch.int64)

    def group_loads(self) -> list[int]:
        return [int(self.world_loads[g * self.spec.attn_tp_size]) for g in range(self.spec.dp_size)]


class _PendingScale:
    """Rank 0's scale command until the DP groups that leave are empty (at once when none leaves)."""

    def __init__(self, command: ScaleInstance) -> None:
        self.command = command
        self.since = time.monotonic()
        # The loads rank 0 holds come from the previous turn's all-gather; a request routed in the turn the
        # command arrived (before it, in the same inbox drain) shows up only in that turn's gather.
        self.loads_seen = False
        self.leaving_requests = 0  # the most requests the leaving DP groups held while this waited

    def open_groups(self, dp_size: int) -> int:
        """DP groups that take new requests meanwhile: the leaving ones take none."""
        return min(dp_size, self.command.dp_size)

    def drained(self, view: _InstanceView) -> bool:
        if self.command.tp_size >= view.spec.tp_size:  # growing: no group leaves
            return True
        leaving = view.world_loads[self.command.tp_size::view.spec.attn_tp_size]  # one rank per leaving group
        self.leaving_requests = max(self.leaving_requests, int(leaving.sum()))
        return self.loads_seen and not any(int(load) for load in leaving)


def run_rank(ctx: RankContext, runner: StepRunner) -> None:
    """Serves until the process is terminated (the launcher owns the lifetime) or until a scale-down lets this
    rank go (elastic EP, `engine.runtime.elastic`)."""
    if JOIN_KEY in ctx.role_args:  # a rank started by a scale-up meets the running instance first
        try:
            join_instance(ctx, runner)
        except BaseException:
            runner.close()
            raise
    zctx = zmq.Context()
    inbox = outbox = None
    if ctx.rank == 0:
        inbox = zctx.socket(zmq.PULL)
        inbox.bind(ctx.inbox_addr)
    if ctx.attn_tp_rank == 0:  # a rank keeps its DP group and its place in it across scales
        outbox = zctx.socket(zmq.PUSH)
        outbox.setsockopt(zmq.LINGER, 0)
        outbox.connect(ctx.outbox_addr)

    def emit(outputs: list[TokenOutput]) -> None:
        if outbox is not None and outputs:  # attention-TP followers hold the same outputs; their leader sends
            outbox.send(encode(OutputBatch(outputs)))

    gauges = getattr(runner, "gauges", None)
    notices = getattr(runner, "notices", None)
    clock = getattr(runner, "clock", None)  # a runner's `StepClock`: where its decode turns go
    bind_emitter = getattr(runner, "bind_emitter", None)
    if bind_emitter is not None:
        bind_emitter(emit)
    view = _InstanceView(ctx)
    pending: _PendingScale | None = None
    last_status = 0.0
    try:
        while True:
            if clock is not None:
                clock.begin()
            spec = view.spec
            routed: list[tuple[ToRanks, int]] = []
            if inbox is not None:
                group_loads = view.group_loads()
                wait = IDLE_WAIT_MS if sum(group_loads) == 0 and runner.num_requests() == 0 else 0
                for msg in _drain(inbox, wait):
                    if isinstance(msg, ScaleInstance):
                        if pending is None:  # the HTTP process sends one at a time
                            pending = _PendingScale(msg)
                    elif isinstance(msg, GenerateRequest):
                        open_groups = spec.dp_size if pending is None else pending.open_groups(spec.dp_size)
                        dp_rank = runner.choose_dp_rank(msg, group_loads[:open_groups])
                        group_loads[dp_rank] += 1
                        routed.append((msg, dp_rank))
                    else:
                        routed.append((msg, -1))
                if pending is not None and pending.drained(view):
                    routed.append((pending.command, -1))
                if notices is not None and outbox is not None:
                    for notice in notices():
                        outbox.send(encode(notice))
            if spec.tp_size > 1:
                box = [routed]
                dist.broadcast_object_list(box, src=0, group=view.cpu_group)
                routed = box[0]
            outputs: list[TokenOutput] = []
            scale: ScaleInstance | None = None
            for msg, dp_rank in routed:
                if isinstance(msg, GenerateRequest):
                    if dp_rank == ctx.dp_rank:
                        runner.add(msg)
                elif isinstance(msg, ScaleInstance):
                    scale = msg
                else:
                    outputs.extend(runner.abort(msg.rid))
            if clock is not None:
                clock.lap("inbox")
            outputs.extend(runner.step())
            emit(outputs)
            if clock is not None:
                clock.lap("outputs")
            if outbox is not None:
                now = time.monotonic()
                if now - last_status > STATUS_PERIOD_S:  # the first one also says "ready"
                    last_status = now
                    outbox.send(encode(RankStatus(rank=ctx.rank, dp_rank=ctx.dp_rank,
                                                  num_requests=runner.num_requests(),
                                                  counts=runner.status_counts(), sent_at=time.time(),
                                                  gauges=gauges() if gauges is not None else {})))
            if spec.tp_size > 1:
                view.my_load[0] = runner.num_requests()
                dist.all_gather(view.load_slots, view.my_load, group=view.cpu_group)
            else:
                view.world_loads[0] = runner.num_requests()
            if clock is not None:
                clock.end()
            if pending is not None:
                pending.loads_seen = True
            if scale is not None:  # between two turns, on every rank at once
                drained = (time.monotonic() - pending.since, pending.leaving_requests) if pending else (0.0, 0)
                pending = None
                outcome = apply_scale(ctx, runner, scale)
                if not outcome.stays:
                    return
                view = _InstanceView(ctx)
                if ctx.rank == 0 and outbox is not None:
                    outbox.send(encode(scale_report(ctx, scale, outcome, *drained)))
    finally:
        runner.close()
        for sock in (inbox, outbox):
            if sock is not None:
                sock.close(0)
        zctx.term()
