"""Elastic EP, the HTTP process's side: ``POST /scale_elastic_ep`` grows or shrinks a running instance.

Growing: the new ranks are started at once and build their shards (every weight but the routed experts)
while the instance keeps serving; once each has said so (a "loaded" ``ScaleReport``), rank 0 gets the
``ScaleInstance`` and every rank switches at one turn boundary (``engine.runtime.elastic``). A new rank that
dies while loading ends the scale before the instance is touched; one that dies at the rendezvous makes the old
ranks meet again at their old size (rank 0 reports "rolled_back"). Either way the answer is a 503 naming what
happened and the instance serves on at its old size.

Shrinking: rank 0 routes new requests only to the DP groups that stay, waits until the leaving groups are
empty, then the experts move and the leaving ranks exit (the launcher lets them go).

One scale at a time; a second request while one runs is a 409.

A role may need more than its ranks to follow a scale (a prefill instance: its bootstrap service must take the
new ranks' registrations and publish the new layout): it passes ``LayoutHooks``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..server.messages import ScaleInstance, ScaleReport
from .bridge import RankBridge
from .elastic import JOIN_KEY, JoinPlan
from .launch import InstanceProcesses, InstanceSpec, RankContext

log = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 600.0  # a new rank imports torch and builds its shard: minutes for a large model
POLL_S = 0.1


class ScaleError(Exception):
    """A scale that did not happen; the instance serves at its old size. ``status``/``code`` for the client."""

    def __init__(self, message: str, status: int = 503, code: str = "scale_failed") -> None:
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(frozen=True)
class ScaleResult:
    """A finished scale, as ``POST /scale_elastic_ep`` answers it (seconds)."""

    tp_size: int
    dp_size: int
    wall_s: float  # the whole request: new ranks loading, draining, the switch
    load_s: float  # new ranks building their shards (0 when shrinking)
    drain_s: float  # command at rank 0 -> the turn it switched at: the leaving groups' drain, or one turn's rest
    drained_requests: int  # the most requests the leaving DP groups held while draining
    pause_s: float  # the turn boundary every rank stopped at: rendezvous, groups, expert moves
    experts_moved: int

    def body(self) -> dict[str, Any]:
        return {"success": True, "data_parallel_size": self.dp_size, "tp_size": self.tp_size,
                **{k: v for k, v in dataclasses.asdict(self).items() if k not in ("tp_size", "dp_size")}}


class LayoutHooks(Protocol):
    """What the HTTP process does around a scale besides the ranks' switch. Called on the HTTP process's loop;
    each must return quickly."""

    def starting(self, new: InstanceSpec) -> None:
        """A scale to ``new`` begins (before any new rank starts)."""

    def switched(self, new: InstanceSpec) -> None:
        """Every rank serves at ``new`` now (before the scale is answered)."""

    def abandoned(self, old: InstanceSpec) -> None:
        """The scale did not happen: the instance serves at ``old``; ranks started for it are gone."""


class ElasticScaler:
    """Grows and shrinks one running instance (one node). Owns nothing it does not start: the ranks it adds
    become the launcher's (``InstanceProcesses.adopt``).

    Args:
        spec: the instance's layout at start (updated by every scale).
        entry: the role's rank entry point (new ranks run it; it sees ``JOIN_KEY`` in its role args).
        procs / bridge: the instance's rank processes and the HTTP process's sockets to them.
        inbox_addr / outbox_addr: the ranks' zmq endpoints (new ranks connect their outputs to the outbox).
        role_args: what every rank of the role was started with.
        on_layout: called with each new layout (``/server_info``'s tp_size and dp_size follow it).
        join_timeout_s: how long the ranks wait for each other at the new world's rendezvous.
        hooks: the role's own steps around a scale (``LayoutHooks``), if any.
    """

    def __init__(self, spec: InstanceSpec, entry: Callable[[RankContext], None], procs: InstanceProcesses,
                 bridge: RankBridge, inbox_addr: str, outbox_addr: str, role_args: dict[str, Any],
                 on_layout: Callable[[InstanceSpec], None], join_timeout_s: float,
                 hooks: LayoutHooks | None = None) -> None:
        self.spec, self.entry, self.procs, self.bridge = spec, entry, procs, bridge
        self.inbox_addr, self.outbox_addr, self.role_args = inbox_addr, outbox_addr, role_args
        self.on_layout, self.join_timeout_s, self.hooks = on_layout, join_timeout_s, hooks
        self.epoch = 0
        self._task: asyncio.Future[ScaleResult] | None = None

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    def _rendezvous(self, tag: str) -> str:
        path = os.path.join(tempfile.gettempdir(), f"tandem-dist-{os.getpid()}-e{self.epoch}-{tag}-{uuid.uuid4().hex}")
        self.procs.add_dist_file(path)
        return f"file://{path}"

    async def scale(self, new_dp: int) -> ScaleResult:
        """Re-forms the instance at ``new_dp`` DP groups of the same attn_tp ranks, or raises ``ScaleError``
        with the instance at its old size."""
        if self.busy:
            raise ScaleError("a scale of this instance is already running", 409, "scale_in_progress")
        if not self.bridge.ready:
            raise ScaleError(self.bridge.dead_reason or "the instance's ranks are still starting", 503, "not_ready")
        # Shielded: a client that hangs up (the server cancels its handler) must not stop a scale half-way,
        # with the ranks meeting and the new ranks killed under them.
        self._task = asyncio.ensure_future(self._scale_with_hooks(new_dp))
        return await asyncio.shield(self._task)

    async def _scale_with_hooks(self, new_dp: int) -> ScaleResult:
        old = self.spec
        if self.hooks is None:
            return await self._scale(new_dp)
        self.hooks.starting(dataclasses.replace(old, tp_size=new_dp * old.attn_tp_size, dp_size=new_dp))
        try:
            result = await self._scale(new_dp)
        except BaseException:
            self.hooks.abandoned(old)
            raise
        self.hooks.switched(self.spec)
        return result

    async def _scale(self, new_dp: int) -> ScaleResult:
        old = self.spec
        new = dataclasses.replace(old, tp_size=new_dp * old.attn_tp_size, dp_size=new_dp)
        self.epoch += 1
        started = time.monotonic()
        while not self.bridge.scale_reports.empty():  # reports of an earlier, abandoned scale
            self.bridge.scale_reports.get_nowait()
        command = ScaleInstance(epoch=self.epoch, tp_size=new.tp_size, dp_size=new.dp_size,
                                rendezvous=self._rendezvous("new"), rollback=self._rendezvous("rollback"),
                                join_timeout_s=self.join_timeout_s)
        joiners = []
        load_s = 0.0
        if new.tp_size > old.tp_size:
            plan = JoinPlan(self.epoch, old.tp_size, old.dp_size, command.rendezvous, self.join_timeout_s,
                            wait_s=LOAD_TIMEOUT_S + self.join_timeout_s)
            joiners = self.procs.spawn(new, range(old.tp_size, new.tp_size), self.entry, command.rendezvous,
                                       self.inbox_addr, self.outbox_addr, {**self.role_args, JOIN_KEY: plan})
            try:
                await self._wait_loaded(joiners)
            except BaseException:
                await _end(joiners)
                raise
            load_s = time.monotonic() - started
        else:
            self.procs.let_go(new.tp_size)
        log.info("scale %d: switching tp %d dp %d -> tp %d dp %d", self.epoch, old.tp_size, old.dp_size,
                 new.tp_size, new.dp_size)
        await self.bridge.send_scale(command)
        try:
            report = await self._wait_report(lambda r: r.rank == 0 and r.phase in ("switched", "rolled_back"))
        except BaseException:
            self.procs.keep()
            await _end(joiners)
            raise
        if report.phase == "rolled_back":
            await _end(joiners)
            raise ScaleError(f"scale to data_parallel_size {new_dp} failed: {report.error}", 503,
                             "scale_rolled_back")
        self.procs.adopt(joiners)
        self.spec = new
        self.bridge.relayout(new.dp_size)
        self.on_layout(new)
        result = ScaleResult(new.tp_size, new.dp_size, time.monotonic() - started, load_s, report.drain_s,
                             report.drained_requests, report.pause_s, report.experts_moved)
        log.info("scale %d done: %s", self.epoch, result)
        return result

    async def _wait_loaded(self, joiners: list) -> None:
        """Until every new rank reported its shard built; ``ScaleError`` if one dies or time runs out."""
        waiting = {int(p.name.removeprefix("rank")) for p in joiners}
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while waiting:
            for proc in joiners:
                if not proc.is_alive():
                    raise ScaleError(f"new {proc.name} exited with code {proc.exitcode} while loading; the "
                                     f"instance keeps serving at data_parallel_size {self.spec.dp_size}", 503,
                                     "scale_join_failed")
            if time.monotonic() > deadline:
                raise ScaleError(f"new ranks {sorted(waiting)} did not load within {LOAD_TIMEOUT_S:g} s; the "
                                 f"instance keeps serving at data_parallel_size {self.spec.dp_size}", 503,
                                 "scale_join_failed")
            report = await self._next_report(POLL_S)
            if report is not None and report.phase == "loaded":
                waiting.discard(report.rank)

    async def _wait_report(self, wanted: Callable[[ScaleReport], bool]) -> ScaleReport:
        while True:
            if self.bridge.dead_reason is not None:
                raise ScaleError(f"the instance stopped during the scale: {self.bridge.dead_reason}", 503,
                                 "instance_stopped")
            report = await self._next_report(0.5)
            if report is not None and wanted(report):
                return report

    async def _next_report(self, timeout_s: float) -> ScaleReport | None:
        try:
            report = await asyncio.wait_for(self.bridge.scale_reports.get(), timeout_s)
        except asyncio.TimeoutError:
            return None
        return report if report.epoch == self.epoch else None


async def _end(procs: list) -> None:
    """Kills ranks that never joined (they hold nothing of the instance)."""
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    await asyncio.get_running_loop().run_in_executor(None, lambda: [p.join(5.0) for p in procs])
