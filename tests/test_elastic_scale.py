"""Elastic EP end to end: router + prefill (tp 1) + a decode instance at tp 2 dp 2 with EPLB (4 redundant
slots, a rebalance every 16 steps) that scales live through ``POST /scale_elastic_ep``.

- A join that fails leaves the instance serving at its old size: new ranks dying while the others wait for
  them at the rendezvous (``TANDEM_ELASTIC_FAULT``; the old ranks roll back to their old world, 503
  ``scale_rolled_back``), and a new rank SIGKILLed while it loads (nothing touched, 503 ``scale_join_failed``).
  Requests right after get the tokens of a static run. The tests run in file order: the faults are the first
  two scales of the instance.
- 32 streaming requests through the router while the instance scales 2 -> 4 -> 2: every one completes with
  the tokens of a static run (colocated greedy generation), none fails, both workers' pools go back to idle,
  and ``/server_info`` follows the layout. The wall time of each scale and the longest token gap a client saw
  during it are printed (``bench.elastic_ep`` records them in bench/results/).

- The prefill instance of the same system (one rank) answers a scale with a 501 saying why (a prefill instance
  of several ranks scales live: tests/test_elastic_prefill.py).

``TANDEM_ELASTIC_FULL=1`` also runs them on a decode instance at tp 2 dp 1 (DP groups of two ranks: 2 -> 4 -> 2
ranks) and on one without EPLB.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from elastic_system import reference_llm, scale_killing_a_new_rank, static_tokens  # noqa: F401 (a fixture)
from pd_system import PDSystem, get_json, skip_unless_backend, wait_idle

from bench.elastic_ep import (
    DECODE_FLAGS,
    lengths,
    post_scale,
    prompts,
    run_workload,
    stream_generate,
    summarize,
)
from engine.llm import LLM
from engine.runtime.elastic import FAULT_ENV
from engine.tiny_model import write_tiny_model

pytestmark = pytest.mark.slow  # real processes: router, prefill, decode with ranks joining and leaving

JOIN_TIMEOUT_S = 4  # the pause a rolled-back join costs the streams
MAX_NEW_TOKENS = 48


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("elastic-model") / "tiny-v3")


@dataclass(frozen=True)
class Layout:
    """A decode instance's start and the DP sizes it scales through (each DP group keeps its attn_tp ranks)."""

    flags: tuple[str, ...]
    dp: int
    up: int  # the size it grows to and comes back from

    def tp(self, dp: int) -> int:
        attn_tp = int(self.flags[self.flags.index("--tp") + 1]) // self.dp
        return dp * attn_tp


# CI: the tp 2 dp 2 -> 4 ranks -> back (attn_tp 1). TANDEM_ELASTIC_FULL=1 adds attn_tp 2 (tp 2 dp 1 ->
# tp 4 dp 2 -> back): the attention and agreement groups of a DP group of two ranks re-formed too; and the
# instance without EPLB (the static expert layout re-split over the new ranks).
LAYOUTS = {"tp2dp2": Layout(tuple(DECODE_FLAGS), 2, 4)}
if os.environ.get("TANDEM_ELASTIC_FULL") == "1":
    LAYOUTS["tp2dp1"] = Layout(("--tp", "2", "--dp", "1", *DECODE_FLAGS[4:]), 1, 2)
    LAYOUTS["tp2dp2-no-eplb"] = Layout(("--tp", "2", "--dp", "2"), 2, 4)


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request: pytest.FixtureRequest) -> Layout:
    return LAYOUTS[request.param]


@pytest.fixture(scope="module")
def system(tiny_model: Path, layout: Layout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PDSystem]:
    skip_unless_backend("nixl")
    # Scale 1: the new ranks die at the rendezvous (the test hook); scale 2: the test kills one while it loads.
    pd = PDSystem(tiny_model, tmp_path_factory.mktemp("elastic"), "nixl",
                  decode_flags=[*layout.flags, "--elastic-ep-join-timeout", str(JOIN_TIMEOUT_S)],
                  env={FAULT_ENV: "rendezvous:1"})
    yield pd
    pd.close()


def _layout(system: PDSystem) -> tuple[int, int]:
    info = get_json(system.decode.url + "/server_info")
    return info["tp_size"], info["dp_size"]


