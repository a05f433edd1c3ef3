"""Router + 1 prefill + 1 decode (NIXL, real processes) with a decode pool far smaller than a burst needs
and `--reserve-tokens`: the decode worker admits more than fits, retracts the newest requests when the
pool runs out and prefills them again itself; every answer equals colocated greedy generation, the
retractions are counted on /metrics, and both pools end idle. The decode worker also keeps finished
requests' pages (`--decode-prefix-cache`): conversations whose pages do not all fit its pool are served
from what survives eviction, token-exact."""

from __future__ import annotations

import concurrent.futures as cf
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from pd_system import PDSystem, get_json, http, skip_unless_backend, wait_idle

from engine.llm import LLM
from engine.sampling import SamplingParams
from engine.tiny_model import write_tiny_model

pytestmark = pytest.mark.slow  # real processes: router + workers with their ranks

MAX_NEW = 40


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PDSystem, Path]]:
    skip_unless_backend("nixl")
    model = write_tiny_model(tmp_path_factory.mktemp("pd-retract") / "tiny-v3")
    # 32 decode pages of 16 tokens; 8 requests of up to 7 pages' whole life each need 56.
    pd = PDSystem(model, tmp_path_factory.mktemp("pd-retract-logs"), "nixl",
                  decode_flags=["--max-total-tokens", "512", "--reserve-tokens", "4", "--decode-prefix-cache"])
    yield pd, model
    pd.close()


def test_a_burst_that_overflows_the_decode_pool_completes_token_exact_with_retractions(
        system: tuple[PDSystem, Path]) -> None:
    pd, model = system
    prompts = [[(11 * i + 3 * j) % 250 + 2 for j in range(40 + 3 * i)] for i in range(8)]
    llm = LLM(model, page_size=16, prefix_cache=False)
    try:
        expected = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW,
                                                                               ignore_eos=True))]
    finally:
        llm.close()

    def send(prompt: list[int]) -> list[int]:
        body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0,
                                                         "ignore_eos": True}}
        status, raw = http("POST", pd.router.url + "/generate", body, timeout_s=240)
        assert status == 200, raw
        return json.loads(raw)["output_ids"]

    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(send, prompts)) == expected
    info = wait_idle(pd.decode.url)
    assert info["retractions"] > 0 and info["num_errors"] == 0
    status, metrics = http("GET", pd.decode.url + "/metrics")
    assert status == 200 and b"tandem_worker_retractions " in metrics
    wait_idle(pd.prefill.url)
    assert get_json(pd.decode.url + "/server_info")["total_pages"] == 32


def test_conversations_larger_than_the_decode_pool_reuse_what_survives_eviction_token_exact(
        system: tuple[PDSystem, Path]) -> None:
    """Five conversations of three turns (prompts of 7-9 pages, 45 pages at the end) on a 32-page decode pool
    that keeps finished requests' pages: the pool cannot hold every conversation, so cached pages are evicted
    for new ones (an eviction storm on decode) while later turns still find some of theirs; every answer
    equals a cache-off run's and the decode pool ends idle."""
    pd, model = system
    conversations = [[(7 * i + 5 * j) % 250 + 2 for j in range(90)] for i in range(5)]
    llm = LLM(model, page_size=16, prefix_cache=False)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    before = wait_idle(pd.decode.url)
    try:
        for turn in range(3):
            prompts = [c + [(13 * turn + 3 * i + j) % 250 + 2 for j in range(11)] for i, c in enumerate(conversations)]
            expected = [o.token_ids for o in llm.generate(prompts, params)]

            def send(prompt: list[int]) -> list[int]:
                body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 6, "temperature": 0,
                                                                 "ignore_eos": True}}
                status, raw = http("POST", pd.router.url + "/generate", body, timeout_s=240)
                assert status == 200, raw
                return json.loads(raw)["output_ids"]

            with cf.ThreadPoolExecutor(len(prompts)) as pool:
                assert list(pool.map(send, prompts)) == expected, turn
            for c, p, ids in zip(conversations, prompts, expected, strict=True):
                c[:] = p + ids
    finally:
        llm.close()
    after = wait_idle(pd.decode.url)
    counts = {k: (before[k], after[k]) for k in ("decode_reused_tokens", "prefix_cache_evicted_pages", "retractions")}
    assert after["decode_reused_tokens"] > before["decode_reused_tokens"], counts  # later turns found pages
    assert after["prefix_cache_evicted_pages"] > before["prefix_cache_evicted_pages"], counts  # others were evicted
    assert after["num_errors"] == 0
    wait_idle(pd.prefill.url)
