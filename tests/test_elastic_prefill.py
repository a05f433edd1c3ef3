"""Elastic EP on a prefill instance, end to end: router + a prefill instance at tp 2 dp 2 with EPLB (4 redundant
slots) that scales live through ``POST /scale_elastic_ep`` + a decode instance (tp 1), KV over NIXL.

The prefill's rank 0 publishes where it routes each room (its DP group and the layout in force that turn) at
the bootstrap service, and the decode worker maps every room with that placement: rooms begun before a switch
keep their old sources, rooms begun after use the new layout (kvtransfer.placements).

- A join that fails leaves the prefill serving at its old size (new ranks dying at the rendezvous: rolled back;
  a new rank SIGKILLed while loading: nothing touched); the bootstrap service lists the old ranks only and
  refuses a request naming a DP group the instance lacks; requests right after get static tokens.
- 32 streaming requests through the router while the prefill scales 2 -> 4 -> 2: every one completes with the
  tokens of a static run (colocated greedy generation), none fails; the new DP groups serve rooms named for
  them; both workers' pools (pages, aux slots, senders, receivers, transfer handles) go back to idle; the
  bootstrap service and ``/server_info`` follow the layout, and the leaving ranks deregistered.
The tests run in file order: the faults are the first two scales of the instance.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from elastic_system import reference_llm, scale_killing_a_new_rank, static_tokens  # noqa: F401 (a fixture)
from pd_system import PDSystem, get_json, http, skip_unless_backend, wait_idle

from bench.elastic_ep import PREFILL_FLAGS, ScaleStep, lengths, post_scale, prompts, run_workload, summarize
from engine.llm import LLM
from engine.runtime.elastic import FAULT_ENV
from engine.tiny_model import write_tiny_model

pytestmark = pytest.mark.slow  # real processes: router, prefill with ranks joining and leaving, decode

JOIN_TIMEOUT_S = 4  # the pause a rolled-back join costs the streams
MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("elastic-prefill-model") / "tiny-v3")


@pytest.fixture(scope="module")
def system(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PDSystem]:
    skip_unless_backend("nixl")
    flags = [*PREFILL_FLAGS[:PREFILL_FLAGS.index("--elastic-ep-join-timeout")],
             "--elastic-ep-join-timeout", str(JOIN_TIMEOUT_S)]
    # Scale 1: the new ranks die at the rendezvous (the test hook); scale 2: the test kills one while it loads.
    pd = PDSystem(tiny_model, tmp_path_factory.mktemp("elastic-prefill"), "nixl", prefill_flags=flags,
                  env={FAULT_ENV: "rendezvous:1"})
    yield pd
    pd.close()


def _generate(system: PDSystem, prompt: list[int], prefill_dp_rank: int | None = None) -> tuple[int, dict]:
    body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0,
                                                      "ignore_eos": True}}
    if prefill_dp_rank is not None:  # the prefill's DP group, passed through by the router
        body["disagg_prefill_dp_rank"] = prefill_dp_rank
    status, raw = http("POST", system.router.url + "/generate", body)
    return status, json.loads(raw)


def _generate_once_routable(system: PDSystem, prompt: list[int], prefill_dp_rank: int) -> tuple[int, dict]:
    """`_generate` naming a new DP group, once the router's view of the prefill (polled every 0.1 s) has it."""
    deadline = time.monotonic() + 5
    while True:
        status, body = _generate(system, prompt, prefill_dp_rank)
        if status != 400 or "attention-DP groups" not in str(body) or time.monotonic() > deadline:
            return status, body
        time.sleep(0.05)


def _layouts(system: PDSystem) -> tuple[tuple[int, int], tuple[int, int, list[int]]]:
    """The prefill's (tp, dp) in /server_info, and its bootstrap service's (tp, dp, registered ranks)."""
    info = get_json(system.prefill.url + "/server_info")
    instance = get_json(f"http://127.0.0.1:{system.bootstrap_port}/v1/instance")
    return (info["tp_size"], info["dp_size"]), (instance["tp_size"], instance["dp_size"],
                                                 [r["rank"] for r in instance["ranks"]])


def test_a_failed_join_leaves_the_prefill_serving_at_its_old_size(system: PDSystem, reference: LLM) -> None:
    cases = prompts(4, reference.config.vocab_size, seed=7)
    expected = static_tokens(reference, cases, [MAX_NEW_TOKENS] * len(cases))
    old = ((2, 2), (2, 2, [0, 1]))
    rolled_back = post_scale(system.prefill.url, 4)
    assert rolled_back.status == 503, rolled_back.body
    assert rolled_back.body["error"]["code"] == "scale_rolled_back"
    assert "rolled back to data_parallel_size 2" in rolled_back.body["error"]["message"]
    assert _layouts(system) == old  # the new ranks' registrations went with them
    assert [_generate(system, c)[1]["output_ids"] for c in cases[:2]] == expected[:2]
    killed = scale_killing_a_new_rank(system.prefill, 4)
    assert killed.status == 503, killed.body
    assert killed.body["error"]["code"] == "scale_join_failed"
    assert _layouts(system) == old
    status, refused = _generate(system, cases[2], prefill_dp_rank=2)  # the router knows the old layout
    assert status == 400 and "has 2 attention-DP groups" in refused["error"]["message"], refused
    assert [_generate(system, c)[1]["output_ids"] for c in cases[2:]] == expected[2:]
    for worker in (system.decode, system.prefill):
        wait_idle(worker.url)


def test_32_streams_complete_with_static_tokens_while_the_prefill_scales_2_4_2(system: PDSystem,
                                                                              reference: LLM) -> None:
    cases = prompts(32, reference.config.vocab_size, seed=11)
    max_new = lengths(len(cases), MAX_NEW_TOKENS)
    probes = prompts(2, reference.config.vocab_size, seed=13)
    expected, expected_probes = (static_tokens(reference, cases, max_new),
                                 static_tokens(reference, probes, [MAX_NEW_TOKENS] * 2))
    layouts, probed = [], []

    def on_scale(step: ScaleStep) -> None:
        layouts.append(_layouts(system))
        if step.new_dp == 4:  # the new DP groups compute rooms and their KV reaches the decode instance
            probed.extend(_generate_once_routable(system, p, g) for p, g in zip(probes, (2, 3), strict=True))

    # Half the streams before the scale-up, a quarter on 4 DP groups, a quarter during the scale-down.
    traces, steps = run_workload(system.router.url, system.prefill.url, cases, max_new, [4, 2], stagger_s=0.05,
                                 first_scale_after_s=0.3, between_scales_s=0.3, on_scale=on_scale)
    summary = summarize(traces, steps)
    print(json.dumps(summary, indent=1))
    assert [s.status for s in steps] == [200, 200], [s.body for s in steps]
    # Each new layout was in force at the bootstrap service before its scale was answered.
    assert layouts[0] == ((4, 4), (4, 4, [0, 1, 2, 3]))
    assert layouts[1][0] == (2, 2) and layouts[1][1][:2] == (2, 2)
    assert all(s.body["experts_moved"] > 0 for s in steps)  # new ranks got experts; leaving ranks gave theirs
    assert [status for status, _ in probed] == [200, 200], probed
    assert [body["output_ids"] for _, body in probed] == expected_probes
    assert [t.error for t in traces] == [None] * len(cases)
    assert [t.ids for t in traces] == expected
    for worker in (system.decode, system.prefill):
        info = wait_idle(worker.url)
        assert info["num_errors"] == 0, worker.name
    assert _layouts(system) == ((2, 2), (2, 2, [0, 1]))  # the leaving ranks deregistered as they exited
