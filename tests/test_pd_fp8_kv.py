"""1P1D with an FP8 KV cache (`--kv-cache-dtype fp8_e4m3` on both workers), real processes, NIXL and Mooncake:
greedy outputs equal colocated FP8-KV generation, both pools return to idle, and a decode worker whose KV
cache is in another dtype is refused when it looks the prefill instance up (bootstrap), before any page moves.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from pd_system import (
    FP8_KV_LOGPROB_TOL,
    PAGE_SIZE,
    PDSystem,
    check_concurrent_mixed_requests,
    get_json,
    http,
    skip_unless_backend,
    wait_healthy,
    wait_idle,
    worker_flags,
)

from bench.pd_servers import free_port
from engine.llm import LLM
from engine.tiny_model import write_tiny_model

pytestmark = pytest.mark.slow  # real processes: router + workers with their ranks

FP8_FLAGS = ["--kv-cache-dtype", "fp8_e4m3"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("pd-fp8-model") / "tiny-v3")


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> Iterator[LLM]:
    """Colocated generation on an FP8 pool in this process: what every disaggregated answer must equal."""
    llm = LLM(tiny_model, page_size=PAGE_SIZE, kv_cache_dtype="fp8_e4m3")
    yield llm
    assert llm.kv_pool.available_pages == llm.kv_pool.num_pages
    llm.close()


@pytest.fixture(scope="module", params=["nixl", "mooncake"])
def system(request: pytest.FixtureRequest, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[PDSystem]:
    skip_unless_backend(request.param)
    pd = PDSystem(tiny_model, tmp_path_factory.mktemp(f"pd-fp8-{request.param}"), request.param,
                  prefill_flags=FP8_FLAGS,
                  decode_flags=[*FP8_FLAGS, "--max-total-tokens", "2048"])
    yield pd
    pd.close()


def test_both_workers_report_an_fp8_kv_cache(system: PDSystem) -> None:
    for worker in (system.prefill, system.decode):
        assert get_json(worker.url + "/server_info")["kv_cache_dtype"] == "fp8_e4m3"


def test_fp8_kv_1p1d_greedy_outputs_equal_colocated_fp8_kv_generation_and_pools_end_idle(
    system: PDSystem, reference: LLM
) -> None:
    # Greedy tokens equal; logprobs within FP8_KV_LOGPROB_TOL (an element at an e4m3 rounding boundary may
    # land one step apart when the prefill batches it differently). Ends with both workers idle.
    check_concurrent_mixed_requests(system, reference, n=16, seed=3, logprob_tol=FP8_KV_LOGPROB_TOL)


def test_decode_with_another_kv_cache_dtype_is_refused_at_bootstrap(
    system: PDSystem, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    port = free_port()
    decode = system.servers.start("decode-auto-kv", "decode_worker", worker_flags(tiny_model, system.backend, port), port)
    try:
        wait_healthy([decode])
        body = {
            "input_ids": [5, 6, 7, 8],
            "sampling_params": {"max_new_tokens": 2},
            "bootstrap_host": "127.0.0.1",
            "bootstrap_port": system.bootstrap_port,
            "bootstrap_room": 4242,
        }
        status, raw = http("POST", decode.url + "/generate", body)
        assert status == 502, raw  # the peer cannot be used: a gateway error, not the client's
        message = json.loads(raw)["error"]["message"]
        assert "dtype differs: 'float32' here, 'float8_e4m3fn' on the peer" in message, message
        assert "--kv-cache-dtype" in message
        wait_idle(decode.url)
        wait_idle(system.prefill.url)  # the prefill side never saw a request for that room
    finally:
        decode.stop()
