"""Dual batch overlap (DBO): one forward's batch cut into two micro-batches whose stages interleave, so that
one micro-batch's expert-parallel dispatch or combine is in flight while the other computes.

Per MoE layer, in this order (the same on every rank of the instance, which keeps the EP collectives in
step): attention(0), dispatch(0), attention(1), dispatch(1), experts(0), combine(0), experts(1), combine(1).
On CUDA the dispatches and combines run on a second stream, ordered against the compute stream by events:
dispatch(0) overlaps attention(1), dispatch(1) overlaps experts(0), combine(0) overlaps experts(1). On CPU
the same interleaving runs in order: the tokens it gives are what is tested.

Where it pays: only where dispatch and combine cost time, i.e. real EP traffic between GPUs. Below a token
count a step is not split (`DboConfig`'s thresholds, vLLM's `--dbo-decode-token-threshold` and
`--dbo-prefill-token-threshold`): small GEMMs twice cost more than the overlap gives. Micro-batches are cut
at sequence boundaries (at most half of the tokens on either side, the closest cut to it); a batch of one
sequence is not split.

With several attention-DP groups the ranks hold different batches, and a rank that splits must not meet a
rank that does not in the EP collectives: every forward (and every idle forward of a group without work)
first agrees on the split with one MIN all-reduce over the instance (idle groups vote yes).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from engine.forward_batch import ForwardBatch, ForwardMode

T = TypeVar("T")


@dataclass(frozen=True)
class DboConfig:
    """`enabled`: split steps of at least `decode_token_threshold` (DECODE) or `prefill_token_threshold`
    (EXTEND) new tokens into two micro-batches. The defaults are vLLM's."""

    enabled: bool = False
    decode_token_threshold: int = 32
    prefill_token_threshold: int = 512

    def __post_init__(self) -> None:
        if self.decode_token_threshold < 2 or self.prefill_token_threshold < 2:
            raise ValueError("the DBO token thresholds must be >= 2 (two micro-batches of one token at least)")

    def threshold(self, mode: ForwardMode) -> int:
        return self.decode_token_threshold if mode is ForwardMode.DECODE else self.prefill_token_threshold


def add_dbo_flags(group: argparse._ActionsContainer) -> None:
    """`--enable-dbo` and its thresholds (vLLM's names); the one definition every entry point uses."""
    d = DboConfig()
    group.add_argument("--enable-dbo", action="store_true",
                       help="dual batch overlap: split a step's batch into two micro-batches so one's EP "
                            "dispatch/combine runs while the other computes (pays with real EP traffic)")
    group.add_argument("--dbo-decode-token-threshold", type=int, default=d.decode_token_threshold,
                       help="decode steps with fewer tokens (sequences) are not split")
    group.add_argument("--dbo-prefill-token-threshold", type=int, default=d.prefill_token_threshold,
                       help="prefill steps with fewer new tokens are not split")


def dbo_config_from_flags(args: argparse.Namespace) -> DboConfig:
    return DboConfig(bool(getattr(args, "enable_dbo", False)),
                     getattr(args, "dbo_decode_token_threshold", DboConfig.decode_token_threshold),
                     getattr(args, "dbo_prefill_token_threshold", DboConfig.prefill_token_threshold))


def split_point(batch: ForwardBatch, config: DboConfig) -> int | None:
    """The first sequence of micro-batch 1 (the cut nearest half of the new tokens), or None: not split."""
    if not config.enabled or batch.graph_safe or batch.batch_size < 2:
        return None
    extend = batch.extend_lens.tolist()
    total = sum(extend)
    if total < config.threshold(batch.mode):
        return None
    best, best_gap, seen = 1, total, 0
    for k in range(1, len(extend)):
        seen += extend[k - 1]
        gap = abs(total - 2 * seen)
        if gap < best_gap:
            best, best_gap = k, gap
    return best


def micro_batch(batch: ForwardBatch, lo: int, hi: int) -> ForwardBatch:
    """Sequences `[lo, hi)` of `batch` as a batch of their own (views of its tensors, offsets re-based)."""
    cu_q, cu_k = batch.cu_seqlens_q, batch.cu_seqlens_k
    # The offsets from the host copies where the batch has them (no device sync), kept re-based beside.
    host_q, host_k = batch.cu_seqlens_q_host, batch.cu_seqlens_k_host
    q0, q1 = (int(cu_q[lo]), int(cu_q[hi])) if host_q is None else (int(host_q[lo]), int(host_q[hi]))
    k0, k1 = (int(cu_k[lo]), int(cu_k[hi])) if host_k is None else (int(host_k[lo]), int(host_k[hi]))
    return replace(
        batch,
        input_ids=batch.input_ids[q0:q1],
        positions=batch.positions[q0:q1],
        extend_lens=batch.extend_lens[lo:hi],
        prefix_lens=batch.prefix_lens[lo:hi],
        seq_lens=batch.seq_lens[lo:hi],
        page_table=batch.page_table[lo:hi],
        cu_seqlens_q=cu_q[lo : hi + 1] - q0,
        cu_seqlens_k=cu_k[lo : hi + 1] - k0,
        cu_seqlens_q_host=host_q[lo : hi + 1] - q0 if host_q is not None else None,
        cu_seqlens_k_host=host_k[lo : hi + 1] - k0 if host_k is not None else None,
        write_pages=batch.write_pages[q0:q1],
        write_slots=batch.write_slots[q0:q1],
        read_pages=batch.read_pages[k0:k1] if batch.read_pages is not None else None,
        read_slots=batch.read_slots[k0:k1] if batch.read_slots is not None else None,
    )


def agree_split(want: bool, group: Any) -> bool:
    """Whether every rank of `group` (a gloo group) splits this forward: one MIN all-reduce of a host flag
    (an idle rank votes True)."""
    flag = torch.tensor([int(want)], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


class Streams:
    """Where the communication stages run: a second CUDA stream ordered against the compute stream by
    events, or (CPU) the one sequence of calls."""

    def __init__(self, device: torch.device) -> None:
        self.comm = torch.cuda.Stream(device) if device.type == "cuda" else None

    def communicate(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs `fn(*args)` (a dispatch or a combine) after the compute stream's work so far, on the comm
        stream; the compute stream waits for it before it touches the result (`joined`)."""
        if self.comm is None:
            return fn(*args)
        compute = torch.cuda.current_stream()
        self.comm.wait_stream(compute)
        with torch.cuda.stream(self.comm):
            return fn(*args)

    @contextlib.contextmanager
    def joined(self) -> Iterator[None]:
        """Compute-stream work that reads a communication stage's result."""
        if self.comm is not None:
            torch.cuda.current_stream().wait_stream(self.comm)
        yield

    def finish(self) -> None:
        if self.comm is not None:
            torch.cuda.current_stream().wait_stream(self.comm)
