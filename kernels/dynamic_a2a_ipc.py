"""The MLA-core head exchange on the GPU: buffers shared by the ranks of one node over CUDA IPC, split sizes
read on the device, the head transpose fused into the copy, capturable in a CUDA graph.

Same contract as ``kernels.dynamic_a2a`` (read it first), different mechanics:

- At construction every rank allocates its receive buffers and a signal array, and the ranks exchange CUDA
  IPC handles (``torch.multiprocessing``'s CUDA tensor sharing, sent over any process group, gloo too), so
  each rank holds every peer's buffers as device pointers. Works between GPUs of one node (P2P over NVLink
  or PCIe) and between processes sharing one GPU. No NVLink multicast.
- ``heads_to_owner`` pushes: rank s writes row m of owner r's tokens, its heads, straight into
  ``recv_r[m, s*Hl:(s+1)*Hl]`` — the owner's final ``[M, W*Hl, D]`` layout, so there is no transpose pass.
- ``heads_from_owner`` pushes the other way: the owner reads head slice s of its ``[M, W*Hl, D]`` rows
  (strided) and writes them contiguously at ``back_s[start_owner + m]``.
- Split sizes stay on the device: offsets are a device cumsum, the copy kernel masks rows past a rank's
  count, so one captured graph serves any split of up to ``max_tokens`` tokens. Outputs are the full
  fixed-size buffers; the valid rows are ``send_counts[rank]`` (to the owner) or ``sum(send_counts)`` (back).
- Ordering: a barrier before the copy (every peer finished reading what the previous exchange put in its
  buffers) and one after (every peer's rows have landed). A barrier is one tiny kernel: bump a device epoch,
  store it into each peer's signal slot with release semantics at system scope, spin with acquire loads
  until every peer's slot holds it. The epoch lives on the device, so graph replays keep counting.

Not thread-safe; one instance per (rank, shape); ``close()`` drops the peers' mappings before the buffers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from torch.multiprocessing.reductions import reduce_tensor

BLOCK_ROWS = 4


@triton.jit(do_not_specialize=["rank"])  # rank 1 would compile apart (see _load_kernels)
def _barrier_kernel(signal_ptrs, epoch_ptr, rank, WORLD: tl.constexpr):
    epoch = tl.load(epoch_ptr) + 1
    tl.store(epoch_ptr, epoch)
    for peer in tl.static_range(WORLD):
        slots = tl.load(signal_ptrs + peer).to(tl.pointer_type(tl.int64))
        tl.atomic_xchg(slots + rank, epoch, sem="release", scope="sys")
    mine = tl.load(signal_ptrs + rank).to(tl.pointer_type(tl.int64))
    for peer in tl.static_range(WORLD):
        seen = tl.atomic_add(mine + peer, 0, sem="acquire", scope="sys")
        while seen < epoch:
            seen = tl.atomic_add(mine + peer, 0, sem="acquire", scope="sys")


@triton.jit
def _copy_rows(src_ptr, src_first, src_step, dst_ptr, dst_first, dst_step, count, ROW: tl.constexpr,
               BLOCK: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """This program's block of rows m < count: row src_first + m * src_step of src -> row dst_first +
    m * dst_step of dst (rows of ROW values). Both exchange directions, with their row maps swapped."""
    cols = tl.arange(0, BLOCK)
    for i in tl.static_range(BLOCK_ROWS):
        m = tl.program_id(1) * BLOCK_ROWS + i
        if m < count:
            for c in range(0, ROW, BLOCK):
                mask = c + cols < ROW
                row = tl.load(src_ptr + (src_first + m * src_step) * ROW + c + cols, mask=mask)
                tl.store(dst_ptr + (dst_first + m * dst_step) * ROW + c + cols, row, mask=mask)


@triton.jit(do_not_specialize=["rank"])  # rank 1 would compile apart (see _load_kernels)
def _to_owner_kernel(
    x_ptr,
    recv_ptrs,
    counts_ptr,
    starts_ptr,
    rank,
    ROW: tl.constexpr,
    WORLD: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    """Program (owner r, row block b): rows m of r's tokens -> recv_r[m, rank*Hl:(rank+1)*Hl] (ROW = Hl*D)."""
    owner = tl.program_id(0)
    dest = tl.load(recv_ptrs + owner).to(x_ptr.dtype)
    # source row start + m, destination row m * WORLD + rank
    _copy_rows(x_ptr, tl.load(starts_ptr + owner), 1, dest, rank, WORLD, tl.load(counts_ptr + owner),
               ROW, BLOCK, BLOCK_ROWS)


