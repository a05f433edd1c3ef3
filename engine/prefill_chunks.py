"""Chunked prefill planning shared by the colocated scheduler (`engine.scheduler`) and the prefill role's
batcher (`prefill_worker.batcher`): which prompt tokens go into the next EXTEND forward, and that batch.

Both walk their prefilling requests oldest first and give each its remaining prompt tokens until the
per-forward token budget runs out, so a long prompt is cut into chunks and finished over several steps.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, TypeVar

import torch

from engine.forward_batch import ForwardBatch, ForwardMode
from engine.kv_pool import KVPool


class PrefillItem(Protocol):
    """A request being prefilled: the tokens it computes KV for (its prompt; after a retraction, its output
    too), how many of them have KV already, and its pages."""

    @property
    def fill_ids(self) -> list[int]: ...

    num_computed: int
    pages: list[int]


Item = TypeVar("Item", bound=PrefillItem)


def plan_prefill_chunks(items: Iterable[Item], budget: int) -> list[tuple[Item, int]]:
    """(item, tokens to compute now) for the items, in order, while `budget` tokens last; the last item
    taken may get only part of its remaining prompt (it continues next step)."""
    chunks: list[tuple[Item, int]] = []
    for item in items:
        if budget == 0:
            break
        take = min(len(item.fill_ids) - item.num_computed, budget)
        chunks.append((item, take))
        budget -= take
    return chunks


def build_extend_batch(
    chunks: list[tuple[Item, int]], kv_pool: KVPool, vocab_size: int | None = None, return_all_logits: bool = False
) -> ForwardBatch:
    """The EXTEND batch computing each chunk's tokens after the item's `num_computed` ones, into its
    pages (`ForwardBatch.build` checks token ids against `vocab_size` when given). `return_all_logits`:
    logits of every token too (prompt log-probabilities)."""
    return ForwardBatch.build(
        ForwardMode.EXTEND,
        [item.fill_ids[item.num_computed : item.num_computed + n] for item, n in chunks],
        [item.num_computed for item, _ in chunks],
        [item.pages for item, _ in chunks],
        kv_pool,
        vocab_size=vocab_size,
        return_all_logits=return_all_logits,
    )


def prompt_logprobs(prompt: list[int], start: int, logits: torch.Tensor, top: int
                    ) -> tuple[list[float | None], list[list[tuple[int, float]]]]:
    """Log-probabilities of prompt tokens from one chunk's logits `[n, V]` (the chunk holds prompt tokens
    `start..start+n-1`; row j predicts token start+j+1): for each prompt token the chunk predicts, its
    logprob (float32 log_softmax of the raw logits, as output logprobs) and the `top` most likely tokens.
    Token 0 has nothing before it: None, as vLLM and SGLang answer."""
    values: list[float | None] = [None] if start == 0 else []
    tops: list[list[tuple[int, float]]] = [[]] if start == 0 else []
    targets = prompt[start + 1 : start + logits.shape[0] + 1]
    if not targets:
        return values, tops
    logprobs = torch.log_softmax(logits[: len(targets)].float(), dim=-1)
    index = torch.tensor(targets, dtype=torch.long, device=logits.device)[:, None]
    values += logprobs.gather(1, index).squeeze(1).tolist()
    if top:
        best, ids = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
        tops += [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), best.tolist(), strict=True)]
    else:
        tops += [[] for _ in targets]
    return values, tops
