"""Decode profiled alone: one decode worker with the bench KV connector, no prefill instance at all.

    python -m bench.decode_alone --input-len 4096 --output-len 64 --num-prompts 16 --max-concurrency 8 \\
        [--device cpu|cuda] [--model DIR | --load-format dummy --model engine/model_configs/deepseek-v2-lite]

Starts `python -m decode_worker --kv-connector bench` (each request's prompt KV is random values filled
in by the worker, its first token drawn at random), runs `bench.serving` against it with token-id prompts
of `--input-len`, prints the decode numbers (output tok/s, ITL and TPOT percentiles) and writes JSON + PNG
under bench/results/. Every number is labelled "kv-connector=bench, not end-to-end": TTFT here is the
worker's reservation + fill time, not a prefill.

Without `--model`, the embedded tiny DeepSeek-V3 is used; its checkpoint says `max_position_embeddings`
512, which the scheduler enforces, so a copy with a larger value (the next power of two above input +
output, at most 8192 where the model's rope cache ends) is written to runs/tiny-v3-ctx<N>. The weights
are the same random tiny weights; only the context limit changes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from bench.pd_servers import ServerGroup, cpu_worker_env, free_port, get_json, wait_healthy, wait_idle
from bench.serving import BenchConfig, BenchmarkError, run_benchmark, run_or_exit
from bench.serving_metrics import format_summary

log = logging.getLogger("bench.decode_alone")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TINY_ROPE_CACHE_LIMIT = 8192  # engine.model caches rope up to min(max_position_embeddings, 8192)


def tiny_model_with_context(needed_tokens: int, root: Path = Path("runs")) -> Path:
    """The tiny model with `max_position_embeddings` >= `needed_tokens` (written once, then reused)."""
    context = 512
    while context < needed_tokens:
        context *= 2
    if context > TINY_ROPE_CACHE_LIMIT:
        raise ValueError(
            f"the tiny model serves at most {TINY_ROPE_CACHE_LIMIT} tokens; asked {needed_tokens}"
        )
    out = root / f"tiny-v3-ctx{context}"
    config_path = out / "config.json"
    if config_path.exists() and json.loads(config_path.read_text())["max_position_embeddings"] == context:
        return out
    from engine.tiny_model import write_tiny_model

    write_tiny_model(out)
    config = json.loads(config_path.read_text())
    config["max_position_embeddings"] = context
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return out


def decode_worker_args(args: argparse.Namespace, model: str, port: int) -> list[str]:
    """Flags of the one decode worker: KV capacity for every request in flight at its whole length."""
    page = args.page_size
    per_request = -(-(args.input_len + args.output_len) // page) * page
    capacity = per_request * (args.max_concurrency + 1)  # +1: the warm-up request may still be freeing
    flags = [
        "--model", model, "--load-format", args.load_format, "--device", args.device, "--tp", str(args.tp),
        "--host", "127.0.0.1", "--port", str(port), "--page-size", str(page),
        "--max-total-tokens", str(max(capacity, args.max_total_tokens or 0)),
        "--max-running-requests", str(args.max_concurrency), "--kv-connector", "bench",
        "--log-level", "warning",
    ]  # fmt: skip
    if args.cuda_graph_max_bs:
        flags += ["--cuda-graph-max-bs", str(args.cuda_graph_max_bs)]
    return flags


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the worker, `measure` it, stop it; the JSON-ready report."""
    model = args.model or str(tiny_model_with_context(args.input_len + args.output_len + 1))
    port = free_port()
    env = cpu_worker_env(args.threads) if args.device == "cpu" else {}
    with ServerGroup(Path(args.log_dir), env) as group:
        started = time.monotonic()
        log.info(
            "starting one decode worker (--kv-connector bench, %s, tp %d); no prefill instance",
            args.device,
            args.tp,
        )
        worker = group.start("decode", "decode_worker", decode_worker_args(args, model, port), port)
        wait_healthy([worker])
        log.info("decode worker healthy after %.1f s", time.monotonic() - started)
        return measure(worker.url, args, model)


