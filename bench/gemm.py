"""FP8 block-scaled GEMM throughput at DeepSeek-V3 shapes, beside torch's bf16 matmul in the same run.

    python -m bench.gemm                 # CUDA: real numbers (bench/results/gemm_cuda.json + .png)
    python -m bench.gemm --quick         # any machine: tiny shapes, torch reference (gemm_<device>_quick.*)

Dense: y = x W^T for V3's projections, N x K = 18432x7168 (dense gate/up), 7168x18432 (dense down),
2112x7168 (fused q_a + kv_a), 7168x2112, 24576x1536 (q_b), 7168x16384 (o_proj), 4096x7168, at 1 and 16
rows (decode) and 128, 4096 (prefill). Grouped: V3's routed experts (256 experts, top-8, hidden 7168,
moe_intermediate 2048: gate+up GEMM, SiLU, down GEMM) at 128 and 4096 tokens, in the contiguous (prefill)
and masked (decode) layouts.

Each FP8 backend is timed beside the bf16 path the model would otherwise run on the same shape: torch's
bf16 matmul for dense, the repo's bf16 grouped kernels for experts (``torch._grouped_mm`` contiguous,
Triton masked). ``ratio`` = FP8 TFLOP/s / bf16 TFLOP/s (the issue's goal: >= 1.6 on the large shapes). The
masked layout is also timed under torch's own bf16 matmul of its shapes (``bf16_torch``: ``torch.bmm`` over
every expert's capacity rows, the SiLU * up pass between), each backend's ``ratio_torch`` against it: the
repo's masked kernel skips the rows past each expert's count, torch's computes them.
FP8 backends: ``triton`` (our GEMM, activation quantization included), ``triton_gemm`` (the GEMM alone on
pre-quantized activations), ``cublas`` (cuBLASLt's block-scaled GEMM through torch, quantization included;
sm90 where this torch takes block scales), ``triton_best`` (with ``--sweep``: the fastest of a few tile
configs of our GEMM on the prefill-sized shapes, its config recorded; the grouped GEMMs' gated and down
launches swept apart, each config's time logged), ``deepgemm`` (DeepGEMM's kernels,
``kernels.fp8_deepgemm``: dense, contiguous and masked, FP8 activations at every size; listed where
``available()``: a build on the path, sm90, its probe GEMM right; JIT compiles come before the timed runs).
The model runs ``TANDEM_FP8_GEMM``'s choice among ``triton``, ``cublas`` and ``deepgemm`` for dense GEMMs.
``rel_err`` is each output against the torch reference (kernels.fp8: quantize x, dequantize, matmul).
Timing: ``triton.testing.do_bench`` medians on CUDA; perf_counter medians on CPU (--quick only).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from kernels import fp8
from kernels.backend import switched
from kernels.fp8_cublas import GEMM_ENV
from kernels.fp8_deepgemm import MASKED_ROW_MULTIPLE
from kernels.moe import moe_forward, moe_forward_masked

RESULTS = Path(__file__).resolve().parent / "results"
DENSE = [(18432, 7168), (7168, 18432), (2112, 7168), (7168, 2112), (24576, 1536), (7168, 16384), (4096, 7168)]
DENSE_ROWS = (1, 16, 128, 4096)  # decode batch sizes (fused quantization, split-K) and prefill
EXPERTS, TOP_K, HIDDEN, INTER = 256, 8, 7168, 2048
TOKENS = (128, 4096)
QUICK_DENSE = [(256, 384), (200, 300)]  # a partial block each way in the second
QUICK_ROWS = (1, 33)
QUICK_MOE = (8, 2, 256, 192)  # experts, top-k, hidden, intermediate
QUICK_TOKENS = (16, 64)


def time_ms(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        # Medians, as the module says: do_bench's default is the mean, which one slow repetition of a ~10 ms
        # grouped GEMM (about a dozen fit in rep's 100 ms) moves by several percent.
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)).item()


def _with_act(mode: str, op: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``op`` run with ``fp8.ACT_ENV`` set to ``mode`` (the kernels read it on every call)."""
    def run(*args: object, **kwargs: object) -> torch.Tensor:
        with switched(fp8.ACT_ENV, mode):
            return op(*args, **kwargs)
    return run


