"""Decode step time with CUDA graphs vs eager, on a dummy-weight model of a real shape.

    python -m bench.decode_step --device cuda --load-format dummy --model-config v2-lite \
        [--batch-sizes 1,8,64] [--context 1024] [--kv-cache-dtype auto|fp8_e4m3] \
        [--out bench/results/decode_step_gpu.json]

One DECODE forward of ``batch`` sequences, each with ``context`` tokens of (random) latent KV in the
pool, timed eagerly (``model(batch)``) and through ``engine.cuda_graph.CudaGraphRunner`` (static copy-in
+ replay), each call followed by a device synchronise: the latency a decode step pays, sampling and the
host-side batch build excluded from both. Also reports how close the two paths' logits are. Prints a
table; writes JSON. On CPU the runner cannot capture and runs its padded static path eagerly (a smoke
test of this script, not a measurement).

The headline is step / floor (`bench.decode_floor`): the bytes the step must read — the weights of the
experts its router selected (counted per layer), every other weight, the KV — over a `copy_` timed in the
same run; and the kernels a graph replay launches (profiler). Also writes a PNG beside the JSON.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.decode_floor import copy_bandwidth, kernels_per_step, plot, selected_experts, step_bytes
from bench.report import write_report
from decode_worker.bench_connector import fill_pages
from engine.config import ModelConfig
from engine.cuda_graph import CudaGraphRunner
from engine.forward_batch import ForwardBatch, ForwardMode
from engine.kv_pool import KVPool, resolve_kv_cache_dtype
from engine.llm import resolve_dtype
from engine.model import DeepseekForCausalLM
from engine.moe import active_grid_enabled
from engine.quant import add_quantization_flag, plan_quantization
from engine.server.cli import add_kv_cache_dtype_flag
from engine.weights import load_model
from kernels.backend import switched
from kernels.fp8 import ACT_ENV

log = logging.getLogger("bench.decode_step")
CONFIGS = Path(__file__).resolve().parent.parent / "engine" / "model_configs"
NAMED = {"v2-lite": CONFIGS / "deepseek-v2-lite", "v3": CONFIGS / "deepseek-v3"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_step", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model-config", default="v2-lite", help="v2-lite, v3, or a checkpoint directory")
    parser.add_argument("--load-format", default="dummy", choices=["dummy", "auto"])
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    add_quantization_flag(parser)  # --quantization fp8 --load-format dummy: random FP8 weights + scales
    parser.add_argument("--batch-sizes", default="1,8,64")
    parser.add_argument("--context", type=int, default=1024, help="cached tokens per sequence")
    parser.add_argument("--page-size", type=int, default=64)
    add_kv_cache_dtype_flag(parser)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--profile", action="store_true",
                        help="also trace a few graph replays per batch size (torch.profiler): top kernels; under "
                        "PDL also of graphs captured without it (graph_profile_serial: each kernel's own time)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/decode_step_<device>.json)")
    return parser.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Any, device: torch.device, iters: int, warmup: int) -> dict[str, float]:
    """Median and 20/80 % quantiles of one synchronised call, in ms (host clock: what a step costs the caller);
    on CUDA also ``device_ms``, the median between events recorded before and after the call on its stream, so a
    slow host (copy-in, launch) shows apart from the GPU's own time."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples, on_device = [], []
    events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if device.type == "cuda" else None
    for _ in range(iters):
        start = time.perf_counter()
        if events:
            events[0].record()
        fn()
        if events:
            events[1].record()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
        if events:
            on_device.append(events[0].elapsed_time(events[1]))
    q = statistics.quantiles(samples, n=5) if len(samples) > 1 else samples * 4
    out = {"ms": statistics.median(samples), "p20_ms": q[0], "p80_ms": q[3]}
    if on_device:
        out["device_ms"] = statistics.median(on_device)
    return out


def profile_kernels(fn: Any, device: torch.device, steps: int = 5, top: int = 12) -> list[dict[str, Any]]:
    """The `top` kernels by device time over `steps` calls: name, microseconds per call, share of the total."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        _sync(device)
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    return [{"kernel": e.key[:120], "us_per_step": e.device_time_total / steps, "calls_per_step": e.count / steps,
             "share": e.device_time_total / total} for e in events[:top]]


def top_kernels(batch_size: int) -> int:
    """How many kernels a profile lists: at batch 1 every FP8 GEMM kernel must be among them (bench.decode_step_fp8
    sums them)."""
    return 40 if batch_size == 1 else 12


def pdl_in_use(x: torch.Tensor) -> bool:
    """Whether kernels on ``x``'s device launch as programmatic dependents (``kernels.triton_pdl``)."""
    from kernels.triton_pdl import pdl_on  # Triton: imported on CUDA runs only

    return pdl_on(x)


