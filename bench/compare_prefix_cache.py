"""The prefix cache off, on prefill, and on prefill + decode-side reuse, side by side: the multi-turn chat
workload through the router, one table, one JSON and one PNG.

    python -m bench.compare_prefix_cache [--num-conversations 8 --num-turns 4 --system-prompt-len 256 \\
        --turn-input-len 48 --turn-output-len 8] [--device cpu|cuda] [--model DIR --load-format dummy] \\
        [--transfer-backend nixl|mooncake]

Setups (`--setups`), run one after the other (each started, measured, checked idle and stopped before the
next), all router -> 1 prefill worker (tp1) + `--num-decode` decode workers (tp1, default 1), the KV moving
through the transfer engine:
  cache_off      the prefill worker runs with --disable-prefix-cache: every turn recomputes the whole prompt and
                 sends all of its pages.
  prefill_cache  the default: the prefill worker reuses the pages of the prompt prefixes it has seen (computes
                 only the suffix) and still sends the whole prompt's pages.
  decode_reuse   as prefill_cache, and the decode worker runs with --decode-prefix-cache (the router with
                 --decode-policy cache_aware): decode keeps each conversation's pages (prompt and answer) and
                 the prefill worker writes only the pages decode does not hold.
  decode_reuse_p2  (not run by default) as decode_reuse, with the router's default decode choice
                 (power_of_two), blind to where a conversation's KV is: with --num-decode 2 or more, what the
                 cache-aware choice is worth.
Each gets the same `bench.serving --dataset multiturn` run (`bench.serving_multiturn`: N conversations on a
shared system prompt, M lockstep turns, each prompt = the conversation so far + a new message); the prefill
worker's /server_info counters give the prompt tokens it computed and the KV bytes it wrote per turn. JSON:
bench/results/prefix_cache_<device>.json; the PNG has prefill tokens computed, KV bytes sent and TTFT p50/p99
per turn for all three.

On one GPU (both workers share it; V2-Lite-shaped dummy weights, NIXL cuda_ipc):

    python -m bench.compare_prefix_cache --device cuda --model engine/model_configs/deepseek-v2-lite \
        --load-format dummy --num-conversations 16 --num-turns 6 --system-prompt-len 2048 \
        --turn-input-len 256 --turn-output-len 64 --cuda-graph-max-bs 16
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from bench.pd_servers import ServerGroup, cpu_worker_env, free_port, wait_healthy, wait_idle
from bench.serving import run_or_exit
from bench.serving_multiturn import MultiTurnConfig, format_turns, run_multiturn

log = logging.getLogger("bench.compare_prefix_cache")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SETUPS = ("cache_off", "prefill_cache", "decode_reuse", "decode_reuse_p2")
DEFAULT_SETUPS = SETUPS[:3]
SHORT = {"cache_off": "off", "prefill_cache": "pfx", "decode_reuse": "reuse", "decode_reuse_p2": "p2"}


def _worker_flags(args: argparse.Namespace, port: int) -> list[str]:
    longest = args.system_prompt_len + args.num_turns * (args.turn_input_len + args.turn_output_len)
    return [
        "--model", args.model, "--load-format", args.load_format, "--device", args.device, "--tp", "1",
        "--host", "127.0.0.1", "--port", str(port), "--page-size", str(args.page_size),
        "--transfer-backend", args.transfer_backend, "--log-level", "warning",
        "--max-total-tokens", str(args.max_total_tokens or max(65536, 2 * longest * args.num_conversations)),
    ]  # fmt: skip


def run_setup(name: str, args: argparse.Namespace, config: MultiTurnConfig) -> dict[str, Any]:
    """Start router + 1 prefill + `--num-decode` decode workers, run the workload through the router, check every
    worker idle, stop."""
    env = cpu_worker_env(args.threads) if args.device == "cpu" else {}
    load_before = os.getloadavg()
    with ServerGroup(Path(args.log_dir) / name, env) as group:
        p_port, boot, r_port = free_port(), free_port(), free_port()
        d_ports = [free_port() for _ in range(args.num_decode)]
        prefill_flags = [*_worker_flags(args, p_port), "--bootstrap-port", str(boot)]
        if name == "cache_off":
            prefill_flags.append("--disable-prefix-cache")
        prefill = group.start("prefill", "prefill_worker", prefill_flags, p_port)
        router_flags = ["--host", "127.0.0.1", "--port", str(r_port), "--prefill", prefill.url, str(boot),
                        "--log-level", "warning"]  # fmt: skip
        decodes = []
        for i, d_port in enumerate(d_ports):
            decode_flags = _worker_flags(args, d_port)
            if args.cuda_graph_max_bs:
                decode_flags += ["--cuda-graph-max-bs", str(args.cuda_graph_max_bs)]
            if name.startswith("decode_reuse"):
                decode_flags.append("--decode-prefix-cache")
            decodes.append(group.start(f"decode{i}" if i else "decode", "decode_worker", decode_flags, d_port))
            router_flags += ["--decode", decodes[-1].url]
        # decode_reuse: a conversation's turns go to the decode instance holding its KV; decode_reuse_p2: the
        # router's default decode choice (power of two), blind to where the KV is.
        router_flags += ["--decode-policy", "cache_aware" if name == "decode_reuse" else "power_of_two"]
        wait_healthy([prefill, *decodes])
        router = group.start("router", "router", router_flags, r_port)
        wait_healthy([router])
        # Warm-up: one request of another prompt (its pages do not overlap the workload's).
        warm = MultiTurnConfig(1, 1, 32, 8, 2, config.vocab_size, seed=config.seed + 1000)
        asyncio.run(run_multiturn(router.url, warm))
        started = time.monotonic()
        report = asyncio.run(run_multiturn(router.url, config, counters_url=prefill.url))
        report["duration_s"] = time.monotonic() - started
        idle = [wait_idle(w.url) for w in (prefill, *decodes)]
    report["setup"] = {
        "name": name,
        "transfer_backend": args.transfer_backend,
        "torch_threads_per_worker": args.threads if args.device == "cpu" else None,
        "pages_idle_after_run": all(i["free_pages"] + i.get("evictable_pages", 0) == i["total_pages"] for i in idle),
        "num_decode": args.num_decode,
        "decode_reused_tokens": sum(i.get("decode_reused_tokens", 0) for i in idle[1:]),
        "load_average_1m_before": load_before[0],
        "cpu_count": os.cpu_count(),
    }
    return report


def format_table(reports: dict[str, dict[str, Any]]) -> str:
    """Per turn: prompt tokens, then prefill tokens computed, KV MB sent and TTFT p50 / p99 for each setup."""
    setups = [name for name in SETUPS if name in reports]
    groups = ("prefill tokens computed", "KV MB sent to decode", "TTFT p50 ms", "TTFT p99 ms")
    width = 9 * len(setups) - 1
    lines = [f"{'':>4} | {'':>10} | " + " | ".join(f"{g:^{width}}" for g in groups),
             f"{'turn':>4} | {'prompt tok':>10} | " + " | ".join(
                 " ".join(f"{SHORT[n]:>8}" for n in setups) for _ in groups)]

    def row(label: str, prompt: int, rows: list[dict[str, Any]]) -> str:
        cells = [" ".join(f"{r['prefill_tokens_computed']:>8}" for r in rows),
                 " ".join(f"{_mb(r.get('kv_bytes_sent')):>8}" for r in rows),
                 " ".join(f"{r['ttft_ms']['p50']:>8.1f}" for r in rows),
                 " ".join(f"{r['ttft_ms']['p99']:>8.1f}" for r in rows)]
        return f"{label:>4} | {prompt:>10} | " + " | ".join(cells)

    for t in range(len(reports[setups[0]]["turns"])):
        rows = [reports[name]["turns"][t] for name in setups]
        lines.append(row(str(t), rows[0]["prompt_tokens"], rows))
    summaries = [reports[name]["summary"] for name in setups]
    lines.append(row("all", summaries[0]["prompt_tokens"], summaries))
    return "\n".join(lines)


def _mb(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 1e6:.2f}"


def write_plot(reports: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    setups = [name for name in SETUPS if name in reports]
    fig, (tokens_ax, bytes_ax, ttft_ax) = plt.subplots(1, 3, figsize=(18, 4.8))
    turns = np.arange(len(reports[setups[0]]["turns"]))
    width = 0.8 / len(setups)
    for i, name in enumerate(setups):
        rows = reports[name]["turns"]
        offset = (i - (len(setups) - 1) / 2) * width
        tokens_ax.bar(turns + offset, [r["prefill_tokens_computed"] for r in rows], width, label=name)
        bytes_ax.bar(turns + offset, [(r.get("kv_bytes_sent") or 0) / 1e6 for r in rows], width, label=name)
        p50 = [r["ttft_ms"]["p50"] for r in rows]
        p99 = [r["ttft_ms"]["p99"] for r in rows]
        line = ttft_ax.plot(turns, p50, marker="o", label=f"{name} p50")[0]
        ttft_ax.plot(turns, p99, marker="^", linestyle="--", color=line.get_color(), label=f"{name} p99")
    tokens_ax.plot(turns, [r["prompt_tokens"] for r in reports[setups[0]]["turns"]], "k:", label="prompt tokens")
    tokens_ax.set(title="prefill tokens computed per turn (all conversations)", xlabel="turn", ylabel="tokens",
                  xticks=turns)
    bytes_ax.set(title="KV bytes prefill wrote into decode per turn", xlabel="turn", ylabel="MB", xticks=turns)
    ttft_ax.set(title="TTFT per turn", xlabel="turn", ylabel="ms", xticks=turns)
    for ax in (tokens_ax, bytes_ax, ttft_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.model is None:
        from engine.server.serve import resolve_model_dir

        args.model = resolve_model_dir(None)
    from engine.config import ModelConfig

    vocab = ModelConfig.from_dir(args.model).vocab_size
    config = MultiTurnConfig(args.num_conversations, args.num_turns, args.system_prompt_len, args.turn_input_len,
                             args.turn_output_len, vocab, args.seed)
    config.validate()
    if args.num_decode < 1:
        raise ValueError(f"--num-decode must be >= 1, got {args.num_decode}")
    setups = [name.strip() for name in args.setups.split(",") if name.strip()]
    unknown = [name for name in setups if name not in SETUPS]
    if unknown or not setups:
        raise ValueError(f"--setups: unknown {unknown} (choose from {', '.join(SETUPS)})")
    reports = {name: run_setup(name, args, config) for name in setups}
    for name in setups:
        print(format_turns(reports[name], name))
    title = (f"{' / '.join(setups)}, 1P{args.num_decode}D through the router ({args.device}, "
             f"{Path(args.model).name}): {args.num_conversations} conversations x {args.num_turns} turns, system "
             f"prompt {args.system_prompt_len}, +{args.turn_input_len}/{args.turn_output_len} tokens per turn")
    out = Path(args.output_json or RESULTS_DIR / f"prefix_cache_{args.device}.json")
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    result = {
        "title": title,
        "args": vars(args),
        "host": {"platform": platform.platform(), "python": platform.python_version()},
        "runs": reports,
        "table": format_table(reports),
        "paths": {"json": str(out), "plot": str(plot)},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    write_plot(reports, plot, title)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.compare_prefix_cache", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-conversations", type=int, default=8)
    p.add_argument("--num-turns", type=int, default=4)
    # Defaults fit the embedded tiny model's 512-token context: 256 + 4 x (48 + 8) = 480 tokens at the end.
    p.add_argument("--system-prompt-len", type=int, default=256)
    p.add_argument("--turn-input-len", type=int, default=48)
    p.add_argument("--turn-output-len", type=int, default=8)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default=None, help="checkpoint dir (default: the embedded tiny model)")
    p.add_argument("--load-format", choices=["auto", "dummy"], default="auto")
    p.add_argument("--transfer-backend", choices=["nixl", "mooncake"], default="nixl")
    p.add_argument("--num-decode", type=int, default=1, help="decode workers behind the router")
    p.add_argument("--setups", default=",".join(DEFAULT_SETUPS),
                   help=f"comma-separated, run in this order, from {', '.join(SETUPS)}")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (CPU)")
    p.add_argument("--max-total-tokens", type=int, default=None,
                   help="KV pool per worker (default: twice every conversation's longest prompt, >= 65536)")
    p.add_argument("--cuda-graph-max-bs", type=int, default=0, help="the decode worker's CUDA graphs (GPU); 0: eager")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output-json", default=None, help="default bench/results/prefix_cache_<device>.json")
    p.add_argument("--plot", default=None, help="default: the JSON path with .png")
    p.add_argument("--log-dir", default="runs/compare_prefix_cache", help="each server's log goes under here")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    result = run_or_exit(run, args)
    print(result["title"])
    print(result["table"])
    print(f"results: {result['paths']['json']}\nplot: {result['paths']['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