def fp8_backends(device: torch.device, quick: bool) -> dict[str, dict[str, Callable[..., torch.Tensor]]]:
    """name -> {"linear", "gemm", "moe", "masked"} callables (missing keys: not offered by that backend)."""
    if device.type != "cuda":
        return {"torch_reference": {"linear": fp8.fp8_linear, "moe": fp8.fp8_moe_forward,
                                    "masked": fp8.fp8_moe_forward_masked}}
    from kernels import triton_fp8 as tf
    from kernels import triton_fp8_moe as tfm

    def gemm(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
        return tf.fp8_gemm_triton(xq, xs, w, ws, torch.bfloat16)

    ops = {"linear": tf.fp8_linear_triton, "moe": tfm.fp8_moe_forward_triton,
           "masked": tfm.fp8_moe_forward_masked_triton}
    # "triton" runs what the engine runs (fp8.ACT_ENV auto: W8A16 up to W8A16_MAX_ROWS rows); the other two
    # force FP8 activations (DeepSeek's recipe) or W8A16 at every size, so both show beside bf16.
    backends: dict[str, dict[str, Callable[..., torch.Tensor]]] = {
        "triton": ops,
        "triton_fp8_act": {name: _with_act("fp8", op) for name, op in ops.items()},
        "triton_w8a16": {name: _with_act("bf16", op) for name, op in ops.items()},
        "triton_gemm": {"gemm": gemm},
    }
    from kernels.fp8_cublas import PROBE_LOG, fp8_linear_cublas, probe_recipe

    recipe = probe_recipe(device.index or 0)
    for line in PROBE_LOG.get(device.index or 0, []):
        log(f"cuBLAS block-scaled FP8 probe: {line}")
    if recipe is not None:
        def cublas(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
            return fp8_linear_cublas(x, w, ws, None, x.dtype)

        backends["cublas"] = {"linear": cublas}
    from kernels import fp8_deepgemm as dg

    index = device.index or 0
    if dg.available(index):  # its probe runs in a child first: a crashing build is reported, not fatal
        backends["deepgemm"] = {"linear": dg.fp8_linear_deepgemm, "moe": dg.fp8_moe_forward_deepgemm,
                                "masked": dg.fp8_moe_forward_masked_deepgemm}
    for line in dg.PROBE_LOG.get(index, []):
        log(f"DeepGEMM probe: {line}")
    return backends


def _weights(n: int, k: int, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return fp8.quantize_fp8_weight(torch.randn(n, k, device=device, generator=gen) / k**0.5)


# Tile configs --sweep tries on the prefill-sized shapes: (block_m, block_n, group_m, num_warps, num_stages).
SWEEP_DENSE = [(128, 128, 8, 8, 3), (128, 128, 8, 8, 4), (128, 256, 8, 8, 3), (256, 128, 8, 8, 3), (64, 256, 8, 4, 4)]
# The grouped GEMMs' two launches are swept apart: the gated one (two weight tiles a program: gate and up) with the
# down launch at its default, then the down one with the gated launch at the best found (the contiguous layout's
# down launch keeps the gated one's row tile, as both walk the same padded rows).
SWEEP_GATED = [(64, 256, 8, 8, 3), (64, 128, 8, 4, 4), (64, 128, 8, 8, 4), (128, 128, 8, 8, 3), (128, 128, 8, 8, 4),
               (128, 64, 8, 4, 4), (64, 64, 8, 4, 5), (128, 256, 8, 8, 2)]
SWEEP_DOWN = [(64, 256, 8, 8, 3), (64, 256, 8, 8, 4), (128, 256, 8, 8, 3), (128, 128, 8, 8, 4), (64, 128, 8, 4, 4),
              (128, 128, 8, 4, 3), (64, 128, 8, 8, 5)]
SWEEP_MIN_ROWS = 128
# Backends whose masked layout needs a capacity in whole multiples of their row tile: DeepGEMM stores whole
# 128-row tiles (kernels.fp8_deepgemm), so a dispatch feeding it lays the experts out at such a capacity (as
# DeepEP's low-latency buffers are sized). The bench pads its layout once, outside the timing; the padded
# wrapper path (a copy of x and of the output) is what a caller with another capacity pays.
MASKED_LAYOUT_MULTIPLE = {"deepgemm": MASKED_ROW_MULTIPLE}


def best_config(call: Callable[..., Any], configs: list[tuple[int, ...]], device: torch.device,
                keyword: str = "config") -> tuple[float, tuple[int, ...]]:
    """(ms, config) of the fastest ``call(**{keyword: config})``; a config that fails to compile or launch is
    skipped. Each config's time is logged (the sweep's table)."""
    from kernels.triton_fp8 import Fp8GemmConfig

    best: tuple[float, tuple[int, ...]] = (float("inf"), ())
    for c in configs:
        try:
            ms = time_ms(partial(call, **{keyword: Fp8GemmConfig(*c)}), device)
        except Exception as exc:  # noqa: BLE001 - an out-of-resources config is a result, not a failure
            log(f"  {keyword} {c}: {type(exc).__name__}")
            continue
        log(f"  {keyword} {c}: {ms:.3f} ms")
        best = min(best, (ms, c))
    return best


def sweep_grouped(call: Callable[..., Any], device: torch.device) -> dict[str, Any] | None:
    """The gated launch's best tile (down at its default), then the down launch's (gated at that best)."""
    from kernels.triton_fp8 import Fp8GemmConfig

    _, gated = best_config(call, SWEEP_GATED, device)
    if not gated:
        return None
    ms, down = best_config(partial(call, config=Fp8GemmConfig(*gated)), SWEEP_DOWN, device, "down_config")
    if not down:
        return None
    return {"ms": ms, "config": list(gated), "down_config": list(down)}


def bench_dense(device: torch.device, quick: bool, sweep: bool = False) -> list[dict[str, Any]]:
    gen = torch.Generator(device=device).manual_seed(0)
    rows_list, shapes = (QUICK_ROWS, QUICK_DENSE) if quick else (DENSE_ROWS, DENSE)
    backends = fp8_backends(device, quick)
    out = []
    for n, k in shapes:
        w, ws = _weights(n, k, device, gen)
        w_bf16 = fp8.dequantize_fp8_weight(w, ws, dtype=torch.bfloat16)
        for m in rows_list:
            x = torch.randn(m, k, device=device, generator=gen).bfloat16()
            flops = 2 * m * n * k
            ref = fp8.fp8_linear(x.float(), w, ws)
            bf16_ms = time_ms(partial(torch.matmul, x, w_bf16.T), device)
            row: dict[str, Any] = {"m": m, "n": n, "k": k, "bf16": {"ms": bf16_ms, "tflops": flops / bf16_ms / 1e9}}
            xq, xs = fp8.quantize_fp8_act(x)
            for name, ops in backends.items():
                if "linear" in ops:
                    fn = partial(ops["linear"], x, w, ws)
                elif "gemm" in ops:
                    fn = partial(ops["gemm"], xq, xs, w, ws)
                else:
                    row[name] = {"error": "importable, not wired"}
                    continue
                try:
                    ms = time_ms(fn, device)
                except Exception as exc:  # noqa: BLE001 - a backend refusing a shape (or out of resources) is a result
                    row[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
                    continue
                row[name] = {"ms": ms, "tflops": flops / ms / 1e9, "ratio": bf16_ms / ms, "rel_err": rel_err(fn(), ref)}
            if sweep and device.type == "cuda" and m >= SWEEP_MIN_ROWS:
                from kernels.triton_fp8 import fp8_gemm_triton

                xq_c, xs_c = xq.contiguous(), xs.contiguous()
                ms, cfg = best_config(partial(fp8_gemm_triton, xq_c, xs_c, w, ws, torch.bfloat16), SWEEP_DENSE,
                                      device)
                if cfg:
                    row["triton_best"] = {"ms": ms, "tflops": flops / ms / 1e9, "ratio": bf16_ms / ms,
                                          "config": list(cfg)}
            out.append(row)
            log(f"dense M{m} N{n} K{k}: bf16 {row['bf16']['tflops']:.3g} TF/s | " + " | ".join(
                f"{b} {r['tflops']:.3g} TF/s x{r['ratio']:.2f}" for b, r in row.items() if isinstance(r, dict)
                and "ratio" in r))
    return out


def _expert_weights(experts: int, hidden: int, inter: int, device: torch.device,
                    gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    w13 = torch.empty(experts, 2 * inter, hidden, dtype=fp8.FP8_DTYPE, device=device)
    s13 = torch.empty(experts, 2 * -(-inter // 128), -(-hidden // 128), device=device)
    w2 = torch.empty(experts, hidden, inter, dtype=fp8.FP8_DTYPE, device=device)
    s2 = torch.empty(experts, -(-hidden // 128), -(-inter // 128), device=device)
    half = s13.shape[1] // 2
    for e in range(experts):  # one expert at a time: V3's 256 experts in float32 would take 45 GB
        g, gs = _weights(inter, hidden, device, gen)
        u, us = _weights(inter, hidden, device, gen)
        w13[e, :inter], s13[e, :half], w13[e, inter:], s13[e, half:] = g, gs, u, us
        w2[e], s2[e] = _weights(hidden, inter, device, gen)
    return w13, s13, w2, s2


def bench_grouped(device: torch.device, quick: bool, sweep: bool = False,
                  tokens_list: tuple[int, ...] | None = None) -> list[dict[str, Any]]:
    experts, top_k, hidden, inter = QUICK_MOE if quick else (EXPERTS, TOP_K, HIDDEN, INTER)
    gen = torch.Generator(device=device).manual_seed(1)
    w13, s13, w2, s2 = _expert_weights(experts, hidden, inter, device, gen)
    # Expert by expert: dequantizing all 256 at once would hold ~60 GB of float32 temporaries.
    w13_bf16 = torch.empty(w13.shape, dtype=torch.bfloat16, device=device)
    w2_bf16 = torch.empty(w2.shape, dtype=torch.bfloat16, device=device)
    for e in range(experts):
        w13_bf16[e] = fp8.dequantize_fp8_gated(w13[e], s13[e], dtype=torch.bfloat16)
        w2_bf16[e] = fp8.dequantize_fp8_weight(w2[e], s2[e], dtype=torch.bfloat16)
    if device.type == "cuda":
        from kernels.triton_moe import moe_forward_gpu, moe_forward_masked_triton

        bf16_moe, bf16_masked = moe_forward_gpu, moe_forward_masked_triton
    else:
        bf16_moe, bf16_masked = moe_forward, moe_forward_masked
    backends = fp8_backends(device, quick)
    out = []
    for tokens in tokens_list or (QUICK_TOKENS if quick else TOKENS):
        x = torch.randn(tokens, hidden, device=device, generator=gen).bfloat16()
        ids = torch.rand(tokens, experts, device=device, generator=gen).topk(top_k, dim=1).indices
        weights = torch.rand(tokens, top_k, device=device, generator=gen)
        flops = 6 * tokens * top_k * hidden * inter
        counts = torch.bincount(ids.reshape(-1), minlength=experts)
        capacity = -(-int(counts.max()) // 16) * 16
        xm = torch.zeros(experts, capacity, hidden, dtype=torch.bfloat16, device=device)
        flat, order = ids.reshape(-1), torch.argsort(ids.reshape(-1), stable=True)
        slot = torch.arange(flat.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[flat[order]]
        xm[flat[order], slot] = x[order // top_k]
        # Both masked kernels get the tile hint of the real rows per expert (their default assumes decode's
        # few); the torch references take none.
        hint = {"expected_rows_per_expert": max(1, tokens * top_k // experts)} if device.type == "cuda" else {}
        masked_bf16 = partial(bf16_masked, **hint)
        # layout -> (bf16 call, FP8 arguments and keywords, backend key, reference output)
        cases = {
            "contiguous": (partial(bf16_moe, x, ids, weights, w13_bf16, w2_bf16), (x, ids, weights, w13, s13, w2, s2),
                           {}, "moe", fp8.fp8_moe_forward(x.float(), ids, weights, w13, s13, w2, s2)),
            "masked": (partial(masked_bf16, xm, counts, w13_bf16, w2_bf16), (xm, counts, w13, s13, w2, s2), hint,
                       "masked", fp8.fp8_moe_forward_masked(xm.float(), counts, w13, s13, w2, s2)),
        }
        for layout, (bf16_fn, fp8_args, fp8_kwargs, key, ref) in cases.items():
            bf16_ms = time_ms(bf16_fn, device)
            row: dict[str, Any] = {"layout": layout, "tokens": tokens, "experts": experts, "top_k": top_k,
                                   "hidden": hidden, "inter": inter, "capacity": capacity,
                                   "bf16": {"ms": bf16_ms, "tflops": flops / bf16_ms / 1e9}}
            torch_ms = time_ms(partial(masked_bmm, xm, w13_bf16, w2_bf16), device) if layout == "masked" else None
            if torch_ms is not None:
                row["bf16_torch"] = {"ms": torch_ms, "tflops": flops / torch_ms / 1e9}
            for name, ops in backends.items():
                if key not in ops:
                    continue
                args = fp8_args
                multiple = MASKED_LAYOUT_MULTIPLE.get(name, 1) if layout == "masked" else 1
                if capacity % multiple:  # the dispatch writes such a backend's layout at its capacity: untimed
                    args = (torch.nn.functional.pad(xm, (0, 0, 0, -capacity % multiple)), *fp8_args[1:])
                fn = partial(ops[key], *args, **(fp8_kwargs if name != "torch_reference" else {}))
                try:
                    ms = time_ms(fn, device)
                except Exception as exc:  # noqa: BLE001 - one backend failing a layout is a result; the others still run
                    row[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
                    continue
                got = fn()[:, :capacity] if layout == "masked" else fn()
                row[name] = {"ms": ms, "tflops": flops / ms / 1e9, "ratio": bf16_ms / ms, "rel_err": rel_err(got, ref)}
                if args is not fp8_args:
                    row[name]["capacity"] = args[0].shape[1]
                if torch_ms is not None:
                    row[name]["ratio_torch"] = torch_ms / ms
            if sweep and device.type == "cuda" and tokens * top_k // experts >= SWEEP_MIN_ROWS // 2:
                best = sweep_grouped(partial(backends["triton"][key], *fp8_args, **fp8_kwargs), device)
                if best is not None:
                    ms = best["ms"]
                    row["triton_best"] = {**best, "tflops": flops / ms / 1e9, "ratio": bf16_ms / ms}
            out.append(row)
            torch_note = f" (torch bmm {row['bf16_torch']['tflops']:.3g} TF/s)" if torch_ms is not None else ""
            log(f"grouped {layout} T{tokens} E{experts} top{top_k}: bf16 {row['bf16']['tflops']:.3g} TF/s"
                + torch_note + " | " + " | ".join(
                f"{b} {r['tflops']:.3g} TF/s x{r['ratio']:.2f}" + (f" (x{r['ratio_torch']:.2f} torch's)"
                                                                   if "ratio_torch" in r else "")
                for b, r in row.items() if isinstance(r, dict) and "ratio" in r))
    return out


def masked_bmm(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The masked experts in torch's bf16 matmul: every capacity row of every expert (zero rows give zeros);
    between the two, the one-pass SiLU * up the repo's kernels use on CUDA (torch's own is two passes)."""
    if x.is_cuda:
        from kernels.triton_decode_fused import silu_mul_triton as silu_mul
    else:
        from kernels.moe import silu_mul
    gate_up = torch.bmm(x, w13.transpose(1, 2))
    inter = silu_mul(gate_up.view(-1, gate_up.shape[-1])).view(*gate_up.shape[:2], -1)
    return torch.bmm(inter, w2.transpose(1, 2))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"M{r['m']} {r['n']}x{r['k']}", r) for r in results["dense"]]
    rows += [(f"{r['layout'][:4]} T{r['tokens']}", r) for r in results["grouped"]]
    names = sorted({b for _, r in rows for b, v in r.items() if isinstance(v, dict) and "ratio" in v})
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.6), 4.5))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        ax.bar([j + i * width for j in range(len(rows))], [r.get(name, {}).get("ratio", 0) for _, r in rows],
               width, label=name)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(1.6, color="red", lw=0.8, ls="--", label="goal 1.6x")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [label for label, _ in rows], rotation=60,
                  ha="right", fontsize=7)
    ax.set_ylabel("FP8 / bf16 throughput")
    ax.set_title(f"FP8 block-scaled GEMM vs bf16 ({results['device']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.gemm", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes against the torch reference (CPU ok)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--dense-only", action="store_true", help="skip the grouped expert GEMMs")
    parser.add_argument("--grouped-only", action="store_true", help="skip the dense GEMMs")
    parser.add_argument("--tokens", default=None, help="grouped GEMMs' token counts, comma-separated "
                        f"(default {','.join(map(str, TOKENS))})")
    parser.add_argument("--sweep", action="store_true", help="also try a few tile configs of our GEMM (CUDA)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the JSON and PNG go")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type != "cuda" and not args.quick:
        raise SystemExit("real numbers need CUDA; on CPU run with --quick (tiny shapes, torch reference)")
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "quick": args.quick,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if device.type == "cuda":
        import os

        import triton

        results["triton"] = triton.__version__
        os.environ[GEMM_ENV] = "triton"  # the "triton" backend is ours alone; "cublas" calls cuBLAS directly
    stem = f"gemm_{device.type}" + ("_quick" if args.quick else "")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results["dense"] = [] if args.grouped_only else bench_dense(device, args.quick, args.sweep)
    if device.type == "cuda":
        from kernels.fp8_cublas import PROBE_LOG
        from kernels.fp8_deepgemm import PROBE_LOG as DEEPGEMM_PROBE_LOG

        results["cublas_probe"] = PROBE_LOG.get(device.index or 0, [])
        results["deepgemm_probe"] = DEEPGEMM_PROBE_LOG.get(device.index or 0, [])
    results["grouped"] = []
    # The dense half is kept before the grouped GEMMs run: a backend dying there leaves a JSON behind.
    (args.out_dir / f"{stem}.json").write_text(json.dumps(results, indent=1))
    tokens = tuple(int(t) for t in args.tokens.split(",")) if args.tokens else None
    results["grouped"] = [] if args.dense_only else bench_grouped(device, args.quick, args.sweep, tokens)
    (args.out_dir / f"{stem}.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out_dir / f"{stem}.png")
    log(f"wrote {args.out_dir / stem}.json and .png")
    return results


if __name__ == "__main__":
    main()