@triton.jit(do_not_specialize=["rank"])  # rank 1 would compile apart (see _load_kernels)
def _from_owner_kernel(
    y_ptr,
    back_ptrs,
    counts_ptr,
    starts_ptr,
    rank,
    ROW: tl.constexpr,
    WORLD: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    """Program (rank s, row block b): y[m, s*Hl:(s+1)*Hl] of this owner's rows -> back_s[start_rank + m]."""
    peer = tl.program_id(0)
    dest = tl.load(back_ptrs + peer).to(y_ptr.dtype)
    # source row m * WORLD + peer, destination row start + m
    _copy_rows(y_ptr, peer, WORLD, dest, tl.load(starts_ptr + rank), 1, tl.load(counts_ptr + rank),
               ROW, BLOCK, BLOCK_ROWS)


def _share(tensor: torch.Tensor, group: Any, rank: int, world: int) -> list[torch.Tensor]:
    """Every rank's `tensor` (same shape everywhere), peers' opened through CUDA IPC handles."""
    handles: list[Any] = [None] * world
    dist.all_gather_object(handles, reduce_tensor(tensor), group=group)
    return [tensor if r == rank else fn(*args) for r, (fn, args) in enumerate(handles)]


class IpcAllToAll:
    """The head exchange of MLA-core DP over CUDA IPC buffers (module docstring).

    Args:
        group: any process group of the ``world`` ranks (gloo is enough: it only carries the IPC handles).
        rank / world: this rank in it; every rank must be on this node.
        max_tokens: the largest batch (N) an exchange takes; buffers are sized for it.
        heads: heads per rank (Hl).
        dim_to / dim_from: values per head sent to the owner (latent + rope: 576) and back (latent: 512).
        dtype / device: of every tensor exchanged.
    """

    def __init__(
        self,
        group: Any,
        rank: int,
        world: int,
        max_tokens: int,
        heads: int,
        dim_to: int,
        dim_from: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self._allocate(rank, world, max_tokens, heads, dim_to, dim_from, dtype, torch.device(device))
        self._connect([_share(t, group, rank, world) for t in self._shared()])
        dist.barrier(group=group)  # every peer has opened every handle before anyone writes

    @classmethod
    def in_process(
        cls,
        world: int,
        max_tokens: int,
        heads: int,
        dim_to: int,
        dim_from: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> list[IpcAllToAll]:
        """``world`` ranks inside one process, each to be driven on its own CUDA stream, sharing buffers
        directly (no IPC). For measuring the kernels and barriers on one GPU without the context
        time-slicing that ranks as processes sharing a GPU pay at every barrier."""
        ranks = [cls.__new__(cls) for _ in range(world)]
        for rank, a2a in enumerate(ranks):
            a2a._allocate(rank, world, max_tokens, heads, dim_to, dim_from, dtype, torch.device(device))
        for a2a in ranks:
            a2a._connect([[peer._shared()[i] for peer in ranks] for i in range(3)])
        return ranks

    def _allocate(
        self,
        rank: int,
        world: int,
        max_tokens: int,
        heads: int,
        dim_to: int,
        dim_from: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.rank, self.world, self.max_tokens, self.heads = rank, world, max_tokens, heads
        self.dim_to, self.dim_from = dim_to, dim_from
        self.recv = torch.zeros(max_tokens, world * heads, dim_to, dtype=dtype, device=device)
        self.back = torch.zeros(max_tokens, heads, dim_from, dtype=dtype, device=device)
        # int64: at ~250k barriers a second (2 per exchange, 2 exchanges per layer) int32 wraps in hours
        self.signals = torch.zeros(world, dtype=torch.int64, device=device)
        self.epoch = torch.zeros(1, dtype=torch.int64, device=device)

    def _shared(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.recv, self.back, self.signals

    def _connect(self, peers: list[list[torch.Tensor]]) -> None:
        """Every rank's (recv, back, signals), as tensors this process can address."""
        self._peers = peers
        device = self.recv.device
        recv_ptrs, back_ptrs, signal_ptrs = ([t.data_ptr() for t in tensors] for tensors in peers)
        self._recv_ptrs = torch.tensor(recv_ptrs, dtype=torch.int64, device=device)
        self._back_ptrs = torch.tensor(back_ptrs, dtype=torch.int64, device=device)
        self._signal_ptrs = torch.tensor(signal_ptrs, dtype=torch.int64, device=device)
        self._load_kernels()

    def _load_kernels(self) -> None:
        """Compile and load both copy kernels now, copying nothing (zero counts). Loading a module may wait
        for the kernels running on the device: done at the first exchange, while this rank's barrier spins
        for a peer that the same host thread has yet to launch (ranks as streams of one process), it would
        never return. For the same reason no kernel specializes on ``rank`` (Triton compiles an argument
        equal to 1 apart), so the barrier loaded by rank 0 serves every rank."""
        zeros = torch.zeros(self.world, dtype=torch.int64, device=self.recv.device)
        for kernel, buffer, ptrs, dim in (
            (_to_owner_kernel, self.recv, self._recv_ptrs, self.dim_to),
            (_from_owner_kernel, self.back, self._back_ptrs, self.dim_from),
        ):
            row = self.heads * dim
            kernel[self._grid()](
                buffer,
                ptrs,
                zeros,
                zeros,
                self.rank,
                ROW=row,
                WORLD=self.world,
                BLOCK=min(1024, triton.next_power_of_2(row)),
                BLOCK_ROWS=BLOCK_ROWS,
            )

    def barrier(self) -> None:
        _barrier_kernel[(1,)](self._signal_ptrs, self.epoch, self.rank, WORLD=self.world, num_warps=1)

    def _starts(self, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = counts.to(device=self.recv.device, dtype=torch.int64)
        return counts, torch.cumsum(counts, 0) - counts

    def _grid(self) -> tuple[int, int]:
        return self.world, triton.cdiv(self.max_tokens, BLOCK_ROWS)

    def heads_to_owner(self, x: torch.Tensor, send_counts: torch.Tensor) -> torch.Tensor:
        """``x`` ``[N, Hl, dim_to]`` (rows grouped by owner; ``send_counts`` on the device) -> this rank's
        ``recv`` ``[max_tokens, W*Hl, dim_to]``, valid in its first ``send_counts[rank]`` rows."""
        assert (
            x.shape[1:] == (self.heads, self.dim_to) and x.shape[0] <= self.max_tokens and x.is_contiguous()
        )
        counts, starts = self._starts(send_counts)
        row = self.heads * self.dim_to
        self.barrier()
        _to_owner_kernel[self._grid()](
            x,
            self._recv_ptrs,
            counts,
            starts,
            self.rank,
            ROW=row,
            WORLD=self.world,
            BLOCK=min(1024, triton.next_power_of_2(row)),
            BLOCK_ROWS=BLOCK_ROWS,
        )
        self.barrier()
        return self.recv

    def heads_from_owner(self, y: torch.Tensor, owner_counts: torch.Tensor) -> torch.Tensor:
        """``y`` ``[>= M, W*Hl, dim_from]`` (this owner's rows first) -> this rank's ``back``
        ``[max_tokens, Hl, dim_from]``, valid in its first ``sum(owner_counts)`` rows, in owner order."""
        assert y.shape[1:] == (self.world * self.heads, self.dim_from) and y.is_contiguous()
        counts, starts = self._starts(owner_counts)
        row = self.heads * self.dim_from
        self.barrier()
        _from_owner_kernel[self._grid()](
            y,
            self._back_ptrs,
            counts,
            starts,
            self.rank,
            ROW=row,
            WORLD=self.world,
            BLOCK=min(1024, triton.next_power_of_2(row)),
            BLOCK_ROWS=BLOCK_ROWS,
        )
        self.barrier()
        return self.back

    def close(self) -> None:
        torch.cuda.synchronize(self.recv.device)
        self._peers = []
        self._recv_ptrs = self._back_ptrs = self._signal_ptrs = torch.empty(0)
