"""The decode step with FP8 weights against the same step with bf16 weights, in one process, as a ratio.

    python -m bench.decode_step_fp8 --device cuda --model-config v2-lite --load-format dummy \
        [--batch-sizes 1,8,64] [--context 1024] [--out bench/results/decode_step_fp8_vs_bf16_gpu.json]

Runs ``bench.decode_step`` twice on one device, one model after the other (the first freed before the second
loads): ``--quantization none`` (the dtype's weights) and ``--quantization fp8`` (128 x 128-block FP8 weights:
W8A16 GEMMs at decode sizes). The headline per batch size is FP8 step / bf16 step (DeepSeek-V3's goal: 0.65 at
batch 1, where a step reads its weights and little else), beside each step's own floor ratio; both reports are
kept whole in the JSON, and a PNG shows the two steps and their ratio. With ``--profile`` each row also splits
the FP8 step into its FP8 GEMM launches and the rest, and gives FP8 / bf16 as it would be with those launches at
``copy_``'s rate (``at_gemm_floor``: how far GEMM work alone can take the ratio), and the PNG cuts each bar into
its GEMMs, the kernels both steps share and the rest (``breakdown``). On CPU FP8 weights are dequantized at
load, so the two runs are the same model (a smoke test of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import torch

from bench import decode_step
from bench.report import write_report

GOAL_AT_BATCH_1 = 0.65  # issue 16: FP8 at most 0.65x the bf16 step at batch 1
# The FP8 step's kernels that stream FP8 weights: the masked expert and dense GEMMs (Triton's, DeepGEMM's; the
# expert GEMMs' one launch, kernels.triton_moe_fused_decode), their split-K reductions and activation quantizers.
FP8_GEMM_KERNEL = re.compile(r"fp8|reduce_splits|deep_gemm|sm90_fp8|moe_fused_decode", re.IGNORECASE)


def kernel_profile(report: dict[str, Any]) -> list[dict[str, Any]] | None:
    """A step's kernel profile: the one of graphs without PDL where the step ran with it (under PDL a kernel's
    time includes its wait for the kernel ahead; ``decode_step.profile_serial``), else the step's own."""
    return report.get("graph_profile_serial", report.get("graph_profile"))


def at_gemm_floor(base: dict[str, Any], fp8: dict[str, Any], copy_gbs: float | None) -> dict[str, float]:
    """What the FP8 step would take with its FP8 GEMMs at the ``copy_`` rate and the rest of it unchanged, over
    the bf16 step: the best FP8 / bf16 that GEMM work alone can reach. From the FP8 step's kernel profile (its
    kernels that stream FP8 weights, timed inside the graph) and the FP8 weight bytes the step reads; {} without
    a profile or a bandwidth. Where the step ran with PDL the profile is that of graphs without it (under PDL a
    kernel's time includes its wait for the kernel ahead); the rest is the step's time less those kernels'. A
    profile lists a step's top kernels only (``decode_step.top_kernels``: 40 at batch 1, 12 above), so a GEMM
    launch past them would count in the rest (in session 38's run every FP8 GEMM kernel was among them)."""
    profile = kernel_profile(fp8)
    nbytes = fp8.get("step_bytes", {}).get("fp8_weights")
    if not profile or not nbytes or not copy_gbs:
        return {}
    gemm_ms = sum(k["us_per_step"] for k in profile if FP8_GEMM_KERNEL.search(k["kernel"])) / 1e3
    floor_ms = nbytes / (copy_gbs * 1e9) * 1e3
    rest_ms = fp8["graph"]["ms"] - gemm_ms
    return {"fp8_gemm_ms": gemm_ms, "fp8_gemm_floor_ms": floor_ms, "fp8_rest_ms": rest_ms,
            "fp8_over_bf16_at_gemm_floor": (rest_ms + floor_ms) / base["graph"]["ms"]}


def fixed_cost(base: dict[str, Any], fp8: dict[str, Any], copy_gbs: float | None) -> dict[str, float]:
    """The part of the FP8 step that does not scale with the bytes it reads, and what the goal allows of it.

    Model: a step takes F + bytes x c. Two values of c are used. ``hidden``: what the bf16 step's extra bytes
    cost in this run, (bf16 - fp8) / (bytes_bf16 - bytes_fp8); below ``copy_``'s rate wherever latency-bound work
    hides transfers. ``copy``: ``copy_``'s rate. For each, F = fp8_ms - bytes_fp8 x c, and the most F may be for
    FP8 <= GOAL x bf16, that is (GOAL x bytes_bf16 - bytes_fp8) x c / (1 - GOAL). {} without both steps' bytes,
    or where they read the same bytes (FP8 dequantized at load on CPU)."""
    b8 = fp8.get("step_bytes", {}).get("total")
    b16 = base.get("step_bytes", {}).get("total")
    if not b8 or not b16 or b16 <= b8:
        return {}
    rates = {"hidden": (base["graph"]["ms"] - fp8["graph"]["ms"]) / (b16 - b8)}
    if copy_gbs:
        rates["copy"] = 1e3 / (copy_gbs * 1e9)
    out = {}
    for name, ms_per_byte in rates.items():
        out[f"fixed_ms_{name}"] = fp8["graph"]["ms"] - b8 * ms_per_byte
        out[f"goal_fixed_ms_{name}"] = (GOAL_AT_BATCH_1 * b16 - b8) * ms_per_byte / (1 - GOAL_AT_BATCH_1)
    return out


