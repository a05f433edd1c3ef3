"""A served PD system for the end-to-end tests: router + one prefill + one decode worker, real processes.

Servers are started by the benchmarks' launcher (`bench.pd_servers`): each runs in its own session
(process group), so `stop()` / `kill()` reach its rank processes too. Workload helpers send mixed
requests (`/generate` and `/v1/completions`, streamed and not) and return the generated token ids or text; `wait_idle` checks every pool of a worker is back at its start.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import random
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench import pd_servers
from bench.pd_servers import Server, ServerGroup, cpu_worker_env, free_port
from engine.llm import LLM
from engine.sampling import SamplingParams

START_TIMEOUT_S = 240  # rank processes import torch + a transfer backend; 2 shared cores are slow
# Ranks of P and D share this machine's cores: one torch thread each avoids OpenMP spin-waiting.
WORKER_ENV = cpu_worker_env(threads=1)
PAGE_SIZE = 16
# Chunks of 40 tokens end mid-page: a page is sent only once all of its tokens are computed.
CHUNK_TOKENS = 40
TOP_LOGPROBS = 3  # alternatives per position that /generate cases ask for


def start_server(name: str, module: str, args: Sequence[str], port: int, log_dir: Path) -> Server:
    return pd_servers.start_server(name, module, args, port, log_dir, WORKER_ENV)


def http(method: str, url: str, body: Any = None, timeout_s: float = 60) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def get_json(url: str) -> dict[str, Any]:
    status, body = http("GET", url, timeout_s=10)
    assert status == 200, (url, status, body[:300])
    return json.loads(body)


def wait_healthy(servers: Sequence[Server], timeout_s: float = START_TIMEOUT_S) -> None:
    pd_servers.wait_healthy(servers, timeout_s)


def worker_flags(model_dir: Path, backend: str, port: int, peer_timeout_s: float = 5.0) -> list[str]:
    """Flags both workers of a test system share (later flags of the same name override these)."""
    flags = f"--host 127.0.0.1 --port {port} --transfer-backend {backend} --page-size {PAGE_SIZE} "
    flags += f"--max-prefill-tokens {CHUNK_TOKENS} --max-total-tokens 8192 --kv-peer-timeout {peer_timeout_s}"
    return ["--model", str(model_dir), *flags.split(), "--log-level", "warning"]


class PDSystem:
    """Router + prefill + decode on one machine. `close()` stops all three.

    Args:
        model_dir: checkpoint both workers serve.
        log_dir: where each server's log goes (shown when start-up fails).
        backend: "nixl" | "mooncake".
        prefill_flags / decode_flags: extra flags, e.g. ("--tp", "2", "--dp", "2").
        peer_timeout_s: the KV plane's dead-peer timeout on both workers.
        env: added to every server's environment (e.g. TANDEM_KV_AUTH_TOKEN, a deployment's shared token).
    """

    def __init__(self, model_dir: Path, log_dir: Path, backend: str, prefill_flags: Sequence[str] = (),
                 decode_flags: Sequence[str] = (), peer_timeout_s: float = 5.0,
                 env: dict[str, str] | None = None) -> None:
        self.backend = backend
        self.decode_flags = list(decode_flags)
        # Workloads draw prompt ids below this: an id outside the vocabulary is (rightly) a 400.
        self.vocab_size: int = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
        self.bootstrap_port = free_port()
        p_port, d_port, r_port = free_port(), free_port(), free_port()
        self.servers = ServerGroup(log_dir, {**WORKER_ENV, **(env or {})})
        try:
            prefill_args = [*worker_flags(model_dir, backend, p_port, peer_timeout_s), *prefill_flags,
                            "--bootstrap-port", str(self.bootstrap_port)]
            self.prefill_args, self.prefill_port = prefill_args, p_port  # to restart it on the same ports
            self.prefill = self.servers.start("prefill", "prefill_worker", prefill_args, p_port)
            decode_args = [*worker_flags(model_dir, backend, d_port, peer_timeout_s), *decode_flags]
            self.decode_args, self.decode_port = decode_args, d_port
            self.decode = self.servers.start("decode", "decode_worker", decode_args, d_port)
            wait_healthy([self.prefill, self.decode])
            # Health every 0.5 s and ejection at the first failure: the kill test sees it at once.
            router_args = ["--host", "127.0.0.1", "--port", str(r_port), "--prefill", self.prefill.url,
                           str(self.bootstrap_port), "--decode", self.decode.url]
            router_args += "--health-interval 0.5 --health-failure-threshold 1 --log-level warning".split()
            self.router_args, self.router_port = router_args, r_port
            self.router = self.servers.start("router", "router", router_args, r_port)
            wait_healthy([self.router])
        except BaseException:
            self.close()
            raise

    def restart(self, role: str) -> Server:
        """Stop `role` ("prefill" | "decode" | "router"; already killed is fine) and start it again on
        the same ports with the same flags; returns the new server once it is healthy."""
        module = {"prefill": "prefill_worker", "decode": "decode_worker", "router": "router"}[role]
        old: Server = getattr(self, role)
        self.servers.servers.remove(old)
        old.stop(grace_s=1)
        args, port = getattr(self, f"{role}_args"), getattr(self, f"{role}_port")
        new = self.servers.start(role, module, args, port)
        setattr(self, role, new)
        wait_healthy([new])
        return new

    def close(self) -> None:
        self.servers.close()


IDLE_KEYS = ("free_pages", "live_rooms", "free_aux_slots", "inflight_handles", "active_requests")


def idle_problems(info: dict[str, Any]) -> list[str]:
    problems = []
    # With a prefix cache, idle pages are free or cached and unreferenced (evictable on demand).
    free, evictable = info.get("free_pages"), info.get("evictable_pages")
    if not isinstance(free, int) or not isinstance(evictable, int) or free + evictable != info.get("total_pages"):
        problems.append(f"free_pages {free} + evictable_pages {evictable} of {info.get('total_pages')}")
    if info.get("free_aux_slots") != info.get("total_aux_slots"):
        problems.append(f"free_aux_slots {info.get('free_aux_slots')} of {info.get('total_aux_slots')}")
    for key in ("live_rooms", "inflight_handles", "active_requests"):
        if info.get(key) != 0:
            problems.append(f"{key} {info.get(key)}")
    return problems


def wait_idle(url: str, timeout_s: float = 15) -> dict[str, Any]:
    """/server_info once every pool is back at its idle count; AssertionError naming what is not.

    Only counts that every DP group reported after this call began are trusted: ranks report every
    0.5 s, and a report from before the workload would look idle."""
    started = time.time()
    deadline = time.monotonic() + timeout_s
    while True:
        info = get_json(url + "/server_info")
        problems = idle_problems(info)
        if info.get("status_time", 0.0) <= started:
            problems.append(f"no pool report since the check began (last {info.get('status_time')})")
        if not problems:
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} not idle after {timeout_s} s: {problems}")
        time.sleep(0.2)


# --- workload -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One request of a mixed workload: prompt ids, how many tokens, which endpoint, streamed or not."""

    prompt: list[int]
    max_new_tokens: int
    endpoint: str  # "/generate" | "/v1/completions"
    stream: bool
    penalties: tuple[float, float, float] = (0.0, 0.0, 1.0)  # presence, frequency, repetition
    min_new_tokens: int = 0

    def params(self) -> SamplingParams:
        presence, frequency, repetition = self.penalties
        return SamplingParams(max_new_tokens=self.max_new_tokens, presence_penalty=presence,
                              frequency_penalty=frequency, repetition_penalty=repetition,
                              min_new_tokens=self.min_new_tokens)


