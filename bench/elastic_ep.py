"""Elastic EP under load: a decode (or prefill) instance scales 2 -> 4 -> 2 DP groups while streaming requests run
through the router, with the wall time of each scale and the longest token gap a client saw during it.

    python -m bench.elastic_ep                  # CPU, tiny model: bench/results/elastic_ep_cpu.json + .png
    python -m bench.elastic_ep --role prefill   # the prefill scales: bench/results/elastic_ep_prefill_cpu.*

Router + one prefill instance + one decode instance on this machine; the one that scales runs tp 2 dp 2 with
EPLB (redundant experts, rebalancing every few steps), the other tp 1. ``--streams`` streaming ``/generate``
requests start one after another in three shares (``run_workload``): half before the scale-up, a quarter on
the 4-group layout before the scale-down (the new DP groups take them, so the scale-down must drain them), a
quarter during the scale-down; the scales are posted to the scaling worker's ``/scale_elastic_ep``. A prefill
scale shows in the streams as the first token's wait (the prefill serves each request once): each scale's
row also has the longest time to first token of the streams waiting for it during the scale. Every request's
tokens are compared with a static run (colocated greedy generation of the same prompts in this process). A
token gap is the time between two consecutive streamed events of one request; the gaps that overlap a scale's
window (POST sent -> answered) are that scale's, the others the baseline. ``tests/test_elastic_scale.py`` and
``tests/test_elastic_prefill.py`` run the same workload (``run_workload``).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import http.client
import json
import random
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
PAGE_SIZE = 16


@dataclass
class StreamTrace:
    """One streamed request: its final output ids and when each event arrived (monotonic seconds)."""

    ids: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    error: str | None = None
    started: float = 0.0


@dataclass(frozen=True)
class ScaleStep:
    """One POST /scale_elastic_ep as the client saw it."""

    new_dp: int
    started: float
    ended: float
    status: int
    body: dict[str, Any]


def stream_generate(base_url: str, prompt: list[int], max_new_tokens: int, timeout_s: float = 300) -> StreamTrace:
    """A streaming greedy ``/generate``; each ``data:`` event's arrival time is recorded."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    trace = StreamTrace(started=time.monotonic())
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    try:
        body = {"input_ids": prompt, "stream": True,
                "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}}
        conn.request("POST", "/generate", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            trace.error = f"{response.status}: {response.read()[:300]!r}"
            return trace
        while True:
            line = response.readline()
            if not line:
                break
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                trace.error = json.dumps(event["error"])
                break
            trace.times.append(time.monotonic())
            trace.ids = event["output_ids"]
    except OSError as exc:
        trace.error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    return trace


def post_scale(decode_url: str, new_dp: int, timeout_s: float = 600) -> ScaleStep:
    started = time.monotonic()
    request = urllib.request.Request(decode_url + "/scale_elastic_ep", method="POST",
                                     data=json.dumps({"new_data_parallel_size": new_dp}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    return ScaleStep(new_dp, started, time.monotonic(), status, json.loads(raw))


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randrange(4, 40))] for _ in range(n)]


def lengths(n: int, max_new_tokens: int) -> list[int]:
    """Tokens per stream, in ``run_workload``'s shares for a scale up and back: the first half (streaming while
    new ranks load) and the last quarter (starting with the scale-down, on the ranks that stay while the leaving
    ones drain) 4x longer, so that some are still running when each scale switches, however long the loading or
    the drain takes. The quarter between, which the scale-down drains, stays short."""
    long_share = [i < n // 2 or i >= n // 2 + (n - n // 2) // 2 for i in range(n)]
    return [4 * max_new_tokens if long else max_new_tokens for long in long_share]


def run_workload(router_url: str, scale_url: str, cases: list[list[int]], max_new_tokens: list[int],
                 scales: list[int], stagger_s: float, first_scale_after_s: float, between_scales_s: float = 0.5,
                 on_scale: Callable[[ScaleStep], None] | None = None) -> tuple[list[StreamTrace], list[ScaleStep]]:
    """Streams in phases, so that every layout serves some: half of ``cases`` start first (one every
    ``stagger_s``) and the first scale is posted to ``scale_url`` (the worker that scales) ``first_scale_after_s``
    later; once a scale is answered the next
    share of streams starts, and ``between_scales_s`` later the next scale is posted (so a scale-down finds
    the new DP groups holding requests and must drain them); the last share starts with the last scale. Returns
    every trace (in ``cases`` order) and every scale step."""
    traces: list[StreamTrace | None] = [None] * len(cases)
    first = len(cases) // 2
    rest = len(cases) - first
    bounds = [0, first] + [first + rest * (i + 1) // len(scales) for i in range(len(scales))]
    steps: list[ScaleStep] = []
    with cf.ThreadPoolExecutor(len(cases) + 1) as pool:
        futures: dict[cf.Future[StreamTrace], int] = {}

        def launch(lo: int, hi: int) -> None:
            for i in range(lo, hi):
                futures[pool.submit(stream_generate, router_url, cases[i], max_new_tokens[i])] = i
                time.sleep(stagger_s)

        launchers = [threading.Thread(target=launch, args=(bounds[0], bounds[1]))]
        launchers[0].start()
        time.sleep(first_scale_after_s)
        for i, new_dp in enumerate(scales):
            if i:
                time.sleep(between_scales_s)
            posted = pool.submit(post_scale, scale_url, new_dp)
            if i == len(scales) - 1:  # the last share streams while the last scale runs
                launchers.append(threading.Thread(target=launch, args=(bounds[i + 1], bounds[i + 2])))
                launchers[-1].start()
            step = posted.result()
            steps.append(step)
            if on_scale is not None:
                on_scale(step)
            if i < len(scales) - 1:  # the next share lands on the layout this scale made
                launchers.append(threading.Thread(target=launch, args=(bounds[i + 1], bounds[i + 2])))
                launchers[-1].start()
        for launcher in launchers:
            launcher.join()
        for future in cf.as_completed(list(futures)):
            traces[futures[future]] = future.result()
    return [t for t in traces if t is not None], steps


def gaps_in(traces: list[StreamTrace], start: float, end: float) -> list[float]:
    """Every token gap whose interval overlaps ``[start, end]``."""
    out = []
    for trace in traces:
        for a, b in zip(trace.times, trace.times[1:], strict=False):
            if b >= start and a <= end:
                out.append(b - a)
    return out


def ttfts_in(traces: list[StreamTrace], start: float, end: float) -> list[float]:
    """Time to first token of every stream whose wait for it overlaps ``[start, end]``."""
    return [t.times[0] - t.started for t in traces if t.times and t.times[0] >= start and t.started <= end]


def _median(values: list[float]) -> float | None:
    return sorted(values)[len(values) // 2] if values else None


def summarize(traces: list[StreamTrace], steps: list[ScaleStep]) -> dict[str, Any]:
    """Per scale: wall time, the server's own timings, the longest and median gap during it, the longest time to
    first token of the streams waiting for theirs during it; the baseline of each outside every scale."""
    windows = [(s.started, s.ended) for s in steps]
    baseline = []
    for trace in traces:
        for a, b in zip(trace.times, trace.times[1:], strict=False):
            if not any(b >= lo and a <= hi for lo, hi in windows):
                baseline.append(b - a)
    base_median = _median(baseline)
    base_ttft = _median([t.times[0] - t.started for t in traces
                         if t.times and not any(t.times[0] >= lo and t.started <= hi for lo, hi in windows)])
    rows = []
    for step in steps:
        gaps = gaps_in(traces, step.started, step.ended)
        ttfts = ttfts_in(traces, step.started, step.ended)
        in_flight = sum(1 for t in traces if t.times and t.started <= step.ended and t.times[-1] >= step.started)
        # Streams with tokens on both sides of the switch (the turn boundary ends just before the answer).
        switch = step.ended - step.body.get("pause_s", 0.0)
        across = sum(1 for t in traces if t.times and t.times[0] < switch and t.times[-1] > step.ended)
        rows.append({"new_dp": step.new_dp, "status": step.status, "wall_s": round(step.ended - step.started, 4),
                     "server": step.body, "streams_in_flight": in_flight, "streams_across_switch": across,
                     "max_gap_s": round(max(gaps), 4) if gaps else None,
                     "median_gap_s": round(sorted(gaps)[len(gaps) // 2], 4) if gaps else None,
                     "streams_waiting_first_token": len(ttfts),
                     "max_ttft_s": round(max(ttfts), 4) if ttfts else None,
                     # The same run's token gap outside any scale is the yardstick.
                     "max_gap_vs_baseline_median": round(max(gaps) / base_median, 2) if gaps and base_median else None,
                     "pause_vs_baseline_median": (round(step.body["pause_s"] / base_median, 2)
                                                  if base_median and "pause_s" in step.body else None)})
    return {"scales": rows,
            "baseline_max_gap_s": round(max(baseline), 4) if baseline else None,
            "baseline_median_gap_s": round(base_median, 4) if base_median else None,
            "baseline_median_ttft_s": round(base_ttft, 4) if base_ttft else None,
            "requests": len(traces), "failed": sum(1 for t in traces if t.error)}


def plot(traces: list[StreamTrace], steps: list[ScaleStep], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min(t.started for t in traces)
    fig, ax = plt.subplots(figsize=(10, 5))
    for i, trace in enumerate(traces):
        times = [t - t0 for t in trace.times]
        ax.plot(times, [i] * len(times), "|", markersize=4, color="tab:blue")
    for step in steps:
        color = "tab:green" if step.status == 200 else "tab:red"
        ax.axvspan(step.started - t0, step.ended - t0, alpha=0.2, color=color)
        ax.text(step.started - t0, len(traces) + 0.5, f"-> dp {step.new_dp} ({step.status})", fontsize=8)
    ax.set_xlabel("seconds since the first request")
    ax.set_ylabel("stream")
    ax.set_title("token arrivals of each stream; shaded: POST /scale_elastic_ep in flight")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.elastic_ep", description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--stagger-s", type=float, default=0.1)
    parser.add_argument("--first-scale-after-s", type=float, default=1.0)
    parser.add_argument("--backend", default="nixl")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: every rank on its own GPU (rank r on cuda:r; NCCL), float32 like the static "
                             "run on the CPU it is compared with; 2 -> 4 ranks needs four GPUs")
    parser.add_argument("--role", choices=("decode", "prefill"), default="decode",
                        help="the instance that scales (the other runs tp 1)")
    parser.add_argument("--out", default=None,
                        help="results path without suffix; unset: bench/results/elastic_ep[_prefill]_<device>")
    args = parser.parse_args(argv)
    stem = "elastic_ep" if args.role == "decode" else "elastic_ep_prefill"
    out = Path(args.out or RESULTS / f"{stem}_{args.device}")
    prefill_flags, decode_flags = ([], DECODE_FLAGS) if args.role == "decode" else (PREFILL_FLAGS, [])

    from bench.pd_servers import ServerGroup, cpu_worker_env, free_port, wait_healthy, wait_idle
    from engine.llm import LLM
    from engine.sampling import SamplingParams
    from engine.tiny_model import write_tiny_model

    work = Path(tempfile.mkdtemp(prefix="elastic-ep-"))
    model = write_tiny_model(work / "tiny-v3")
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    cases = prompts(args.streams, vocab)
    bootstrap, p_port, d_port, r_port = free_port(), free_port(), free_port(), free_port()
    common = ["--model", str(model), "--host", "127.0.0.1", "--transfer-backend", args.backend, "--page-size",
              str(PAGE_SIZE), "--max-total-tokens", "8192", "--log-level", "warning",
              # Low-latency EP sizes its fixed per-step buffers for the largest forward: the default 8192-token
              # prefill budget would pad every decode step of the tiny model to 8192 rows per rank.
              "--max-prefill-tokens", "64", "--device", args.device]
    if args.device == "cuda":
        common += ["--dtype", "float32"]
    with ServerGroup(work / "logs", cpu_worker_env(1) if args.device == "cpu" else {}) as servers:
        prefill = servers.start("prefill", "prefill_worker", [*common, "--port", str(p_port), "--bootstrap-port",
                                                              str(bootstrap), *prefill_flags], p_port)
        decode = servers.start("decode", "decode_worker", [*common, "--port", str(d_port), *decode_flags], d_port)
        wait_healthy([prefill, decode])
        router = servers.start("router", "router", ["--host", "127.0.0.1", "--port", str(r_port), "--prefill",
                                                    prefill.url, str(bootstrap), "--decode", decode.url], r_port)
        wait_healthy([router])
        scaling = decode if args.role == "decode" else prefill
        traces, steps = run_workload(router.url, scaling.url, cases, lengths(len(cases), args.max_new_tokens), [4, 2],
                                     args.stagger_s, args.first_scale_after_s)
        wait_idle(decode.url)
        wait_idle(prefill.url)
    llm = LLM(model, page_size=PAGE_SIZE)
    try:
        params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths(len(cases), args.max_new_tokens)]
        expected = [o.token_ids for o in llm.generate(cases, params)]
    finally:
        llm.close()
    summary = summarize(traces, steps)
    summary["tokens_equal_static_run"] = all(t.ids == e for t, e in zip(traces, expected, strict=True))
    summary["setup"] = {"streams": args.streams, "max_new_tokens": lengths(len(cases), args.max_new_tokens),
                        "stagger_s": args.stagger_s,
                        "role": args.role, "prefill_flags": prefill_flags or "tp 1",
                        "decode_flags": decode_flags or "tp 1", "backend": args.backend, "device": args.device}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(traces, steps, out.with_suffix(".png"))
    print(json.dumps(summary, indent=1))
    return 0 if summary["tokens_equal_static_run"] and not summary["failed"] else 1


# The decode instance of the workload: tp 2 dp 2 with EPLB (4 redundant slots: 12 physical experts split over 2
# or 4 ranks; a rebalance every 16 steps, also across the scales).
DECODE_FLAGS = ["--tp", "2", "--dp", "2", "--enable-eplb", "--eplb-config",
                '{"num_redundant_experts": 4, "step_interval": 16, "window_size": 64}',
                "--elastic-ep-join-timeout", "10"]
# The prefill instance of ``--role prefill``: the same layout and EPLB (a prefill step is one chunk of prompts, so
# rebalances come every few requests).
PREFILL_FLAGS = DECODE_FLAGS


if __name__ == "__main__":
    raise SystemExit(main())
