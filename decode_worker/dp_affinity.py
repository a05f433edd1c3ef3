"""Which attention-DP group of a decode instance a prompt's pages went to: decode-side reuse across DP groups.

With `--dp` > 1 each attention-DP group has its own KV pool and prefix cache, so a conversation's next turn
finds its pages only on the group that served the last turn. Rank 0 places every request (`choose_dp_rank`)
and sees no group's cache, so it remembers where it sent each prompt: the chained keys of the prompt's full
pages (the same pages `KVPool.alloc_for_prompt` looks up), each mapped to the group it went to. A new prompt
goes to the group of its deepest known page unless that group has `balance_abs` or more requests than the
least loaded one (then, and for prompts with no known page, the caller's default: the least loaded group).

The table is a hint, never a correctness matter: a group that evicted the pages simply has them written
again. Keys are Python hashes of (parent key, the page's token ids): deterministic for ints, and a rare
collision only misplaces a request. The table keeps at most `max_keys` keys, forgetting the least recently
used first.
"""

from __future__ import annotations

from collections import OrderedDict


class DPGroupAffinity:
    """Prefix -> attention-DP group hints for one decode instance's rank 0.

    Args:
        page_size: tokens per KV page (a key per full page).
        balance_abs: follow a hint only while its group has fewer than this many more requests than the least
            loaded group.
        max_keys: page keys remembered at most.
    """

    def __init__(self, page_size: int, balance_abs: int = 16, max_keys: int = 1 << 20) -> None:
        if page_size < 1 or balance_abs < 1 or max_keys < 1:
            raise ValueError("page_size, balance_abs and max_keys must be >= 1")
        self.page_size = page_size
        self.balance_abs = balance_abs
        self.max_keys = max_keys
        self._group: OrderedDict[int, int] = OrderedDict()  # page key -> DP group, least recently used first
        self.followed = 0  # requests placed by a hint (for tests and metrics)

    def _keys(self, tokens: list[int]) -> list[int]:
        """Chained keys of the full pages of `tokens` but its last token (which is always computed anew)."""
        keys, key, ps = [], 0, self.page_size
        for start in range(0, len(tokens) - ps, ps):
            key = hash((key, tuple(tokens[start : start + ps])))
            keys.append(key)
        return keys

    def choose(self, tokens: list[int], loads: list[int], default: int) -> int:
        """The DP group for a prompt of `tokens`, given each group's request count; records the choice."""
        keys = self._keys(tokens)
        hinted = None
        for key in keys:
            group = self._group.get(key)
            if group is None:
                break
            hinted = group
        chosen = default
        if hinted is not None and hinted < len(loads) and loads[hinted] - min(loads) < self.balance_abs:
            chosen = hinted
            self.followed += 1
        for key in keys:
            self._group.pop(key, None)
            self._group[key] = chosen
        while len(self._group) > self.max_keys:
            self._group.popitem(last=False)
        return chosen
