"""1P1D against colocated serving on the same resources, with the same workload: one table and one PNG.

    python -m bench.compare_pd [--input-len 256 --output-len 32 --num-prompts 32 --max-concurrency 8] \\
        [--device cpu|cuda] [--model DIR] [--transfer-backend nixl|mooncake]

Setups, run one after the other (each started, measured, checked idle and stopped before the next):
  1p1d       router -> 1 prefill worker (tp1) + 1 decode worker (tp1); the KV moves through the transfer
             engine (NIXL by default).
  colocated  router -> 2 decode workers (tp1) and no prefill worker, so every request is decode-only: the
             worker that gets it prefills and decodes it (the router's short-prompt path; the threshold is
             also set above every prompt to say so). Same processes, ranks and threads as 1p1d: two
             single-rank workers, `--threads` torch threads each, the same router.
Both get the same `bench.serving` run (fixed seed, token-id prompts, `/generate` streaming through the
router, one warm-up request). The table gives TTFT and ITL p50/p99, req/s and output tok/s, and the
1P1D/colocated ratio; JSON goes to bench/results/compare_pd_<device>.json with both runs in full, the PNG
overlays their latency CDFs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.gpu_mps import client_env, gpu_names, mps_available, mps_daemon
from bench.pd_servers import Server, ServerGroup, cpu_worker_env, free_port, wait_healthy, wait_idle
from bench.serving import BenchConfig, run_benchmark, run_or_exit

log = logging.getLogger("bench.compare_pd")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SETUPS = ("1p1d", "colocated")
# (row name, summary key, stat or None, higher is better)
TABLE_ROWS: tuple[tuple[str, str, str | None, bool], ...] = (
    ("TTFT p50 (ms)", "ttft_ms", "p50", False),
    ("TTFT p99 (ms)", "ttft_ms", "p99", False),
    ("ITL p50 (ms)", "itl_ms", "p50", False),
    ("ITL p99 (ms)", "itl_ms", "p99", False),
    ("ITL max (ms)", "itl_ms", "max", False),
    ("E2E p50 (ms)", "e2e_ms", "p50", False),
    ("throughput (req/s)", "request_throughput", None, True),
    ("output throughput (tok/s)", "output_throughput", None, True),
    ("total throughput (tok/s)", "total_token_throughput", None, True),
)


def _worker_flags(args: argparse.Namespace, port: int) -> list[str]:
    context = args.input_len + args.output_len
    flags = [
        "--model", args.model, "--load-format", args.load_format, "--device", args.device, "--tp", "1",
        "--host", "127.0.0.1", "--port", str(port), "--page-size", str(args.page_size),
        "--transfer-backend", args.transfer_backend,
        "--max-total-tokens", str(max(65536, 2 * context * args.max_concurrency)),
        "--log-level", "warning",
    ]  # fmt: skip
    if args.max_prefill_tokens:
        flags += ["--max-prefill-tokens", str(args.max_prefill_tokens)]
    if args.disable_overlap_schedule:
        flags.append("--disable-overlap-schedule")
    return flags


def _graph_flags(args: argparse.Namespace) -> list[str]:
    """Decode workers (both setups' alike) replay CUDA graphs up to this batch size; 0: eager."""
    return ["--cuda-graph-max-bs", str(args.cuda_graph_max_bs)] if args.cuda_graph_max_bs else []


def _router_flags(port: int) -> list[str]:
    return ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]


def add_worker_args(p: argparse.ArgumentParser) -> None:
    """The flags ``_worker_flags`` and ``_graph_flags`` read (every bench that calls ``start_setup`` takes them)."""
    p.add_argument("--transfer-backend", choices=["nixl", "mooncake"], default="nixl")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--cuda-graph-max-bs", type=int, default=0, help="decode workers' CUDA graphs (GPU); 0: eager")
    p.add_argument("--max-prefill-tokens", type=int, default=None,
                   help="the workers' tokens per prefill forward (default: the workers' own)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (CPU)")
    p.add_argument("--disable-overlap-schedule", action="store_true",
                   help="the workers' flag: decode turns wait for their forward (engine.decode_overlap)")


def add_gpu_sharing_args(p: argparse.ArgumentParser) -> None:
    """The flags `start_setup` reads (every bench that starts a 1P1D setup takes them)."""
    p.add_argument("--mps", action=argparse.BooleanOptionalAction, default=None,
                   help="GPU: run the servers under a private CUDA MPS daemon (kernels of both share the SMs); "
                        "default: where nvidia-cuda-mps-control is installed, as scripts/launch_1p1d.sh deploys "
                        "one GPU's 1P1D (TANDEM_MPS=auto)")
    p.add_argument("--mps-prefill-sm", type=int, default=None, help="with --mps: the prefill's SM share, percent")
    p.add_argument("--mps-decode-sm", type=int, default=None, help="with --mps: the decode's SM share, percent")
    p.add_argument("--mps-low-priority", choices=("prefill", "decode"), default=None,
                   help="with --mps: the role whose kernels get MPS's below-normal client priority")


