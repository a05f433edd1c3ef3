"""Router + 1 prefill + 1 decode worker (tp1 each), real processes and real transports, with NIXL and with
Mooncake: greedy outputs equal colocated generation, every pool returns to idle, requests without bootstrap
fields run colocated on decode, and a prefill killed mid-request fails the requests it held while decode
keeps serving.

One system per transfer engine is shared by this module's tests (start-up is the slow part); the kill
test runs last in each group because it ends that system's prefill worker.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pd_api_checks import (
    API_FLAGS,
    StructuredCase,
    check_n_and_list_prompts,
    check_prompt_logprobs,
    check_responses_api,
    check_structured_output,
    check_tool_calls_and_reasoning,
    structured_cases,
    structured_expected,
)
from pd_system import (
    PAGE_SIZE,
    Case,
    PDSystem,
    check_against_reference,
    check_concurrent_mixed_requests,
    check_decode_reuse_across_turns,
    get_json,
    http,
    run_case,
    skip_unless_backend,
    wait_idle,
)

from engine.llm import LLM
from engine.sampling import SamplingParams
from engine.tiny_model import write_tiny_model

pytestmark = pytest.mark.slow  # real processes: router + workers with their ranks

BACKENDS = ["nixl", "mooncake"]
PEER_TIMEOUT_S = 5.0
# Decode holds 128 pages: the 32 requests (up to 20 pages each) queue there for pages, and their KV waits on
# the prefill side meanwhile. The Mooncake system also decodes through the CUDA-graph runner's padded path.
# Both decode with decode-side reuse: every test here runs with finished requests' pages kept on decode.
DECODE_FLAGS = {"nixl": ["--max-total-tokens", "2048", "--decode-prefix-cache"],
                "mooncake": ["--max-total-tokens", "2048", "--cuda-graph-max-bs", "8", "--decode-prefix-cache"]}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("pd-model") / "tiny-v3")


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> Iterator[LLM]:
    """Colocated generation in this process: what every disaggregated answer must equal."""
    llm = LLM(tiny_model, page_size=PAGE_SIZE)
    yield llm
    llm.close()


# Random schemas, regexes and choices per transfer engine: a few in CI (each costs ~100 sampled tokens on
# 2 cores); TANDEM_STRUCTURED_CASES=200 runs the sweep.
STRUCTURED_CASES = int(os.environ.get("TANDEM_STRUCTURED_CASES", "8"))


@pytest.fixture(scope="module")
def structured(reference: LLM) -> tuple[list[StructuredCase], list[str]]:
    """The constrained cases and their colocated answers (computed once for both transfer engines)."""
    cases = structured_cases(STRUCTURED_CASES, seed=21)
    return cases, structured_expected(reference, cases)


@pytest.fixture(scope="module", params=BACKENDS)
def system(request: pytest.FixtureRequest, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[PDSystem]:
    skip_unless_backend(request.param)
    pd = PDSystem(tiny_model, tmp_path_factory.mktemp(f"pd-{request.param}"), request.param,
                  prefill_flags=API_FLAGS, decode_flags=[*DECODE_FLAGS[request.param], *API_FLAGS],
                  peer_timeout_s=PEER_TIMEOUT_S)
    yield pd
    pd.close()


def test_32_concurrent_mixed_requests_through_the_router_equal_colocated_greedy_outputs(
    system: PDSystem, reference: LLM
) -> None:
    check_concurrent_mixed_requests(system, reference, n=32, seed=1)


def test_a_one_rank_decode_instance_dispatches_no_experts(system: PDSystem) -> None:
    # One rank holds every expert: the local MoE path, not low-latency EP padded to a fixed budget.
    assert get_json(system.decode.url + "/server_info")["ep_mode"] == "local"


def test_decode_serves_requests_without_bootstrap_fields_colocated(system: PDSystem, reference: LLM) -> None:
    cases = [Case([5, 6, 7, 8, 9], 6, "/generate", stream=False), Case([*range(3, 90)], 5, "/generate", True)]
    results = [run_case(system.decode.url, case) for case in cases]
    check_against_reference(reference, cases, results)
    wait_idle(system.decode.url)


def test_decode_reuses_cached_prefixes_for_the_requests_it_prefills_itself(system: PDSystem, reference: LLM) -> None:
    """Requests without bootstrap fields are prefilled on the decode worker: its prefix cache serves their
    shared prefixes (`cached_tokens` in the answer says how much), token-exact."""
    prompt = [*range(100, 187)]  # 87 tokens: 5 full 16-token pages of it are published by the first request
    body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    expected = reference.generate([prompt], SamplingParams(max_new_tokens=4))[0].token_ids
    answers = []
    for _ in range(2):
        status, raw = http("POST", system.decode.url + "/generate", body)
        assert status == 200, raw
        answers.append(json.loads(raw))
    assert [a["output_ids"] for a in answers] == [expected, expected]
    assert [a["meta_info"]["cached_tokens"] for a in answers] == [0, 5 * PAGE_SIZE]
    wait_idle(system.decode.url)


def test_a_stop_string_ends_a_disaggregated_request_early_and_frees_its_pages(
    system: PDSystem, reference: LLM
) -> None:
    """The decode worker cuts the text at the stop string and aborts the rest of the generation; pages,
    rooms and slots on both sides go back to idle."""
    prompt = [*range(40, 95)]
    full = reference.generate([prompt], SamplingParams(max_new_tokens=48, ignore_eos=True))[0].text
    stop = next(full[i : i + 2] for i in range(4, len(full) - 2) if "\ufffd" not in full[i : i + 2])
    body = {"prompt": prompt, "max_tokens": 48, "temperature": 0, "ignore_eos": True, "stop": stop}
    status, raw = http("POST", system.router.url + "/v1/completions", body)
    assert status == 200, raw
    choice = json.loads(raw)["choices"][0]
    assert choice["text"] == full[: full.index(stop)] and choice["finish_reason"] == "stop"
    for worker in (system.prefill, system.decode):
        wait_idle(worker.url)


@pytest.mark.parametrize("target", ["router", "decode"])
def test_extreme_sampling_values_are_served_or_refused_and_every_instance_keeps_serving(
    system: PDSystem, reference: LLM, target: str
) -> None:
    """Through the router the prefill side draws the first token; a decode worker alone draws them all.
    Values that pass validation give tokens (a vanishing temperature is greedy); non-finite ones are a 400."""
    url = (system.router if target == "router" else system.decode).url + "/v1/completions"
    prompt = [*range(20, 60)]
    greedy = reference.generate([prompt], SamplingParams(max_new_tokens=8, ignore_eos=True))[0].text
    base = {"prompt": prompt, "max_tokens": 8, "ignore_eos": True}
    status, raw = http("POST", url, {**base, "temperature": 1e-300})
    assert status == 200 and json.loads(raw)["choices"][0]["text"] == greedy, raw
    for extreme in ({"temperature": 1.0, "repetition_penalty": 1e-300}, {"temperature": 1e300, "seed": 3},
                    {"temperature": 1.0, "top_p": 1e-300, "seed": 4}):
        status, raw = http("POST", url, {**base, **extreme})
        assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 8, (extreme, raw)
    status, raw = http("POST", url, {**base, "temperature": float("nan")})  # json.dumps writes NaN
    assert status == 400 and json.loads(raw)["error"]["type"] == "invalid_request_error", raw
    status, raw = http("POST", url, {**base, "temperature": 0})
    assert status == 200 and json.loads(raw)["choices"][0]["text"] == greedy, raw
    for worker in (system.prefill, system.decode):
        wait_idle(worker.url)


def test_prefill_cache_hits_compute_only_the_suffix_and_decode_still_gets_the_whole_prompt(
    system: PDSystem, reference: LLM
) -> None:
    """A chat's turns (each prompt = the last one + a new message) and then 6 requests at once on the same
    system prompt: the prefill instance serves their prefixes from its cache (the counters say exactly how
    much), starts each prefill after the cached pages (40-token chunks: across the cached boundary), and
    the decode side, which gets the cached pages and the new ones, answers exactly as colocated generation."""
    rng = random.Random(20)
    system_prompt = [rng.randrange(2, reference.config.vocab_size) for _ in range(3 * PAGE_SIZE + 5)]
    turns = [system_prompt]
    for _ in range(3):
        turns.append(turns[-1] + [rng.randrange(2, reference.config.vocab_size) for _ in range(29)])
    url = system.prefill.url  # wait_idle: counts the ranks reported after the call began
    for i, prompt in enumerate(turns):
        before = wait_idle(url)
        case = Case(prompt, 4, "/generate" if i % 2 else "/v1/completions", stream=i % 3 == 1)
        check_against_reference(reference, [case], [run_case(system.router.url, case)])
        after = wait_idle(url)
        # Prefill publishes each prompt's full pages: the next turn hits all of them.
        hit = 0 if i == 0 else len(turns[i - 1]) // PAGE_SIZE * PAGE_SIZE
        assert after["prefix_cache_lookup_tokens"] - before["prefix_cache_lookup_tokens"] == len(prompt)
        assert after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"] == hit, i
    cases = [Case(system_prompt + [3 + i] * (2 + 9 * i), 5, "/generate" if i % 2 else "/v1/completions",
                  stream=i % 3 == 0) for i in range(6)]
    before = wait_idle(url)
    with cf.ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda c: run_case(system.router.url, c), cases))
    check_against_reference(reference, cases, results)
    after = wait_idle(url)
    assert after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"] == 6 * 3 * PAGE_SIZE
    for worker in (system.prefill, system.decode):
        wait_idle(worker.url)


def test_decode_side_reuse_writes_only_the_pages_decode_does_not_hold_and_answers_as_a_cache_off_run(
    system: PDSystem, tiny_model: Path
) -> None:
    check_decode_reuse_across_turns(system, tiny_model)


def test_n_choices_and_list_prompts_equal_single_requests_with_derived_seeds(system: PDSystem, reference: LLM
                                                                            ) -> None:
    check_n_and_list_prompts(system, reference)


def test_structured_output_is_valid_and_equals_colocated_generation(
    system: PDSystem, structured: tuple[list[StructuredCase], list[str]]
) -> None:
    check_structured_output(system, *structured)


def test_forced_tool_calls_parse_and_reasoning_comes_apart_as_colocated(system: PDSystem, reference: LLM,
                                                                        tiny_model: Path) -> None:
    check_tool_calls_and_reasoning(system, reference, tiny_model)


def test_prompt_logprobs_are_served_on_decode_alone_and_equal_colocated(system: PDSystem, reference: LLM) -> None:
    check_prompt_logprobs(system, reference)


def test_the_responses_api_answers_as_the_same_chat_request(system: PDSystem) -> None:
    check_responses_api(system)


def test_decode_answers_an_error_when_the_prefill_instance_cannot_be_looked_up(system: PDSystem) -> None:
    body = {
        "input_ids": [5, 6, 7],
        "sampling_params": {"max_new_tokens": 2},
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": 9,
        "bootstrap_room": 11,
    }
    status, raw = http("POST", system.decode.url + "/generate", body)
    # The named peer is at fault, not the request's shape and not this server: a bad gateway.
    error = json.loads(raw)["error"]
    assert status == 502 and "unreachable" in error["message"] and error["code"] == "kv_peer_error"
    wait_idle(system.decode.url)


def test_killed_prefill_fails_its_in_flight_requests_and_decode_keeps_serving(
    system: PDSystem, reference: LLM
) -> None:
    warm = Case([4, 5, 6], 2, "/generate", stream=False)
    check_against_reference(reference, [warm], [run_case(system.router.url, warm)])
    # Freeze the prefill's rank processes so that requests are surely in flight there, then kill the whole
    # instance. Its main process (HTTP and the bootstrap service) keeps answering until the kill: a frozen
    # bootstrap service failed the decode side's lookups (cached 1 s) before any request reached it.
    ranks = subprocess.run(["pgrep", "-P", str(system.prefill.proc.pid)], capture_output=True, text=True,
                           check=False).stdout.split()
    assert ranks, "the prefill instance has no rank processes"
    for pid in ranks:
        os.kill(int(pid), signal.SIGSTOP)
    cases = [Case([3 + i] * (10 + 20 * i), 4, "/generate", stream=i % 2 == 1) for i in range(4)]
    direct = Case([9, 8, 7, 6], 3, "/generate", stream=False)  # decode alone must notice the dead peer
    direct_body = {
        "input_ids": direct.prompt,
        "sampling_params": {"max_new_tokens": 3},
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": system.bootstrap_port,
        "bootstrap_room": 77,
    }
    with cf.ThreadPoolExecutor(len(cases) + 1) as pool:
        futures = [pool.submit(run_case, system.router.url, c) for c in cases]
        direct_future = pool.submit(http, "POST", system.decode.url + "/generate", direct_body)
        deadline = time.monotonic() + 30
        while get_json(system.decode.url + "/server_info").get("decode_transferring", 0) < len(cases) + 1:
            assert time.monotonic() < deadline, "requests did not reach the decode worker"
            time.sleep(0.1)
        killed_at = time.monotonic()
        system.prefill.signal(signal.SIGKILL)
        results = [f.result(timeout=60) for f in futures]
        direct_status, direct_raw = direct_future.result(timeout=60)
    for result in results:
        assert "error" in result and result["status"] != 500, result
    assert direct_status == 502 and "silent" in json.loads(direct_raw)["error"]["message"]
    # Every client knew within the dead-peer timeout (plus the fence and slow-machine slack).
    assert time.monotonic() - killed_at < 2 * PEER_TIMEOUT_S + 10
    wait_idle(system.decode.url, timeout_s=2 * PEER_TIMEOUT_S)
    # Decode keeps serving (colocated: no prefill is left), token-exact.
    check_against_reference(reference, [direct], [run_case(system.decode.url, direct)])
    deadline = time.monotonic() + 10
    while True:
        prefill = next(
            w for w in get_json(system.router.url + "/workers")["workers"] if w["role"] == "prefill"
        )
        if not prefill["healthy"]:
            break
        assert time.monotonic() < deadline, f"the router did not eject the dead prefill: {prefill}"
        time.sleep(0.2)
