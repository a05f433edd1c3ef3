"""The prefill role on one rank: prefill prompts in chunks and push each chunk's KV pages to the decode
instance that asked for them (DESIGN.md request flow, steps 3-4).

Every rank of the request's attention-DP group runs the same forwards and holds the same KV; each has its
own `KVSender` per room and writes (real) or only reports (dummy) as the decode side's mapping said. With
MLA-core DP every rank runs every request, but only the room's owner (`room % tp`) holds its KV and opens a
sender; the others follow the room's fate through the group's agreement. A
room's pages are freed once every rank of the group has seen its sender end (`GroupAgreement`); the
HTTP reply (the first token, SGLang's shape) goes out then: 200 once the KV has landed, an error if not.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass

import torch

from engine.kv_shards import ShardedKVPool
from engine.parallel import ParallelContext
from engine.runtime import timeline
from engine.runtime.colocated import (
    EngineArgs,
    RankEngine,
    build_rank_engine,
    duplicate_output,
    engine_gauges,
    error_output,
    fingerprint_of,
    rejected_output,
    to_sampling_params,
)
from engine.runtime.disagg import (
    BENCH_CONNECTOR,
    FAILED,
    PENDING,
    SUCCEEDED,
    GroupAgreement,
    KVArgs,
    RankTransport,
    leave_cleanly_on_sigterm,
    local_state,
)
from engine.runtime.elastic import ELASTIC_KEY, JOIN_KEY
from engine.runtime.launch import RankContext
from engine.runtime.lockstep import LockstepStepper
from engine.runtime.rank_loop import least_loaded, run_rank
from engine.runtime.timeline import Timeline
from engine.scheduler import StepResult
from engine.server.messages import GenerateRequest, RoomsPlaced, TokenOutput
from kvtransfer.bootstrap_client import BootstrapClient
from kvtransfer.mapping import prefill_dp_group, prefill_owner
from kvtransfer.rooms import RankInfo
from kvtransfer.send_manager import KVSendManager
from kvtransfer.sender import KVSender
from kvtransfer.state import KVTransferError
from prefill_worker.batcher import ChunkDone, PrefillBatcher, PrefillJob

log = logging.getLogger(__name__)

# When the rank only waits on the network (no forward to run), it naps this long per loop turn instead
# of spinning: the cores belong to the forwards (and, on one host, to the decode instance). Short, because
# the nap is also how late a finished transfer is seen: a 4k-token DeepSeek-V3 prompt's KV (288 MB) moves
# in ~0.3 ms between GPUs of one host, and each side's nap adds to TTFT. A poll costs a few microseconds.
WAIT_NAP_S = 0.0001
# After a turn posts rooms' last writes, the rank polls those rooms' senders for at most this long before its
# next forward: a sender tells the decode ranks its writes are done only when polled, and the next poll
# would otherwise come after that whole forward (on one H100 shared with the decode instance, 178 ms after
# the writes were posted, at the median). Polling is local to the rank (no collectives), so ranks may differ
# in how long they wait; each waits only while its own writes are in flight.
WRITE_WAIT_S = 0.003


class LockstepBatcher:
    """The batcher in the shape `LockstepStepper` drives (`has_work`, `step`); the step's finished chunks
    are kept in `chunks`. Lockstep: with several DP groups, every rank runs one forward (maybe an empty
    MoE one) per loop turn, so expert-parallel collectives line up across the instance."""

    def __init__(self, batcher: PrefillBatcher) -> None:
        self.batcher = batcher
        self.chunks: list[ChunkDone] = []

    def has_work(self) -> bool:
        return self.batcher.has_work()

    def step(self) -> StepResult:
        self.chunks = self.batcher.step()
        return StepResult([], [])


@dataclass(eq=False)
class Room:
    """A request on this rank: its prefill job and its sender. `answered`: its output went out already
    (an abort); the room still lives until every rank's sender has ended."""

    request: GenerateRequest
    job: PrefillJob
    sender: KVSender | None  # None: an MLA-core rank that does not own the room's KV (nothing to send)
    stopped: bool = False  # taken out of the batcher (failed or aborted): no more forwards
    answered: bool = False


