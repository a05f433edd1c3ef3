"""The serving path's host side in 1P1D: TTFT cut into its parts, and a decode step into forward vs host work.

    python -m bench.host_path --label before [--input-len 4096 --output-len 100 --num-prompts 32 \\
        --max-concurrency 8] [--device cpu|cuda] [--model DIR --load-format dummy] [--output-json PATH]

Starts router + 1 prefill + 1 decode worker (`bench.compare_pd`'s 1p1d setup) with TANDEM_TIMELINE=1, runs
`bench.serving` through the router, then
- joins each measured request's client times (`started_at` + `start_s`, TTFT) with its prefill and decode
  ranks' timeline lines (same host: wall clocks agree) into the parts of its TTFT, in order:
  to the prefill rank (router, prefill HTTP process, the rank's inbox while it runs other forwards), prefill
  queue (arrival to the step that runs its first chunk), prefill forward, KV writes until the prefill rank
  saw them done, until the decode rank saw the KV landed, first token queued, first token out to the client;
  requests are paired by order (client send order vs. decode-rank arrival order; a concurrent burst may swap
  neighbours, the medians do not care);
- reads the decode rank's `StepClock` counters (/server_info) before and after: ms per decode step per phase.

The JSON keeps one entry per `--label` (a later run with the same label replaces it) and the PNG compares
them: stacked TTFT parts, and stacked host phases beside the forward of one decode step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.compare_pd import add_gpu_sharing_args, add_worker_args, sharing_env, start_setup, use_mps, warm_up
from bench.decode_alone import tiny_model_with_context
from bench.pd_servers import ServerGroup, cpu_worker_env, get_json, wait_idle
from bench.pd_timeline import parse
from bench.serving import BenchConfig, run_benchmark, run_or_exit
from engine.runtime.rank_loop import STATUS_PERIOD_S
from engine.step_clock import PHASES

log = logging.getLogger("bench.host_path")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# (part, from, to): marks are "client_send", "client_first", or (role, mark) with mark None for arrival
TTFT_PARTS: tuple[tuple[str, Any, Any], ...] = (
    ("to prefill rank", "client_send", ("prefill", None)),
    ("prefill queue", ("prefill", None), ("prefill", "step_began")),
    ("prefill forward", ("prefill", "step_began"), ("prefill", "forward_done")),
    ("KV writes seen done (prefill)", ("prefill", "forward_done"), ("prefill", "kv_done")),
    ("KV seen landed (decode)", ("prefill", "kv_done"), ("decode", "landed")),
    ("first token queued", ("decode", "landed"), ("decode", "first_token_queued")),
    ("first token to client", ("decode", "first_token_queued"), "client_first"),
)


def _at(roles: dict[str, tuple[float, dict[str, float]]], role: str, mark: str | None) -> float | None:
    """Wall-clock seconds of `mark` on `role`'s line (None: its arrival, the line's t0)."""
    t0, marks = roles[role]
    if mark is None:
        return t0
    return t0 + marks[mark] / 1e3 if mark in marks else None


def ttft_parts(report: dict[str, Any], log_dir: Path) -> dict[str, Any]:
    """Per-part medians (ms) over the measured requests, and the handshake's slack (decode asked the prefill
    rank for the KV this long before its forward was done: negative means the handshake was on the path)."""
    lines = [roles for roles in parse(log_dir).values() if "prefill" in roles and "decode" in roles]
    lines.sort(key=lambda roles: roles["decode"][0])
    requests = sorted((r for r in report["requests"] if r["success"]), key=lambda r: r["start_s"])
    lines = lines[len(lines) - len(requests):]  # the warm-up request came first, alone
    parts: dict[str, list[float]] = {name: [] for name, _, _ in TTFT_PARTS}
    slack: list[float] = []
    for request, roles in zip(requests, lines, strict=False):
        send = report["started_at"] + request["start_s"]
        points = {"client_send": send, "client_first": send + request["ttft_ms"] / 1e3}
        for name, start, end in TTFT_PARTS:
            a = points[start] if isinstance(start, str) else _at(roles, *start)
            b = points[end] if isinstance(end, str) else _at(roles, *end)
            if a is not None and b is not None:
                parts[name].append((b - a) * 1e3)
        reserved, done = _at(roles, "decode", "reserved"), _at(roles, "prefill", "forward_done")
        if reserved is not None and done is not None:
            slack.append((done - reserved) * 1e3)
    medians = {name: statistics.median(v) for name, v in parts.items() if v}
    return {"paired_requests": min(len(requests), len(lines)), "median_ms": medians,
            "sum_of_medians_ms": sum(medians.values()),
            "handshake_slack_ms_median": statistics.median(slack) if slack else None}


def step_phases(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Mean ms per decode step of each phase over the run (the decode worker's StepClock counters)."""
    steps = after.get("decode_steps", 0) - before.get("decode_steps", 0)
    if steps <= 0:
        return {"steps": 0}

    def per_step(key: str) -> float:
        return (after.get(key, 0) - before.get(key, 0)) / steps / 1e3

    phases = {phase: per_step(f"decode_{phase}_us_total") for phase in PHASES}
    turn = per_step("decode_turn_us_total")
    out = {"steps": steps, "turn_ms": turn, "phases_ms": phases, "host_ms": turn - phases["forward"]}
    if "decode_forward_device_us_total" in after:  # CUDA: the GPU had nothing to run for the rest
        device = per_step("decode_forward_device_us_total")
        out.update(forward_device_ms=device, gpu_idle_ms=turn - device)
    return out