def breakdown(base: dict[str, Any], fp8: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each step cut three ways from its kernel profile (the serial one where the step ran with PDL): the GEMMs
    that stream weights of the step's own dtype, the other kernels (attention, norms, routing, LM head: the same
    launches in both steps, named as in the FP8 step's profile outside ``FP8_GEMM_KERNEL``), and the rest of the
    step's time (the gaps between launches, and kernels past a profile's top). {} without both profiles."""
    profiles = [kernel_profile(r) for r in (base, fp8)]
    if not all(profiles):
        return {}
    shared = {k["kernel"] for k in profiles[1] if not FP8_GEMM_KERNEL.search(k["kernel"])}
    cut = {}
    for name, report, profile in (("bf16", base, profiles[0]), ("fp8", fp8, profiles[1])):
        other = sum(k["us_per_step"] for k in profile if k["kernel"] in shared) / 1e3
        gemm = sum(k["us_per_step"] for k in profile if k["kernel"] not in shared) / 1e3
        cut[name] = {"gemm_ms": gemm, "other_kernels_ms": other, "rest_ms": report["graph"]["ms"] - gemm - other}
    return cut


def compare(argv: list[str]) -> dict[str, Any]:
    """Both reports and the per-batch FP8 / bf16 step ratios."""
    reports = {}
    for name, flag in (("bf16", "none"), ("fp8", "fp8")):
        args = decode_step.parse_args([*argv, "--quantization", flag])
        reports[name] = decode_step.run(args)
        gc.collect()  # the first model's weights go before the second's load
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    rows = []
    for base, fp8 in zip(reports["bf16"]["results"], reports["fp8"]["results"], strict=True):
        rows.append({"batch_size": base["batch_size"], "bf16_ms": base["graph"]["ms"], "fp8_ms": fp8["graph"]["ms"],
                     "fp8_over_bf16": fp8["graph"]["ms"] / base["graph"]["ms"],
                     "bf16_floor_ratio": base.get("floor_ratio"), "fp8_floor_ratio": fp8.get("floor_ratio"),
                     "bf16_kernels": base.get("kernels_per_step"), "fp8_kernels": fp8.get("kernels_per_step"),
                     **at_gemm_floor(base, fp8, reports["fp8"].get("copy_bandwidth_gbs")),
                     **fixed_cost(base, fp8, reports["fp8"].get("copy_bandwidth_gbs")),
                     "breakdown": breakdown(base, fp8)})
    first = reports["bf16"]
    return {"bench": "decode_step_fp8", "device": first["device"], "torch": first["torch"], "model": first["model"],
            "context": first["context"], "fp8_weights_kept": reports["fp8"]["weights"] == "fp8",
            "goal_at_batch_1": GOAL_AT_BATCH_1,
            "headline": {str(r["batch_size"]): r["fp8_over_bf16"] for r in rows}, "results": rows,
            "reports": reports}


def print_table(report: dict[str, Any]) -> None:
    print(f"decode step, FP8 vs bf16 weights: {report['model']} on {report['device']}, context {report['context']}"
          + ("" if report["fp8_weights_kept"] else " (FP8 dequantized at load here: the same model twice)"))
    print(f"{'batch':>6} {'bf16 ms':>9} {'fp8 ms':>9} {'fp8/bf16':>9} {'bf16/floor':>11} {'fp8/floor':>10}"
          f" {'fp8 GEMMs ms':>13} {'at copy_':>9} {'fp8/bf16 then':>14}")
    for r in report["results"]:
        floors = "".join(f" {r[k]:>10.2f}x" if r[k] is not None else f" {'-':>11}"
                         for k in ("bf16_floor_ratio", "fp8_floor_ratio"))
        split = (f" {r['fp8_gemm_ms']:>13.3f} {r['fp8_gemm_floor_ms']:>9.3f} {r['fp8_over_bf16_at_gemm_floor']:>13.2f}x"
                 if "fp8_gemm_ms" in r else "")
        print(f"{r['batch_size']:>6} {r['bf16_ms']:>9.3f} {r['fp8_ms']:>9.3f} {r['fp8_over_bf16']:>8.2f}x{floors}{split}")
    first = report["results"][0] if report["results"] else {}
    if first.get("batch_size") == 1 and "fixed_ms_hidden" in first:
        copy = (f" ({first['fixed_ms_copy']:.2f} at copy_'s rate; {first['goal_fixed_ms_copy']:.2f})"
                if "fixed_ms_copy" in first else "")
        print(f"batch 1: {first['fixed_ms_hidden']:.2f} ms of the FP8 step does not scale with its bytes at this run's "
              f"cost of bf16's extra bytes{copy}; {GOAL_AT_BATCH_1}x bf16 allows {first['goal_fixed_ms_hidden']:.2f}")


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    if all(r.get("breakdown") for r in rows):  # each bar cut into GEMMs, the launches both steps share, the rest
        parts = (("gemm_ms", "its GEMMs", ""), ("other_kernels_ms", "other kernels (the same in both)", "//"),
                 ("rest_ms", "gaps and the rest", ".."))
        for offset, name, colour in ((-0.2, "bf16", "C0"), (0.2, "fp8", "C1")):
            bottom = [0.0] * len(rows)
            for key, what, hatch in parts:
                heights = [r["breakdown"][name][key] for r in rows]
                ax.bar([i + offset for i in x], heights, 0.4, bottom=bottom, color=colour, hatch=hatch,
                       edgecolor="white", label=f"{'FP8' if name == 'fp8' else 'bf16'} weights: {what}")
                bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    else:
        ax.bar([i - 0.2 for i in x], [r["bf16_ms"] for r in rows], 0.4, label="bf16 weights")
        ax.bar([i + 0.2 for i in x], [r["fp8_ms"] for r in rows], 0.4, label="FP8 weights")
    for i, r in zip(x, rows, strict=True):
        ax.text(i, max(r["bf16_ms"], r["fp8_ms"]), f"{r['fp8_over_bf16']:.2f}x", ha="center", va="bottom", fontsize=9)
    if rows and rows[0]["batch_size"] == 1:
        ax.hlines(GOAL_AT_BATCH_1 * rows[0]["bf16_ms"], -0.45, 0.45, colors="red", linestyles="dashed",
                  label=f"goal at batch 1 ({GOAL_AT_BATCH_1}x bf16)")
    ax.set_xticks(list(x), [str(r["batch_size"]) for r in rows])
    ax.set_xlabel("batch size")
    ax.set_ylabel("ms per CUDA-graph decode step")
    ax.set_title(f"FP8 vs bf16 weights: {report['model']}, context {report['context']}, {report['device']}",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_overlay(runs: list[tuple[str, dict[str, Any]]], path: str) -> None:
    """Several runs' steps against batch size on one axis (FP8 solid, bf16 dashed, one colour a run): A/B pairs
    of a switch, read side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, report) in enumerate(runs):
        rows = report["results"]
        batch = [r["batch_size"] for r in rows]
        colour = f"C{i}"
        ax.plot(batch, [r["fp8_ms"] for r in rows], "o-", color=colour, label=f"{label}, FP8")
        ax.plot(batch, [r["bf16_ms"] for r in rows], "s--", color=colour, label=f"{label}, bf16")
    ax.set_xscale("log", base=2)
    batches = sorted({r["batch_size"] for _, report in runs for r in report["results"]})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("ms per CUDA-graph decode step")
    first = runs[0][1]
    ax.set_title(f"decode step: {first['model']}, context {first['context']}, {first['device']}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_step_fp8", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/decode_step_fp8_vs_bf16_"
                                                    "<device>.json)")
    parser.add_argument("--overlay", nargs="+", metavar="LABEL=JSON",
                        help="plot these runs' JSONs on one axis into --png instead of running")
    parser.add_argument("--replot", metavar="JSON", help="plot this run's JSON again into --png (its rows' "
                                                             "breakdown recomputed from its profiles) instead of running")
    parser.add_argument("--png", default=None, help="the --overlay or --replot PNG's path")
    args, rest = parser.parse_known_args(argv)
    if args.replot:
        if not args.png or rest or args.overlay:
            parser.error("--replot takes JSON and --png PATH, nothing else")
        report = json.loads(Path(args.replot).read_text())
        runs = zip(report["reports"]["bf16"]["results"], report["reports"]["fp8"]["results"], strict=True)
        for row, (base, fp8) in zip(report["results"], runs, strict=True):
            row["breakdown"] = breakdown(base, fp8)
        plot(report, args.png)
        print(f"wrote {args.png}")
        return 0
    if args.overlay:
        if not args.png or rest or any("=" not in item for item in args.overlay):
            parser.error("--overlay takes LABEL=JSON items and --png PATH, nothing else")
        runs = [(label, json.loads(Path(path).read_text())) for label, path in
                (item.split("=", 1) for item in args.overlay)]
        plot_overlay(runs, args.png)
        print(f"wrote {args.png}")
        return 0
    if any(a == "--quantization" or a.startswith("--quantization=") for a in rest):
        parser.error("--quantization is what this bench varies: leave it out")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    report = compare(rest)
    print_table(report)
    device = "cpu" if report["device"] == "cpu" else "cuda"
    write_report(report, "decode_step_fp8_vs_bf16", device, args.out, lambda r, path: plot(r, str(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
