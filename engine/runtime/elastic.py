"""Elastic EP on the ranks: an instance re-forms at a new number of DP groups between two steps.

The HTTP process (``engine.runtime.scaling``) starts any new ranks, waits until each has built its shard
(everything but the routed experts, loaded while the instance keeps serving) and then sends rank 0 a
``ScaleInstance``. Rank 0 stops routing new requests to the DP groups that leave, waits until they hold no
request (their streams finish, their pages go back), and broadcasts the command; every rank then switches at
the end of that same turn (``apply_scale``):

- growing: the old world's process groups are destroyed and every rank, old and new, meets at a fresh
  rendezvous for the new world size (``meet``). If it does not form within the join timeout (a new rank died,
  or never came), the old ranks meet again at a second fresh rendezvous at the old size and rebuild the old
  groups: nothing moved yet, so the instance serves on as before and rank 0 reports why.
- shrinking: the experts first move over the old world (every rank is still in it), then the leaving ranks
  exit and the others meet at the smaller size.

Ranks keep their ids (retained ranks are ``0 .. min(old, new) - 1``), so a retained rank keeps its DP group,
its requests and their KV pages; only the instance-wide groups and the experts' homes change. The experts'
new placement comes from EPLB's policy over the window's load (``engine.eplb.policy``; the static layout
without ``--enable-eplb``) and the weights move point-to-point (``engine.eplb.rebalance.move_layer``): a new
rank receives exactly the experts the placement gives it. Groups are created in the same order on old and new
ranks (``torch.distributed.new_group`` is a collective): attention groups, then the expert moves, then the
runner's groups. The same code runs NCCL on GPUs (``meet`` picks the backend from the device).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..ep_moe import ExpertParallelMoE
from ..eplb.policy import Placement, rebalance_experts, static_placement
from ..eplb.rebalance import move_layer
from ..model import DeepseekForCausalLM
from ..moe import MoEBlock
from ..parallel import ParallelContext
from ..server.messages import ScaleInstance, ScaleReport
from .launch import RankContext

log = logging.getLogger(__name__)

JOIN_KEY = "elastic_join"  # role_args key of a rank started to join a running instance
# role_args key, True when the instance can scale live (`engine.server.elastic.live_scale_refusal`): a prefill
# instance's rank 0 then publishes where it routes each room (kvtransfer.placements).
ELASTIC_KEY = "elastic"
# Test hook: "PHASE:EPOCH[,PHASE:EPOCH...]" makes a joining rank of that scale epoch exit at PHASE ("loading":
# before it reports its shard built; "rendezvous": while the others wait for it there), as a rank killed while
# joining would.
FAULT_ENV = "TANDEM_ELASTIC_FAULT"
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)  # torch's default, restored once a world has formed


@dataclass(frozen=True)
class JoinPlan:
    """What a rank started by a scale-up is told: the layout it joins and where the new world meets."""

    epoch: int
    old_tp: int
    old_dp: int
    rendezvous: str
    join_timeout_s: float
    wait_s: float  # how long this rank waits at the rendezvous (longer than any other new rank's loading)


@dataclass(frozen=True)
class ScaleOutcome:
    """One rank's result of ``apply_scale``: whether it stays, and what rank 0 reports."""

    stays: bool
    error: str | None = None
    pause_s: float = 0.0
    experts_moved: int = 0


# --- worlds -------------------------------------------------------------------------------------------------
def meet(addr: str, rank: int, size: int, timeout_s: float, device: str) -> None:
    """Initialises the default process group of ``size`` ranks at ``addr`` ("file://PATH"), or raises once
    ``timeout_s`` passed without every rank. A last all-reduce proves every rank is in the mesh (a rank that
    died after the store rendezvous fails it on every rank) before the collectives get their usual timeout."""
    if not addr.startswith("file://"):
        raise ValueError(f"elastic EP meets on one node through a file, not at {addr!r}")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.FileStore(addr.removeprefix("file://"), size)
    store.set_timeout(timeout)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
    try:
        check = torch.ones(1, device=device)
        dist.all_reduce(check)
        if int(check.item()) != size:
            raise RuntimeError(f"the new world counted {int(check.item())} of {size} ranks")
        from torch.distributed.distributed_c10d import _set_pg_timeout

        _set_pg_timeout(COLLECTIVE_TIMEOUT, dist.group.WORLD)
    except BaseException:
        leave_world()
        raise


def leave_world() -> None:
    """Destroys the default process group and every group made from it (nothing if none is up)."""
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# --- the model's groups -------------------------------------------------------------------------------------
def placeholder_context(ctx: RankContext, redundant_experts: int) -> ParallelContext:
    """A joining rank's placement before its world exists: ranks and sizes, no groups yet (``rebind_model``)."""
    spec = ctx.spec
    return ParallelContext(tp_rank=ctx.rank, tp_size=spec.tp_size, dp_size=spec.dp_size,
                           redundant_experts=redundant_experts)