def mixed_cases(n: int, seed: int, vocab: int, max_prompt: int = 300) -> list[Case]:
    """Prompts from 1 token to several chunks long, 1 to 16 new tokens, every endpoint x stream mode."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        length = (
            [1, 7, PAGE_SIZE, CHUNK_TOKENS, CHUNK_TOKENS + 1][i] if i < 5 else rng.randrange(2, max_prompt)
        )
        prompt = [rng.randrange(2, vocab) for _ in range(length)]
        endpoint = "/generate" if i % 4 < 2 else "/v1/completions"
        # Every third request penalises repeats: the first token is drawn on the prefill side (prompt-only
        # repetition penalty), the rest on decode (prompt and output).
        penalties = (0.3, 0.5, 1.2) if i % 3 == 0 else (0.0, 0.0, 1.0)
        max_new = rng.randrange(1, 17)
        cases.append(Case(prompt, max_new, endpoint, stream=i % 2 == 1, penalties=penalties,
                          min_new_tokens=min(2, max_new) if i % 3 == 0 else 0))
    return cases


def _body(case: Case) -> dict[str, Any]:
    presence, frequency, repetition = case.penalties
    penalties = {"presence_penalty": presence, "frequency_penalty": frequency, "repetition_penalty": repetition,
                 "min_tokens": case.min_new_tokens}
    if case.endpoint == "/generate":
        return {
            "input_ids": case.prompt,
            "stream": case.stream,
            "sampling_params": {"max_new_tokens": case.max_new_tokens, "temperature": 0, **penalties},
            "return_logprob": True,  # the first from the prefill side, the rest from decode
            "top_logprobs_num": TOP_LOGPROBS,
        }
    return {
        "prompt": case.prompt,
        "max_tokens": case.max_new_tokens,
        "temperature": 0,
        "stream": case.stream,
        **penalties,
    }


def run_case(base_url: str, case: Case, timeout_s: float = 120) -> dict[str, Any]:
    """{"status", "ids" (generate) or "text" (completions), "error"} of one request."""
    status, raw = http("POST", base_url + case.endpoint, _body(case), timeout_s)
    if status != 200:
        return {"status": status, "error": raw.decode(errors="replace")}
    if not case.stream:
        doc = json.loads(raw)
        if case.endpoint == "/generate":
            return {"status": status, "ids": doc["output_ids"], "logprobs": _logprobs(doc), "tops": _tops(doc)}
        return {"status": status, "text": doc["choices"][0]["text"]}
    events = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: {")]
    errors = [e["error"] for e in events if "error" in e]
    if errors:
        return {"status": status, "error": json.dumps(errors[0])}
    if case.endpoint == "/generate":
        return {"status": status, "ids": events[-1]["output_ids"], "logprobs": _logprobs(events[-1]),
                "tops": _tops(events[-1])}
    return {"status": status, "text": "".join(c["text"] for e in events for c in e["choices"])}


def _logprobs(doc: dict[str, Any]) -> list[float]:
    return [lp for lp, _, _ in doc["meta_info"]["output_token_logprobs"]]


def _tops(doc: dict[str, Any]) -> list[list[tuple[int, float]]]:
    return [[(t, lp) for lp, t, _ in top] for top in doc["meta_info"]["output_top_logprobs"]]


def backend_missing(kind: str) -> str | None:
    """Why transfer engine `kind` cannot run here, or None (an import only: an engine costs seconds)."""
    try:
        __import__({"nixl": "nixl._api", "mooncake": "mooncake.engine"}[kind])
    except (ImportError, OSError) as exc:
        return f"{kind} unavailable: {exc}"
    return None


def skip_unless_backend(kind: str) -> None:
    """Skips the calling test or fixture, naming why, where transfer engine `kind` cannot run."""
    missing = backend_missing(kind)
    if missing:
        pytest.skip(missing)


def expected_outputs(llm: LLM, cases: list[Case]) -> list[tuple[list[int], list[float], list[list[tuple[int, float]]]]]:
    """Greedy colocated generation of every case, batched together: ids, their logprobs, the alternatives."""
    params = [c.params() for c in cases]
    outputs = llm.generate([c.prompt for c in cases], params, return_logprob=True, top_logprobs=TOP_LOGPROBS)
    return [(o.token_ids, o.logprobs or [], o.top_logprobs or []) for o in outputs]


# Logprobs of the same tokens batched differently: float32 rounding apart.
LOGPROB_TOL = 1e-4
# The same with an FP8 KV cache (1P1D against colocated, on CPU and GPU): the 1P1D prefill runs its chunks in
# other batches than the colocated reference, and a GEMM's rounding depends on its row count (MKL's on a CPU,
# cuBLAS's and Triton's on a GPU): float32 noise that, on the rare latent element sitting at an e4m3 rounding
# boundary, stores it one FP8 step (up to 1/8 relative) apart. Seen: over 1e-4 on 1 of 32 requests on an H100
# (2.6e-4 at most in the next run, bench/results/gpu_tests_fp8_pd_h100_s31.log), and on 1 of 16 on a CPU CI run
# (a top alternative). Greedy tokens must still be equal; a wrong scale, page or layer moves logprobs by ~1.
FP8_KV_LOGPROB_TOL = 5e-3


def _same_alternatives(got: list[tuple[int, float]], expected: list[tuple[int, float]], tol: float) -> bool:
    """Equal (id, logprob) lists up to `tol`; ids may swap only where their logprobs tie."""
    if len(got) != len(expected):
        return False
    close = all(abs(g[1] - e[1]) < tol for g, e in zip(got, expected, strict=True))
    by_id = dict(expected)
    return close and all(t not in by_id or abs(by_id[t] - v) < tol for t, v in got)


def check_against_reference(llm: LLM, cases: list[Case], results: list[dict[str, Any]],
                            logprob_tol: float = LOGPROB_TOL) -> float:
    """Every result succeeded and equals colocated generation (ids, or their text for completions); the
    logprobs /generate returns match colocated ones within `logprob_tol`. Returns the largest logprob
    difference seen."""
    expected = expected_outputs(llm, cases)
    worst = 0.0
    for i, (case, result, (ids, logprobs, tops)) in enumerate(zip(cases, results, expected, strict=True)):
        where = (i, case.endpoint, case.stream, len(case.prompt))
        assert "error" not in result, (where, result)
        if "ids" in result:
            assert result["ids"] == ids, where
            assert len(result["logprobs"]) == len(ids), where
            diff = max(abs(a - b) for a, b in zip(result["logprobs"], logprobs, strict=True))
            worst = max(worst, diff)
            assert diff < logprob_tol, (where, diff)
            assert len(result["tops"]) == len(ids), where  # the first position's came through the aux slot
            assert all(_same_alternatives(g, e, logprob_tol) for g, e in zip(result["tops"], tops, strict=True)), where
        else:
            assert result["text"] == llm.tokenizer.decode(ids), where
    return worst


def check_concurrent_mixed_requests(system: PDSystem, reference: LLM, n: int, seed: int,
                                    logprob_tol: float = LOGPROB_TOL) -> float:
    """`n` mixed requests sent at once through the router all equal colocated greedy generation (logprobs
    within `logprob_tol`); then both workers go back to idle with no errors counted. Returns the largest
    logprob difference seen."""
    cases = mixed_cases(n, seed=seed, vocab=reference.config.vocab_size)
    spans = {system.prefill.url: ("prefill_forward", "kv_send"), system.decode.url: ("decode_page_wait", "kv_wait")}
    before = {url: get_json(url + "/server_info") for url in spans}
    with cf.ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda c: run_case(system.router.url, c), cases))
    worst = check_against_reference(reference, cases, results, logprob_tol)
    for worker in (system.prefill, system.decode):
        info = wait_idle(worker.url)
        assert info["num_errors"] == 0
        for span in spans[worker.url]:  # every request's stage times were summed once, on its DP group
            assert info[f"{span}_count"] - before[worker.url][f"{span}_count"] == n, (worker.name, span)
            assert info[f"{span}_us_total"] > before[worker.url][f"{span}_us_total"], (worker.name, span)
    return worst


def check_decode_reuse_across_turns(system: PDSystem, model_dir: Path, decode_attn_tp: int = 1,
                                    prefill_counts: bool = True) -> None:
    """Decode-side reuse (a decode worker with `--decode-prefix-cache`). Two conversations, four lockstep turns
    through the router (each prompt = the last prompt + its answer + a new message): from turn 1 on the decode
    instance holds the conversation's earlier pages (prompt and answer but its last token) and the prefill
    instance writes only the pages after them into each of the `decode_attn_tp` decode ranks of the group
    (its counters say exactly how many), while every answer equals a cache-off colocated run's greedy tokens;
    both pools end idle. `prefill_counts` False: the prefill instance's counters are its DP-group leaders' only
    (several ranks per prefill DP group take turns as real sources), so only decode's count is checked."""
    rng = random.Random(2020)
    vocab = system.vocab_size
    shared = [rng.randrange(2, vocab) for _ in range(3 * PAGE_SIZE + 5)]
    conversations = [list(shared) for _ in range(2)]
    cache_off = LLM(model_dir, page_size=PAGE_SIZE, prefix_cache=False)
    page_bytes = None
    try:
        for turn in range(4):
            prompts = [c + [rng.randrange(2, vocab) for _ in range(19 + 7 * i)] for i, c in enumerate(conversations)]
            cases = [Case(p, 7, "/generate" if (turn + i) % 2 else "/v1/completions", stream=turn % 2 == 1)
                     for i, p in enumerate(prompts)]
            expected = [o.token_ids for o in cache_off.generate(prompts, [c.params() for c in cases])]
            before_p, before_d = wait_idle(system.prefill.url), wait_idle(system.decode.url)
            with cf.ThreadPoolExecutor(len(cases)) as pool:
                results = list(pool.map(lambda c: run_case(system.router.url, c), cases))
            check_against_reference(cache_off, cases, results)
            after_p, after_d = wait_idle(system.prefill.url), wait_idle(system.decode.url)
            held = [0 if turn == 0 else min((len(c) - 1) // PAGE_SIZE, (len(p) - 1) // PAGE_SIZE)
                    for c, p in zip(conversations, prompts, strict=True)]
            written = sum(-(-len(p) // PAGE_SIZE) for p in prompts) - sum(held)
            assert after_d["decode_reused_tokens"] - before_d["decode_reused_tokens"] == sum(held) * PAGE_SIZE
            if prefill_counts:
                pages = after_p["kv_pages_sent"] - before_p["kv_pages_sent"]
                sent = after_p["kv_bytes_sent"] - before_p["kv_bytes_sent"]
                assert pages == decode_attn_tp * written, (turn, pages, written, held)
                page_bytes = page_bytes or sent // pages
                assert sent == pages * page_bytes
                if turn:  # measurably less than the whole prompts' pages, which a decode without reuse receives
                    assert sum(held) >= 2 * 4 and sent < decode_attn_tp * (written + sum(held)) * page_bytes
            for c, p, ids in zip(conversations, prompts, expected, strict=True):
                c[:] = p + ids
    finally:
        cache_off.close()
