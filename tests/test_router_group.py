"""`--workers N` control plane pieces: sibling sockets (`router.group`) and metric snapshots (`router.metrics`)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from router.config import GroupSpec
from router.group import ProcessGroup
from router.metrics import RouterStats, merge, snapshot
from router.workers import WorkerRegistry


def test_siblings_answer_each_other_and_a_bad_message_is_refused_not_fatal(tmp_path: Path) -> None:
    async def body() -> None:
        async def echo(message: dict[str, Any]) -> dict[str, Any]:
            if message.get("op") != "echo":
                raise ValueError(f"unknown control op {message.get('op')!r}")
            return {"echo": message["value"]}

        groups = [ProcessGroup(GroupSpec(i, 3, str(tmp_path)), echo) for i in range(3)]
        for g in groups[:2]:  # the third never starts: it must be skipped, not waited on forever
            await g.start()
        try:
            answers = await groups[0].ask_siblings({"op": "echo", "value": 7})
            assert answers == [{"echo": 7}]  # process 1 answered; process 2 is absent
            assert await groups[1].ask(0, {"op": "nope"}) == {"error": "ValueError: unknown control op 'nope'"}
            assert await groups[0].ask_siblings({"op": "nope"}) == []
        finally:
            for g in groups:
                await g.close()
        assert not list(tmp_path.iterdir())  # sockets removed

    asyncio.run(asyncio.wait_for(body(), 30))


def test_snapshots_of_two_processes_sum_counters_gauges_and_histograms() -> None:
    from router.config import Role, WorkerSpec

    snaps = []
    for n, healthy in ((3, True), (5, False)):
        stats, registry = RouterStats(), WorkerRegistry([WorkerSpec("http://d:1", Role.DECODE)])
        worker = registry.all_workers()[0]
        for _ in range(n):
            stats.count_request("generate", "pd")
            worker.stats.requests += 1
            worker.stats.ttft.observe(0.02)
        stats.count_error("upstream")
        stats.in_flight = n
        worker.healthy = healthy
        snaps.append(snapshot(stats, registry))
    total = merge(snaps)
    assert total["processes"] == 2 and total["in_flight"] == 8
    assert total["requests"] == [["generate", "pd", 8]] and total["errors"] == {"upstream": 2}
    w = total["workers"]["http://d:1"]
    assert w["requests"] == 8 and sum(w["ttft"][0]) == 8 and abs(w["ttft"][1] - 0.16) < 1e-9
    assert w["healthy"] == 1  # one process sends it traffic
    assert snaps[0]["workers"]["http://d:1"]["requests"] == 3  # merging copies, never mutates a snapshot
