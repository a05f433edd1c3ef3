"""DP routing by the instances (`--dp-routing internal`) against by the router (`router`), one skewed workload
through the same prefill and decode instances: one table and one PNG.

    python -m bench.compare_dp_routing [--tp 2 --dp 2 --num-prompts 96 --short-len 16 --long-len 440
        --long-every 8 --output-len 64 --request-rate 16 --rounds 4] [--device cpu|cuda] [--model DIR]

Setup: P (tp, dp) + D (tp, dp) started once; two routers in front of them, one per mode; `bench.serving`
sends the same skewed mix (every `--long-every`-th prompt `--long-len` tokens, the rest `--short-len`;
Poisson arrivals, fixed seed) through each router in turn (`--rounds` times, alternating, so that neither
mode always runs on a warmer or quieter machine). While a run goes on, both workers' `/get_load` is sampled
every `--sample-ms`: the spread of per-DP-group load is the gap between the most and the least loaded
group's tokens in flight at each sample (0: even). The table gives TTFT and ITL p50/p99 and the mean and
p90 spread on each instance, with the router/internal ratio; JSON + PNG go to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.pd_servers import Server, ServerGroup, cpu_worker_env, free_port, get_json, wait_healthy, wait_idle
from bench.serving import BenchConfig, run_benchmark, run_or_exit

log = logging.getLogger("bench.compare_dp_routing")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODES = ("internal", "router")


class LoadSampler:
    """Samples each worker's per-DP-group tokens in flight (`/get_load`) on a thread until `stop()`."""

    def __init__(self, workers: dict[str, str], period_s: float) -> None:
        self.workers, self.period_s = workers, period_s
        self.samples: dict[str, list[tuple[float, list[int]]]] = {name: [] for name in workers}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = 0.0

    def __enter__(self) -> LoadSampler:
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, url in self.workers.items():
                try:
                    load = get_json(url + "/get_load", timeout_s=2.0)
                except (OSError, ValueError):
                    continue
                tokens = [int(g["tokens_in_flight"]) for g in sorted(load["dp_groups"], key=lambda g: g["dp_rank"])]
                self.samples[name].append((time.monotonic() - self._start, tokens))
            self._stop.wait(self.period_s)


def spread_stats(samples: list[tuple[float, list[int]]]) -> dict[str, float | None]:
    """Mean and p90 of (max - min) group tokens over the samples where the instance had any load."""
    gaps = [max(t) - min(t) for _, t in samples if t and sum(t) > 0]
    if not gaps:
        return {"mean": None, "p90": None, "busy_samples": 0}
    return {"mean": float(np.mean(gaps)), "p90": float(np.percentile(gaps, 90)), "busy_samples": len(gaps)}


def _worker_flags(args: argparse.Namespace, port: int) -> list[str]:
    return ["--model", args.model, "--load-format", args.load_format, "--device", args.device,
            "--tp", str(args.tp), "--dp", str(args.dp), "--host", "127.0.0.1", "--port", str(port),
            "--page-size", str(args.page_size), "--transfer-backend", args.transfer_backend,
            "--max-prefill-tokens", str(args.max_prefill_tokens), "--max-total-tokens", "65536",
            "--log-level", "warning"]  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.model is None:
        from engine.server.serve import resolve_model_dir

        args.model = resolve_model_dir(None)
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    env = cpu_worker_env(args.threads) if args.device == "cpu" else {}
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    samples: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    load_before = os.getloadavg()
    with ServerGroup(Path(args.log_dir), env) as group:
        p_port, d_port, boot = free_port(), free_port(), free_port()
        prefill = group.start("prefill", "prefill_worker", [*_worker_flags(args, p_port), "--bootstrap-port",
                                                            str(boot)], p_port)  # fmt: skip
        decode = group.start("decode", "decode_worker", _worker_flags(args, d_port), d_port)
        wait_healthy([prefill, decode])
        routers: dict[str, Server] = {}
        for mode in MODES:
            port = free_port()
            routers[mode] = group.start(f"router-{mode}", "router", [
                "--host", "127.0.0.1", "--port", str(port), "--prefill", prefill.url, str(boot),
                "--decode", decode.url, "--dp-routing", mode, "--log-level", "warning"], port)  # fmt: skip
        wait_healthy(list(routers.values()))
        for round_index in range(args.rounds):
            for mode in MODES if round_index % 2 == 0 else reversed(MODES):
                config = BenchConfig(
                    base_url=routers[mode].url, backend="sglang", random_input_len=args.short_len,
                    random_output_len=args.output_len, skew_long_len=args.long_len,
                    skew_long_every=args.long_every, num_prompts=args.num_prompts,
                    request_rate=args.request_rate, seed=args.seed + round_index, prompt_format="ids",
                    vocab_size=vocab, label=mode, disable_tqdm=True, warmup_requests=2,
                )  # fmt: skip
                log.info("round %d: --dp-routing %s", round_index, mode)
                with LoadSampler({"prefill": prefill.url, "decode": decode.url}, args.sample_ms / 1000) as sampler:
                    report = run_benchmark(config)
                runs[mode].append(report)
                samples[mode].append(sampler.samples)
                for worker in (prefill, decode):
                    wait_idle(worker.url, timeout_s=60)
    return summarize(args, runs, samples, load_before[0])