def use_mps(args: argparse.Namespace) -> bool:
    """``--mps`` / ``--no-mps`` as given; without either, MPS on CUDA where its control daemon is installed (the
    servers of a setup share one GPU, and the deployment script runs such a pair under MPS by default)."""
    return args.mps if args.mps is not None else args.device == "cuda" and mps_available()


def sharing_env(stack: contextlib.ExitStack, args: argparse.Namespace, directory: Path) -> dict[str, str]:
    """Under MPS (``use_mps``): a private daemon under ``directory`` for the stack's life, and the env its clients
    need."""
    if not use_mps(args):
        return {}
    log.info("servers under a private MPS daemon (%s; --no-mps: without)", "--mps" if args.mps else "default")
    return stack.enter_context(mps_daemon(directory))


def start_setup(name: str, group: ServerGroup, args: argparse.Namespace) -> tuple[Server, list[Server]]:
    """Start one setup's workers, then its router; (router, workers) once all are healthy."""
    router_port = free_port()
    router_args = _router_flags(router_port)
    if name == "1p1d":
        p_port, d_port, boot = free_port(), free_port(), free_port()
        prefill = group.start("prefill", "prefill_worker", [*_worker_flags(args, p_port),
                              "--bootstrap-port", str(boot)], p_port,
                              client_env(args.mps_prefill_sm, args.mps_low_priority == "prefill"))  # fmt: skip
        decode = group.start("decode", "decode_worker", _worker_flags(args, d_port) + _graph_flags(args), d_port,
                             client_env(args.mps_decode_sm, args.mps_low_priority == "decode"))
        workers = [prefill, decode]
        router_args += ["--prefill", prefill.url, str(boot), "--decode", decode.url]
    else:
        ports = [free_port(), free_port()]
        workers = [group.start(f"colocated{i}", "decode_worker", _worker_flags(args, port) + _graph_flags(args), port)
                   for i, port in enumerate(ports)]  # fmt: skip
        router_args += ["--short-prompt-threshold", str(args.input_len + 1)]
        for worker in workers:
            router_args += ["--decode", worker.url]
    wait_healthy(workers)
    router = group.start("router", "router", router_args, router_port)
    wait_healthy([router])
    return router, workers