def settled_info(url: str) -> dict[str, Any]:
    """/server_info once the worker is idle and its ranks have reported since (every STATUS_PERIOD_S)."""
    wait_idle(url)
    time.sleep(2 * STATUS_PERIOD_S)
    return get_json(url + "/server_info")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.model is None:
        args.model = str(tiny_model_with_context(args.input_len + args.output_len + 1))
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    env = cpu_worker_env(args.threads) if args.device == "cpu" else {}
    env["TANDEM_TIMELINE"] = "1"
    log_dir = Path(args.log_dir) / args.label
    for old in log_dir.glob("*.log"):  # the join reads every line under it: only this run's
        old.unlink()
    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        env.update(sharing_env(stack, args, log_dir / "mps"))
        group = stack.enter_context(ServerGroup(log_dir, env))
        router, (prefill, decode) = start_setup("1p1d", group, args)
        config = BenchConfig(
            base_url=router.url, backend="sglang", random_input_len=args.input_len,
            random_output_len=args.output_len, num_prompts=args.num_prompts, max_concurrency=args.max_concurrency,
            seed=args.seed, prompt_format="ids", vocab_size=vocab, label=args.label,
            max_duration_s=args.max_duration_s, disable_tqdm=True,
            warmup_requests=0,
        )  # fmt: skip
        # One warm-up request through the router, outside the counters and the timeline join.
        warm_up(router.url, args.input_len)
        before = settled_info(decode.url)
        report = run_benchmark(config)
        after = settled_info(decode.url)
        idle = [wait_idle(prefill.url), after]
    steps = step_phases(before, after)
    s = report["summary"]
    return {
        "label": args.label,
        "setup": {"device": args.device, "model": args.model, "load_format": args.load_format,
                  "input_len": args.input_len, "output_len": args.output_len, "num_prompts": args.num_prompts,
                  "max_concurrency": args.max_concurrency, "transfer_backend": args.transfer_backend,
                  "torch_threads_per_worker": args.threads if args.device == "cpu" else None,
                  "load_average_1m_before": load_before[0], "cpu_count": os.cpu_count(), "mps": use_mps(args),
                  "pages_idle_after_run": all(i["free_pages"] + i.get("evictable_pages", 0) == i["total_pages"]
                                              for i in idle)},
        "serving": {"completed": s["completed"], "output_tok_s": s["output_throughput"],
                    "ttft_ms": s["ttft_ms"], "itl_ms": s["itl_ms"], "tpot_ms": s["tpot_ms"]},
        "ttft": ttft_parts(report, log_dir),
        "decode_step": steps,
    }


