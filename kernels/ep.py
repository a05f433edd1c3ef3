"""Expert-parallel token exchange for MoE layers, in the shape of DeepEP's ``Buffer``.

``Dispatcher`` moves each token to the ranks that hold its chosen experts and brings the expert outputs
back. Two modes, fixed at construction, mirror DeepEP's:

- high-throughput (prefill): ``dispatch`` sends each token once to every rank holding one of its experts
  (variable counts, one host sync to size the receive buffers); the receiving rank runs its experts and
  applies the routing weights itself (``kernels.moe_forward``); ``combine`` sums the partial outputs back
  onto the source tokens.
- low-latency (decode): at most ``num_max_dispatch_tokens_per_rank`` tokens per rank and step; every
  buffer has a fixed shape (no host sync, CUDA-graph safe); the receiver sees DeepEP's masked layout
  ``[num_local_experts, ep_size * budget, D]`` plus a count per expert (``kernels.moe_forward_masked``);
  ``low_latency_combine`` applies the routing weights on the source rank.

Backends: ``a2a`` (``torch.distributed.all_to_all_single``; gloo on CPU, NCCL on GPU), ``local`` (one
rank holds every expert: the same code path without a collective), ``deepep`` (DeepEP's ``Buffer``:
normal mode for high-throughput, low-latency mode for the masked layout; ``kernels.ep_deepep``, imported
only when chosen). Experts are split in contiguous ranges: rank ``r`` holds ``[r * E_local, (r + 1) * E_local)``.

Every rank of the group must call the same methods in the same order, including ranks with zero tokens
(they still join the collectives). The per-rank routing statistics live in ``kernels.ep_stats``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kernels.ep_a2a import A2ABackend, ExchangeBackend, LocalBackend

if TYPE_CHECKING:
    from kernels.ep_deepep import DeepEPBackend

BACKENDS = ("a2a", "local", "deepep")
MODES = ("high_throughput", "low_latency")


@dataclass(frozen=True)
class DispatchHandle:
    """What ``combine`` needs to undo a high-throughput ``dispatch`` (opaque to callers).

    ``send_token_index`` lists, for every row sent, the source token it came from, grouped by
    destination rank (``send_splits`` rows per rank); ``recv_splits`` rows came from each rank.
    """

    num_tokens: int
    send_token_index: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]


@dataclass(frozen=True)
class DispatchOutput:
    """High-throughput dispatch result on the receiving rank.

    Attributes:
        recv_x: ``[N, D]`` every token routed to at least one local expert (once per token).
        recv_topk_ids: ``[N, K]`` int64 local expert index, ``-1`` where the expert is on another rank.
        recv_topk_weights: ``[N, K]`` float32 routing weights (the receiver applies them).
        num_recv_tokens_per_expert: host list ``[E_local]``: rows each local expert must process.
        handle: pass to ``combine``.
    """

    recv_x: torch.Tensor
    recv_topk_ids: torch.Tensor
    recv_topk_weights: torch.Tensor
    num_recv_tokens_per_expert: list[int]
    handle: DispatchHandle


@dataclass(frozen=True)
class LowLatencyHandle:
    """What ``low_latency_combine`` needs (opaque to callers; fixed-shape tensors only).

    ``pack_index``: for each received row ``[src, local expert, slot]``, its row in the flattened
    padded masked layout (the padding row of its expert when the slot is unused).
    ``source_rows``: for each ``(token, k)`` of the source batch, the row of the returned expert outputs
    that holds its result (``num_experts * budget`` = a zero row when the expert id was ``-1``).
    """

    pack_index: torch.Tensor
    source_rows: torch.Tensor
    num_tokens: int


@dataclass(frozen=True)
class LowLatencyDispatchOutput:
    """Low-latency dispatch result: DeepEP's masked layout.

    Attributes:
        recv_x: ``[E_local, ep_size * budget, D]``; rows ``[0, recv_count[e])`` of expert ``e`` are real,
            the rows after them are undefined (as in DeepEP).
        recv_count: ``[E_local]`` int64 on the device (no host sync).
        handle: pass to ``low_latency_combine``.
    """

    recv_x: torch.Tensor
    recv_count: torch.Tensor
    handle: LowLatencyHandle


class Dispatcher:
    """Dispatch/combine of MoE tokens over the ranks of an expert-parallel group.

    Supports high-throughput mode (variable token counts) or low-latency mode (fixed per-rank budget,
    masked layout), over the ``a2a`` backend (torch.distributed, any group size) or ``local`` (one rank).

    Attributes:
        ep_rank / ep_size: this rank inside the group and the group's size.
        num_experts / num_local_experts: routed experts in all and per rank.
        mode / backend: as given at construction.

    Call ``close()`` when done: it drops the low-latency buffers (released explicitly rather than in a
    destructor, as DeepEP does, so an exception path never waits on a collective).
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        *,
        group: Any = None,
        backend: str = "a2a",
        mode: str = "high_throughput",
        num_max_dispatch_tokens_per_rank: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        """
        Args:
            num_experts: routed experts over the whole group; must divide evenly by its size.
            hidden_size: ``D`` of the tokens (sizes the low-latency buffers).
            group: the torch.distributed process group of the expert-parallel ranks (``None`` = the
                default group); ignored by ``local``.
            backend: ``"a2a"``, ``"local"`` or ``"deepep"`` (bfloat16 on CUDA; refused with
                ``kernels.ep_deepep.DeepEPUnavailableError`` saying why where it cannot run).
            mode: ``"high_throughput"`` or ``"low_latency"``; the other mode's methods refuse to run.
            num_max_dispatch_tokens_per_rank: low-latency only: the most tokens one rank sends per step.
            dtype / device: of the tokens (low-latency buffers are allocated once, here).
        """
        if backend not in BACKENDS:
            raise ValueError(f"unknown EP backend {backend!r}; choose one of {BACKENDS}")
        if mode not in MODES:
            raise ValueError(f"unknown dispatch mode {mode!r}; choose one of {MODES}")
        self._deepep: DeepEPBackend | None = None
        self._exchange: ExchangeBackend | None = None
        if backend == "deepep":
            from kernels.ep_deepep import DeepEPBackend  # imports deep_ep: only when chosen

            self._deepep = DeepEPBackend(group, num_experts, hidden_size, mode=mode, dtype=dtype,
                                         num_max_dispatch_tokens_per_rank=num_max_dispatch_tokens_per_rank)
            self.ep_size, self.ep_rank = self._deepep.size, self._deepep.rank
        else:
            self._exchange = LocalBackend() if backend == "local" else A2ABackend(group)
            self.ep_size, self.ep_rank = self._exchange.size, self._exchange.rank
        self.backend, self.mode = backend, mode
        if num_experts < 1 or num_experts % self.ep_size:
            raise ValueError(f"{num_experts} experts cannot be split evenly over {self.ep_size} EP ranks")
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        self.num_experts, self.hidden_size = num_experts, hidden_size
        self.num_local_experts = num_experts // self.ep_size
        self.dtype, self.device = dtype, torch.device(device)
        self.budget = num_max_dispatch_tokens_per_rank
        self._ll_send: torch.Tensor | None = None
        self._ll_recv: torch.Tensor | None = None
        if mode == "low_latency" and self._deepep is None:
            if self.budget < 1:
                raise ValueError("low-latency mode needs num_max_dispatch_tokens_per_rank >= 1")
            rows = num_experts * self.budget
            # Send buffer: one block of `budget` rows per global expert, plus a dump row for ids of -1.
            self._ll_send = torch.zeros(rows + 1, hidden_size, dtype=dtype, device=self.device)
            self._ll_recv = torch.empty(rows, hidden_size, dtype=dtype, device=self.device)

    @property
    def closed(self) -> bool:
        return self._exchange is None and self._deepep is None

    def close(self) -> None:
        """Drops the buffers; the process group stays with its owner. Safe to call twice.

        With ``deepep`` this is a collective (DeepEP's ``destroy`` ends with a barrier): every rank calls it.
        """
        deepep, self._deepep = self._deepep, None
        self._exchange = None
        self._ll_send = self._ll_recv = None
        if deepep is not None:
            deepep.close()

    def _live(self, mode: str) -> ExchangeBackend | None:
        """The exchange of ``a2a``/``local`` (``None`` for ``deepep``), once the mode and state allow the call."""
        if self.closed:
            raise RuntimeError("Dispatcher is closed")
        if mode != self.mode:
            raise RuntimeError(f"this Dispatcher was built for {self.mode} mode; {mode} calls are refused")
        return self._exchange

    def _check_routing(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor | None) -> None:
        if x.dim() != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"x must be [num_tokens, {self.hidden_size}], got {tuple(x.shape)}")
        if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
            raise ValueError(f"topk_ids must be [{x.shape[0]}, K], got {tuple(topk_ids.shape)}")
        if topk_weights is not None and topk_weights.shape != topk_ids.shape:
            raise ValueError(f"topk_weights {tuple(topk_weights.shape)} must match topk_ids {tuple(topk_ids.shape)}")

    # ---- high-throughput mode -------------------------------------------------------------------

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> DispatchOutput:
        """Send every token to each rank that holds one of its experts (global ids, ``-1`` = none)."""
        exchange = self._live("high_throughput")
        self._check_routing(x, topk_ids, topk_weights)
        if exchange is None:
            assert self._deepep is not None
            return self._deepep.dispatch(x, topk_ids, topk_weights)
        ids = topk_ids.long()
        per_rank = self.num_local_experts
        dest_rank = torch.where(ids >= 0, ids.div(per_rank, rounding_mode="floor"), -1)
        # in_rank[p, t]: token t has an expert on rank p. nonzero() walks it rank-major, token-minor.
        ranks = torch.arange(self.ep_size, device=ids.device)
        in_rank = (dest_rank.unsqueeze(0) == ranks.view(-1, 1, 1)).any(dim=-1)
        send_rank, send_token = in_rank.nonzero(as_tuple=True)
        send_counts = in_rank.sum(dim=1)
        local_ids = ids[send_token] - (send_rank * per_rank).unsqueeze(1)
        local_ids = torch.where(dest_rank[send_token] == send_rank.unsqueeze(1), local_ids, -1)

        recv_counts = exchange.exchange_counts(send_counts)
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
        recv_x = exchange.all_to_all(x[send_token], recv_splits, send_splits)
        recv_ids = exchange.all_to_all(local_ids, recv_splits, send_splits)
        recv_weights = exchange.all_to_all(topk_weights.float()[send_token], recv_splits, send_splits)
        valid = recv_ids[recv_ids >= 0]
        per_expert = torch.bincount(valid, minlength=self.num_local_experts).tolist()
        handle = DispatchHandle(int(x.shape[0]), send_token, send_splits, recv_splits)
        return DispatchOutput(recv_x, recv_ids, recv_weights, per_expert, handle)

    def combine(self, y: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Sum each rank's (already weighted) output rows back onto their source tokens: ``[T, D]``."""
        exchange = self._live("high_throughput")
        if exchange is None:
            assert self._deepep is not None
            return self._deepep.combine(y, handle)
        if y.dim() != 2 or y.shape[0] != sum(handle.recv_splits):
            raise ValueError(f"combine expects [{sum(handle.recv_splits)}, D] rows, got {tuple(y.shape)}")
        back = exchange.all_to_all(y, handle.send_splits, handle.recv_splits)
        out = torch.zeros(handle.num_tokens, y.shape[1], dtype=y.dtype, device=y.device)
        # One index_add_ per source rank: indices are unique within each, so the sum order is fixed
        # (rank 0's part first) and the result is deterministic on GPU too.
        start = 0
        for count in handle.send_splits:
            if count:
                rows = slice(start, start + count)
                out.index_add_(0, handle.send_token_index[rows], back[rows])
            start += count
        return out

    # ---- low-latency mode -----------------------------------------------------------------------

    def low_latency_dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor) -> LowLatencyDispatchOutput:
        """Send ``(token, expert)`` pairs into fixed per-expert slots; every shape is fixed by the budget."""
        exchange = self._live("low_latency")
        self._check_routing(x, topk_ids, None)
        num_tokens, budget = int(x.shape[0]), self.budget
        if num_tokens > budget:
            raise ValueError(f"{num_tokens} tokens exceed num_max_dispatch_tokens_per_rank={budget}")
        if x.dtype != self.dtype:
            raise ValueError(f"x has dtype {x.dtype}, the low-latency buffers hold {self.dtype}")
        if exchange is None:
            assert self._deepep is not None
            return self._deepep.low_latency_dispatch(x, topk_ids)
        assert self._ll_send is not None and self._ll_recv is not None
        ids = topk_ids.long()
        num_experts, local = self.num_experts, self.num_local_experts
        dump = num_experts * budget
        # slot[t, k]: how many earlier tokens picked the same expert (a token picks an expert once).
        picks = torch.zeros(num_tokens, num_experts + 1, dtype=torch.long, device=ids.device)
        picks.scatter_(1, torch.where(ids >= 0, ids, num_experts), 1)
        picks = picks[:, :num_experts]
        slots = (picks.cumsum(dim=0) - picks).gather(1, ids.clamp(min=0))
        source_rows = torch.where(ids >= 0, ids * budget + slots, dump)
        # No zeroing between steps: unused slots travel but are never read (they pack onto padding rows).
        self._ll_send.index_copy_(0, source_rows.flatten(),
                                  x.unsqueeze(1).expand(-1, ids.shape[1], -1).reshape(-1, x.shape[1]))
        send_counts = picks.sum(dim=0)  # [E] = [dest rank, local expert]

        recv = exchange.all_to_all_equal(self._ll_send[:dump], self._ll_recv)
        recv_counts = exchange.exchange_counts(send_counts).view(self.ep_size, local)  # [src, local expert]
        # Pack [src, expert, slot] rows into [expert, src-major rows]: row offset of src's block within
        # expert e is the count of rows from lower source ranks.
        offsets = recv_counts.cumsum(dim=0) - recv_counts
        slot = torch.arange(budget, device=ids.device)
        padded_rows = self.ep_size * budget + 1  # one padding row per expert at the end
        expert_base = (torch.arange(local, device=ids.device) * padded_rows).view(1, local, 1)
        used = slot.view(1, 1, -1) < recv_counts.unsqueeze(-1)
        pack_index = expert_base + torch.where(used, offsets.unsqueeze(-1) + slot.view(1, 1, -1), padded_rows - 1)
        packed = torch.empty(local * padded_rows, self.hidden_size, dtype=x.dtype, device=x.device)
        packed.index_copy_(0, pack_index.flatten(), recv)  # unused slots all land on the padding rows
        recv_x = packed.view(local, padded_rows, -1)[:, : padded_rows - 1]
        handle = LowLatencyHandle(pack_index.flatten(), source_rows, num_tokens)
        return LowLatencyDispatchOutput(recv_x, recv_counts.sum(dim=0), handle)

    def low_latency_combine(self, y: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                            handle: LowLatencyHandle) -> torch.Tensor:
        """Bring every expert's (unweighted) rows home and sum them with the routing weights: ``[T, D]``.

        Terms are added in ascending expert id per token, the order ``kernels.moe_forward`` uses.
        """
        exchange = self._live("low_latency")
        if exchange is None:
            assert self._deepep is not None
            return self._deepep.low_latency_combine(y, topk_ids, topk_weights, handle)
        local, padded_rows = self.num_local_experts, self.ep_size * self.budget + 1
        if y.shape != (local, padded_rows - 1, self.hidden_size):
            raise ValueError(f"low_latency_combine expects {(local, padded_rows - 1, self.hidden_size)}, "
                             f"got {tuple(y.shape)}")
        if topk_ids.shape != handle.source_rows.shape or topk_weights.shape != topk_ids.shape:
            raise ValueError("topk_ids / topk_weights must be the ones given to low_latency_dispatch")
        y_padded = torch.zeros(local, padded_rows, self.hidden_size, dtype=y.dtype, device=y.device)
        y_padded[:, : padded_rows - 1] = y
        send_back = y_padded.view(-1, self.hidden_size)[handle.pack_index]
        back = torch.zeros(self.num_experts * self.budget + 1, self.hidden_size, dtype=y.dtype, device=y.device)
        exchange.all_to_all_equal(send_back, back[:-1])
        order = topk_ids.long().argsort(dim=1, stable=True)  # -1 first: they add an exact zero
        rows = handle.source_rows.gather(1, order)
        weights = topk_weights.gather(1, order)
        out = torch.zeros(handle.num_tokens, self.hidden_size, dtype=y.dtype, device=y.device)
        for k in range(rows.shape[1]):
            out = out + back[rows[:, k]] * weights[:, k : k + 1].to(y.dtype)
        return out
