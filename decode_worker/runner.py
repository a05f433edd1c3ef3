"""The decode role on one rank: receive a request's prompt KV from the prefill instance, then decode it in
the continuous batch (DESIGN.md request flow, steps 2 and 4). Requests without bootstrap fields run
colocated (prefilled here), which is what the router's conditional disaggregation relies on.

A disaggregated request waits in FIFO order until pages for its whole life (prompt + max new tokens)
and an aux slot are free; then its receiver asks the mapped prefill ranks to write the prompt's pages.
With decode-side reuse (`--decode-prefix-cache`) a finished request's pages stay in this pool's prefix
cache, and a later request whose prompt starts with them (a conversation's next turn) takes those cached
pages first and asks the prefill ranks for the rest only (`TransferRequest.held_pages`).
It joins the batch at the step where every rank of the DP group has seen its KV arrive
(`GroupAgreement`); if the transfer fails anywhere in the group, the client gets an error and the pages
go back once no write can still land in them.

With MLA-core DP (`--attention-dp mla-core`) every rank reserves the same pages in its mirror of the
instance's allocator, but only their owner holds them, receives the KV and reads the aux record; it hands
the record to the other ranks when the room ends (`_first_token_record`).
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass, field

import torch.distributed as dist

from decode_worker.dp_affinity import DPGroupAffinity
from decode_worker.prefilled import PrefilledKVRunner
from engine.kv_pool import PoolExhaustedError
from engine.kv_shards import ShardedKVPool
from engine.parallel import ParallelContext
from engine.prefix_cache import Block
from engine.runtime.colocated import (
    EngineArgs,
    RankEngine,
    build_rank_engine,
    error_output,
    fingerprint_of,
    status_of,
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
from engine.runtime.elastic import JOIN_KEY
from engine.runtime.launch import RankContext
from engine.runtime.rank_loop import run_rank
from engine.runtime.timeline import Timeline
from engine.sampling import SamplingParams
from engine.server.messages import GenerateRequest, TokenOutput
from kvtransfer.auxdata import AuxRecord
from kvtransfer.receive_manager import KVReceiveManager
from kvtransfer.receiver import KVReceiver
from kvtransfer.rooms import RankInfo
from kvtransfer.state import KVTransferError

WAIT_NAP_S = 0.0001  # see prefill_worker.runner: nap instead of spinning while only the network works


@dataclass(eq=False)
class Transfer:
    """A disaggregated request on this rank, from arrival until it joins the batch or fails."""

    request: GenerateRequest
    params: SamplingParams
    pages: list[int] = field(default_factory=list)  # its whole life's pages; the prompt's come first
    held: list[Block] = field(default_factory=list)  # decode-side reuse: cached blocks of pages[:len(held)]
    aux_slot: int | None = None
    receiver: KVReceiver | None = None
    local_error: str | None = None  # this rank could not start the transfer (bootstrap, mapping)
    local_status: tuple[int, str] = (502, "kv_peer_error")  # HTTP status and code of `local_error`
    aborted: bool = False  # the client left: free everything once the transfer has ended
    passive: bool = False  # MLA-core DP: another rank owns the pages and receives; this one only follows

    def state(self) -> int:
        if self.local_error is not None:
            return FAILED
        if self.passive:
            return SUCCEEDED  # the owner's state decides (GroupAgreement)
        return local_state(self.receiver.poll()) if self.receiver is not None else PENDING


class DecodeRunner(PrefilledKVRunner):
    """`StepRunner` of the decode role: the colocated scheduler plus the KV receiving stage in front.

    Args:
        ctx: this rank.
        engine: the rank's model and KV pool (`build_rank_engine`).
        args: engine settings (batch limit, prefill budget for colocated requests).
        kv: transfer backend, host, aux slots, timeouts.
        cuda_graph_max_bs: as `PrefilledKVRunner`'s.
        prefix_reuse: decode-side reuse: keep finished requests' pages in the pool's prefix cache and take a
            new request's cached leading pages instead of having them written again (needs the pool's cache).
    """

    def __init__(
        self, ctx: RankContext, engine: RankEngine, args: EngineArgs, kv: KVArgs, cuda_graph_max_bs: int = 0,
        prefix_reuse: bool = False,
    ) -> None:
        super().__init__(ctx, engine, args, cuda_graph_max_bs)
        if prefix_reuse and engine.kv_pool.prefix_cache is None:
            raise ValueError("decode-side prefix reuse needs the prefix cache (drop --disable-prefix-cache)")
        if prefix_reuse and isinstance(engine.kv_pool, ShardedKVPool):
            raise ValueError("decode-side prefix reuse does not run with --attention-dp mla-core yet")
        self.prefix_reuse = prefix_reuse
        self.reused_tokens = 0  # prompt tokens of transfers served by pages held here already, for /metrics
        # Several DP groups, each with its own cache: rank 0 sends a conversation's turns to the group that has
        # its pages (decode_worker.dp_affinity).
        self.dp_affinity = (DPGroupAffinity(engine.kv_pool.page_size)
                            if prefix_reuse and ctx.spec.dp_size > 1 else None)
        self.rank = ctx.rank
        # A joining rank (elastic EP) has no world yet: its agreement group comes with `regroup`.
        self.agreement = GroupAgreement(ctx) if JOIN_KEY not in ctx.role_args else None
        self.transport = RankTransport(kv, "decode", ctx.rank, engine.kv_pool.tensor)
        info = RankInfo(ctx.rank, ctx.spec.tp_size, ctx.spec.dp_size, kv.host, fingerprint_of(engine, args),
                        kv.control_key, ctx.spec.mla_core)
        self.manager = KVReceiveManager(
            self.transport.engine, self.transport.layout, self.transport.aux, info, kv.timeouts
        )
        self.free_aux_slots = list(range(kv.aux_slots - 1, -1, -1))
        self.queued: deque[Transfer] = deque()  # no pages yet
        self.transferring: list[Transfer] = []  # pages reserved, receiver asked (same order on every rank)
        # Summed for /metrics: waiting for pages (batch room), then for the prompt's KV to land.
        self.timeline = Timeline("decode", (("decode_page_wait", "arrived", "reserved"),
                                            ("kv_wait", "reserved", "landed")))  # fmt: skip

    # --- StepRunner ---------------------------------------------------------------------------------
    def add(self, request: GenerateRequest) -> None:
        if request.bootstrap is None:
            super().add(request)
            return
        params = self._accept(request)
        if params is not None:
            self.queued.append(Transfer(request, params))
            self.timeline.mark(request.rid, "arrived")

    def abort(self, rid: str) -> list[TokenOutput]:
        if rid in self.requests:
            return super().abort(rid)
        transfer = self._find(rid)
        if transfer is None or transfer.aborted:
            return []
        if transfer in self.queued:
            self.queued.remove(transfer)
            self.timeline.drop(rid)
        else:
            transfer.aborted = True  # pages go back once the transfer has ended on every rank
            if transfer.receiver is not None:
                transfer.receiver.abort("aborted by the client")
        return [TokenOutput(rid=rid, token_ids=[], finished=True, finish_reason="abort")]

    def num_requests(self) -> int:
        return len(self.requests) + len(self.queued) + len(self.transferring)

    def choose_dp_rank(self, request: GenerateRequest, loads: list[int]) -> int:
        least = super().choose_dp_rank(request, loads)
        if self.dp_affinity is None or request.bootstrap is None:
            return least
        return self.dp_affinity.choose(request.input_ids, loads, least)

    def step(self) -> list[TokenOutput]:
        if self.transferring:
            self._settle()
        if self.queued:
            self._reserve()
        if self.transferring and not self.scheduler.has_work():
            time.sleep(WAIT_NAP_S)
        self.clock.lap("transfers")
        return super().step()

    def group_load(self) -> dict[str, int]:
        """The batch's load plus the requests still waiting for pages or for their KV to land."""
        load = super().group_load()
        waiting = (*self.queued, *self.transferring)
        load["queued_requests"] += len(waiting)
        load["tokens_in_flight"] += sum(len(t.request.input_ids) for t in waiting)
        return load

    def regroup(self, ctx: RankContext, parallel: ParallelContext) -> None:
        """Elastic EP: the DP group keeps its ranks and rooms; its agreement group and the layout the rank
        mapping reads (`RankInfo`) follow the re-formed instance. Called with no transfer in flight
        between two of its steps (`_settle` is the only user of the agreement)."""
        super().regroup(ctx, parallel)
        self.agreement = GroupAgreement(ctx)
        self.manager.rank_info = dataclasses.replace(self.manager.rank_info, tp_size=ctx.spec.tp_size,
                                                     dp_size=ctx.spec.dp_size)

    def status_counts(self) -> dict[str, int]:
        counts = super().status_counts()
        counts.update(
            {
                "live_rooms": self.manager.num_live_rooms,
                "free_aux_slots": len(self.free_aux_slots),
                "total_aux_slots": self.manager.aux.num_slots,
                "inflight_handles": self.transport.engine.num_inflight_handles,
                "decode_queued": len(self.queued),
                "decode_transferring": len(self.transferring),
                "decode_running": len(self.requests),
                "decode_reused_tokens": self.reused_tokens,
                "decode_dp_affinity_followed": self.dp_affinity.followed if self.dp_affinity is not None else 0,
                **self.timeline.counters(),
            }
        )
        return counts

    def close(self) -> None:
        self.manager.close()  # fails live rooms and tells their prefill ranks
        for transfer in self.transferring:
            self._free(transfer)
        self.transferring.clear()
        self.queued.clear()
        self.transport.close()
        super().close()

    # --- the transfer stage -------------------------------------------------------------------------
    def _is_waiting(self, rid: str) -> bool:
        return self._find(rid) is not None

    def _find(self, rid: str) -> Transfer | None:
        for transfer in (*self.queued, *self.transferring):
            if transfer.request.rid == rid:
                return transfer
        return None

    def _agreement(self) -> GroupAgreement:
        assert self.agreement is not None, "a joining rank steps only once it has joined"
        return self.agreement

    def _reserve(self) -> None:
        """Start the queue's transfers, oldest first, while pages, aux slots and batch room last."""
        pool = self.engine.kv_pool
        while self.queued:
            transfer = self.queued[0]
            prompt_len = len(transfer.request.input_ids)
            if not self.free_aux_slots:
                return
            needed = self.scheduler.pages_needed(prompt_len, transfer.params)
            if self.prefix_reuse:
                if not self._has_batch_room(len(self.transferring)):
                    return
                try:
                    # The leading pages this pool holds already (a conversation's earlier turn) are taken as
                    # they are; the prefill ranks write only the rest.
                    transfer.pages, transfer.held = pool.alloc_for_prompt(transfer.request.input_ids, needed)
                except PoolExhaustedError:
                    return
            elif self._has_room(prompt_len, transfer.params, len(self.transferring)):
                try:
                    transfer.pages = pool.alloc(needed)
                except PoolExhaustedError:  # a sharded pool: room in total, not on any one rank
                    return
            else:
                return
            self.queued.popleft()
            self.reused_tokens += len(transfer.held) * pool.page_size
            transfer.aux_slot = self.free_aux_slots.pop()
            owner = pool.owner_of(transfer.pages) if isinstance(pool, ShardedKVPool) else None
            # The prompt's pages the prefill ranks write: those past the ones held here already.
            prompt_pages = transfer.pages[len(transfer.held) : pool.pages_for_tokens(prompt_len)]
            self.transferring.append(transfer)
            boot = transfer.request.bootstrap
            assert boot is not None
            self.timeline.mark(transfer.request.rid, "reserved")
            if owner is not None and owner != self.rank:
                transfer.passive = True
                continue
            try:
                transfer.receiver = self.manager.create_receiver(
                    boot.host, boot.port, boot.room, boot.prefill_dp_rank, owner, boot.prefill_layout
                )
                if isinstance(pool, ShardedKVPool):
                    prompt_pages = pool.local_pages(prompt_pages)
                transfer.receiver.init(prompt_pages, transfer.aux_slot, len(transfer.held))
            except (KVTransferError, ValueError) as exc:
                transfer.local_error = str(exc)
                transfer.local_status = status_of(exc)
                if transfer.receiver is not None:
                    transfer.receiver.abort(str(exc))

    def _settle(self) -> None:
        """Poll every receiver; act on what the whole DP group has seen (the same decisions on every rank)."""
        transfers = list(self.transferring)
        states = [t.state() for t in transfers]
        keep: list[Transfer] = []
        for transfer, state, (ended, failed) in zip(
            transfers, states, self._agreement().agree(states), strict=True
        ):
            if not ended:
                if failed and state == PENDING and transfer.receiver is not None:
                    transfer.receiver.abort("the room failed on another rank of this decode group")
                keep.append(transfer)
            elif failed or transfer.aborted:
                self._free(transfer)
                if not transfer.aborted:
                    reason = transfer.local_error or (
                        transfer.receiver.failure_reason if transfer.receiver else None
                    )
                    status, code = transfer.local_status if transfer.local_error else (502, "kv_transfer_failed")
                    self._pending.append(
                        error_output(
                            transfer.request.rid,
                            "KV transfer from the prefill instance failed: "
                            + (reason or "it failed on another rank of this decode group"),
                            status,
                            code,
                        )
                    )
            else:
                self._adopt(transfer)
        self.transferring = keep

    def _adopt(self, transfer: Transfer) -> None:
        """The prompt's KV is in our pages on every rank of the group: join the decode batch."""
        assert transfer.aux_slot is not None
        request = transfer.request
        record = self._first_token_record(transfer)
        first = record.first_token_id
        self.free_aux_slots.append(transfer.aux_slot)
        transfer.aux_slot = None
        vocab = self.engine.config.vocab_size
        if first >= vocab:
            self._free(transfer)
            self._pending.append(
                error_output(
                    request.rid,
                    f"the prefill side sent first token {first}, outside the vocabulary [0, {vocab})",
                    502,
                    "kv_transfer_failed",
                )
            )
            return
        self.timeline.mark(request.rid, "landed")
        held = transfer.held if self.prefix_reuse else None
        if self._join_batch(request, first, transfer.pages, transfer.params, record.logprob, record.top, held):
            transfer.pages, transfer.held = [], []  # the scheduler owns them now
            self.timeline.finish(request.rid, "first_token_queued")
        else:
            self._free(transfer)

    def _first_token_record(self, transfer: Transfer) -> AuxRecord:
        """The aux record the prefill side wrote: read here, or under MLA-core DP sent by the pages' owner
        (every rank adopts ended rooms in the same order, so the broadcasts line up)."""
        pool = self.engine.kv_pool
        record = transfer.receiver.aux() if transfer.receiver is not None else None
        if isinstance(pool, ShardedKVPool) and pool.num_shards > 1:
            box = [record]
            dist.broadcast_object_list(box, src=pool.owner_of(transfer.pages), group=self.agreement.group)
            record = box[0]
        assert record is not None
        return record

    def _free(self, transfer: Transfer) -> None:
        self.timeline.drop(transfer.request.rid)
        if transfer.pages:
            self.engine.kv_pool.release(transfer.pages, transfer.held)
            transfer.pages, transfer.held = [], []
        if transfer.aux_slot is not None:
            self.free_aux_slots.append(transfer.aux_slot)
            transfer.aux_slot = None


def decode_entry(ctx: RankContext) -> None:
    """Rank process entry (spawned): build the model shard and serve the decode role until terminated."""
    args: EngineArgs = ctx.role_args["engine"]
    kv: KVArgs = ctx.role_args["kv"]
    leave_cleanly_on_sigterm()
    graphs: int = ctx.role_args.get("cuda_graph_max_bs") or 0
    # One rank holds every expert: the model's local MoE path (no dispatch, no masking; graphs capture it).
    # Low-latency EP there padded every decode step to its fixed budget (the largest prefill: 8192 tokens
    # per expert): the tiny model's decode step took ~100 ms on CPU instead of ~3 ms.
    engine = build_rank_engine(ctx, args, expert_parallel=ctx.spec.tp_size > 1 or args.eplb is not None)
    if kv.connector == BENCH_CONNECTOR:  # no transfer engine: KV pages filled with random values here
        from decode_worker.bench_connector import BenchDecodeRunner

        run_rank(ctx, BenchDecodeRunner(ctx, engine, args, graphs, seed=args.seed))
        return
    run_rank(ctx, DecodeRunner(ctx, engine, args, kv, graphs, bool(ctx.role_args.get("decode_prefix_cache"))))
