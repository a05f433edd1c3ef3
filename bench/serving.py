"""Serving benchmark client: load any OpenAI-compatible (or SGLang-native) server and measure it.

    python -m bench.serving --base-url http://127.0.0.1:8000 --dataset random \\
        --random-input-len 1024 --random-output-len 128 --num-prompts 200 --request-rate 4 \\
        --output-json runs/bench.json --plot runs/bench.png

Follows SGLang/vLLM ``bench_serving``: random prompts (token ids, or text), fixed output length through
``ignore_eos`` + ``max_tokens``, Poisson arrivals at ``--request-rate`` (all at once by default) and/or
at most ``--max-concurrency`` requests in flight. Reports TTFT, TPOT, ITL and E2E percentiles,
throughput and goodput under ``--slo-ttft-ms``/``--slo-itl-ms``. ``run_benchmark`` is the same run as a
function returning the JSON dict, for scripts that compare setups (``bench/compare_pd.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import numpy as np
import orjson
from tqdm import tqdm

from bench.serving_client import BACKEND_PATHS, RequestResult, SamplingConfig, send_request
from bench.serving_dataset import RequestInput, load_tokenizer, random_requests
from bench.serving_metrics import SloTargets, format_summary, summarize

log = logging.getLogger("bench.serving")

RESULT_FORMAT_VERSION = 1
BENCH_CONNECTOR_LABEL = "kv-connector=bench, not end-to-end"


class BenchmarkError(RuntimeError):
    """The benchmark could not run (server unreachable, warm-up failed, bad configuration)."""


_T = TypeVar("_T")


def run_or_exit(run: Callable[[argparse.Namespace], _T], args: argparse.Namespace, counts: tuple[int, ...] = (),
                what: str = "lengths and counts") -> _T:
    """A serving bench's ``run(args)`` for its ``main``: ``counts`` must be >= 1 (else one line and exit 2), and a
    failure of the benchmark, a server or an argument ends the process with its message (exit 1), not a traceback."""
    if counts and min(counts) < 1:
        print(f"error: {what} must be >= 1", file=sys.stderr)
        raise SystemExit(2)
    try:
        return run(args)
    except (BenchmarkError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc


@dataclass
class BenchConfig:
    """Everything one run needs; the CLI flags map one-to-one onto these fields."""

    base_url: str
    backend: str = "openai"
    dataset: str = "random"
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 1.0
    # A skewed mix: every `skew_long_every`-th prompt is `skew_long_len` tokens instead (0: none).
    skew_long_len: int = 0
    skew_long_every: int = 0
    num_prompts: int = 100
    request_rate: float = math.inf
    max_concurrency: int | None = None
    seed: int = 1
    model: str | None = None
    tokenizer: str | None = None
    prompt_format: str | None = None
    vocab_size: int | None = None
    temperature: float = 0.0
    slo_ttft_ms: float | None = None
    slo_itl_ms: float | None = None
    max_duration_s: float | None = None
    request_timeout_s: float = 600.0
    warmup_requests: int = 1
    output_json: str | None = None
    plot: str | None = None
    label: str = ""
    extra_body: dict[str, Any] = field(default_factory=dict)
    disable_tqdm: bool = False

    def validate(self) -> None:
        if self.backend not in BACKEND_PATHS:
            raise BenchmarkError(f"unknown backend {self.backend!r}; choose from {sorted(BACKEND_PATHS)}")
        if self.dataset != "random":
            raise BenchmarkError(f"unknown dataset {self.dataset!r}; only 'random' is supported")
        if self.num_prompts < 1:
            raise BenchmarkError(f"--num-prompts must be >= 1, got {self.num_prompts}")
        if not self.request_rate > 0:
            raise BenchmarkError(f"--request-rate must be > 0 (inf sends all at once), got {self.request_rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise BenchmarkError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if self.max_duration_s is not None and self.max_duration_s <= 0:
            raise BenchmarkError(f"--max-duration-s must be > 0, got {self.max_duration_s}")
        if self.warmup_requests < 0:
            raise BenchmarkError(f"--warmup-requests must be >= 0, got {self.warmup_requests}")
        if self.prompt_format not in (None, "ids", "text"):
            raise BenchmarkError(f"--prompt-format must be 'ids' or 'text', got {self.prompt_format!r}")
        if self.backend == "openai-chat" and self.prompt_format == "ids":
            raise BenchmarkError("the openai-chat backend sends messages, so it needs --prompt-format text")

    def as_json(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        fields["request_rate"] = None if math.isinf(self.request_rate) else self.request_rate
        return fields


def _build_requests(config: BenchConfig) -> list[RequestInput]:
    tokenizer, special_ids = load_tokenizer(config.tokenizer)
    prompt_format = config.prompt_format
    if prompt_format is None:
        prompt_format = "text" if config.backend == "openai-chat" or tokenizer is not None else "ids"
    # Without a tokenizer the vocabulary is unknown: stay in a range every model has.
    vocab_size = config.vocab_size or (tokenizer.vocab_size if tokenizer is not None else 1000)
    try:
        requests = random_requests(
            num_prompts=config.num_prompts + config.warmup_requests,
            input_len=config.random_input_len,
            output_len=config.random_output_len,
            range_ratio=config.random_range_ratio,
            seed=config.seed,
            prompt_format=prompt_format,
            vocab_size=vocab_size,
            tokenizer=tokenizer,
            excluded_ids=special_ids,
        )
        if config.skew_long_len and config.skew_long_every:
            longs = random_requests(num_prompts=len(requests), input_len=config.skew_long_len,
                                    output_len=config.random_output_len, range_ratio=config.random_range_ratio,
                                    seed=config.seed + 1, prompt_format=prompt_format, vocab_size=vocab_size,
                                    tokenizer=tokenizer, excluded_ids=special_ids)
            # Warm-up requests come first: the timed ones count from 0, every k-th of them long.
            every, warm = config.skew_long_every, config.warmup_requests
            requests = [dataclasses.replace(longs[i], index=i) if i >= warm and (i - warm) % every == every - 1
                        else r for i, r in enumerate(requests)]
        return requests
    except ValueError as exc:
        raise BenchmarkError(str(exc)) from exc


async def _discover_model(session: aiohttp.ClientSession, base_url: str) -> str:
    """The first model the server lists at /v1/models (SGLang's default), else ``"default"``."""
    try:
        async with session.get(f"{base_url}/v1/models") as resp:
            if resp.status == 200:
                models = (await resp.json(loads=orjson.loads)).get("data") or []
                if models:
                    return str(models[0]["id"])
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as exc:
        log.info("could not list models at %s (%s); using 'default'", base_url, exc)
    return "default"


def poisson_gaps(num_requests: int, rate: float, seed: int) -> np.ndarray:
    """Seconds to wait before each request: exponential gaps (Poisson arrivals), zero for rate inf."""
    if math.isinf(rate):
        return np.zeros(num_requests)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=num_requests)
    gaps[0] = 0.0  # the first request goes at t=0 so the measured duration starts with work
    return gaps