def _stacked(ax: Any, labels: list[str], parts: dict[str, list[float]], marker: tuple[str, list[float]],
             ylabel: str, title: str) -> None:
    """One stacked bar per run (a segment per part) with the client's figure as a dot on top."""
    bottom = [0.0] * len(labels)
    for name, values in parts.items():
        ax.bar(labels, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.scatter(labels, marker[1], color="k", zorder=3, label=marker[0])
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)


def write_plot(runs: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(runs)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    _stacked(left, labels, {name: [runs[k]["ttft"]["median_ms"].get(name, 0.0) for k in labels]
                            for name, _, _ in TTFT_PARTS},
             ("client TTFT p50", [runs[k]["serving"]["ttft_ms"]["p50"] for k in labels]),
             "ms (median per part)", "TTFT parts")
    _stacked(right, labels, {phase: [runs[k]["decode_step"].get("phases_ms", {}).get(phase, 0.0) for k in labels]
                             for phase in PHASES},
             ("client ITL p50", [runs[k]["serving"]["itl_ms"]["p50"] for k in labels]),
             "ms per decode step (mean)", "decode step: forward vs host phases")
    first = runs[labels[0]]["setup"]
    fig.suptitle(f"1P1D host path, {first['device']}, {Path(first['model']).name}: in={first['input_len']} "
                 f"out={first['output_len']} n={first['num_prompts']} conc={first['max_concurrency']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_run(run: dict[str, Any]) -> str:
    lines = [f"== {run['label']} ==",
             f"output tok/s {run['serving']['output_tok_s']:.1f}   TTFT p50 {run['serving']['ttft_ms']['p50']:.2f} ms"
             f"   ITL p50 {run['serving']['itl_ms']['p50']:.2f} ms"]
    lines.append(f"TTFT parts (median ms over {run['ttft']['paired_requests']} requests):")
    lines += [f"  {name:<32}{value:>9.2f}" for name, value in run["ttft"]["median_ms"].items()]
    slack = run["ttft"]["handshake_slack_ms_median"]
    lines.append(f"  handshake done before the forward by {slack:.2f} ms (median)" if slack is not None else "")
    step = run["decode_step"]
    if step.get("steps"):
        lines.append(f"decode step ({step['steps']} steps), ms per step: turn {step['turn_ms']:.3f}, "
                     f"host (turn - forward) {step['host_ms']:.3f}")
        lines += [f"  {phase:<12}{value:>8.3f}" for phase, value in step["phases_ms"].items()]
        if "gpu_idle_ms" in step:
            lines.append(f"  device forward {step['forward_device_ms']:.3f}, GPU idle {step['gpu_idle_ms']:.3f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.host_path", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--label", required=True, help="this run's name in the JSON and the PNG (e.g. before, after)")
    p.add_argument("--input-len", type=int, default=4096)
    p.add_argument("--output-len", type=int, default=100)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-concurrency", type=int, default=8)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default=None, help="checkpoint dir (default: the tiny model, context raised)")
    p.add_argument("--load-format", choices=["auto", "dummy"], default="auto")
    add_worker_args(p)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-duration-s", type=float, default=600.0)
    p.add_argument("--output-json", default=None, help="default bench/results/host_path_<device>.json")
    p.add_argument("--plot", default=None, help="default: the JSON path with .png")
    add_gpu_sharing_args(p)
    p.add_argument("--log-dir", default="runs/host_path", help="servers' logs go under <this>/<label>")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    result = run_or_exit(run, args, (args.input_len, args.output_len, args.num_prompts, args.max_concurrency))
    json_path = Path(args.output_json or RESULTS_DIR / f"host_path_{args.device}.json")
    doc = json.loads(json_path.read_text()) if json_path.exists() else {"format_version": 1, "runs": {}}
    doc["machine"] = {"node": platform.node(), "processor": platform.processor() or platform.machine()}
    doc["runs"][args.label] = result
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    plot_path = Path(args.plot or json_path.with_suffix(".png"))
    write_plot(doc["runs"], plot_path)
    print(format_run(result))
    print(f"results: {json_path}\nplot: {plot_path}")
    return 0 if result["serving"]["completed"] == args.num_prompts else 1


if __name__ == "__main__":
    sys.exit(main())