def regrouped_context(ctx: RankContext, redundant_experts: int) -> ParallelContext:
    """This rank's ``ParallelContext`` over the current world (a collective: attention groups are created)."""
    from .groups import build_parallel_context

    return dataclasses.replace(build_parallel_context(ctx), redundant_experts=redundant_experts)


def rebind_model(model: DeepseekForCausalLM, pctx: ParallelContext) -> None:
    """Points every layer at ``pctx``: modules holding the placement get it, layers sharded over the attention
    group get its new group (the same ranks: a DP group keeps its attn_tp ranks)."""
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, ParallelContext):
                setattr(module, name, pctx)
        if "group" in vars(module) and getattr(module, "tp_size", None) == pctx.attn_tp_size:
            module.group = pctx.attn_tp_group


def empty_expert_slots(model: DeepseekForCausalLM) -> None:
    """A joining rank holds no routed expert until the placement gives it some: nothing is loaded for them
    from the checkpoint (``engine.weights`` loads only a rank's own slots) and they arrive from their holders."""
    for layer in model.model.layers:
        block = layer.mlp
        if isinstance(block, MoEBlock):
            for tensor in block.expert_tensors():
                tensor.data = tensor.data.new_empty((0, *tensor.shape[1:]))
            block.local_experts = []
            block.expert_start = block.expert_end = 0


# --- experts ------------------------------------------------------------------------------------------------
def _placements(moe: ExpertParallelMoE, group: Any, new_size: int) -> tuple[torch.Tensor, list[int], Placement]:
    """(old ``phy2log`` of every layer, the MoE layers, their new ``Placement`` over ``new_size`` ranks).
    A collective over ``group``: a joining rank learns the old map and EPLB's counters from rank 0, and every
    rank computes the same new placement (the policy is a pure function of the summed window counts)."""
    config = moe.model.config
    layers = sorted(moe.blocks)
    num_physical = config.n_routed_experts + moe.model.ctx.redundant_experts
    eplb = moe.eplb
    if eplb is None:
        old = static_placement(config.num_hidden_layers, config.n_routed_experts, num_physical).phy2log
        return old, layers, static_placement(len(layers), config.n_routed_experts, num_physical)
    device = eplb.map.phy2log.device
    old = eplb.map.phy2log.clone()
    counters = torch.tensor([eplb.steps, eplb.rebalances, eplb.experts_moved, eplb.map.version],
                            dtype=torch.int64, device=device)
    dist.broadcast(old, src=0, group=group)
    dist.broadcast(counters, src=0, group=group)
    eplb.steps, eplb.rebalances, eplb.experts_moved, eplb.map.version = (int(v) for v in counters.tolist())
    load = moe.recorder.global_window_counts(group)[torch.tensor(layers, device=device)].cpu()
    new = rebalance_experts(load, num_physical, new_size, eplb.num_groups, eplb.num_nodes)
    return old.cpu(), layers, new


def move_experts(moe: ExpertParallelMoE, rank: int, old_size: int, new_size: int, group: Any) -> int:
    """Moves every MoE layer's experts from their slots over ``old_size`` ranks to the new placement over
    ``new_size`` ranks (``group``: a world holding both layouts) and switches EPLB's map. Returns the experts
    that crossed ranks, over the instance."""
    old, layers, new = _placements(moe, group, new_size)
    per_rank = new.num_physical // new_size
    moved = 0
    for row, layer in enumerate(layers):
        block = moe.blocks[layer]
        moved += move_layer(block, old[layer].tolist(), new.phy2log[row].tolist(), rank, old_size, group, new_size)
        block.local_experts = new.phy2log[row, rank * per_rank:(rank + 1) * per_rank].tolist() if rank < new_size \
            else []
        block.expert_start, block.expert_end = (rank * per_rank, (rank + 1) * per_rank) if rank < new_size else (0, 0)
    if moe.eplb is not None:
        moe.eplb.map.switch(layers, new)
        moe.eplb.experts_moved += moved
    return moved


# --- one rank's switch ---------------------------------------------------------------------------------------
def _regroup(ctx: RankContext, runner: Any, spec: Any) -> ParallelContext:
    """Every group this rank uses, rebuilt over the current world for ``spec`` (in the joining ranks' order)."""
    ctx.spec = spec
    engine = runner.engine
    pctx = regrouped_context(ctx, engine.parallel.redundant_experts)
    rebind_model(engine.model, pctx)
    engine.parallel = pctx
    if engine.moe is not None:
        engine.moe.regroup(pctx)
    return pctx


