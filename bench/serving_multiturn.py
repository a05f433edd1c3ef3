"""Multi-turn chat workload for `bench.serving --dataset multiturn`: what a prefix cache is for.

N conversations share one system prompt; each has M turns, and turn t's prompt is the whole conversation
so far (the system prompt, every earlier user message and the answer the server gave to it) plus a new
user message, as a chat client resends it. Token-id prompts on SGLang's `/generate` (streamed, greedy,
`ignore_eos`), so prompt lengths are exact and the answers are the server's own output ids.

Turns run in lockstep: the N conversations send turn t at once, and turn t+1 starts when all of turn t
has answered. That makes per-turn numbers clean: TTFT p50/p99 of each turn, and, read from the prefill
instance's (or a colocated worker's) `/server_info` counters around the turn, how many prompt tokens it
really ran through its forwards (`prefill_tokens_computed`), how many its prefix cache served
(`prefix_cache_hit_tokens`; absent without a cache), and how many KV bytes it wrote into decode instances
(`kv_bytes_sent`; a prefill instance's, smaller where decode-side reuse left pages unwritten).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
import orjson

from bench.serving_client import RequestResult, SamplingConfig, send_request
from bench.serving_dataset import RequestInput
from bench.serving_metrics import latency_stats_ms


@dataclass(frozen=True)
class MultiTurnConfig:
    """One multi-turn run (the `bench.serving` flags of the same names)."""

    num_conversations: int = 8
    num_turns: int = 4
    system_prompt_len: int = 512
    turn_input_len: int = 64
    output_len: int = 16
    vocab_size: int = 1000
    seed: int = 1
    request_timeout_s: float = 600.0

    def validate(self) -> None:
        for name in ("num_conversations", "num_turns", "system_prompt_len", "turn_input_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.vocab_size < 3:
            raise ValueError(f"--vocab-size must be >= 3, got {self.vocab_size}")


def user_messages(config: MultiTurnConfig) -> tuple[list[int], list[list[list[int]]]]:
    """The shared system prompt and each conversation's user messages (ids from 2 up: 0 and 1 are often
    special)."""
    rng = np.random.default_rng(config.seed)
    system = rng.integers(2, config.vocab_size, config.system_prompt_len).tolist()
    messages = [[rng.integers(2, config.vocab_size, config.turn_input_len).tolist() for _ in range(config.num_turns)]
                for _ in range(config.num_conversations)]  # fmt: skip
    return system, messages


def _counters(info: dict[str, Any]) -> tuple[int, int, int | None] | None:
    """(prompt tokens computed, prompt tokens served by the prefix cache, KV bytes written into decode
    instances or None where the worker moves none) so far; hits are 0 without a cache."""
    computed, hit = info.get("prefill_tokens_computed"), info.get("prefix_cache_hit_tokens", 0)
    sent = info.get("kv_bytes_sent")
    if not isinstance(computed, int) or not isinstance(hit, int):
        return None
    return computed, hit, sent if isinstance(sent, int) else None


async def _fresh_info(session: aiohttp.ClientSession, url: str, since: float, timeout_s: float = 20.0) -> dict:
    """`url`/server_info once its ranks' counts were reported after wall time `since` (they report every
    0.5 s) and nothing is in flight there."""
    deadline = time.monotonic() + timeout_s
    while True:
        async with session.get(url + "/server_info") as resp:
            info = orjson.loads(await resp.read())
        if info.get("status_time", 0.0) > since and not info.get("active_requests", 0):
            return info
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} reported no fresh idle counts within {timeout_s} s: {info}")
        await asyncio.sleep(0.1)


async def run_multiturn(base_url: str, config: MultiTurnConfig, counters_url: str | None = None) -> dict[str, Any]:
    """Run the workload against `base_url` (a router or a worker); `counters_url` is the worker whose
    prefill counters are read per turn (None: prompt tokens are reported as computed, unverified)."""
    config.validate()
    system, messages = user_messages(config)
    sampling = SamplingConfig(backend="sglang", model="default", temperature=0.0, ignore_eos=True)
    histories = [list(system) for _ in range(config.num_conversations)]
    turns: list[dict[str, Any]] = []
    timeout = aiohttp.ClientTimeout(total=config.request_timeout_s)
    bench_start = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for turn in range(config.num_turns):
            before = await _fresh_info(session, counters_url, time.time()) if counters_url else None
            prompts = [history + conversation[turn] for history, conversation in zip(histories, messages, strict=True)]
            results = [RequestResult(i, len(p), config.output_len) for i, p in enumerate(prompts)]
            await asyncio.gather(*(
                send_request(session, base_url + "/generate", RequestInput(i, p, len(p), config.output_len),
                             sampling, result, bench_start)
                for i, (p, result) in enumerate(zip(prompts, results, strict=True))))  # fmt: skip
            failed = [r.error for r in results if not r.success]
            if failed:
                raise RuntimeError(f"turn {turn}: {len(failed)} requests failed, e.g. {failed[0]}")
            after = await _fresh_info(session, counters_url, time.time()) if counters_url else None
            prompt_tokens = sum(len(p) for p in prompts)
            computed, hit, sent = prompt_tokens, 0, None
            if before is not None and after is not None:
                b, a = _counters(before), _counters(after)
                if a is not None and b is not None:
                    computed, hit = a[0] - b[0], a[1] - b[1]
                    sent = a[2] - b[2] if a[2] is not None and b[2] is not None else None
            turns.append({
                "turn": turn,
                "prompt_tokens": prompt_tokens,
                "prefill_tokens_computed": computed,
                "prefix_cache_hit_tokens": hit,
                "kv_bytes_sent": sent,
                "ttft_ms": latency_stats_ms([r.ttft_s for r in results]),
                "ttft_s": [r.ttft_s for r in results],
            })  # fmt: skip
            for history, prompt, result in zip(histories, prompts, results, strict=True):
                history[:] = prompt + result.output_ids  # the answer joins the conversation
    all_ttft = [t for turn in turns for t in turn["ttft_s"]]
    return {
        "config": config.__dict__,
        "turns": turns,
        "summary": {
            "requests": len(all_ttft),
            "ttft_ms": latency_stats_ms(all_ttft),
            "prompt_tokens": sum(t["prompt_tokens"] for t in turns),
            "prefill_tokens_computed": sum(t["prefill_tokens_computed"] for t in turns),
            "prefix_cache_hit_tokens": sum(t["prefix_cache_hit_tokens"] for t in turns),
            "kv_bytes_sent": (None if any(t["kv_bytes_sent"] is None for t in turns)
                              else sum(t["kv_bytes_sent"] for t in turns)),
            "counters_from": counters_url,
        },
    }


def format_turns(report: dict[str, Any], label: str = "") -> str:
    """One line per turn: prompt tokens, tokens computed, KV MB sent to decode, TTFT p50/p99."""
    lines = [f"== multi-turn {label} ==", f"{'turn':>4} {'prompt tok':>10} {'computed':>9} {'hit':>7} "
             f"{'KV MB sent':>10} {'TTFT p50 ms':>11} {'TTFT p99 ms':>11}"]  # fmt: skip
    for t in report["turns"]:
        sent = "-" if t.get("kv_bytes_sent") is None else f"{t['kv_bytes_sent'] / 1e6:.2f}"
        lines.append(f"{t['turn']:>4} {t['prompt_tokens']:>10} {t['prefill_tokens_computed']:>9} "
                     f"{t['prefix_cache_hit_tokens']:>7} {sent:>10} {t['ttft_ms']['p50']:>11.1f} "
                     f"{t['ttft_ms']['p99']:>11.1f}")
    return "\n".join(lines)