def profile_serial(model: DeepseekForCausalLM, pool: KVPool, rows: list[dict[str, Any]],
                   batches: list[ForwardBatch], context: int) -> None:
    """Each row's ``graph_profile_serial``: the kernels of graphs captured without programmatic dependent launch.
    Under PDL (``graph_profile``) a kernel's programs start while the kernel ahead still runs and wait in
    ``griddepcontrol.wait``, and the profiler counts that wait in the kernel's time (a 2.64 ms FP8 step's kernels
    summed to 4.04 ms on an H100), so only this profile says what each kernel costs."""
    from kernels.triton_pdl import PDL_ENV

    # The switch is read at each launch, so at capture: these graphs keep plain launches.
    with switched(PDL_ENV, "0"):
        runner = CudaGraphRunner(model, pool, max(r["batch_size"] for r in rows), max_context_len=context + 1)
        try:
            for row, batch in zip(rows, batches, strict=True):
                row["graph_profile_serial"] = profile_kernels(lambda b=batch: runner(b), pool.tensor.device,
                                                              top=top_kernels(row["batch_size"]))
        finally:
            runner.close()


def decode_batch(pool: KVPool, batch_size: int, context: int, vocab: int, offset: int) -> ForwardBatch:
    """``batch_size`` sequences of ``context`` cached tokens each, on disjoint pages from ``offset``."""
    per_seq = pool.pages_for_tokens(context + 1)
    tables = [list(range(offset + i * per_seq, offset + (i + 1) * per_seq)) for i in range(batch_size)]
    ids = [[(1009 * i + 17) % vocab] for i in range(batch_size)]
    return ForwardBatch.build(ForwardMode.DECODE, ids, [context] * batch_size, tables, pool)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    model_dir = NAMED.get(args.model_config, Path(args.model_config))
    config = ModelConfig.from_dir(model_dir)
    dtype = resolve_dtype(args.dtype, device)
    sizes = sorted({int(s) for s in args.batch_sizes.split(",")})
    started = time.monotonic()
    quant = plan_quantization(args.quantization, config, device, dtype)
    model = DeepseekForCausalLM(config, dtype=dtype, device=device, fp8=quant.model_fp8)
    load_model(model, model_dir, args.load_format, seed=0, fp8=quant.in_effect)
    load_s = time.monotonic() - started
    log.info("model %s (%s) loaded in %.1fs", args.model_config, dtype, load_s)

    per_seq = -(-(args.context + 1) // args.page_size)
    pool = KVPool(max(sizes) * per_seq + 1, config.num_hidden_layers, args.page_size, config.kv_cache_dim,
                  resolve_kv_cache_dtype(args.kv_cache_dtype, dtype), device)
    runner = None
    try:
        pages = pool.alloc(max(sizes) * per_seq)  # the runner takes the one page left as scratch
        # Random latents stand in for a prefilled context; scaled like kv_a_layernorm's output.
        assert pages == list(range(pages[0], pages[0] + len(pages)))  # a fresh pool hands out one run
        fill_pages(pool.tensor, pages, torch.Generator(device=device).manual_seed(0))
        bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
        if bandwidth:
            log.info("copy_ bandwidth %.0f GB/s", bandwidth / 1e9)
        started = time.monotonic()
        runner = CudaGraphRunner(model, pool, max(sizes), max_context_len=args.context + 1)
        capture_s = time.monotonic() - started
        log.info("runner ready (%d buckets, capture=%s) in %.1fs", len(runner.buckets), runner.capture, capture_s)
        rows, batches = [], []
        for bs in sizes:
            batch = decode_batch(pool, bs, args.context, config.vocab_size, pages[0])
            batches.append(batch)
            eager = time_ms(lambda b=batch: model(b), device, args.iters, args.warmup)
            graph = time_ms(lambda b=batch: runner(b), device, args.iters, args.warmup)
            ref = model(batch).next_token_logits.float()
            got = runner(batch).next_token_logits.float()
            agree = float((ref.argmax(-1) == got.argmax(-1)).float().mean())
            rel = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
            rows.append({"batch_size": bs, "eager": eager, "graph": graph, "speedup": eager["ms"] / graph["ms"],
                         "logits_rel_err": rel, "argmax_agree": agree})
            experts = selected_experts(model, lambda b=batch: model(b))
            moved = step_bytes(model, batch, experts)
            rows[-1].update({"experts_selected_per_layer": experts, "step_bytes": moved})
            if bandwidth:
                floor_ms = moved["total"] / bandwidth * 1e3
                rows[-1].update({"floor_ms": floor_ms, "floor_ratio": graph["ms"] / floor_ms,
                                 "kernels_per_step": kernels_per_step(lambda b=batch: runner(b), device)})
            if args.profile and device.type == "cuda":
                rows[-1]["graph_profile"] = profile_kernels(lambda b=batch: runner(b), device, top=top_kernels(bs))
            log.info("batch %d: eager %.2f ms, graph %.2f ms (%.1fx; %s ms between device events)", bs,
                     eager["ms"], graph["ms"], eager["ms"] / graph["ms"],
                     f"{graph['device_ms']:.2f}" if "device_ms" in graph else "n/a")
        if args.profile and device.type == "cuda" and pdl_in_use(pool.tensor):
            runner.close()  # its scratch page goes to the runner below
            runner = None
            profile_serial(model, pool, rows, batches, args.context)
        pool.free(pages)
    finally:
        if runner is not None:
            runner.close()
        pool.close()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"bench": "decode_step", "device": name, "torch": torch.__version__, "model": args.model_config,
            "load_format": args.load_format, "dtype": str(dtype).removeprefix("torch."),
            "kv_cache_dtype": args.kv_cache_dtype, "context": args.context,
            "weights": "fp8" if quant.keep_fp8 else str(dtype).removeprefix("torch."),
            # FP8 GEMMs' activations (kernels.fp8.ACT_ENV): auto = W8A16 at decode sizes, fp8 = quantized
            "fp8_act": os.environ.get(ACT_ENV, "auto") if quant.keep_fp8 else None,
            "moe_active_grid": active_grid_enabled(),  # engine.moe: a grid of the active experts
            # every kernel switch set for the run (TANDEM_FP8_DECODE_F16 and the like): what an A/B's arms differ by
            "switches": {k: v for k, v in sorted(os.environ.items()) if k.startswith("TANDEM_")},
            "page_size": args.page_size, "iters": args.iters, "captured": device.type == "cuda",
            "load_s": load_s, "capture_s": capture_s, "copy_bandwidth_gbs": bandwidth / 1e9 if bandwidth else None,
            "headline": {str(r["batch_size"]): {"floor_ratio": r.get("floor_ratio"),
                                                "kernels_per_step": r.get("kernels_per_step")} for r in rows},
            "results": rows}


