"""One streamed request against an OpenAI-compatible or SGLang-native server, timed token by token.

Backends (SGLang ``bench_serving`` names):
  ``openai``       POST /v1/completions       (prompt: text or token-id list)
  ``openai-chat``  POST /v1/chat/completions  (prompt: text, one user message)
  ``sglang``       POST /generate             (``text`` or ``input_ids``; ``sampling_params``)

Every request streams (``stream: true``, ``stream_options.include_usage``) with ``ignore_eos`` and a
fixed token budget, so the output length is the one asked for. Timing follows SGLang/vLLM: TTFT is
from just before the POST to the first chunk carrying a token; each later chunk adds one ITL per token
it carries (a chunk of k tokens adds k ITLs of gap/k, as SGLang does, when the server says how many it
carries: SGLang ``meta_info`` or per-chunk ``usage``). An OpenAI stream that bundles tokens without
per-chunk counts yields one ITL per chunk, so there len(itl) < output_tokens - 1.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from bench.serving_dataset import RequestInput

BACKEND_PATHS: dict[str, str] = {
    "openai": "/v1/completions",
    "openai-chat": "/v1/chat/completions",
    "sglang": "/generate",
}

# Header a worker sets when it serves through a benchmarking KV connector (kv-connector=bench), so
# results can never be mistaken for end-to-end numbers even when the user forgets --label.
KV_CONNECTOR_HEADER = "x-tandem-kv-connector"


@dataclass
class RequestResult:
    """What one request measured. Times are seconds; ``start_s`` is since the benchmark started."""

    index: int
    prompt_len: int
    expected_output_len: int
    sent: bool = False
    success: bool = False
    cancelled: bool = False
    error: str = ""
    start_s: float = 0.0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    server_prompt_tokens: int | None = None
    kv_connector: str = ""
    output_ids: list[int] = field(default_factory=list)  # with the sglang backend (its events carry them)

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None for single-token outputs."""
        if self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def input_tokens(self) -> int:
        """The server's prompt count when it gave one (it knows best), else the client's."""
        return self.server_prompt_tokens if self.server_prompt_tokens is not None else self.prompt_len


@dataclass(frozen=True)
class SamplingConfig:
    """Request fields that are the same for every request of a run."""

    backend: str
    model: str
    temperature: float = 0.0
    ignore_eos: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)


@dataclass
class _ChunkInfo:
    """What one SSE event says: tokens it carries and any usage numbers or error."""

    has_token: bool = False
    completion_tokens: int | None = None  # cumulative, when the server reports it per chunk
    prompt_tokens: int | None = None
    error: str = ""


