"""The benchmarking KV connector (`--kv-connector bench`): a decode worker serves requests with no prefill
instance and no transfer engine (its pages filled with random KV), a prefill worker computes the KV and
drops it; both label their responses, return every page, and `bench.decode_alone` writes consistent JSON.

One decode worker and one prefill worker are started for the whole module (in parallel)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pd_system import Server, free_port, get_json, start_server, wait_healthy, wait_idle

from bench import decode_alone
from engine.llm import LLM
from engine.sampling import SamplingParams
from engine.tiny_model import write_tiny_model

pytestmark = pytest.mark.slow  # real processes: two workers with their ranks

PAGE_SIZE = 16
POOL_TOKENS = 256  # 16 pages: two requests of 120 tokens fit at once, so a burst of them must queue
KV_CONNECTOR_HEADER = "x-tandem-kv-connector"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("bench-model") / "tiny-v3")


@pytest.fixture(scope="module")
def workers(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    logs = tmp_path_factory.mktemp("bench-logs")
    common = ["--model", str(model_dir), "--host", "127.0.0.1", "--page-size", str(PAGE_SIZE),
              "--max-total-tokens", str(POOL_TOKENS), "--kv-connector", "bench", "--log-level", "warning"]
    d_port, p_port = free_port(), free_port()
    servers: list[Server] = []
    try:
        servers.append(start_server("decode", "decode_worker", [*common, "--port", str(d_port)], d_port, logs))
        servers.append(start_server("prefill", "prefill_worker", [*common, "--port", str(p_port)], p_port, logs))
        wait_healthy(servers)
        yield servers[0], servers[1]
    finally:
        for server in servers:
            server.stop()


def _generate(url: str, prompt: list[int], max_new_tokens: int, stream: bool = False,
              **extra: object) -> tuple[int, dict[str, str], bytes]:
    """(status, response headers, body) of one /generate request."""
    import urllib.error
    import urllib.request

    body = {"input_ids": prompt, "stream": stream, **extra,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0}}
    request = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def _wait_count(url: str, key: str, expected: int, timeout_s: float = 10) -> None:
    """Until /server_info's `key` reaches `expected` (the ranks report their counts every 0.5 s)."""
    deadline = time.monotonic() + timeout_s
    while (value := get_json(url + "/server_info").get(key)) != expected:
        assert time.monotonic() < deadline, f"{key} is {value}, expected {expected}"
        time.sleep(0.1)


def test_decode_worker_with_bench_connector_serves_a_queued_burst_without_prefill_and_frees_every_page(
        workers: tuple[Server, Server]) -> None:
    decode, _ = workers
    info = get_json(decode.url + "/server_info")
    assert info["kv_connector"] == "bench" and info["role"] == "decode"
    filled_before = info["bench_filled_requests"]
    # 120 tokens each (8 pages of 16): only two fit in the 16-page pool at once, the rest wait their turn.
    # Half carry bootstrap fields naming a prefill instance that does not exist: the connector ignores them.
    dead_prefill = {"bootstrap_host": "127.0.0.1", "bootstrap_port": free_port(), "bootstrap_room": 7}
    cases = [(list(range(2 + i, 102 + i)), 20, i % 2 == 1, dead_prefill if i % 2 else {}) for i in range(6)]
    with cf.ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda c: _generate(decode.url, c[0], c[1], c[2], **c[3]), cases))
    for (_, max_new, stream, _), (status, headers, raw) in zip(cases, results, strict=True):
        assert status == 200, raw[:300]
        assert headers[KV_CONNECTOR_HEADER] == "bench"
        events = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: {")]
        doc = events[-1] if stream else json.loads(raw)
        assert len(doc["output_ids"]) == max_new and doc["meta_info"]["finish_reason"]["type"] == "length"
    _wait_count(decode.url, "bench_filled_requests", filled_before + len(cases))
    wait_idle(decode.url)


def test_bench_decode_worker_refuses_a_request_larger_than_its_pool_and_leaks_nothing(
        workers: tuple[Server, Server]) -> None:
    decode, _ = workers
    for stream in (False, True):  # a client error: 400 with the JSON body, a stream too (not 200 + error event)
        status, headers, raw = _generate(decode.url, list(range(2, 202)), 100, stream)  # 300 tokens > 256 pages
        error = json.loads(raw)["error"]
        assert status == 400 and "pages" in error["message"] and error["type"] == "invalid_request_error"
        assert headers[KV_CONNECTOR_HEADER] == "bench"
    wait_idle(decode.url)


def test_prefill_worker_with_bench_connector_answers_the_true_first_token_and_drops_the_kv(
        workers: tuple[Server, Server], model_dir: Path) -> None:
    _, prefill = workers
    info = get_json(prefill.url + "/server_info")
    assert info["kv_connector"] == "bench" and info["role"] == "prefill"
    dropped_before = info["bench_dropped_requests"]
    prompts = [list(range(3, 40)), list(range(50, 150))]  # the second spans several pages
    llm = LLM(str(model_dir))
    try:
        expected = [o.token_ids for o in llm.generate(prompts, [SamplingParams(max_new_tokens=1)] * 2)]
    finally:
        llm.close()
    for prompt, want in zip(prompts, expected, strict=True):
        status, headers, raw = _generate(prefill.url, prompt, 8)  # no bootstrap fields: accepted anyway
        assert status == 200, raw[:300]
        assert headers[KV_CONNECTOR_HEADER] == "bench"
        assert json.loads(raw)["output_ids"] == want  # one token: the decode side would make the rest
    _wait_count(prefill.url, "bench_dropped_requests", dropped_before + len(prompts))
    wait_idle(prefill.url)


def test_decode_alone_report_is_labelled_and_its_numbers_are_consistent(
        workers: tuple[Server, Server], model_dir: Path, tmp_path: Path) -> None:
    decode, _ = workers
    out = tmp_path / "decode_alone.json"
    args = decode_alone.build_parser().parse_args(
        ["--input-len", "64", "--output-len", "8", "--num-prompts", "6", "--max-concurrency", "3",
         "--page-size", str(PAGE_SIZE), "--output-json", str(out), "--disable-tqdm"])
    decode_alone.measure(decode.url, args, str(model_dir))
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert report["kv_connector"] == "bench" and "not end-to-end" in report["label"]
    assert report["setup"]["pages_idle_after_run"]
    s = report["summary"]
    assert s["completed"] == 6 and s["failed"] == 0
    assert s["total_output_tokens"] == 6 * 8 and s["total_input_tokens"] == 6 * 64
    assert s["output_throughput"] * s["duration_s"] == pytest.approx(s["total_output_tokens"], rel=1e-6)
    assert s["request_throughput"] * s["duration_s"] == pytest.approx(s["completed"], rel=1e-6)
    for request in report["requests"]:
        assert 0 < request["ttft_ms"] <= request["e2e_ms"]
        assert request["ttft_ms"] + sum(request["itl_ms"]) <= request["e2e_ms"] + 1e-3
        assert request["output_tokens"] == 8
