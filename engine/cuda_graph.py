"""CUDA-graph decode: the DECODE forward captured once per batch-size bucket, replayed with padding.

A decode step of a small batch is bound by kernel launches (27 layers x ~30 kernels on V2-Lite), not
by the GPU: replaying a captured graph launches them all at once. A graph replays fixed shapes and
fixed addresses, so the runner owns static input buffers sized for the largest bucket (bucket ``bs``
uses rows ``[:bs]``), copies each batch into them, pads the rest, and replays the smallest bucket that
holds the batch. The forward it captures is the model's ``graph_safe`` DECODE path (no host sync, no
data-dependent shape: masked-layout MoE, Triton paged decode); sampling stays outside the graph. At
tp > 1 the graph holds the EP exchange too: fixed-budget all-to-alls into the masked layout
(``engine.ep_moe``, low-latency mode), whose shapes do not depend on the batch or its routing.

Padding rows read and write one scratch page of the pool (token 0, sequence length 1), which the
runner reserves at start-up and returns in ``close()``, so they never touch a real sequence's KV.
Batches the graphs cannot take (too many sequences, a wider page table, EXTEND) run eagerly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from engine.forward_batch import ForwardBatch, ForwardMode, ForwardOutput
from engine.kv_pool import KVPool
from engine.model import DeepseekForCausalLM
from engine.moe import LocalDispatcher, MaskedDispatcher, MoEBlock

log = logging.getLogger(__name__)


def capture_bucket_sizes(max_bs: int) -> list[int]:
    """Batch sizes to capture: powers of two below ``max_bs``, then ``max_bs`` itself."""
    if max_bs < 1:
        raise ValueError(f"cuda_graph_max_bs must be >= 1, got {max_bs}")
    sizes = []
    size = 1
    while size < max_bs:
        sizes.append(size)
        size *= 2
    return [*sizes, max_bs]


def bucket_for(buckets: list[int], batch_size: int) -> int | None:
    """The smallest bucket holding ``batch_size`` sequences; None when the batch is larger than all."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    return next((b for b in sorted(buckets) if b >= batch_size), None)