def build_request_body(request: RequestInput, config: SamplingConfig) -> dict[str, Any]:
    """The JSON body for ``request`` on ``config.backend``."""
    if config.backend == "sglang":
        body: dict[str, Any] = {
            "sampling_params": {
                "max_new_tokens": request.output_len,
                "ignore_eos": config.ignore_eos,
                "temperature": config.temperature,
            },
            "stream": True,
        }
        body["input_ids" if isinstance(request.prompt, list) else "text"] = request.prompt
    else:
        body = {
            "model": config.model,
            "max_tokens": request.output_len,
            "temperature": config.temperature,
            "ignore_eos": config.ignore_eos,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if config.backend == "openai-chat":
            if not isinstance(request.prompt, str):
                raise ValueError("the openai-chat backend needs text prompts (use --prompt-format text)")
            body["messages"] = [{"role": "user", "content": request.prompt}]
        else:
            body["prompt"] = request.prompt
    body.update(config.extra_body)
    return body


def _error_message(payload: Any) -> str:
    if isinstance(payload, dict):
        err = payload.get("error", payload)
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(err)
    return str(payload)


def _parse_openai_event(event: dict[str, Any], chat: bool) -> _ChunkInfo:
    info = _ChunkInfo()
    if "error" in event:
        info.error = _error_message(event)
        return info
    usage = event.get("usage")
    if isinstance(usage, dict):
        info.completion_tokens = usage.get("completion_tokens")
        info.prompt_tokens = usage.get("prompt_tokens")
    for choice in event.get("choices") or []:
        if chat:
            delta = choice.get("delta") or {}
            text = delta.get("content") or delta.get("reasoning_content") or ""
            role_only = "role" in delta and not text
        else:
            text, role_only = choice.get("text") or "", False
        # A chunk with no text still carries a token (e.g. half of a multi-byte character), unless it
        # is the role preamble or the closing chunk that only states finish_reason.
        if text or (choice.get("finish_reason") is None and not role_only):
            info.has_token = True
    return info


def _parse_sglang_event(event: dict[str, Any]) -> _ChunkInfo:
    info = _ChunkInfo()
    if "error" in event:
        info.error = _error_message(event)
        return info
    meta = event.get("meta_info") or {}
    info.completion_tokens = meta.get("completion_tokens")
    info.prompt_tokens = meta.get("prompt_tokens")
    info.has_token = True
    return info


def parse_event(backend: str, event: dict[str, Any]) -> _ChunkInfo:
    """Decode one SSE ``data:`` object for ``backend``."""
    if backend == "sglang":
        return _parse_sglang_event(event)
    return _parse_openai_event(event, chat=backend == "openai-chat")


class _TokenClock:
    """Turns chunk arrival times into TTFT and ITLs."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.ttft_s = 0.0
        self.itl_s: list[float] = []
        self.tokens = 0
        self._last: float | None = None

    def tokens_arrived(self, now: float, count: int) -> None:
        if count <= 0:
            return
        if self._last is None:
            self.ttft_s = now - self.start
            # Tokens that came with the first one arrived with it: zero gaps keep len(itl) == tokens - 1.
            self.itl_s.extend([0.0] * (count - 1))
        else:
            gap = (now - self._last) / count
            self.itl_s.extend([gap] * count)
        self.tokens += count
        self._last = now


async def _read_sse_events(response: aiohttp.ClientResponse):
    """Yield each decoded ``data:`` object until ``[DONE]`` or the end of the body."""
    async for raw_line in response.content:
        line = raw_line.strip()
        if not line or line.startswith(b":"):
            continue
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        yield orjson.loads(data)


async def send_request(
    session: aiohttp.ClientSession,
    url: str,
    request: RequestInput,
    config: SamplingConfig,
    result: RequestResult,
    bench_start: float,
) -> None:
    """Stream one request and fill ``result`` in place (so a cancelled request keeps what it had)."""
    body = build_request_body(request, config)
    start = time.perf_counter()
    result.sent = True
    result.start_s = start - bench_start
    clock = _TokenClock(start)
    usage_tokens: int | None = None
    try:
        async with session.post(url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}) as resp:
            result.kv_connector = resp.headers.get(KV_CONNECTOR_HEADER, "")
            if resp.status != 200:
                text = await resp.text()
                try:
                    message = _error_message(orjson.loads(text))
                except orjson.JSONDecodeError:
                    message = text[:200]
                result.error = f"HTTP {resp.status}: {message}"
                return
            async for event in _read_sse_events(resp):
                now = time.perf_counter()
                info = parse_event(config.backend, event)
                if info.error:
                    result.error = f"stream error: {info.error}"
                    return
                if info.prompt_tokens is not None:
                    result.server_prompt_tokens = int(info.prompt_tokens)
                if isinstance(event, dict) and isinstance(event.get("output_ids"), list):
                    result.output_ids = event["output_ids"]  # SGLang's events carry every id so far
                new_tokens = int(info.has_token)
                if info.completion_tokens is not None:
                    reported = int(info.completion_tokens)
                    if info.has_token:
                        # Per-chunk cumulative counts (SGLang meta_info, vLLM continuous usage) say
                        # exactly how many tokens this chunk carries.
                        new_tokens = max(reported - clock.tokens, 0)
                    usage_tokens = reported
                clock.tokens_arrived(now, new_tokens)
        end = time.perf_counter()
    except asyncio.CancelledError:
        result.cancelled = True
        result.error = "cancelled: benchmark time limit reached"
        raise
    except (aiohttp.ClientError, asyncio.TimeoutError, orjson.JSONDecodeError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return
    finally:
        result.ttft_s, result.itl_s = clock.ttft_s, clock.itl_s
        result.output_tokens = usage_tokens if usage_tokens is not None else clock.tokens
    if clock.tokens == 0:
        result.error = "stream ended without any token"
        return
    result.e2e_s = end - start
    result.success = True
