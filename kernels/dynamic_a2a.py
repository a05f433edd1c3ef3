"""The all-to-all of MLA-core data parallelism, with split sizes given as tensors and the head transpose
fused into the copy: the torch.distributed reference (any backend, gloo included).

MLA-core DP (``--attention-dp mla-core``) runs the q/kv projections TP-sharded over the whole batch (rank s
holds heads ``[s*Hl, (s+1)*Hl)`` of every token), but each request's latent KV lives on one *owner* rank.
Two exchanges per layer move the per-head rows between those layouts:

- ``heads_to_owner``: every rank sends each owner the rows of the owner's tokens for its own heads; the
  owner receives ``[M, W*Hl, D]`` (all heads of its M tokens; heads ordered by source rank).
- ``heads_from_owner``: the owner sends head slice s of its ``[M, W*Hl, D]`` output back to rank s; rank s
  receives ``[N, Hl, D]`` (its heads of every token, tokens in owner order).

Rows are grouped by owner: ``send_counts[r]`` consecutive rows go to rank r. Every rank sends an owner
the same rows (the batch is the same on every rank), which is what makes the heads line up on arrival.

The split sizes are tensors because on the GPU they are known only on the device, inside a CUDA graph:
the fast backend (``kernels.dynamic_a2a_ipc``) reads them there and writes straight into peer buffers.
This reference exchanges them first (one small ``all_to_all_single``, then a host read: not capturable)
and then moves the rows with ``all_to_all_single`` and a transpose copy — the two-step baseline the
fast backend is measured against (``bench/dynamic_a2a.py``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def exchange_counts(send_counts: torch.Tensor, group: Any, world: int) -> torch.Tensor:
    """How many rows each rank sends this one (``recv[s]`` from rank s), given how many this one sends each
    rank (``send_counts[r]``); int64 on ``send_counts``' device. gloo moves CPU tensors only."""
    counts = send_counts.to(torch.int64)
    if world == 1:
        return counts.clone()
    recv = torch.empty_like(counts)
    dist.all_to_all_single(recv, counts.contiguous(), group=group)
    return recv


def _check_counts(counts: list[int], rows: int, world: int, what: str) -> None:
    if len(counts) != world or any(c < 0 for c in counts) or sum(counts) != rows:
        raise ValueError(f"{what} {counts} must be {world} non-negative numbers summing to {rows}")


def _a2a_rows(
    out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any
) -> None:
    """``all_to_all_single`` over dim 0; gloo takes CPU tensors only, so device tensors go through the host
    there (the reference is about results, not speed, on gloo)."""
    if inp.device.type != "cpu" and dist.get_backend(group) == "gloo":
        host_out = out.cpu()
        dist.all_to_all_single(host_out, inp.cpu(), out_splits, in_splits, group=group)
        out.copy_(host_out)
        return
    dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)


def heads_to_owner(x: torch.Tensor, send_counts: torch.Tensor | list[int], group: Any, world: int) -> torch.Tensor:
    """``x`` ``[N, Hl, D]`` (this rank's heads of every token, rows grouped by owner) -> ``[M, W*Hl, D]``,
    every head of the M tokens this rank owns; ``out[m, s*Hl + h] = x_on_rank_s[start_me + m, h]``.

    ``send_counts`` as a tensor: the sizes are exchanged first (the general two-step form). As a host list:
    the caller states that every rank passes this same list (MLA-core: every rank knows each request's
    owner), so this rank receives ``send_counts[rank]`` rows from each and nothing is exchanged."""
    n, heads, dim = x.shape
    if world == 1:
        return x
    if isinstance(send_counts, list):
        sends = [int(c) for c in send_counts]
        recv = [sends[dist.get_rank(group)]] * world
    else:
        recv = exchange_counts(send_counts, group, world).tolist()
        sends = [int(c) for c in send_counts.tolist()]
    _check_counts(sends, n, world, "send_counts")
    if len(set(recv)) != 1:
        raise ValueError(f"every rank must send an owner the same rows, got {recv}")
    mine = recv[0]
    flat = torch.empty(world * mine, heads * dim, dtype=x.dtype, device=x.device)
    _a2a_rows(flat, x.reshape(n, heads * dim).contiguous(), recv, sends, group)
    return flat.view(world, mine, heads, dim).transpose(0, 1).reshape(mine, world * heads, dim)


def heads_from_owner(y: torch.Tensor, owner_counts: torch.Tensor | list[int], group: Any, world: int) -> torch.Tensor:
    """``y`` ``[M, W*Hl, D]`` (every head of this rank's own tokens) -> ``[N, Hl, D]``, this rank's heads of
    every token in owner order. ``owner_counts[r]``: tokens owned by rank r (the ``send_counts`` of the
    matching ``heads_to_owner``; the same on every rank, so no size exchange is needed)."""
    if world == 1:
        return y
    mine, all_heads, dim = y.shape
    heads = all_heads // world
    counts = [int(c) for c in (owner_counts if isinstance(owner_counts, list) else owner_counts.tolist())]
    _check_counts(counts, sum(counts), world, "owner_counts")
    send = y.view(mine, world, heads, dim).transpose(0, 1).reshape(world * mine, heads * dim)
    out = torch.empty(sum(counts), heads * dim, dtype=y.dtype, device=y.device)
    _a2a_rows(out, send, counts, [mine] * world, group)
    return out.view(-1, heads, dim)
