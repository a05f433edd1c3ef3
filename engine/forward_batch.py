"""What one model forward computes: a batch of sequences, each with new tokens after a cached prefix."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.kv_pool import KVPool

if TYPE_CHECKING:
    from engine.mla_core import MlaCoreRoute


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # prefill new tokens (any count) after a prefix already in the pages
    DECODE = "decode"  # exactly one new token per sequence, absorbed attention over the pages


@dataclass
class ForwardBatch:
    """A batch for ``DeepseekForCausalLM.forward``; build it with ``ForwardBatch.build``.

    Attributes:
        mode: EXTEND or DECODE.
        input_ids: ``[T]`` int64, the new tokens of every sequence, concatenated.
        positions: ``[T]`` int64, position of each new token (its sequence's prefix length + offset).
        extend_lens / prefix_lens / seq_lens: int32 ``[B]``; seq_len = prefix_len + extend_len.
        page_table: int32 ``[B, max_pages]``, padded with -1.
        cu_seqlens_q / cu_seqlens_k: int32 ``[B+1]`` cumulative new / total tokens.
        write_pages / write_slots: int64 ``[T]``, where each new token's latent goes.
        read_pages / read_slots: int64 ``[sum(seq_lens)]``, EXTEND only: every token of every sequence,
            the full context whose latent is decompressed to K/V.
        kv_pool: the pool the page indices refer to (read and written by every layer).
        return_all_logits: also return logits of every new token (tests, scoring).
        graph_safe: DECODE only, set by ``engine.cuda_graph``: the forward must be capturable in a CUDA
            graph (no host sync, no data-dependent shape): masked-layout MoE, rope computed from the
            positions, logits of every row (each row is one sequence's only new token).
        cu_seqlens_q_host / cu_seqlens_k_host: the same bounds on the host, for the prefill attention,
            which cuts the packed batch into sequences in Python: reading the device copies there cost two
            host syncs per layer (54 per V2-Lite prefill forward, ~25 ms of an 88 ms 4096-token forward
            on an H100 spent with the GPU idle).
        mla_core: set by the model when the pool is sharded (MLA-core DP): where each token's KV lives.
    """

    mode: ForwardMode
    kv_pool: KVPool
    input_ids: torch.Tensor
    positions: torch.Tensor
    extend_lens: torch.Tensor
    prefix_lens: torch.Tensor
    seq_lens: torch.Tensor
    page_table: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    write_pages: torch.Tensor
    write_slots: torch.Tensor
    read_pages: torch.Tensor | None
    read_slots: torch.Tensor | None
    return_all_logits: bool = False
    graph_safe: bool = False
    cu_seqlens_q_host: torch.Tensor | None = None
    cu_seqlens_k_host: torch.Tensor | None = None
    mla_core: MlaCoreRoute | None = None

    @property
    def batch_size(self) -> int:
        return int(self.extend_lens.shape[0])

    @classmethod
    def build(
        cls,
        mode: ForwardMode,
        new_token_ids: list[list[int]],
        prefix_lens: list[int],
        page_tables: list[list[int]],
        kv_pool: KVPool,
        return_all_logits: bool = False,
        vocab_size: int | None = None,
    ) -> ForwardBatch:
        """Lay out a batch. With ``vocab_size`` the token ids are checked here, on the host, so the
        forward itself never has to synchronise with the device to validate them."""
        page_size, device = kv_pool.page_size, kv_pool.tensor.device
        if not new_token_ids:
            raise ValueError("a forward batch needs at least one sequence")
        if not len(new_token_ids) == len(prefix_lens) == len(page_tables):
            raise ValueError("new_token_ids, prefix_lens and page_tables must have one entry per sequence")
        extend_lens = [len(ids) for ids in new_token_ids]
        if vocab_size is not None:
            for ids in new_token_ids:
                bad = [t for t in ids if not 0 <= t < vocab_size]
                if bad:
                    raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        if min(extend_lens) < 1:
            raise ValueError("every sequence needs at least one new token")
        if mode is ForwardMode.DECODE and max(extend_lens) != 1:
            raise ValueError("decode batches take exactly one new token per sequence")
        seq_lens = [p + n for p, n in zip(prefix_lens, extend_lens, strict=True)]
        for i, (length, table) in enumerate(zip(seq_lens, page_tables, strict=True)):
            if len(table) * page_size < length:
                raise ValueError(f"sequence {i} has {length} tokens but only {len(table)} pages of {page_size}")

        if mode is ForwardMode.DECODE:
            return cls._decode(new_token_ids, prefix_lens, page_tables, kv_pool, return_all_logits)
        max_pages = max(len(t) for t in page_tables)
        table = torch.full((len(page_tables), max_pages), -1, dtype=torch.int32)
        for i, t in enumerate(page_tables):
            table[i, : len(t)] = torch.tensor(t, dtype=torch.int32)

        positions = torch.cat([torch.arange(p, p + n) for p, n in zip(prefix_lens, extend_lens, strict=True)])
        seq_index = torch.repeat_interleave(torch.arange(len(seq_lens)), torch.tensor(extend_lens))
        write_pages = table[seq_index, positions // page_size].long()
        write_slots = positions % page_size

        read_pages = read_slots = None
        if mode is ForwardMode.EXTEND:
            all_pos = torch.cat([torch.arange(n) for n in seq_lens])
            all_seq = torch.repeat_interleave(torch.arange(len(seq_lens)), torch.tensor(seq_lens))
            read_pages = table[all_seq, all_pos // page_size].long().to(device)
            read_slots = (all_pos % page_size).to(device)

        def cumsum(lengths: list[int]) -> torch.Tensor:
            return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)

        cu_q, cu_k = cumsum(extend_lens), cumsum(seq_lens)
        return cls(
            mode=mode,
            kv_pool=kv_pool,
            input_ids=torch.tensor([t for ids in new_token_ids for t in ids], dtype=torch.long, device=device),
            positions=positions.to(device),
            extend_lens=torch.tensor(extend_lens, dtype=torch.int32, device=device),
            prefix_lens=torch.tensor(prefix_lens, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            page_table=table.to(device),
            cu_seqlens_q=cu_q.to(device),
            cu_seqlens_k=cu_k.to(device),
            write_pages=write_pages.to(device),
            write_slots=write_slots.to(device),
            read_pages=read_pages,
            read_slots=read_slots,
            return_all_logits=return_all_logits,
            cu_seqlens_q_host=cu_q,
            cu_seqlens_k_host=cu_k,
        )


    @classmethod
    def _decode(cls, new_token_ids: list[list[int]], prefix_lens: list[int], page_tables: list[list[int]],
                kv_pool: KVPool, return_all_logits: bool) -> ForwardBatch:
        """A checked DECODE batch (one new token per sequence, at position prefix_len), laid out in plain
        Python and moved to the device as two tensors (the int64 fields and the int32 ones) that every field
        is a view of. Every decode step builds one: the general path's per-row tensors, index arithmetic
        and a dozen host-to-device copies cost ~0.3 ms a step on CPU, and each copy from pageable memory
        waits for the device on a GPU. On a GPU the two go from pinned memory without waiting: an overlapped
        decode turn (``engine.decode_overlap``) lays out the next batch while the last one still runs."""
        page_size, device = kv_pool.page_size, kv_pool.tensor.device
        b = len(new_token_ids)
        max_pages = max(len(t) for t in page_tables)
        seq_lens = [p + 1 for p in prefix_lens]
        cu_k = [0] * (b + 1)
        for i, n in enumerate(seq_lens):
            cu_k[i + 1] = cu_k[i] + n
        table: list[int] = []
        for t in page_tables:
            table += t
            table += [-1] * (max_pages - len(t))
        pinned = device.type == "cuda"
        longs = torch.tensor([ids[0] for ids in new_token_ids] + prefix_lens
                             + [t[p // page_size] for t, p in zip(page_tables, prefix_lens, strict=True)]
                             + [p % page_size for p in prefix_lens], dtype=torch.long, pin_memory=pinned)
        ints = torch.tensor([1] * b + prefix_lens + seq_lens + list(range(b + 1)) + cu_k + table, dtype=torch.int32,
                            pin_memory=pinned)
        host_q, host_k = ints[3 * b : 4 * b + 1], ints[4 * b + 1 : 5 * b + 2]
        dl, di = longs.to(device, non_blocking=pinned), ints.to(device, non_blocking=pinned)
        return cls(
            mode=ForwardMode.DECODE, kv_pool=kv_pool,
            input_ids=dl[:b], positions=dl[b : 2 * b], write_pages=dl[2 * b : 3 * b], write_slots=dl[3 * b :],
            extend_lens=di[:b], prefix_lens=di[b : 2 * b], seq_lens=di[2 * b : 3 * b],
            cu_seqlens_q=di[3 * b : 4 * b + 1], cu_seqlens_k=di[4 * b + 1 : 5 * b + 2],
            page_table=di[5 * b + 2 :].view(b, max_pages), read_pages=None, read_slots=None,
            return_all_logits=return_all_logits, cu_seqlens_q_host=host_q, cu_seqlens_k_host=host_k,
        )  # fmt: skip


@dataclass
class ForwardOutput:
    """``next_token_logits`` ``[B, V]`` (last new token of each sequence); ``all_logits`` ``[T, V]`` if asked."""

    next_token_logits: torch.Tensor
    all_logits: torch.Tensor | None = None