def measure(url: str, args: argparse.Namespace, model: str) -> dict[str, Any]:
    """Benchmark the bench-connector decode worker at `url`, check its pool is back at idle, write the
    JSON and PNG; the report (bench.serving's, plus `setup` and `paths`)."""
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    info = get_json(url + "/server_info")
    if info.get("kv_connector") != "bench":
        raise BenchmarkError(f"the worker does not report kv_connector 'bench': {info}")
    config = BenchConfig(
        base_url=url, backend="sglang", random_input_len=args.input_len, random_output_len=args.output_len,
        num_prompts=args.num_prompts, max_concurrency=args.max_concurrency, seed=args.seed,
        prompt_format="ids", vocab_size=vocab, label=f"decode alone, input {args.input_len}, {args.device}",
        max_duration_s=args.max_duration_s, disable_tqdm=args.disable_tqdm,
    )  # fmt: skip
    report = run_benchmark(config)
    idle = wait_idle(url)
    report["setup"] = {
        "what": "one decode worker with --kv-connector bench; no prefill instance, no transfer engine",
        "model": model,
        "load_format": args.load_format,
        "device": args.device,
        "tp": args.tp,
        "page_size": args.page_size,
        "torch_threads_per_worker": args.threads if args.device == "cpu" else None,
        "max_context": info.get("max_context"),
        "worker_kv_connector": info.get("kv_connector"),
        "pages_idle_after_run": idle["free_pages"] + idle.get("evictable_pages", 0) == idle["total_pages"],
        "bench_filled_requests": idle.get("bench_filled_requests"),
    }
    json_path = Path(args.output_json or RESULTS_DIR / f"decode_alone_{args.device}_in{args.input_len}.json")
    plot_path = Path(args.plot or json_path.with_suffix(".png"))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    from bench.serving_plots import write_plot

    write_plot([report], plot_path)
    report["paths"] = {"json": str(json_path), "plot": str(plot_path)}
    return report


def decode_table(report: dict[str, Any]) -> str:
    """The decode numbers that matter, in one short block, under the run's label."""
    s = report["summary"]
    rows = [
        ("requests completed / failed", f"{s['completed']} / {s['failed']}"),
        ("duration (s)", f"{s['duration_s']:.2f}"),
        ("output tokens", str(s["total_output_tokens"])),
        ("output throughput (tok/s)", f"{s['output_throughput']:.1f}"),
        ("ITL p50 / p99 (ms)", f"{s['itl_ms']['p50']:.2f} / {s['itl_ms']['p99']:.2f}"),
        ("TPOT p50 / p99 (ms)", f"{s['tpot_ms']['p50']:.2f} / {s['tpot_ms']['p99']:.2f}"),
        ("first token p50 (ms; reserve + fill, no prefill)", f"{s['ttft_ms']['p50']:.2f}"),
    ]
    lines = [f"== {report['label']} ==", f"kv_connector: {report['kv_connector']}"]
    lines += [f"{name:<50}{value}" for name, value in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.decode_alone",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--input-len", type=int, default=4096)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-concurrency", type=int, default=8, help="also the worker's batch limit")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default=None, help="checkpoint dir (default: the tiny model, context raised)")
    p.add_argument("--load-format", choices=["auto", "dummy"], default="auto")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--max-total-tokens", type=int, default=None, help="default: enough for every request")
    p.add_argument("--cuda-graph-max-bs", type=int, default=None)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the worker (CPU; 2 oversubscribed 2 shared cores)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-duration-s", type=float, default=600.0)
    p.add_argument(
        "--output-json", default=None, help="default bench/results/decode_alone_<device>_in<N>.json"
    )
    p.add_argument("--plot", default=None, help="default: the JSON path with .png")
    p.add_argument("--log-dir", default="runs/decode_alone", help="the worker's log goes here")
    p.add_argument("--disable-tqdm", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    report = run_or_exit(run, args, (args.input_len, args.output_len, args.num_prompts, args.max_concurrency, args.tp),
                         "lengths, counts and --tp")
    print(format_summary(report["summary"], report["label"]))
    print(decode_table(report))
    print(f"results: {report['paths']['json']}\nplot: {report['paths']['plot']}")
    return 0 if report["summary"]["completed"] == args.num_prompts else 1


if __name__ == "__main__":
    sys.exit(main())
