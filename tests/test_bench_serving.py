"""The serving benchmark client against a real mock server process (tests/bench_mock_server.py)."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bench.serving import (
    BENCH_CONNECTOR_LABEL,
    BenchConfig,
    BenchmarkError,
    main,
    poisson_gaps,
    run_benchmark,
)
from bench.serving_dataset import load_tokenizer, random_requests

MOCK_SERVER = Path(__file__).with_name("bench_mock_server.py")
MOCK_TTFT_MS = 20.0
MOCK_ITL_MS = 2.0


def _start_mock(*flags: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, str(MOCK_SERVER), "--port", "0", "--ttft-ms", str(MOCK_TTFT_MS),
         "--itl-ms", str(MOCK_ITL_MS), *flags],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"mock server did not start: {line!r}")
    return proc, f"http://127.0.0.1:{int(line.split()[1])}"


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.wait(timeout=10)
    assert proc.stdout is not None
    proc.stdout.close()


@pytest.fixture(scope="module")
def mock_url() -> Iterator[str]:
    proc, url = _start_mock()
    yield url
    _stop(proc)


def _config(url: str, **overrides: object) -> BenchConfig:
    fields: dict[str, object] = dict(base_url=url, random_input_len=24, random_output_len=12,
                                     num_prompts=16, warmup_requests=0, disable_tqdm=True)
    fields.update(overrides)
    return BenchConfig(**fields)  # type: ignore[arg-type]


def test_cli_run_writes_consistent_json_and_a_png(mock_url: str, tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "run.json", tmp_path / "run.png"
    num_prompts, output_len = 24, 10
    code = main([
        "--base-url", mock_url, "--dataset", "random", "--random-input-len", "32",
        "--random-output-len", str(output_len), "--num-prompts", str(num_prompts), "--request-rate", "80",
        "--seed", "3", "--slo-ttft-ms", "1000", "--slo-itl-ms", "1000", "--output-json", str(out_json),
        "--plot", str(out_png), "--label", "mock run", "--disable-tqdm",
    ])
    assert code == 0
    report = json.loads(out_json.read_text())
    summary, requests = report["summary"], report["requests"]
    assert report["label"] == "mock run" and report["model"] == "mock-model"
    assert summary["completed"] == num_prompts and summary["failed"] == 0

    duration = summary["duration_s"]
    assert summary["request_throughput"] * duration == pytest.approx(summary["completed"])
    assert summary["output_throughput"] * duration == pytest.approx(summary["total_output_tokens"])
    assert summary["input_throughput"] * duration == pytest.approx(summary["total_input_tokens"])
    assert summary["total_output_tokens"] == sum(r["output_tokens"] for r in requests) == num_prompts * output_len
    assert summary["goodput"] is not None and summary["goodput"] <= summary["request_throughput"]
    for r in requests:
        assert r["ttft_ms"] <= r["e2e_ms"]
        assert r["ttft_ms"] >= MOCK_TTFT_MS  # the mock sleeps this long before the first token
        assert len(r["itl_ms"]) == r["output_tokens"] - 1
        assert r["ttft_ms"] + sum(r["itl_ms"]) <= r["e2e_ms"] + 1e-3  # ITLs are rounded to 0.1 µs
        assert r["input_tokens"] == r["prompt_len"] == 32  # server's usage agrees with the client
        assert r["start_s"] + r["e2e_ms"] / 1e3 <= duration + 1e-6
    assert summary["ttft_ms"]["p50"] <= summary["ttft_ms"]["p90"] <= summary["ttft_ms"]["p99"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_server_errors_are_counted_and_kept_out_of_latency_stats(tmp_path: Path) -> None:
    # Requests are numbered on arrival: every 4th gets HTTP 500, the 7th and 14th fail mid-stream.
    proc, url = _start_mock("--fail-every", "4", "--fail-midstream-every", "7")
    try:
        report = run_benchmark(_config(url, num_prompts=20, max_concurrency=5, slo_ttft_ms=1000.0))
    finally:
        _stop(proc)
    summary = report["summary"]
    assert (summary["completed"], summary["failed"], summary["cancelled"]) == (13, 7, 0)
    assert summary["errors"] == {"HTTP 500: injected failure": 5,
                                 "stream error: injected mid-stream failure": 2}
    assert summary["request_throughput"] * summary["duration_s"] == pytest.approx(13)
    assert summary["goodput"] <= summary["request_throughput"]
    assert summary["total_output_tokens"] == 13 * 12
    failed = [r for r in report["requests"] if not r["success"]]
    assert all(r["error"] and not r["cancelled"] for r in failed)


@pytest.mark.parametrize("backend", ["openai-chat", "sglang"])
def test_every_backend_gets_exactly_the_requested_output_length(mock_url: str, backend: str) -> None:
    report = run_benchmark(_config(mock_url, backend=backend, num_prompts=6, max_concurrency=2))
    assert report["summary"]["completed"] == 6
    for r in report["requests"]:
        assert r["output_tokens"] == 12
        assert len(r["itl_ms"]) == 11
        assert r["ttft_ms"] <= r["e2e_ms"]


def test_chunks_of_several_tokens_still_give_one_itl_per_token_after_the_first() -> None:
    # SGLang's meta_info says how many tokens each chunk carries: 12 tokens arrive as 3+3+3+3.
    proc, url = _start_mock("--tokens-per-chunk", "3")
    try:
        report = run_benchmark(_config(url, backend="sglang", num_prompts=3))
    finally:
        _stop(proc)
    for r in report["requests"]:
        assert r["output_tokens"] == 12 and len(r["itl_ms"]) == 11
        assert r["itl_ms"][:2] == [0.0, 0.0]  # the two that came with the first token
        assert min(r["itl_ms"][2:]) > 0.0


def test_time_limit_cancels_requests_in_flight_and_bounds_the_run(mock_url: str) -> None:
    # 2000 tokens at 2 ms each would take 4 s per request; the run must stop at about 0.5 s.
    report = run_benchmark(_config(mock_url, num_prompts=4, max_concurrency=2, random_output_len=2000,
                                   max_duration_s=0.5))
    summary = report["summary"]
    assert summary["completed"] == 0 and summary["failed"] == 0
    assert summary["cancelled"] == 2 and summary["not_sent"] == 2
    assert summary["duration_s"] < 3.0
    assert all(r["error"].startswith("cancelled") for r in report["requests"] if r["sent"])


def test_bench_connector_results_are_labelled_not_end_to_end() -> None:
    proc, url = _start_mock("--kv-connector", "bench")
    try:
        report = run_benchmark(_config(url, num_prompts=2, label="decode only"))
    finally:
        _stop(proc)
    assert report["kv_connector"] == "bench"
    assert report["label"].startswith("decode only") and BENCH_CONNECTOR_LABEL in report["label"]


def test_warm_up_failure_against_a_dead_server_is_a_clear_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    with pytest.raises(BenchmarkError, match="warm-up request .* failed"):
        run_benchmark(_config(f"http://127.0.0.1:{dead_port}", warmup_requests=1, model="m"))


@pytest.mark.parametrize("overrides, message", [
    ({"num_prompts": 0}, "num-prompts"),
    ({"request_rate": 0.0}, "request-rate"),
    ({"max_concurrency": 0}, "max-concurrency"),
    ({"backend": "openai-chat", "prompt_format": "ids"}, "text"),
    ({"backend": "tgi"}, "unknown backend"),
    ({"random_range_ratio": 1.5}, "range ratio"),
])
def test_bad_configuration_is_refused_before_any_request(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(BenchmarkError, match=message):
        run_benchmark(_config("http://127.0.0.1:9", **overrides))


def test_poisson_gaps_have_the_requested_rate_and_inf_sends_at_once() -> None:
    gaps = poisson_gaps(4000, rate=10.0, seed=0)
    assert gaps[0] == 0.0
    assert gaps.mean() == pytest.approx(0.1, rel=0.05)
    assert not np.any(poisson_gaps(5, rate=math.inf, seed=0))


def test_text_prompts_from_a_tokenizer_have_their_measured_length(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(98)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 1}))
    hf, special = load_tokenizer(str(tmp_path))
    assert hf is not None and hf.vocab_size == 100 and special == {1}
    requests = random_requests(num_prompts=5, input_len=30, output_len=4, range_ratio=1.0, seed=0,
                               prompt_format="text", vocab_size=hf.vocab_size, tokenizer=hf,
                               excluded_ids=special | {0})
    for req in requests:
        assert isinstance(req.prompt, str)
        assert req.prompt_len == len(hf.encode_ids(req.prompt)) == 30
        assert "<eos>" not in req.prompt and "[UNK]" not in req.prompt


def test_random_requests_are_reproducible_sized_and_free_of_special_tokens() -> None:
    kwargs = dict(num_prompts=50, input_len=40, output_len=8, range_ratio=0.5, prompt_format="ids",
                  vocab_size=64, excluded_ids={0, 1, 2})
    first = random_requests(seed=7, **kwargs)  # type: ignore[arg-type]
    assert first == random_requests(seed=7, **kwargs)  # type: ignore[arg-type]
    assert first != random_requests(seed=8, **kwargs)  # type: ignore[arg-type]
    for req in first:
        assert isinstance(req.prompt, list) and len(req.prompt) == req.prompt_len
        assert 20 <= req.prompt_len <= 40 and 4 <= req.output_len <= 8
        assert not {0, 1, 2} & set(req.prompt) and max(req.prompt) < 64
    text = random_requests(seed=7, **{**kwargs, "prompt_format": "text"})  # type: ignore[arg-type]
    assert all(isinstance(r.prompt, str) and len(r.prompt.split()) == r.prompt_len for r in text)


def test_multiturn_prompts_carry_the_whole_conversation_with_the_server_s_answers(mock_url: str,
                                                                                  tmp_path: Path) -> None:
    out = tmp_path / "turns.json"
    flags = ["--base-url", mock_url, "--dataset", "multiturn", "--num-conversations", "3", "--num-turns", "3",
             "--system-prompt-len", "20", "--turn-input-len", "5", "--turn-output-len", "4", "--output-json",
             str(out)]
    assert main(flags) == 0
    report = json.loads(out.read_text())
    # Turn t's prompt: the 20-token system prompt, then t x (5-token message + 4-token answer), then 5 more.
    assert [t["prompt_tokens"] for t in report["turns"]] == [3 * (20 + 5), 3 * (29 + 5), 3 * (38 + 5)]
    # Without a worker to read counters from, every prompt token counts as computed (and none as hit).
    assert [t["prefill_tokens_computed"] for t in report["turns"]] == [t["prompt_tokens"] for t in report["turns"]]
    assert all(len(t["ttft_s"]) == 3 and t["ttft_ms"]["p50"] >= MOCK_TTFT_MS for t in report["turns"])
    assert main([*flags[:-2], "--num-turns", "0"]) == 2  # refused before any request


def test_the_prefix_cache_comparison_tabulates_and_plots_three_setups_side_by_side(tmp_path: Path) -> None:
    from bench.compare_prefix_cache import DEFAULT_SETUPS, format_table, write_plot

    def turn(t: int, computed: int, sent: int | None) -> dict:
        return {"turn": t, "prompt_tokens": 100 * (t + 1), "prefill_tokens_computed": computed,
                "kv_bytes_sent": sent, "ttft_ms": {"p50": 10.0 + t, "p99": 20.0 + t}}

    sent = {"cache_off": 2_000_000, "prefill_cache": 2_000_000, "decode_reuse": 500_000}
    reports = {name: {"turns": [turn(t, 50, sent[name]) for t in range(2)],
                      "summary": {**turn(0, 100, 2 * sent[name]), "prompt_tokens": 300}} for name in DEFAULT_SETUPS}
    table = format_table(reports).splitlines()
    assert len(table) == 2 + 2 + 1 and "KV MB sent to decode" in table[0]
    assert table[-1].split("|")[3].split() == ["4.00", "4.00", "1.00"]  # MB per setup, all turns
    png = write_plot(reports, tmp_path / "p.png", "title")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
