"""The ``deepep`` backend of ``kernels.ep.Dispatcher``: DeepEP's V1 ``deep_ep.Buffer`` (NVSHMEM build).

Normal (high-throughput) mode serves ``dispatch``/``combine``; low-latency mode serves the masked layout
of ``low_latency_dispatch``/``low_latency_combine`` (fixed shapes, no host sync, CUDA-graph safe).
``deep_ep`` is imported only when this backend is built, so CPU machines never load it.

What runs where (read from DeepEP's source at commit 567632d; docs/deepep.md says more):

- normal mode, 2, 4 or 8 ranks on one node: NVLink (CUDA IPC buffers) only; NVSHMEM is not started.
- normal mode over more than 8 ranks (a multiple of 8): NVSHMEM across nodes, which needs RDMA NICs.
- low-latency mode: NVSHMEM, which DeepEP starts with IBGDA enabled. With
  ``allow_nvlink_for_low_latency_mode`` (on here) every peer that has an NVLink (P2P) mapping is written
  with plain stores and only the others go through IBGDA, so within one node no RDMA NIC is needed: on an
  H100 without a NIC, NVSHMEM logged "init failed for transport: IBGDA" and went on, and a one-rank
  low-latency dispatch ran (two GPUs not tried yet). Across nodes it needs RDMA NICs.
- tokens must be bfloat16 (the combine kernels are bf16 only); low-latency mode supports the hidden sizes
  in ``LOW_LATENCY_HIDDEN_SIZES``, top-k <= 11 and at most 511 tokens per rank (NVSHMEM QP depth 1024).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist

from kernels.ep import DispatchHandle, DispatchOutput, LowLatencyDispatchOutput, LowLatencyHandle

INTRANODE_RANKS = (2, 4, 8)  # DeepEP's SWITCH_RANKS: the intranode kernels are compiled for these
NVL_PEERS_PER_NODE = 8
LOW_LATENCY_HIDDEN_SIZES = (2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)
LOW_LATENCY_MAX_TOPK = 11
LOW_LATENCY_MAX_TOKENS_PER_RANK = 511  # DeepEP asserts QP depth (1024) >= 2 * (budget + 1)
INSTALL_HINT = ("build it with scripts/build_deepep.sh or `pip install --no-build-isolation "
                "'deep_ep @ git+https://github.com/deepseek-ai/DeepEP@567632dd59810d77b3cc05553df953cc0f779799'` "
                "(docs/deepep.md)")


class DeepEPUnavailableError(RuntimeError):
    """DeepEP cannot serve the requested layout on this machine; the message says why."""


def import_deep_ep() -> ModuleType:
    """``deep_ep``, or ``DeepEPUnavailableError`` saying why it cannot be imported."""
    try:
        import deep_ep
    except ImportError as exc:
        missing = isinstance(exc, ModuleNotFoundError) and exc.name in ("deep_ep", "deep_ep_cpp")
        what = "deep_ep is not installed" if missing else f"deep_ep failed to import ({exc})"
        raise DeepEPUnavailableError(f"{what}; {INSTALL_HINT}") from exc
    except OSError as exc:  # a built extension whose CUDA / NVSHMEM libraries are missing here
        raise DeepEPUnavailableError(f"deep_ep failed to load its libraries ({exc})") from exc
    return deep_ep


def has_rdma_nic() -> bool:
    """Whether an RDMA device (what NVSHMEM's IBGDA transport needs) is visible to this process."""
    try:
        return bool(os.listdir("/sys/class/infiniband"))
    except OSError:
        return False


def deepep_unavailable_reason(num_ranks: int, *, mode: str | None = None, dtype: torch.dtype | None = None,
                              hidden_size: int | None = None, device: torch.device | str = "cuda",
                              num_nodes: int = 1) -> str | None:
    """Why DeepEP cannot serve this layout here, or ``None`` when it can.

    ``mode`` ``None`` means both modes must work (the caller does not know which it will run); a
    ``dtype`` or ``hidden_size`` of ``None`` is not checked. Cheap: imports ``deep_ep``, builds nothing.
    """
    if torch.device(device).type != "cuda":
        return f"DeepEP runs on CUDA GPUs only (the device is {torch.device(device).type})"
    try:
        import_deep_ep()
    except DeepEPUnavailableError as exc:
        return str(exc)
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to this process"
    low_latency = mode in (None, "low_latency")
    if num_ranks <= NVL_PEERS_PER_NODE and num_ranks not in INTRANODE_RANKS:
        return (f"DeepEP's kernels serve 2, 4 or 8 ranks on one node or multiples of 8 across nodes "
                f"(got {num_ranks}); use 'local' on one rank, else 'a2a'")
    if num_nodes > 1 and num_ranks != num_nodes * NVL_PEERS_PER_NODE:
        return (f"DeepEP across nodes takes 8 GPUs per node (rank r on node r // 8); got {num_ranks} ranks "
                f"on {num_nodes} nodes")
    if num_ranks > NVL_PEERS_PER_NODE and not has_rdma_nic():
        return ("DeepEP across nodes needs NVSHMEM over RDMA and this machine has no RDMA NIC "
                "(/sys/class/infiniband is empty); within one node it runs over NVLink alone")
    if dtype is not None and dtype != torch.bfloat16:
        return f"DeepEP moves bfloat16 tokens only (the model runs in {dtype})"
    if hidden_size is not None:
        if (hidden_size * 2) % 16:
            return f"DeepEP needs hidden_size * 2 bytes to be a multiple of 16 (hidden_size {hidden_size})"
        if low_latency and hidden_size not in LOW_LATENCY_HIDDEN_SIZES:
            return (f"DeepEP's low-latency kernels are compiled for hidden sizes {LOW_LATENCY_HIDDEN_SIZES}, "
                    f"not {hidden_size}")
    return None


@dataclass(frozen=True)
class DeepEPDispatchHandle(DispatchHandle):
    """A ``DispatchHandle`` that carries DeepEP's own layout tuple (the base fields are left empty)."""

    native: tuple = ()
    num_recv_tokens: int = 0


@dataclass(frozen=True)
class DeepEPLowLatencyHandle(LowLatencyHandle):
    """A ``LowLatencyHandle`` that carries DeepEP's low-latency handle tuple."""

    native: tuple = ()


@dataclass
class _Sizes:
    """Bytes of the two DeepEP buffers for one layout."""

    nvl: int = 0
    rdma: int = 0


class DeepEPBackend:
    """One ``deep_ep.Buffer`` in normal or low-latency mode, with the ``kernels.ep`` result types.

    Attributes:
        rank / size: this rank in the EP group and the group's size.
        mode: ``"high_throughput"`` (DeepEP's normal mode) or ``"low_latency"``.
        buffer: the ``deep_ep.Buffer`` (``None`` once closed).

    ``close()`` is a collective (DeepEP's ``destroy`` ends with a barrier): every rank calls it. A
    low-latency ``recv_x`` is a view of DeepEP's buffer: it stays valid until the next low-latency dispatch
    but one (DeepEP keeps two buffers), so consume it before then.
    """

    def __init__(self, group: Any, num_experts: int, hidden_size: int, *, mode: str,
                 num_max_dispatch_tokens_per_rank: int = 0, dtype: torch.dtype = torch.bfloat16) -> None:
        """
        Args:
            group: the EP process group (``None`` = the default group); NCCL, one GPU per rank, with
                ``torch.cuda.set_device`` already called.
            num_experts: routed experts over the group; must split evenly.
            hidden_size: ``D`` of the tokens.
            mode: ``"high_throughput"`` or ``"low_latency"``.
            num_max_dispatch_tokens_per_rank: low-latency budget (tokens per rank per step).
            dtype: of the tokens: bfloat16 only.
        """
        import_deep_ep()  # the most basic reason first: DeepEPUnavailableError when it is not installed
        if not dist.is_available() or not dist.is_initialized():
            raise DeepEPUnavailableError("the deepep EP backend needs torch.distributed initialised (NCCL)")
        self.group = group if group is not None else dist.group.WORLD
        self.rank, self.size = dist.get_rank(self.group), dist.get_world_size(self.group)
        reason = deepep_unavailable_reason(self.size, mode=mode, dtype=dtype, hidden_size=hidden_size)
        if reason is not None:
            raise DeepEPUnavailableError(f"the deepep EP backend cannot run here: {reason}")
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        if num_experts < 1 or num_experts % self.size:
            raise ValueError(f"{num_experts} experts cannot be split evenly over {self.size} EP ranks")
        self.mode, self.num_experts, self.hidden_size = mode, num_experts, hidden_size
        self.num_local_experts = num_experts // self.size
        self.budget = num_max_dispatch_tokens_per_rank
        if mode == "low_latency" and not 1 <= self.budget <= LOW_LATENCY_MAX_TOKENS_PER_RANK:
            raise ValueError(f"DeepEP low-latency mode takes 1..{LOW_LATENCY_MAX_TOKENS_PER_RANK} tokens per rank, "
                             f"got num_max_dispatch_tokens_per_rank={self.budget}")
        deep_ep = import_deep_ep()
        self._topk_idx_dtype: torch.dtype = deep_ep.topk_idx_t
        sizes = self._buffer_sizes(deep_ep)
        self.buffer: Any = deep_ep.Buffer(
            self.group, num_nvl_bytes=sizes.nvl, num_rdma_bytes=sizes.rdma,
            low_latency_mode=mode == "low_latency",
            # Low-latency mode wants one RC queue pair per local expert (its kernels assert it).
            num_qps_per_rank=max(1, self.num_local_experts) if mode == "low_latency" else 24,
            allow_nvlink_for_low_latency_mode=True, explicitly_destroy=True)

    def _buffer_sizes(self, deep_ep: ModuleType) -> _Sizes:
        if self.mode == "low_latency":
            return _Sizes(rdma=deep_ep.Buffer.get_low_latency_rdma_size_hint(
                self.budget, self.hidden_size, self.size, self.num_experts))
        hidden_bytes = self.hidden_size * 2  # bf16
        sizes = _Sizes()
        for config in (deep_ep.Buffer.get_dispatch_config(self.size), deep_ep.Buffer.get_combine_config(self.size)):
            sizes.nvl = max(sizes.nvl, config.get_nvl_buffer_size_hint(hidden_bytes, self.size))
            if self.size > NVL_PEERS_PER_NODE:
                sizes.rdma = max(sizes.rdma, config.get_rdma_buffer_size_hint(hidden_bytes, self.size))
        return sizes

    def _live(self) -> Any:
        if self.buffer is None:
            raise RuntimeError("the DeepEP buffer is closed")
        return self.buffer

    def close(self) -> None:
        """Releases DeepEP's buffers (and NVSHMEM in low-latency mode). Collective; safe to call twice."""
        buffer, self.buffer = self.buffer, None
        if buffer is not None:
            buffer.destroy()

    # ---- normal (high-throughput) mode ----------------------------------------------------------

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> DispatchOutput:
        buffer = self._live()
        ids = topk_ids.to(self._topk_idx_dtype).contiguous()
        weights = topk_weights.float().contiguous()
        per_rank, per_rdma_rank, per_expert, in_rank, _ = buffer.get_dispatch_layout(ids, self.num_experts)
        recv_x, recv_ids, recv_weights, per_local_expert, native, _ = buffer.dispatch(
            x.contiguous(), topk_idx=ids, topk_weights=weights, num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        handle = DeepEPDispatchHandle(int(x.shape[0]), ids.new_empty(0), [], [], native=native,
                                      num_recv_tokens=int(recv_x.shape[0]))
        return DispatchOutput(recv_x, recv_ids.long(), recv_weights, list(per_local_expert), handle)

    def combine(self, y: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        buffer = self._live()
        if not isinstance(handle, DeepEPDispatchHandle):
            raise TypeError("combine needs the handle of this backend's dispatch")
        if y.dim() != 2 or y.shape != (handle.num_recv_tokens, self.hidden_size):
            raise ValueError(f"combine expects [{handle.num_recv_tokens}, {self.hidden_size}] rows, "
                             f"got {tuple(y.shape)}")
        combined, _, _ = buffer.combine(y.contiguous(), handle.native)
        return combined

    # ---- low-latency mode -----------------------------------------------------------------------

    def low_latency_dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor) -> LowLatencyDispatchOutput:
        buffer = self._live()
        if topk_ids.shape[1] > LOW_LATENCY_MAX_TOPK:
            raise ValueError(f"DeepEP low-latency mode takes top-k <= {LOW_LATENCY_MAX_TOPK}, got {topk_ids.shape[1]}")
        ids = topk_ids.to(self._topk_idx_dtype).contiguous()
        recv_x, recv_count, native, _, _ = buffer.low_latency_dispatch(
            x.contiguous(), ids, self.budget, self.num_experts, use_fp8=False)
        empty = ids.new_empty(0)
        handle = DeepEPLowLatencyHandle(empty, empty, int(x.shape[0]), native=native)
        return LowLatencyDispatchOutput(recv_x, recv_count.long(), handle)

    def low_latency_combine(self, y: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                            handle: LowLatencyHandle) -> torch.Tensor:
        buffer = self._live()
        if not isinstance(handle, DeepEPLowLatencyHandle):
            raise TypeError("low_latency_combine needs the handle of this backend's low_latency_dispatch")
        expected = (self.num_local_experts, self.size * self.budget, self.hidden_size)
        if tuple(y.shape) != expected:
            raise ValueError(f"low_latency_combine expects {expected}, got {tuple(y.shape)}")
        if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != handle.num_tokens:
            raise ValueError("topk_ids / topk_weights must be the ones given to low_latency_dispatch")
        combined, _, _ = buffer.low_latency_combine(
            y.contiguous(), topk_ids.to(self._topk_idx_dtype).contiguous(), topk_weights.float().contiguous(),
            handle.native)
        return combined