def apply_scale(ctx: RankContext, runner: Any, command: ScaleInstance) -> ScaleOutcome:
    """This rank's part of a scale, at the end of the turn rank 0 broadcast ``command`` in (every rank calls it
    at the same turn). The runner must have ``engine`` and ``regroup(ctx, pctx)``."""
    started = time.perf_counter()
    old_spec = ctx.spec
    new_spec = dataclasses.replace(old_spec, tp_size=command.tp_size, dp_size=command.dp_size)
    old_size, new_size = old_spec.tp_size, new_spec.tp_size
    moe = runner.engine.moe
    moved = 0
    if new_size < old_size:
        if moe is not None:  # while every rank is still in the old world
            moved = move_experts(moe, ctx.rank, old_size, new_size, dist.group.WORLD)
        leave_world()
        if ctx.rank >= new_size:
            return ScaleOutcome(stays=False)
        meet(command.rendezvous, ctx.rank, new_size, command.join_timeout_s, ctx.device)
        runner.regroup(ctx, _regroup(ctx, runner, new_spec))
        return ScaleOutcome(True, pause_s=time.perf_counter() - started, experts_moved=moved)
    leave_world()
    try:
        meet(command.rendezvous, ctx.rank, new_size, command.join_timeout_s, ctx.device)
    except Exception as exc:  # the new world did not form: the old ranks meet again at the old size
        error = (f"the new ranks did not join within {command.join_timeout_s:g} s ({type(exc).__name__}: "
                 f"{str(exc)[:200]}); rolled back to data_parallel_size {old_spec.dp_size}")
        log.warning("rank %d: %s", ctx.rank, error)
        meet(command.rollback, ctx.rank, old_size, max(60.0, command.join_timeout_s), ctx.device)
        runner.regroup(ctx, _regroup(ctx, runner, old_spec))
        return ScaleOutcome(True, error=error, pause_s=time.perf_counter() - started)
    pctx = _regroup(ctx, runner, new_spec)
    if moe is not None:
        moved = move_experts(moe, ctx.rank, old_size, new_size, dist.group.WORLD)
    runner.regroup(ctx, pctx)
    return ScaleOutcome(True, pause_s=time.perf_counter() - started, experts_moved=moved)


def scale_report(ctx: RankContext, command: ScaleInstance, outcome: ScaleOutcome, drain_s: float,
                 drained_requests: int) -> ScaleReport:
    """Rank 0's report of a finished scale (the layout it serves at now)."""
    return ScaleReport(epoch=command.epoch, rank=ctx.rank, phase="rolled_back" if outcome.error else "switched",
                       tp_size=ctx.spec.tp_size, dp_size=ctx.spec.dp_size, error=outcome.error, drain_s=drain_s,
                       drained_requests=drained_requests, pause_s=outcome.pause_s,
                       experts_moved=outcome.experts_moved)


# --- a joining rank ------------------------------------------------------------------------------------------
def _fault(phase: str, plan: JoinPlan) -> None:
    if f"{phase}:{plan.epoch}" in os.environ.get(FAULT_ENV, "").split(","):
        log.warning("%s=%s: this joining rank exits at %s", FAULT_ENV, os.environ[FAULT_ENV], phase)
        if phase == "rendezvous":  # dies while the others wait for it there, not before they are told to go
            time.sleep(plan.join_timeout_s / 2)
        os._exit(3)


def _report_loaded(ctx: RankContext, plan: JoinPlan) -> None:
    import zmq

    from ..server.messages import encode

    zctx = zmq.Context()
    sock = zctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    try:
        sock.connect(ctx.outbox_addr)
        sock.send(encode(ScaleReport(epoch=plan.epoch, rank=ctx.rank, phase="loaded", tp_size=ctx.spec.tp_size,
                                     dp_size=ctx.spec.dp_size)))
    finally:
        sock.close()
        zctx.term()


def join_instance(ctx: RankContext, runner: Any) -> None:
    """A joining rank whose runner is built (its shard without experts, KV pool, transfer engine: everything that
    takes time, done while the instance serves): tell the HTTP process, meet the instance's ranks in the new
    world, then build what needs the world in the order the old ranks do in ``apply_scale`` (attention groups,
    the EP layer, the expert moves, the runner's groups). Raises (the rank exits) if the world does not form."""
    plan: JoinPlan = ctx.role_args[JOIN_KEY]
    engine = runner.engine
    _fault("loading", plan)
    _report_loaded(ctx, plan)
    _fault("rendezvous", plan)
    # A new rank may wait here long (the others are told to come only once every new rank has loaded); the HTTP
    # process ends it if the scale is given up. The old ranks' wait is the one bounded by the join timeout.
    meet(plan.rendezvous, ctx.rank, ctx.spec.tp_size, plan.wait_s, ctx.device)
    pctx = regrouped_context(ctx, engine.parallel.redundant_experts)
    rebind_model(engine.model, pctx)
    engine.parallel = pctx
    if engine.pending_moe is not None:
        engine.moe, engine.pending_moe = engine.pending_moe(), None
        move_experts(engine.moe, ctx.rank, plan.old_tp, ctx.spec.tp_size, dist.group.WORLD)
    runner.regroup(ctx, pctx)