async def _send_limited(
    session: aiohttp.ClientSession, url: str, request: RequestInput, sampling: SamplingConfig,
    result: RequestResult, bench_start: float, limiter: asyncio.Semaphore | None, progress: tqdm,
) -> None:
    if limiter is None:
        await send_request(session, url, request, sampling, result, bench_start)
    else:
        async with limiter:
            await send_request(session, url, request, sampling, result, bench_start)
    progress.update(1)


async def _warm_up(session: aiohttp.ClientSession, url: str, warmups: list[RequestInput],
                   sampling: SamplingConfig) -> None:
    for request in warmups:
        result = RequestResult(request.index, request.prompt_len, request.output_len)
        await send_request(session, url, request, sampling, result, time.perf_counter())
        if not result.success:
            raise BenchmarkError(f"warm-up request to {url} failed: {result.error}")


async def _run_requests(config: BenchConfig, requests: list[RequestInput],
                        session: aiohttp.ClientSession, sampling: SamplingConfig,
                        ) -> tuple[list[RequestResult], float, float]:
    """(results, duration in seconds, wall-clock `time.time()` of the start that `start_s` counts from)."""
    url = config.base_url + BACKEND_PATHS[config.backend]
    await _warm_up(session, url, requests[: config.warmup_requests], sampling)
    measured = requests[config.warmup_requests:]
    results = [RequestResult(r.index, r.prompt_len, r.output_len) for r in measured]
    limiter = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    gaps = poisson_gaps(len(measured), config.request_rate, config.seed + 1)
    progress = tqdm(total=len(measured), desc="requests", unit="req", disable=config.disable_tqdm)
    bench_start, started_at = time.perf_counter(), time.time()
    deadline = bench_start + config.max_duration_s if config.max_duration_s else math.inf
    tasks: list[asyncio.Task[None]] = []
    try:
        for request, result, gap in zip(measured, results, gaps, strict=True):
            if gap > 0:
                await asyncio.sleep(min(gap, max(deadline - time.perf_counter(), 0.0)))
            if time.perf_counter() >= deadline:
                break
            tasks.append(asyncio.create_task(_send_limited(
                session, url, request, sampling, result, bench_start, limiter, progress)))
        if tasks:
            remaining = deadline - time.perf_counter()
            _, pending = await asyncio.wait(tasks, timeout=None if math.isinf(remaining) else max(remaining, 0))
            if pending:
                log.warning("time limit of %.1f s reached: cancelling %d requests in flight",
                            config.max_duration_s, len(pending))
    finally:
        # Also runs when the caller cancels us: nothing may outlive the run.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        progress.close()
    return results, time.perf_counter() - bench_start, started_at


