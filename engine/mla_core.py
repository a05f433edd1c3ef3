"""MLA-core data parallelism (``--attention-dp mla-core``): where one forward's tokens' KV lives, and the two
attention steps that differ from whole-attention TP.

The q/kv projections, W_UK / W_UV and o_proj stay TP-sharded over the whole batch (heads split over the
ranks, so no weight is held twice); the latent KV of a request lives on its owner rank only
(``engine.kv_shards``). Per layer:

- every rank computes the latents of every new token (kv_a_proj is replicated) but writes only its own
  tokens' (the others go to the scratch page);
- DECODE: each rank folds W_UK into its heads' queries for the whole batch, ``heads_to_owner`` hands each
  owner every head of its tokens, the owner runs the absorbed MLA core over its own pages, and
  ``heads_from_owner`` returns each rank its heads of every token for W_UV and the TP o_proj;
- EXTEND (prefill, compute-bound): attention stays head-parallel as under TP; the context latents a
  sequence reads come from its owner (``gather_context``: each rank contributes the rows it owns, zeros
  elsewhere, one all-reduce), so a prefix held by one rank serves the heads of all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

import kernels
from engine.kv_pool import read_kv
from engine.kv_shards import ShardedKVPool
from engine.parallel import all_reduce
from kernels.dynamic_a2a import heads_from_owner, heads_to_owner


@dataclass
class MlaCoreRoute:
    """One forward's token placement under MLA-core DP, built once and used by every layer.

    Attributes:
        rank / world / group: this rank in the attention group the exchanges run over.
        order: ``[B]`` sequence indices grouped by owner rank (stable); ``inverse`` undoes it.
        owner_counts: sequences per owner, a host list (the split sizes of both exchanges: every rank knows
            them, so no exchange sizes are sent, and the device is read once per forward, not per layer).
        own_page_table / own_seq_lens: this rank's sequences (in ``order``), with local page indices.
        write_pages: ``[T]`` local page of each new token's latent (the scratch page for other ranks').
        read_pages / read_owned: EXTEND only: local page of each context row, and whether this rank owns it.
    """

    rank: int
    world: int
    group: Any
    order: torch.Tensor
    inverse: torch.Tensor
    owner_counts: list[int]
    own_page_table: torch.Tensor
    own_seq_lens: torch.Tensor
    write_pages: torch.Tensor
    read_pages: torch.Tensor | None = None
    read_owned: torch.Tensor | None = None


def _localize(pages: torch.Tensor, pool: ShardedKVPool) -> tuple[torch.Tensor, torch.Tensor]:
    """(local index of each instance page, or the scratch page where another rank holds it; owned mask)."""
    base = pool.shard_rank * pool.pages_per_shard
    owned = (pages >= base) & (pages < base + pool.pages_per_shard)
    return torch.where(owned, pages - base, pool.scratch_page), owned


def build_route(batch: Any, pool: ShardedKVPool, group: Any, world: int) -> MlaCoreRoute:
    """The route of ``batch`` (a ``ForwardBatch`` over ``pool``) for a group of ``world`` ranks."""
    if world != pool.num_shards:
        raise ValueError(f"the pool has {pool.num_shards} shards for an attention group of {world} ranks")
    owner = batch.page_table[:, 0].long() // pool.pages_per_shard  # a sequence's pages share one shard
    order = torch.argsort(owner, stable=True)
    inverse = torch.argsort(order)
    counts = torch.bincount(owner, minlength=world).tolist()
    own = order[owner[order] == pool.shard_rank]
    table = batch.page_table[own].long()
    local_table, _ = _localize(table, pool)
    own_table = torch.where(table >= 0, local_table, -1).to(torch.int32)
    write_pages, _ = _localize(batch.write_pages, pool)
    route = MlaCoreRoute(
        pool.shard_rank, world, group, order, inverse, counts, own_table, batch.seq_lens[own], write_pages
    )
    if batch.read_pages is not None:
        route.read_pages, route.read_owned = _localize(batch.read_pages, pool)
    return route


def gather_context(
    route: MlaCoreRoute, kv_cache: torch.Tensor, read_slots: torch.Tensor, dtype: torch.dtype, kv_scale: float
) -> torch.Tensor:
    """EXTEND: every sequence's context latents ``[Tk, R + P]`` on every rank, read from their owners (a sum
    of the owner's rows and zeros: exact)."""
    assert route.read_pages is not None and route.read_owned is not None
    rows = read_kv(kv_cache, route.read_pages, read_slots, dtype, kv_scale)
    rows = torch.where(route.read_owned[:, None], rows, torch.zeros((), dtype=rows.dtype))
    return all_reduce(rows, route.group, route.world)


def decode_core(
    route: MlaCoreRoute,
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    scale: float,
    kv_scale: float,
) -> torch.Tensor:
    """DECODE: this rank's heads of every sequence ``q_latent`` ``[B, Hl, R]``, ``q_pe`` ``[B, Hl, P]`` ->
    the attention-weighted latent of the same heads ``[B, Hl, R]``; the attention itself runs on each
    sequence's owner, over all heads."""
    rank_dim = q_latent.shape[-1]
    q = torch.cat([q_latent, q_pe], dim=-1)[route.order]
    mine = heads_to_owner(q, route.owner_counts, route.group, route.world)  # [M, H, R + P]
    if mine.shape[0]:
        out = kernels.mla_decode_attention(
            mine[..., :rank_dim],
            mine[..., rank_dim:],
            kv_cache,
            route.own_page_table,
            route.own_seq_lens,
            scale,
            kv_scale,
        )
    else:
        out = mine.new_empty(0, mine.shape[1], rank_dim)
    back = heads_from_owner(out, route.owner_counts, route.group, route.world)  # [B, Hl, R], owner order
    return back[route.inverse]
