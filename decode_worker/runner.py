"""The decode role on one rank: receive a request's prompt KV from the prefill instance, then decode it in
the continuous batch (DESIGN.md request flow, steps 2 and 4). Requests without bootstrap fields run
colocated (prefilled here), which is what the router's conditional disaggregation relies on.

A disaggregated request waits in FIFO order until pages for its whole life (prompt + max new tokens)
and an aux slot are free; then its receiver asks the mapped prefill ranks to write the prompt's pages.
It joins the batch at the step where every rank of the DP group has seen its KV arrive
(`GroupAgreement`); if the transfer fails anywhere in the group, the client gets an error and the pages
go back once no write can still land in them.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass, field

from decode_worker.prefilled import PrefilledKVRunner
from engine.parallel import ParallelContext
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
    aux_slot: int | None = None
    receiver: KVReceiver | None = None
    local_error: str | None = None  # this rank could not start the transfer (bootstrap, mapping)
    local_status: tuple[int, str] = (502, "kv_peer_error")  # HTTP status and code of `local_error`
    aborted: bool = False  # the client left: free everything once the transfer has ended

    def state(self) -> int:
        if self.local_error is not None:
            return FAILED
        return local_state(self.receiver.poll()) if self.receiver is not None else PENDING


class DecodeRunner(PrefilledKVRunner):
    """`StepRunner` of the decode role: the colocated scheduler plus the KV receiving stage in front.

    Args:
        ctx: this rank.
        engine: the rank's model and KV pool (`build_rank_engine`).
        args: engine settings (batch limit, prefill budget for colocated requests).
        kv: transfer backend, host, aux slots, timeouts.
        cuda_graph_max_bs: as `PrefilledKVRunner`'s.
    """

    def __init__(
        self, ctx: RankContext, engine: RankEngine, args: EngineArgs, kv: KVArgs, cuda_graph_max_bs: int = 0
    ) -> None:
        super().__init__(ctx, engine, args, cuda_graph_max_bs)
        # A joining rank (elastic EP) has no world yet: its agreement group comes with `regroup`.
        self.agreement = GroupAgreement(ctx) if JOIN_KEY not in ctx.role_args else None
        self.transport = RankTransport(kv, "decode", ctx.rank, engine.kv_pool.tensor)
        info = RankInfo(ctx.rank, ctx.spec.tp_size, ctx.spec.dp_size, kv.host, fingerprint_of(engine, args),
                        kv.control_key)
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

    def step(self) -> list[TokenOutput]:
        if self.transferring:
            self._settle()
        if self.queued:
            self._reserve()
        if self.transferring and not self.scheduler.has_work():
            time.sleep(WAIT_NAP_S)
        return super().step()

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
            if (
                not self._has_room(prompt_len, transfer.params, len(self.transferring))
                or not self.free_aux_slots
            ):
                return
            self.queued.popleft()
            transfer.pages = pool.alloc(self.scheduler.pages_needed(prompt_len, transfer.params))
            transfer.aux_slot = self.free_aux_slots.pop()
            self.transferring.append(transfer)
            boot = transfer.request.bootstrap
            assert boot is not None
            try:
                transfer.receiver = self.manager.create_receiver(
                    boot.host, boot.port, boot.room, boot.data_parallel_rank
                )
                transfer.receiver.init(transfer.pages[: pool.pages_for_tokens(prompt_len)], transfer.aux_slot)
                self.timeline.mark(transfer.request.rid, "reserved")
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
        assert transfer.receiver is not None and transfer.aux_slot is not None
        request = transfer.request
        record = transfer.receiver.aux()
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
        if self._join_batch(request, first, transfer.pages, transfer.params, record.logprob, record.top):
            transfer.pages = []  # the scheduler owns them now
            self.timeline.finish(request.rid, "first_token_queued")
        else:
            self._free(transfer)

    def _free(self, transfer: Transfer) -> None:
        self.timeline.drop(transfer.request.rid)
        if transfer.pages:
            self.engine.kv_pool.free(transfer.pages)
            transfer.pages = []
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
    run_rank(ctx, DecodeRunner(ctx, engine, args, kv, graphs))