@dataclass
class DecodeBuffers:
    """Static inputs of the captured forward for up to ``max_bs`` sequences (one new token each).

    Attributes mirror ``ForwardBatch``: input_ids / positions / write_pages / write_slots int64
    ``[max_bs]``, seq_lens int32 ``[max_bs]``, page_table int32 ``[max_bs, max_pages]``. The EXTEND-only
    and bookkeeping fields (extend_lens, prefix_lens, cu_seqlens_*) are constants the graph-safe
    forward does not read; they exist so the view is a complete ForwardBatch.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    seq_lens: torch.Tensor
    page_table: torch.Tensor
    write_pages: torch.Tensor
    write_slots: torch.Tensor
    ones: torch.Tensor
    zeros: torch.Tensor
    arange: torch.Tensor

    @classmethod
    def allocate(cls, max_bs: int, max_pages: int, device: torch.device) -> DecodeBuffers:
        def ints(dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(max_bs, dtype=dtype, device=device)

        return cls(
            input_ids=ints(torch.long), positions=ints(torch.long), seq_lens=ints(torch.int32),
            page_table=torch.zeros(max_bs, max_pages, dtype=torch.int32, device=device),
            write_pages=ints(torch.long), write_slots=ints(torch.long),
            ones=torch.ones(max_bs, dtype=torch.int32, device=device), zeros=ints(torch.int32),
            arange=torch.arange(max_bs + 1, dtype=torch.int32, device=device),
        )  # fmt: skip

    @property
    def max_bs(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def max_pages(self) -> int:
        return int(self.page_table.shape[1])

    def load(self, batch: ForwardBatch | None, bucket: int, scratch_page: int) -> None:
        """Copy ``batch``'s rows in (device to device, no sync) and make rows ``[bs, bucket)`` padding:
        token 0 at position 0 of a one-token sequence on the scratch page. ``batch=None``: all padding."""
        bs = 0 if batch is None else batch.batch_size
        if bs > bucket or bucket > self.max_bs:
            raise ValueError(f"a batch of {bs} does not fit bucket {bucket} (largest {self.max_bs})")
        self.page_table[:bucket].fill_(scratch_page)
        if batch is not None:
            width = batch.page_table.shape[1]
            if width > self.max_pages:
                raise ValueError(f"page table has {width} columns, the graphs take {self.max_pages}")
            self.input_ids[:bs].copy_(batch.input_ids)
            self.positions[:bs].copy_(batch.positions)
            self.seq_lens[:bs].copy_(batch.seq_lens)
            self.page_table[:bs, :width].copy_(batch.page_table)
            self.write_pages[:bs].copy_(batch.write_pages)
            self.write_slots[:bs].copy_(batch.write_slots)
        self.input_ids[bs:bucket].zero_()
        self.positions[bs:bucket].zero_()
        self.seq_lens[bs:bucket].fill_(1)
        self.write_pages[bs:bucket].fill_(scratch_page)
        self.write_slots[bs:bucket].zero_()

    def batch(self, bucket: int, kv_pool: KVPool) -> ForwardBatch:
        """The graph-safe ForwardBatch over rows ``[:bucket]`` (views: same addresses on every call)."""
        return ForwardBatch(
            mode=ForwardMode.DECODE, kv_pool=kv_pool,
            input_ids=self.input_ids[:bucket], positions=self.positions[:bucket],
            extend_lens=self.ones[:bucket], prefix_lens=self.zeros[:bucket], seq_lens=self.seq_lens[:bucket],
            page_table=self.page_table[:bucket], cu_seqlens_q=self.arange[: bucket + 1],
            cu_seqlens_k=self.arange[: bucket + 1], write_pages=self.write_pages[:bucket],
            write_slots=self.write_slots[:bucket], read_pages=None, read_slots=None, graph_safe=True,
        )  # fmt: skip


def check_capturable(model: DeepseekForCausalLM, max_bs: int) -> None:
    """Raises ValueError saying why ``model``'s DECODE forward of up to ``max_bs`` sequences cannot be captured.

    One rank: the local MoE dispatcher. Several ranks (tp > 1): every MoE layer on a masked EP dispatcher
    (``engine.ep_moe`` in low-latency mode, its budget holding the share of ``max_bs``), so that dispatch and
    combine are fixed-shape exchanges the graph holds; DP groups that replay different buckets, run eagerly
    or idle still meet in collectives of the same shapes. DBO across DP groups votes on the host each forward
    (a graph's replay would skip the vote the other groups wait in): refused.
    """
    multi_rank = model.ctx.tp_size != 1
    if multi_rank and model.dbo.enabled and model.ctx.dp_size > 1:
        raise ValueError("CUDA-graph EP decode runs without DBO across DP groups (its split vote is a host sync)")
    for layer in model.model.layers:
        mlp = layer.mlp
        if not isinstance(mlp, MoEBlock):
            continue
        if not multi_rank:
            if not isinstance(mlp.dispatcher, LocalDispatcher):
                raise ValueError("single-rank CUDA-graph decode needs the local MoE dispatcher")
        elif isinstance(mlp.dispatcher, MaskedDispatcher):
            mlp.dispatcher.check_capture(max_bs)
        else:
            raise ValueError(f"CUDA-graph decode at tp {model.ctx.tp_size} needs the expert-parallel MoE in "
                             "low-latency mode (engine.ep_moe)")


class CudaGraphRunner:
    """Runs DECODE batches through CUDA graphs captured per batch-size bucket (eager beyond them).

    Call it like the model: ``runner(batch) -> ForwardOutput``. The logits of a replayed batch are a
    view of the graph's output buffer, valid until the next call (the scheduler samples at once).

    Args:
        model: a single-rank model with local experts, or a multi-rank one whose MoE layers run the masked
            low-latency EP exchange (``check_capturable``): every rank of the instance builds its runner with
            the same ``max_bs`` at the same time (capture warms up through the collectives).
        kv_pool: the pool the batches' page indices refer to; one page is reserved as scratch.
        max_bs: largest batch to capture; buckets are ``capture_bucket_sizes(max_bs)``.
        capture: capture graphs; default: when the pool is on CUDA. Without capture the same padded,
            graph-safe forward runs eagerly (CPU tests of the padding and the graph-safe path).
        max_context_len: longest sequence a graph serves, fixing the page-table width; default: the
            model's max positions, capped by the pool's size. Longer sequences run eagerly.
    """

    def __init__(self, model: DeepseekForCausalLM, kv_pool: KVPool, max_bs: int, capture: bool | None = None,
                 max_context_len: int | None = None) -> None:
        self.buckets = capture_bucket_sizes(max_bs)
        check_capturable(model, self.buckets[-1])
        self.model, self.kv_pool = model, kv_pool
        self.device = kv_pool.tensor.device
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError(f"cannot capture CUDA graphs on {self.device}")
        context = max_context_len or model.config.max_position_embeddings
        max_pages = min(kv_pool.pages_for_tokens(context), kv_pool.num_pages)
        self.scratch_page = kv_pool.alloc(1)[0]  # raises PoolExhaustedError before anything is held
        self.static_steps = 0  # batches run through the buckets (replayed, or eagerly without capture)
        self.eager_steps = 0  # batches handed to the model as they are
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        try:
            self.buffers = DecodeBuffers.allocate(max_bs, max_pages, self.device)
            if self.capture:
                self._capture_all()
        except BaseException:
            self.close()
            raise

    @property
    def max_bs(self) -> int:
        return self.buckets[-1]

    def can_run(self, batch: ForwardBatch) -> bool:
        """Whether ``batch`` goes through the static path (else the model runs it eagerly)."""
        return (batch.mode is ForwardMode.DECODE and not batch.return_all_logits and not batch.graph_safe
                and batch.kv_pool is self.kv_pool and batch.batch_size <= self.max_bs
                and batch.page_table.shape[1] <= self.buffers.max_pages)

    def __call__(self, batch: ForwardBatch) -> ForwardOutput:
        if self.scratch_page < 0:
            raise RuntimeError("CudaGraphRunner is closed")
        if not self.can_run(batch):
            self.eager_steps += 1
            return self.model(batch)
        self.static_steps += 1
        bs = batch.batch_size
        bucket = bucket_for(self.buckets, bs)
        assert bucket is not None
        self.buffers.load(batch, bucket, self.scratch_page)
        if self.capture:
            self._graphs[bucket].replay()
            logits = self._logits[bucket]
        else:
            logits = self.model(self.buffers.batch(bucket, self.kv_pool)).next_token_logits
        return ForwardOutput(logits[:bs])

    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()  # shared: buckets replay one at a time
        stream = torch.cuda.current_stream(self.device)
        started = time.monotonic()
        for bucket in reversed(self.buckets):  # largest first, so smaller ones fit in its memory
            t0 = time.monotonic()
            self.buffers.load(None, bucket, self.scratch_page)
            batch = self.buffers.batch(bucket, self.kv_pool)
            # Warm up on a side stream (Triton compiles, cuBLAS picks kernels) before capturing.
            side = torch.cuda.Stream(self.device)
            side.wait_stream(stream)
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.model(batch)
            stream.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._logits[bucket] = self.model(batch).next_token_logits
            self._graphs[bucket] = graph
            log.info("captured decode graph for batch %d in %.2fs", bucket, time.monotonic() - t0)
        log.info("captured %d decode graphs (batch <= %d) in %.1fs", len(self.buckets), self.max_bs,
                 time.monotonic() - started)

    def close(self) -> None:
        """Drop the graphs and return the scratch page to the pool (idempotent)."""
        self._graphs.clear()
        self._logits.clear()
        if self.scratch_page >= 0:
            self.kv_pool.free([self.scratch_page])
            self.scratch_page = -1