def test_a_failed_join_leaves_the_instance_serving_at_its_old_size(system: PDSystem, layout: Layout,
                                                                   reference: LLM) -> None:
    cases = prompts(4, reference.config.vocab_size, seed=7)
    expected = static_tokens(reference, cases, [MAX_NEW_TOKENS] * len(cases))
    old = (layout.tp(layout.dp), layout.dp)
    rolled_back = post_scale(system.decode.url, layout.up)
    assert rolled_back.status == 503, rolled_back.body
    assert rolled_back.body["error"]["code"] == "scale_rolled_back"
    assert f"did not join within {JOIN_TIMEOUT_S} s" in rolled_back.body["error"]["message"]
    assert f"rolled back to data_parallel_size {layout.dp}" in rolled_back.body["error"]["message"]
    assert _layout(system) == old
    assert [stream_generate(system.router.url, c, MAX_NEW_TOKENS).ids for c in cases[:2]] == expected[:2]
    killed = scale_killing_a_new_rank(system.decode, layout.up)
    assert killed.status == 503, killed.body
    assert killed.body["error"]["code"] == "scale_join_failed"
    assert "exited with code -9 while loading" in killed.body["error"]["message"]
    assert _layout(system) == old
    assert [stream_generate(system.router.url, c, MAX_NEW_TOKENS).ids for c in cases[2:]] == expected[2:]
    wait_idle(system.decode.url)


def test_a_prefill_instance_of_one_rank_refuses_to_scale_live_and_says_why(system: PDSystem) -> None:
    refused = post_scale(system.prefill.url, 2)
    assert refused.status == 501, refused.body
    assert "at least 2 ranks can be scaled live" in refused.body["error"]["message"]
    assert "keeps serving at data_parallel_size 1" in refused.body["error"]["message"]


def test_32_streams_complete_with_static_tokens_while_the_instance_scales_2_4_2(
        system: PDSystem, layout: Layout, reference: LLM) -> None:
    cases = prompts(32, reference.config.vocab_size, seed=11)
    max_new = lengths(len(cases), MAX_NEW_TOKENS)
    expected = static_tokens(reference, cases, max_new)
    layouts = []
    # Half the streams before the scale-up, a quarter on 4 DP groups (0.4 s before the scale-down: the new
    # groups, least loaded, take the first of them), a quarter during the scale-down (long ones, on the groups
    # that stay: still running when it switches).
    traces, steps = run_workload(system.router.url, system.decode.url, cases, max_new, [layout.up, layout.dp],
                                 stagger_s=0.1, first_scale_after_s=0.5, between_scales_s=0.4,
                                 on_scale=lambda step: layouts.append(_layout(system)))
    summary = summarize(traces, steps)
    print(json.dumps(summary, indent=1))
    assert [s.status for s in steps] == [200, 200], [s.body for s in steps]
    assert layouts == [(layout.tp(layout.up), layout.up), (layout.tp(layout.dp), layout.dp)]
    assert [s.body["data_parallel_size"] for s in steps] == [layout.up, layout.dp]
    assert all(s.body["experts_moved"] > 0 for s in steps)  # new ranks got experts; leaving ranks gave theirs
    # The new DP groups took requests, and the scale-down waited for them to finish (none failed, below).
    assert steps[1].body["drained_requests"] > 0 and steps[1].body["drain_s"] > 0
    # ... and took none while they drained (the router, which still saw them least loaded, named them): the
    # most they held is the quarter of the streams that started on 4 groups.
    assert steps[1].body["drained_requests"] <= len(cases) // 4, steps[1].body
    # Requests were streaming through both switches: the retained ranks kept them and their KV.
    assert all(row["streams_across_switch"] > 0 for row in summary["scales"]), summary["scales"]
    assert [t.error for t in traces] == [None] * len(cases)
    assert [t.ids for t in traces] == expected
    for worker in (system.decode, system.prefill):
        info = wait_idle(worker.url)
        assert info["num_errors"] == 0, worker.name
    if "--enable-eplb" in layout.flags:
        metrics = get_json(system.decode.url + "/server_info")
        assert metrics["eplb_rebalances"] > 0  # EPLB kept rebalancing (in lockstep) across the scales
