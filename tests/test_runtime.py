"""Rank launch, the rank loop's request routing over DP groups, and teardown when a rank dies —
real processes, real gloo groups, real zmq; the step runner is scripted (tests/runtime_echo.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from runtime_echo import echo_entry

from engine.runtime.bridge import RankBridge
from engine.runtime.launch import InstanceSpec, LayoutError, ipc_addr, launch
from engine.runtime.rank_loop import named_or_least_loaded
from engine.server.messages import GenerateRequest, SamplingSpec, TokenOutput


async def _collect(bridge: RankBridge, rid: str, n: int) -> list[TokenOutput]:
    req = GenerateRequest(rid=rid, input_ids=[1], sampling=SamplingSpec(max_new_tokens=n))
    return [out async for out in bridge.submit(req)]


def test_invalid_layout_is_refused_naming_the_numbers() -> None:
    with pytest.raises(LayoutError, match=r"tp \(6\) is not divisible by dp \(4\)"):
        InstanceSpec(tp_size=6, dp_size=4)


def test_a_request_naming_a_group_that_is_not_open_runs_on_the_least_loaded_open_one() -> None:
    """Rank 0 passes only the open groups' loads (a scale-down's leaving groups are not open while they drain)."""
    def named(dp_rank: int | None) -> GenerateRequest:
        return GenerateRequest(rid="r", input_ids=[1], sampling=SamplingSpec(), data_parallel_rank=dp_rank)

    open_loads = [3, 1]  # groups 2 and 3 leave
    assert named_or_least_loaded(named(0), open_loads) == 0  # an open group named: kept, loaded or not
    assert named_or_least_loaded(named(None), open_loads) == 1
    assert named_or_least_loaded(named(3), open_loads) == 1  # leaving (or gone since it was parsed)
    assert named_or_least_loaded(named(2), [0, 5, 0, 0]) == 2  # no scale pending: every group is open


def test_requests_spread_over_dp_groups_and_all_finish() -> None:
    async def main() -> None:
        inbox, outbox = ipc_addr("in"), ipc_addr("out")
        bridge = RankBridge(inbox, outbox, num_dp_groups=2)
        bridge.start()
        procs = launch(InstanceSpec(tp_size=2, dp_size=2), echo_entry, inbox, outbox,
                       on_death=lambda reason: None)
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*[_collect(bridge, f"r{i}", 3 + i) for i in range(6)]), 60)
            # Pool counts come in periodic rank reports: judge them by reports sent after the work ended.
            done_at, deadline = time.time(), time.monotonic() + 10
            while bridge.info()["status_time"] <= done_at and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            info = bridge.info()
        finally:
            procs.stop()
            bridge.close()
        groups = set()
        for i, outs in enumerate(results):
            assert [len(o.token_ids) for o in outs] == [1] * (3 + i)
            assert outs[-1].finished and outs[-1].finish_reason == "length"
            groups.add(outs[0].token_ids[0] // 1000)
        assert groups == {0, 1}
        assert bridge.num_active == 0
        assert bridge.ready and info["status_time"] > done_at and info["echo_active"] == 0

    asyncio.run(main())


def test_a_dead_rank_stops_the_instance_and_fails_open_requests() -> None:
    async def main() -> None:
        inbox, outbox = ipc_addr("in"), ipc_addr("out")
        bridge = RankBridge(inbox, outbox)
        loop = asyncio.get_running_loop()
        died = asyncio.Event()

        def on_death(reason: str) -> None:
            loop.call_soon_threadsafe(bridge.fail_all, reason)
            loop.call_soon_threadsafe(died.set)

        procs = launch(InstanceSpec(tp_size=2, dp_size=1), echo_entry, inbox, outbox, on_death=on_death)
        try:
            outs = await asyncio.wait_for(_collect(bridge, "warm", 2), 60)  # the instance is up
            assert outs[-1].finished
            task = asyncio.create_task(_collect(bridge, "victim", 10**9))
            await asyncio.sleep(0.3)
            os.kill(procs._procs[1].pid, signal.SIGKILL)
            start = time.monotonic()
            await asyncio.wait_for(died.wait(), 30)
            outs = await asyncio.wait_for(task, 5)
            assert time.monotonic() - start < 30
            assert outs[-1].error is not None and "rank1" in outs[-1].error
            assert not procs.alive
        finally:
            procs.stop()
            bridge.close()

    asyncio.run(main())