def warm_up(url: str, input_len: int) -> None:
    """One short greedy request straight to a worker (not through the router)."""
    body = {"input_ids": [1 + i % 100 for i in range(input_len)],
            "sampling_params": {"max_new_tokens": 4, "temperature": 0.0, "ignore_eos": True}}  # fmt: skip
    request = urllib.request.Request(f"{url}/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=300) as response:
        response.read()


def run_setup(name: str, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """Start, measure, check idle, stop: one setup's `bench.serving` report with its setup notes."""
    env = cpu_worker_env(args.threads) if args.device == "cpu" else {}
    load_before = os.getloadavg()  # the machine may be shared: say how busy it was
    with contextlib.ExitStack() as stack:
        env.update(sharing_env(stack, args, Path(args.log_dir) / name / "mps"))
        return _measure_setup(name, args, vocab, env, load_before)


def _measure_setup(name: str, args: argparse.Namespace, vocab: int, env: dict[str, str],
                   load_before: tuple[float, float, float]) -> dict[str, Any]:
    with ServerGroup(Path(args.log_dir) / name, env) as group:
        started = time.monotonic()
        log.info("[%s] starting workers and router", name)
        router, workers = start_setup(name, group, args)
        log.info("[%s] healthy after %.1f s; benchmarking", name, time.monotonic() - started)
        if name == "colocated":
            # bench.serving's warm-up request reaches one worker; the other would meet its first prefill
            # (Triton compiles, allocator growth) inside the measurement: seen on one H100 as 4 requests
            # with 5-6 s TTFT and colocated TTFT p99 6.1 s. 1P1D has one worker per role, so its warm-up
            # reaches both.
            for worker in workers:
                warm_up(worker.url, args.input_len)
        config = BenchConfig(
            base_url=router.url, backend="sglang", random_input_len=args.input_len,
            random_output_len=args.output_len, num_prompts=args.num_prompts, request_rate=args.request_rate,
            max_concurrency=args.max_concurrency, seed=args.seed, prompt_format="ids", vocab_size=vocab,
            label=name, max_duration_s=args.max_duration_s, disable_tqdm=args.disable_tqdm,
        )  # fmt: skip
        report = run_benchmark(config)
        idle = [wait_idle(w.url) for w in workers]
    report["setup"] = {
        "workers": [w.name for w in workers],
        "torch_threads_per_worker": args.threads if args.device == "cpu" else None,
        "transfer_backend": args.transfer_backend if name == "1p1d" else None,
        "pages_idle_after_run": all(i["free_pages"] + i.get("evictable_pages", 0) == i["total_pages"] for i in idle),
        "load_average_1m_before": load_before[0],
        "cpu_count": os.cpu_count(),
        "mps": {"prefill_sm_pct": args.mps_prefill_sm, "decode_sm_pct": args.mps_decode_sm,
                "low_priority": args.mps_low_priority, "chosen_by": "flag" if args.mps else "default"}
        if use_mps(args) else None,
    }
    return report


def _setups(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in SETUPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"setups are {', '.join(SETUPS)}; got {text!r}")
    return names


def _value(summary: dict[str, Any], key: str, stat: str | None) -> float | None:
    value = summary[key] if stat is None else summary[key][stat]
    return None if value is None else float(value)


def comparison_rows(reports: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per metric: each setup's value and the 1P1D/colocated ratio."""
    rows = []
    for title, key, stat, higher_better in TABLE_ROWS:
        values = {name: _value(reports[name]["summary"], key, stat) if name in reports else None for name in SETUPS}
        pd, colo = values["1p1d"], values["colocated"]
        ratio = pd / colo if pd is not None and colo else None
        rows.append({"metric": title, **values, "ratio_1p1d_over_colocated": ratio,
                     "higher_is_better": higher_better})  # fmt: skip
    return rows


def format_table(rows: list[dict[str, Any]], title: str) -> str:
    def cell(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    lines = [title, f"{'metric':<28}{'1P1D':>12}{'colocated':>12}{'1P1D/colo':>12}"]
    for row in rows:
        lines.append(f"{row['metric']:<28}{cell(row['1p1d']):>12}{cell(row['colocated']):>12}"
                     f"{cell(row['ratio_1p1d_over_colocated']):>12}")  # fmt: skip
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.model is None:
        from engine.server.serve import resolve_model_dir

        args.model = resolve_model_dir(None)
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    reports = {name: run_setup(name, args, vocab) for name in args.setups}
    rows = comparison_rows(reports)
    cfg = next(iter(reports.values()))["config"]
    gpus = gpu_names() if args.device == "cuda" else []
    device = f"{args.device} ({', '.join(sorted(set(gpus)))})" if gpus else args.device
    title = (f"1P1D vs colocated, {device}, model {Path(args.model).name}: in={args.input_len} "
             f"out={args.output_len} n={args.num_prompts} conc={cfg['max_concurrency']} "
             f"rate={cfg['request_rate'] or 'inf'}")  # fmt: skip
    json_path = Path(args.output_json or RESULTS_DIR / f"compare_pd_{args.device}.json")
    plot_path = Path(args.plot or json_path.with_suffix(".png"))
    result = {
        "format_version": 1,
        "title": title,
        "machine": {"node": platform.node(), "processor": platform.processor() or platform.machine(),
                    "gpus": gpus},
        "model": args.model,
        "device": args.device,
        "table": rows,
        "runs": reports,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    from bench.serving_plots import write_plot

    write_plot(list(reports.values()), plot_path)
    result["paths"] = {"json": str(json_path), "plot": str(plot_path)}
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.compare_pd",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-concurrency", type=int, default=8)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson req/s; inf: all at once")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default=None, help="checkpoint dir (default: the embedded tiny model)")
    p.add_argument("--load-format", choices=["auto", "dummy"], default="auto")
    add_worker_args(p)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-duration-s", type=float, default=300.0, help="per setup")
    p.add_argument("--output-json", default=None, help="default bench/results/compare_pd_<device>.json")
    p.add_argument("--plot", default=None, help="default: the JSON path with .png")
    p.add_argument("--log-dir", default="runs/compare_pd", help="each server's log goes under here")
    p.add_argument("--disable-tqdm", action="store_true")
    add_gpu_sharing_args(p)
    p.add_argument("--setups", type=_setups, default=SETUPS,
                   help="comma-separated, of 1p1d,colocated (default both; one alone leaves the ratio n/a)")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    result = run_or_exit(run, args, (args.input_len, args.output_len, args.num_prompts, args.max_concurrency))
    print(format_table(result["table"], result["title"]))
    print(f"results: {result['paths']['json']}\nplot: {result['paths']['plot']}")
    completed = [run["summary"]["completed"] for run in result["runs"].values()]
    return 0 if all(c == args.num_prompts for c in completed) else 1


if __name__ == "__main__":
    sys.exit(main())