def _request_record(result: RequestResult) -> dict[str, Any]:
    tpot = result.tpot_s
    return {
        "index": result.index,
        "success": result.success,
        "sent": result.sent,
        "cancelled": result.cancelled,
        "error": result.error,
        "prompt_len": result.prompt_len,
        "input_tokens": result.input_tokens,
        "expected_output_len": result.expected_output_len,
        "output_tokens": result.output_tokens,
        "start_s": result.start_s,
        "ttft_ms": result.ttft_s * 1e3,
        "tpot_ms": None if tpot is None else tpot * 1e3,
        "e2e_ms": result.e2e_s * 1e3,
        "itl_ms": [round(gap * 1e3, 4) for gap in result.itl_s],  # 0.1 µs: keeps big runs small
    }


def _label(config: BenchConfig, results: list[RequestResult]) -> tuple[str, str]:
    """The run's label, forced to say "not end-to-end" when a worker reports the bench connector."""
    connectors = sorted({r.kv_connector for r in results if r.kv_connector})
    kv_connector = ",".join(connectors)
    label = config.label
    if "bench" in connectors and BENCH_CONNECTOR_LABEL not in label:
        label = f"{label} [{BENCH_CONNECTOR_LABEL}]".strip()
    return label, kv_connector


async def run_benchmark_async(config: BenchConfig) -> dict[str, Any]:
    """Run one benchmark and return its JSON-ready result (also written/plotted if asked)."""
    config.validate()
    config.base_url = config.base_url.rstrip("/")
    requests = _build_requests(config)
    timeout = aiohttp.ClientTimeout(total=config.request_timeout_s)
    # limit=0: aiohttp's default pool of 100 connections would silently cap concurrency.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, read_bufsize=1 << 20) as session:
        model = config.model
        if model is None:
            model = await _discover_model(session, config.base_url) if config.backend != "sglang" else ""
        sampling = SamplingConfig(config.backend, model, config.temperature, extra_body=config.extra_body)
        results, duration_s, started_at = await _run_requests(config, requests, session, sampling)
    summary = summarize(results, duration_s, SloTargets(config.slo_ttft_ms, config.slo_itl_ms))
    label, kv_connector = _label(config, results)
    report: dict[str, Any] = {
        "format_version": RESULT_FORMAT_VERSION,
        "label": label,
        "kv_connector": kv_connector,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "config": config.as_json(),
        "summary": summary,
        # Wall clock of the measured run's start: request i left the client at started_at + its start_s, so
        # servers' wall-clock logs of the same host line up with it (bench.host_path).
        "started_at": started_at,
        "requests": [_request_record(r) for r in results],
    }
    if config.output_json:
        out = Path(config.output_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    if config.plot:
        from bench.serving_plots import write_plot

        write_plot([report], config.plot)
    return report


def run_benchmark(args: BenchConfig | argparse.Namespace) -> dict[str, Any]:
    """Synchronous entry point: takes a ``BenchConfig`` or the CLI's parsed arguments."""
    if isinstance(args, BenchConfig):
        config = args
    else:  # the multiturn dataset's flags are not BenchConfig fields
        fields = BenchConfig.__dataclass_fields__
        config = BenchConfig(**{k: v for k, v in vars(args).items() if k in fields})
    return asyncio.run(run_benchmark_async(config))


def _json_object(text: str) -> dict[str, Any]:
    value = orjson.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--extra-body must be a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--backend", choices=sorted(BACKEND_PATHS), default="openai")
    p.add_argument("--dataset", choices=["random", "multiturn"], default="random",
                   help="multiturn: chat conversations on a shared system prompt (bench.serving_multiturn)")
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=1.0,
                   help="lengths drawn from [max(1, L*ratio), L]; 1.0 = fixed lengths")
    p.add_argument("--skew-long-len", type=int, default=0,
                   help="a skewed mix: every --skew-long-every-th prompt has this many tokens instead")
    p.add_argument("--skew-long-every", type=int, default=0, help="see --skew-long-len (0: no long prompts)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="Poisson arrival rate in req/s; inf sends every request at once")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--model", default=None, help="model name to send (default: first of /v1/models)")
    p.add_argument("--tokenizer", default=None, help="model folder with tokenizer.json, for text prompts")
    p.add_argument("--prompt-format", choices=["ids", "text"], default=None,
                   help="token-id prompts or text (default: text with a tokenizer or for chat, else ids)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="random ids are drawn below this (default: tokenizer's vocab, else 1000)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-itl-ms", type=float, default=None, help="SLO on each request's mean ITL (TPOT)")
    p.add_argument("--max-duration-s", type=float, default=None,
                   help="stop sending and cancel requests in flight after this many seconds")
    p.add_argument("--request-timeout-s", type=float, default=600.0)
    p.add_argument("--warmup-requests", type=int, default=1, help="untimed requests sent first, one by one")
    p.add_argument("--output-json", default=None)
    p.add_argument("--plot", default=None, help="write latency CDFs and ITL over time to this PNG")
    p.add_argument("--label", default="", help="free text stored with the results")
    p.add_argument("--extra-body", type=_json_object, default={}, help="JSON merged into every request")
    p.add_argument("--disable-tqdm", action="store_true")
    turns = p.add_argument_group("multiturn dataset (sglang /generate, token ids, greedy)")
    turns.add_argument("--num-conversations", type=int, default=8)
    turns.add_argument("--num-turns", type=int, default=4)
    turns.add_argument("--system-prompt-len", type=int, default=512, help="tokens shared by every conversation")
    turns.add_argument("--turn-input-len", type=int, default=64, help="tokens of each new user message")
    turns.add_argument("--turn-output-len", type=int, default=16, help="tokens of each answer")
    turns.add_argument("--counters-url", default=None,
                       help="prefill (or colocated) worker whose /server_info prefix-cache counters give the "
                            "prompt tokens computed per turn")
    return p


def _main_multiturn(args: argparse.Namespace) -> int:
    from bench.serving_multiturn import MultiTurnConfig, format_turns, run_multiturn

    config = MultiTurnConfig(args.num_conversations, args.num_turns, args.system_prompt_len, args.turn_input_len,
                             args.turn_output_len, args.vocab_size or 1000, args.seed, args.request_timeout_s)
    try:
        report = asyncio.run(run_multiturn(args.base_url.rstrip("/"), config, args.counters_url))
    except (ValueError, RuntimeError, aiohttp.ClientError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report["label"] = args.label
    print(format_turns(report, args.label))
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
        print(f"results: {args.output_json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    if args.dataset == "multiturn":
        return _main_multiturn(args)
    try:
        report = run_benchmark(args)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(report["summary"], report["label"]))
    if args.output_json:
        print(f"results: {args.output_json}")
    if args.plot:
        print(f"plot: {args.plot}")
    return 0 if report["summary"]["completed"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