class PrefillRunner:
    """`StepRunner` of the prefill role. Owns the batcher, the transfer engine and the KV send manager.

    Args:
        ctx: this rank.
        engine: the rank's model and KV pool (`build_rank_engine`).
        args: engine settings (prefill token budget, request limit).
        kv: transfer backend, host, aux slots, timeouts and the bootstrap service's address.
    """

    def __init__(self, ctx: RankContext, engine: RankEngine, args: EngineArgs, kv: KVArgs,
                 publish_rooms: bool = False) -> None:
        if kv.bootstrap_addr is None:
            raise ValueError("a prefill rank needs the bootstrap service's address")
        self.ctx = ctx
        self.engine = engine
        self.batcher = PrefillBatcher(engine.model, engine.kv_pool, args.max_prefill_tokens, args.max_running,
                                      engine.grammar)
        # A rank joining a running instance (elastic EP) has no world yet: its groups come with `regroup`.
        joining = JOIN_KEY in ctx.role_args
        self.agreement = GroupAgreement(ctx) if not joining else None
        self._steps = LockstepBatcher(self.batcher)
        self.stepper = LockstepStepper(self._steps, engine.model, engine.parallel, engine.moe,  # type: ignore[arg-type]
                                       self._control_group() if not joining else None)
        # Elastic EP: rank 0 reports where it routed each room (`notices`), so that decode ranks map every room
        # with the layout in force when it started (kvtransfer.placements).
        self.publish_rooms = publish_rooms
        self._placed: list[tuple[int, int]] = []
        self.transport = RankTransport(kv, "prefill", ctx.rank, engine.kv_pool.tensor)
        try:
            info = RankInfo(ctx.rank, ctx.spec.tp_size, ctx.spec.dp_size, kv.host, fingerprint_of(engine, args),
                            kv.control_key, ctx.spec.mla_core)
            self.manager = KVSendManager(
                self.transport.engine,
                self.transport.layout,
                self.transport.aux,
                info,
                kv.bootstrap_addr,
                kv.timeouts,
                BootstrapClient(kv.timeouts.http_s, kv.auth_token),
            )
        except BaseException:
            self.transport.close()
            raise
        self.rooms: dict[str, Room] = {}  # arrival order: the same on every rank of the group
        self._pending: list[TokenOutput] = []
        # Summed for /metrics: arrival to first token sampled (queue + forward), then to every write done.
        self.timeline = Timeline("prefill", (("prefill_forward", "arrived", "forward_done"),
                                             ("kv_send", "forward_done", "kv_done")))  # fmt: skip

    # --- StepRunner ---------------------------------------------------------------------------------
    def add(self, request: GenerateRequest) -> None:
        boot = request.bootstrap
        if boot is None:
            self._pending.append(
                error_output(
                    request.rid,
                    "a prefill worker serves only requests with "
                    "bootstrap_host, bootstrap_port and bootstrap_room",
                    400,
                    "missing_bootstrap",
                )
            )
            return
        if request.rid in self.rooms:
            self._pending.append(duplicate_output(request.rid))
            return
        try:
            layout = self.manager.rank_info.parallel
            prefill_dp_group(layout, boot.room, boot.prefill_dp_rank)
            job = PrefillJob(request.rid, list(request.input_ids), to_sampling_params(request.sampling),
                             top_logprobs=request.top_logprobs)
            job.owner = prefill_owner(layout, boot.room) if layout.mla_core else None
            self.batcher.validate(job.prompt_ids, job.params)
            sender = self.manager.create_sender(boot.room) if job.owner in (None, self.ctx.rank) else None
        except (ValueError, KVTransferError) as exc:
            self._pending.append(rejected_output(request.rid, exc))
            return
        self.batcher.add(job)
        self.rooms[request.rid] = Room(request, job, sender)
        self.timeline.mark(request.rid, "arrived")

    def abort(self, rid: str) -> list[TokenOutput]:
        room = self.rooms.get(rid)
        if room is None or room.answered:
            return []
        if room.sender is not None:
            room.sender.abort("aborted by the client")
        self._stop(room)
        room.answered = True
        return [TokenOutput(rid=rid, token_ids=[], finished=True, finish_reason="abort")]

    def num_requests(self) -> int:
        return len(self.rooms)

    def step(self) -> list[TokenOutput]:
        outs, self._pending = self._pending, []
        if self.rooms:
            self._settle(outs)
        forwards = self.stepper.forwards
        self._steps.chunks = []
        if timeline.ENABLED:
            for room in self.rooms.values():
                if room.job.num_computed == 0 and not room.stopped:
                    self.timeline.mark(room.request.rid, "step_began")  # once per step until its first chunk
        self.stepper.step()  # on every rank, also those without work (MoE collectives)
        posted: list[KVSender] = []  # senders whose last writes this turn posted
        for chunk in self._steps.chunks:
            sender = self.rooms[chunk.job.rid].sender  # None: an MLA-core rank without the room's KV
            if chunk.job.error is not None:  # its first token could not be drawn: this room fails alone
                if sender is not None:
                    sender.abort(chunk.job.error)
                continue
            if sender is not None:
                sender.send(self._local(chunk.pages), chunk.position, last=chunk.last)
            if chunk.last:
                assert chunk.job.first_token is not None
                self.timeline.mark(chunk.job.rid, "forward_done")
                if sender is not None:
                    sender.send_aux(chunk.job.first_token, chunk.job.first_logprob, chunk.job.first_top)
                    posted.append(sender)
                self.timeline.mark(chunk.job.rid, "kv_posted")
        if posted:
            self._await_writes(posted)
        if self.rooms and self.stepper.forwards == forwards:
            time.sleep(WAIT_NAP_S)
        return outs

    @staticmethod
    def _await_writes(senders: list[KVSender]) -> None:
        """Poll `senders` (their last writes just posted) until each has ended or WRITE_WAIT_S has passed."""
        deadline = time.monotonic() + WRITE_WAIT_S
        while True:
            senders = [s for s in senders if not s.poll().is_terminal]
            if not senders or time.monotonic() >= deadline:
                return
            time.sleep(WAIT_NAP_S)

    def choose_dp_rank(self, request: GenerateRequest, loads: list[int]) -> int:
        """SGLang's rule, so the decode side knows where the KV is: `disagg_prefill_dp_rank` (a DP-aware router
        picks it by load), else room % dp. The body's `data_parallel_rank` names the decode's group: not ours.

        An instance that scales live publishes every room's group (`notices`), so decode need not derive it:
        a named group is then a hint. `loads` holds the groups that take rooms (while a scale-down drains, only
        those that stay); a room goes to the group it names if that one is among them, else to room % their
        number (a router's view of the instance trails a switch by one of its polls), and the request carries
        the group it got."""
        if request.sampling.seed is None and request.sampling.temperature > 0:
            # Rank 0 draws the seed before the broadcast, so every rank of the DP group samples the same
            # first token (unseeded per-rank generators would diverge).
            request.sampling.seed = random.getrandbits(63)
        boot = request.bootstrap
        if boot is None:
            return least_loaded(loads)
        if self.publish_rooms:
            named, open_groups = boot.prefill_dp_rank, len(loads)
            group = named if named is not None and 0 <= named < open_groups else boot.room % open_groups
            boot.prefill_dp_rank = group
            self._placed.append((boot.room, group))
            return group
        try:
            return prefill_dp_group(self.manager.rank_info.parallel, boot.room, boot.prefill_dp_rank)
        except KVTransferError:
            return 0  # `add` refuses it there with the same message

    def notices(self) -> list[RoomsPlaced]:
        """Rank 0: the rooms routed since the last call, with the layout they run in (`publish_rooms`)."""
        if not self._placed:
            return []
        spec = self.ctx.spec
        placed, self._placed = self._placed, []
        return [RoomsPlaced(spec.tp_size, spec.dp_size, placed)]

    def regroup(self, ctx: RankContext, parallel: ParallelContext) -> None:
        """Elastic EP: the instance re-formed (`engine.runtime.elastic.apply_scale`); a retained rank keeps its DP
        group, its rooms and their senders. Its agreement group, the lockstep's groups and the layout requests
        are checked against follow the new world. Called between two turns, with no collective in flight."""
        self.ctx = ctx
        self.agreement = GroupAgreement(ctx)
        self.stepper.parallel, self.stepper.moe = parallel, self.engine.moe
        self.stepper.control_group = self._control_group()
        self.manager.rank_info = dataclasses.replace(self.manager.rank_info, tp_size=ctx.spec.tp_size,
                                                     dp_size=ctx.spec.dp_size)

    def _control_group(self) -> object | None:
        # The work flag is control traffic: a gloo group even when the model's collectives use NCCL.
        if self.engine.parallel.dp_size > 1 and self.engine.model.device.type == "cuda":
            return torch.distributed.new_group(backend="gloo")
        return None

    def gauges(self) -> dict[str, float]:
        return engine_gauges(self.engine)

    def group_load(self) -> dict[str, int]:
        """Rooms computing or sending their KV, rooms waiting for the batch, and their prompts' tokens."""
        waiting = len(self.batcher.waiting)
        return {"running_requests": len(self.rooms) - waiting, "queued_requests": waiting,
                "tokens_in_flight": sum(len(room.job.prompt_ids) for room in self.rooms.values())}

    def status_counts(self) -> dict[str, int]:
        pool, manager = self.engine.kv_pool, self.manager
        return {
            **self.group_load(),
            **pool.status_counts(),
            "prefill_tokens_computed": self.batcher.computed_tokens,
            "live_rooms": manager.num_live_rooms,
            "free_aux_slots": manager.num_free_aux_slots,
            "total_aux_slots": manager.aux.num_slots,
            "inflight_handles": self.transport.engine.num_inflight_handles,
            # KV pages and bytes this rank wrote into decode ranks (pages a decode rank held already are not)
            "kv_pages_sent": manager.pages_written,
            "kv_bytes_sent": manager.bytes_written,
            "prefill_waiting": len(self.batcher.waiting),
            "prefill_rooms": len(self.rooms),
            **self.timeline.counters(),
        }

    def close(self) -> None:
        self.manager.close()  # fails live rooms and tells their decode ranks
        for room in self.rooms.values():
            self.batcher.release(room.job)
        self.rooms.clear()
        self.transport.close()
        self.stepper.close()
        if self.engine.moe is not None:
            self.engine.moe.close()
        self.engine.kv_pool.close()

    # --- rooms --------------------------------------------------------------------------------------
    def _local(self, pages: list[int]) -> list[int]:
        """The pool tensor's indices of this rank's pages (an MLA-core pool numbers the instance's pages)."""
        pool = self.engine.kv_pool
        return pool.local_pages(pages) if isinstance(pool, ShardedKVPool) else pages

    def _stop(self, room: Room) -> None:
        if not room.stopped:
            room.stopped = True
            self.batcher.remove(room.job)

    def _settle(self, outs: list[TokenOutput]) -> None:
        """Poll every sender; act on what the whole DP group has seen (the same decisions on every rank)."""
        rooms = list(self.rooms.values())
        states = [local_state(room.sender.poll()) if room.sender is not None else SUCCEEDED for room in rooms]
        assert self.agreement is not None, "a joining rank steps only once it has joined"
        for room, state, (ended, failed) in zip(rooms, states, self.agreement.agree(states), strict=True):
            if failed:
                self._stop(room)  # no point computing KV that no decode rank will take
                if state == PENDING and room.sender is not None:
                    room.sender.abort("the room failed on another rank of this prefill group")
            if not ended:
                continue
            self.batcher.release(room.job)
            del self.rooms[room.request.rid]
            if failed:
                self.timeline.drop(room.request.rid)
            else:
                self.timeline.finish(room.request.rid, "kv_done")
            if not room.answered:
                outs.append(self._answer(room, state, failed))

    def _answer(self, room: Room, state: int, failed: bool) -> TokenOutput:
        rid, job = room.request.rid, room.job
        if job.error is not None:
            return error_output(rid, job.error)
        if failed or job.first_token is None:
            reason = room.sender.failure_reason if state == FAILED and room.sender is not None else None
            return error_output(
                rid,
                f"KV transfer of room {room.request.bootstrap.room} failed: "  # type: ignore[union-attr]
                f"{reason or 'it failed on another rank of this prefill group'}",
                502,
                "kv_transfer_failed",
            )
        logprobs = [job.first_logprob] if room.request.return_logprob else []
        return TokenOutput(
            rid=rid,
            token_ids=[job.first_token],
            logprobs=logprobs,
            top_logprobs=[list(job.first_top)] if room.request.top_logprobs else [],
            finished=True,
            finish_reason="length",
            prompt_tokens=len(job.prompt_ids),
            cached_tokens=job.cached_tokens,  # the router's cache-aware policy learns from it
        )


def prefill_entry(ctx: RankContext) -> None:
    """Rank process entry (spawned): build the model shard and serve the prefill role until terminated."""
    args: EngineArgs = ctx.role_args["engine"]
    kv: KVArgs = ctx.role_args["kv"]
    leave_cleanly_on_sigterm()
    if kv.connector == BENCH_CONNECTOR:  # no transfer engine: the computed KV is dropped
        from prefill_worker.bench_connector import BenchPrefillRunner

        run_rank(ctx, BenchPrefillRunner(ctx, build_rank_engine(ctx, args), args))
        return
    run_rank(ctx, PrefillRunner(ctx, build_rank_engine(ctx, args), args, kv,
                                publish_rooms=bool(ctx.role_args.get(ELASTIC_KEY))))
