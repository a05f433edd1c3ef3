"""Router + 1P1D with DP attention on both sides (P tp2 dp2 -> D tp2 dp2), the router picking both
instances' DP groups by load (`--dp-routing router`, the default) and both workers running dual batch
overlap at every batch of two or more: greedy tokens equal colocated generation, disaggregated and
colocated (served on decode alone), also with DP groups the client pins itself (crossed pairs); a group
out of range is a 400 naming the field; per-group load shows on /get_load and /metrics; every pool, and
the router's own per-group counts, go back to idle. TANDEM_PD_FULL_MATRIX=1 adds P tp4 dp2 -> D tp4 dp2.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pd_system import (
    PAGE_SIZE,
    Case,
    PDSystem,
    check_concurrent_mixed_requests,
    get_json,
    http,
    mixed_cases,
    run_case,
    skip_unless_backend,
    wait_idle,
)

from engine.llm import LLM
from engine.tiny_model import write_tiny_model

pytestmark = pytest.mark.slow  # real processes: router + workers with their ranks

DBO = ("--enable-dbo", "--dbo-decode-token-threshold", "2", "--dbo-prefill-token-threshold", "2")
LAYOUTS = {"tp2dp2": ("--tp", "2", "--dp", "2")}
if os.environ.get("TANDEM_PD_FULL_MATRIX") == "1":
    LAYOUTS["tp4dp2"] = ("--tp", "4", "--dp", "2")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("pd-dp-model") / "tiny-v3")


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> Iterator[LLM]:
    llm = LLM(tiny_model, page_size=PAGE_SIZE)
    yield llm
    llm.close()


@pytest.fixture(scope="module", params=list(LAYOUTS))
def system(request: pytest.FixtureRequest, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PDSystem]:
    skip_unless_backend("nixl")
    layout = (*LAYOUTS[request.param], *DBO)
    pd = PDSystem(tiny_model, tmp_path_factory.mktemp(request.param), "nixl", prefill_flags=layout, decode_flags=layout)
    yield pd
    pd.close()


def _pinned(case: Case, decode_group: int, prefill_group: int) -> dict:
    return {"input_ids": case.prompt, "sampling_params": {"max_new_tokens": case.max_new_tokens, "temperature": 0},
            "data_parallel_rank": decode_group, "disagg_prefill_dp_rank": prefill_group}


def test_router_dp_routing_and_dbo_keep_greedy_tokens_disaggregated_colocated_and_pinned(
    system: PDSystem, reference: LLM
) -> None:
    # Disaggregated, both DP groups picked by the router on both instances, sent all at once.
    check_concurrent_mixed_requests(system, reference, n=12, seed=5)
    # Pinned by the client, crossed: prefill group p's KV goes to decode group 1 - p.
    cases = mixed_cases(4, seed=6, vocab=reference.config.vocab_size)
    with cf.ThreadPoolExecutor(len(cases)) as pool:
        replies = list(pool.map(lambda ic: http("POST", system.router.url + "/generate",
                                                _pinned(ic[1], ic[0] % 2, 1 - ic[0] % 2)), enumerate(cases)))
    plain = [Case(c.prompt, c.max_new_tokens, "/generate", False) for c in cases]
    results = [{"status": s, "ids": json.loads(raw)["output_ids"], "logprobs": [], "tops": []} if s == 200
               else {"status": s, "error": raw.decode()} for s, raw in replies]
    expected = [o.token_ids for o in reference.generate([c.prompt for c in plain], [c.params() for c in plain])]
    assert [r.get("ids") for r in results] == expected, results
    # Colocated on decode: prompt log-probabilities keep a request on decode alone (its DP group the router's).
    colocated = mixed_cases(3, seed=7, vocab=reference.config.vocab_size)
    outs = [http("POST", system.router.url + "/generate",
                 {"input_ids": c.prompt, "sampling_params": {"max_new_tokens": c.max_new_tokens, "temperature": 0},
                  "return_logprob": True, "logprob_start_len": 0}) for c in colocated]
    got = [json.loads(raw)["output_ids"] for status, raw in outs if status == 200]
    assert got == [o.token_ids for o in reference.generate([c.prompt for c in colocated],
                                                            [c.params() for c in colocated])], outs
    for worker in (system.prefill, system.decode):
        assert wait_idle(worker.url)["num_errors"] == 0
    router_view = get_json(system.router.url + "/workers")["workers"]
    for worker in router_view:
        assert worker["dp_size"] == 2
        assert all(g["router_tokens"] == 0 and g["router_requests"] == 0 for g in worker["dp_groups"]), worker


def test_dp_groups_out_of_range_are_a_400_naming_the_field_and_load_shows_per_group(system: PDSystem) -> None:
    case = {"input_ids": [5, 6, 7, 8], "sampling_params": {"max_new_tokens": 2}}
    for url, field in ((system.router.url, "data_parallel_rank"), (system.decode.url, "data_parallel_rank"),
                       (system.router.url, "disagg_prefill_dp_rank")):
        status, raw = http("POST", url + "/generate", {**case, field: 2})
        error = json.loads(raw)["error"]
        assert status == 400 and error["param"] == field, (url, field, raw)
    load = get_json(system.decode.url + "/get_load")
    assert load["dp_size"] == 2 and [g["dp_rank"] for g in load["dp_groups"]] == [0, 1]
    assert all(g["free_pages"] > 0 and g["tokens_in_flight"] == 0 for g in load["dp_groups"])
    status, metrics = http("GET", system.prefill.url + "/metrics")
    assert status == 200 and b'tandem_worker_dp_tokens_in_flight{dp_rank="1"} 0' in metrics
    assert run_case(system.router.url, Case([9, 10, 11], 2, "/generate", False))["status"] == 200
    for worker in (system.prefill, system.decode):
        wait_idle(worker.url)
