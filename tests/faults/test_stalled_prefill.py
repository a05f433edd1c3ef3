"""A prefill instance stalled mid-transfer (SIGSTOP) past the peer timeout, whose room's pages decode then
gives to another request, must not write into them when it resumes (SIGCONT): the new request's greedy
tokens equal colocated generation, every pool returns to idle, and the resumed prefill serves again.
Router + prefill + decode as real processes, NIXL and Mooncake."""

from __future__ import annotations

import concurrent.futures as cf
import json
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pd_system import (
    PAGE_SIZE,
    Case,
    PDSystem,
    check_against_reference,
    get_json,
    run_case,
    skip_unless_backend,
    wait_idle,
)

from engine.llm import LLM
from engine.tiny_model import write_tiny_model

pytestmark = pytest.mark.slow  # real processes: router + workers with their ranks

PEER_TIMEOUT_S = 3.0
# 24 pages of 16 tokens: the stalled room's pages are among the first the next request gets.
DECODE_FLAGS = ["--max-total-tokens", "384"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("stall-model") / "tiny-v3")


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> Iterator[LLM]:
    llm = LLM(tiny_model, page_size=PAGE_SIZE)
    yield llm
    llm.close()


@pytest.mark.parametrize("backend", ["nixl", "mooncake"])
def test_a_prefill_resumed_after_its_peer_timeout_never_writes_into_pages_decode_reused(
    backend: str, tiny_model: Path, reference: LLM, tmp_path: Path
) -> None:
    skip_unless_backend(backend)
    system = PDSystem(tiny_model, tmp_path, backend, decode_flags=DECODE_FLAGS, peer_timeout_s=PEER_TIMEOUT_S)
    try:
        warm = Case([4, 5, 6], 2, "/generate", stream=False)
        check_against_reference(reference, [warm], [run_case(system.router.url, warm)])
        system.prefill.signal(signal.SIGSTOP)
        stalled = Case([7 + i % 50 for i in range(200)], 8, "/generate", stream=False)  # 13 pages, 5 chunks
        with cf.ThreadPoolExecutor(1) as pool:
            future = pool.submit(run_case, system.router.url, stalled)
            deadline = time.monotonic() + 30
            while get_json(system.decode.url + "/server_info").get("decode_transferring", 0) < 1:
                assert time.monotonic() < deadline, "the request did not reach the decode worker"
                time.sleep(0.1)
            result = future.result(timeout=4 * PEER_TIMEOUT_S + 20)
        assert "error" in result and result["status"] != 500, result  # decode declared the prefill dead
        # The freed pages go to a long colocated request on decode; the prefill resumes while it runs.
        reuse = Case([9 + i % 40 for i in range(180)], 120, "/generate", stream=True)
        body = {"input_ids": reuse.prompt, "stream": True, "return_logprob": True, "top_logprobs_num": 3,
                "sampling_params": {"max_new_tokens": reuse.max_new_tokens, "temperature": 0}}
        request = urllib.request.Request(system.decode.url + "/generate", data=json.dumps(body).encode(),
                                         method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            lines = [response.readline()]  # the first token is out: its pages are reserved and in use
            system.prefill.signal(signal.SIGCONT)
            lines += response.read().splitlines()
        events = [json.loads(line[6:]) for line in lines if line.startswith(b"data: {")]
        assert not any("error" in e for e in events), events[-1]
        doc = events[-1]
        got = {"status": 200, "ids": doc["output_ids"],
               "logprobs": [lp for lp, _, _ in doc["meta_info"]["output_token_logprobs"]],
               "tops": [[(t, lp) for lp, t, _ in top] for top in doc["meta_info"]["output_top_logprobs"]]}
        check_against_reference(reference, [reuse], [got])
        for worker in (system.prefill, system.decode):
            wait_idle(worker.url, timeout_s=3 * PEER_TIMEOUT_S + 10)
        # The resumed prefill serves again through the router.
        deadline = time.monotonic() + 30
        again = Case([3, 1, 4, 1, 5], 3, "/generate", stream=False)
        while "error" in (result := run_case(system.router.url, again)):
            assert time.monotonic() < deadline, result
            time.sleep(0.5)
        check_against_reference(reference, [again], [result])
    finally:
        system.prefill.signal(signal.SIGCONT)  # a stopped process would ignore the SIGTERM of close()
        system.close()