def _pooled(reports: list[dict[str, Any]], key: str, q: float) -> float | None:
    """Percentile `q` of `key` ("ttft_ms", or "itl_ms": every gap) over the successful requests of all rounds."""
    flat: list[float] = []
    for report in reports:
        for record in report["requests"]:
            value = record.get(key)
            if record.get("success") and value is not None:
                flat.extend(value if isinstance(value, list) else [value])
    return float(np.percentile(flat, q)) if flat else None


def summarize(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]],
              samples: dict[str, list[dict[str, Any]]], load_1m: float) -> dict[str, Any]:
    table: list[dict[str, Any]] = []
    for title, key, q in (("TTFT p50 (ms)", "ttft_ms", 50), ("TTFT p99 (ms)", "ttft_ms", 99),
                          ("ITL p50 (ms)", "itl_ms", 50), ("ITL p99 (ms)", "itl_ms", 99)):
        values = {mode: _pooled(runs[mode], key, q) for mode in MODES}
        table.append({"metric": title, **values})
    for role in ("prefill", "decode"):
        for stat in ("mean", "p90"):
            values = {}
            for mode in MODES:
                pooled = [s for round_samples in samples[mode] for s in round_samples[role]]
                values[mode] = spread_stats(pooled)[stat]
            table.append({"metric": f"{role} group spread {stat} (tokens)", **values})
    for row in table:
        a, b = row["internal"], row["router"]
        row["ratio_router_over_internal"] = b / a if a and b is not None else None
    # Kept small: each round's summary (per-request records are pooled above) and the first round's samples.
    runs = {mode: [{k: v for k, v in r.items() if k != "requests"} for r in runs[mode]] for mode in MODES}
    samples = {mode: samples[mode][:1] for mode in MODES}
    title = (f"--dp-routing internal vs router, {args.device}, P and D tp{args.tp} dp{args.dp}: "
             f"{args.num_prompts} prompts x {args.rounds} rounds, {args.short_len} tokens with every "
             f"{args.long_every}th {args.long_len}, out {args.output_len}, {args.request_rate} req/s")
    return {"format_version": 1, "title": title, "table": table, "runs": runs, "load_samples": samples,
            "machine": {"node": platform.node(), "cpu_count": os.cpu_count(), "load_average_1m_before": load_1m},
            "args": {k: v for k, v in vars(args).items() if k not in ("func",)}}


def format_table(result: dict[str, Any]) -> str:
    def cell(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    lines = [result["title"], f"{'metric':<36}{'internal':>12}{'router':>12}{'router/int':>12}"]
    for row in result["table"]:
        lines.append(f"{row['metric']:<36}{cell(row['internal']):>12}{cell(row['router']):>12}"
                     f"{cell(row['ratio_router_over_internal']):>12}")
    return "\n".join(lines)


def write_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = {"internal": "tab:red", "router": "tab:blue"}
    for ax, role in zip(axes[:2], ("prefill", "decode"), strict=True):
        for mode in MODES:
            round_samples = result["load_samples"][mode][0][role]  # the first round, over time
            t = [s[0] for s in round_samples]
            gap = [max(s[1]) - min(s[1]) if s[1] else 0 for s in round_samples]
            ax.plot(t, gap, color=colors[mode], label=f"{mode}", lw=1.2)
        ax.set_title(f"{role}: max - min DP-group tokens in flight (round 0)")
        ax.set_xlabel("seconds into the run")
        ax.set_ylabel("tokens")
        ax.legend()
    rows = [r for r in result["table"] if r["metric"].startswith(("TTFT p99", "ITL p99"))]
    x = np.arange(len(rows))
    for i, mode in enumerate(MODES):
        axes[2].bar(x + (i - 0.5) * 0.38, [r[mode] or 0 for r in rows], 0.38, color=colors[mode], label=mode)
    axes[2].set_xticks(x, [r["metric"] for r in rows])
    axes[2].set_ylabel("ms")
    axes[2].set_title("p99 latency, all rounds pooled")
    axes[2].legend()
    fig.suptitle(result["title"], fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.compare_dp_routing", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--dp", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=96)
    p.add_argument("--short-len", type=int, default=16)
    p.add_argument("--long-len", type=int, default=440, help="the embedded tiny model takes 512 tokens in all")
    p.add_argument("--long-every", type=int, default=8)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=16.0, help="Poisson req/s")
    p.add_argument("--rounds", type=int, default=4, help="runs per mode, alternating which goes first")
    p.add_argument("--sample-ms", type=float, default=50.0, help="how often /get_load is sampled")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default=None, help="checkpoint dir (default: the embedded tiny model)")
    p.add_argument("--load-format", choices=["auto", "dummy"], default="auto")
    p.add_argument("--transfer-backend", choices=["nixl", "mooncake"], default="nixl")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-prefill-tokens", type=int, default=512)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output-json", default=None, help="default bench/results/dp_routing_<device>.json")
    p.add_argument("--plot", default=None, help="default: the JSON path with .png")
    p.add_argument("--log-dir", default="runs/compare_dp_routing")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    result = run_or_exit(run, args)
    json_path = Path(args.output_json or RESULTS_DIR / f"dp_routing_{args.device}.json")
    plot_path = Path(args.plot or json_path.with_suffix(".png"))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result) + "\n")
    write_plot(result, plot_path)
    print(format_table(result))
    print(f"results: {json_path}\nplot: {plot_path}")
    completed = [r["summary"]["completed"] for mode in MODES for r in result["runs"][mode]]  # every round
    return 0 if all(c == args.num_prompts for c in completed) else 1


if __name__ == "__main__":
    sys.exit(main())