def print_table(report: dict[str, Any]) -> None:
    print(f"decode step, {report['model']} {report['dtype']} (KV {report['kv_cache_dtype']}) on {report['device']}, "
          f"context {report['context']}")
    print(f"{'batch':>6} {'graph ms':>9} {'floor ms':>9} {'step/floor':>10} {'kernels':>8} {'eager ms':>9} "
          f"{'argmax agree':>13} {'rel err':>9}")
    for r in report["results"]:
        floor = f"{r['floor_ms']:>9.3f} {r['floor_ratio']:>9.2f}x {r['kernels_per_step']:>8.0f}" if "floor_ms" in r \
            else f"{'-':>9} {'-':>10} {'-':>8}"
        print(f"{r['batch_size']:>6} {r['graph']['ms']:>9.3f} {floor} {r['eager']['ms']:>9.3f} "
              f"{r['argmax_agree']:>13.3f} {r['logits_rel_err']:>9.2e}")
    for r in report["results"]:
        for k in r.get("graph_profile", []):
            print(f"  bs {r['batch_size']:>3}  {k['us_per_step']:>9.1f} us  {k['calls_per_step']:>6.1f}x  "
                  f"{100 * k['share']:>5.1f}%  {k['kernel']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    report = run(args)
    print_table(report)
    suffix = "" if args.kv_cache_dtype == "auto" else "_kv_" + args.kv_cache_dtype
    write_report(report, f"decode_step{suffix}", args.device, args.out, lambda r, path: plot(r, str(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
