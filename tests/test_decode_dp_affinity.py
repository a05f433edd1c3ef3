"""Rank 0 of a decode instance with several attention-DP groups sends a conversation's turns to the group that
holds its pages (decode-side reuse), unless that group is busier than the balance allows."""

from __future__ import annotations

import pytest

from decode_worker.dp_affinity import DPGroupAffinity

PS = 4


def test_a_conversation_s_turns_follow_the_group_of_its_first_turn_while_loads_stay_within_the_balance() -> None:
    affinity = DPGroupAffinity(PS, balance_abs=3)
    turn = list(range(10, 21))  # 11 tokens: 2 full pages before the last token
    assert affinity.choose(turn, [0, 0, 0], default=2) == 2  # nothing known: the caller's (least loaded) group
    for i in range(4):
        turn = turn + [100 + i] * 5  # the next turn starts with the last one
        assert affinity.choose(turn, [2, 0, 2], default=1) == 2  # 2 more than the least loaded: followed
    assert affinity.followed == 4
    assert affinity.choose(turn + [7], [0, 3, 3], default=0) == 0  # its group is 3 busier: the default wins
    assert affinity.choose(turn + [8], [0, 3, 0], default=1) == 0  # and the new group is remembered
    assert affinity.choose([1, 2, 3, 4, 5, 6, 7, 8, 9], [0, 0, 0], default=1) == 1  # an unrelated prompt


def test_prompts_without_a_full_page_before_their_last_token_get_the_default_and_leave_no_hint() -> None:
    affinity = DPGroupAffinity(PS)
    assert affinity.choose([5, 6, 7, 8], [0, 0], default=1) == 1  # 3 tokens before the last: no full page
    assert affinity.choose([5, 6, 7, 8, 9], [0, 0], default=0) == 0  # one full page: recorded for group 0
    assert affinity.choose([5, 6, 7, 8, 9, 10], [0, 0], default=1) == 0
    assert affinity.followed == 1


def test_the_table_forgets_the_least_recently_used_pages_beyond_its_size() -> None:
    affinity = DPGroupAffinity(PS, max_keys=2)
    first, second = list(range(20, 29)), list(range(40, 49))  # 2 keys each
    affinity.choose(first, [0, 0], default=1)
    affinity.choose(second, [0, 0], default=0)  # evicts `first`'s keys
    assert affinity.choose(first, [0, 0], default=0) == 0  # forgotten: the default
    assert affinity.choose(second + [1, 2], [0, 0], default=1) == 1  # `second` was pushed out by it in turn
    with pytest.raises(ValueError):
        DPGroupAffinity(PS, balance_abs=0)
