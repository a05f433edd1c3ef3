"""Tile sweeps for the decode step's memory-bound kernels, at the shapes the V2-Lite decode step runs.

    PYTHONPATH=. python3 -m bench.tune_gpu [--out PATH] [--jobs 12] [--only moe,moecompact,fp8moe,dense,mla16,mla128]

What it sweeps (each configuration timed captured in a CUDA graph, L2 flushed between repetitions):
  - moe: the masked grouped GEMM's two launches separately (gate+up with SiLU, then down), V2-Lite experts
    (64 x hidden 2048 x intermediate 1408, top-6) at 1, 8 and 64 tokens, and the shared experts as one
    expert (intermediate 2816). Reported: GB/s of the weights the launch must read, and that over copy_.
  - moecompact: today's moe tile at 1 and 8 tokens over all 64 experts and over the active ones alone (the
    same weights and bytes): what a grid of the active experts would save over the masked layout's 64, most of
    them empty at decode.
  - fp8moe: the same two launches with FP8 block-scaled weights as the FP8 decode step runs them
    (`kernels.triton_fp8_moe`, W8A16: bf16 rows against the FP8 weight tile), BLOCK_K fixed at the scale
    block (128); GB/s counts the FP8 bytes.
  - dense: V2-Lite's skinny projections (and the LM head) through that kernel as one expert, beside cuBLAS
    (the first row of each case).
  - mla16 / mla128: paged MLA decode at 16 heads (V2-Lite, TP attention) and 128 heads (V3 under DP
    attention), batch 1 / 8 / 64, context 1024 / 4096, page 64: KV GB/s and TFLOP/s.
Compilation dominates a sweep's wall time, so every configuration is first compiled by a pool of
worker processes (Triton's on-disk cache), then timed one at a time by this process.
The best configuration per case is what `kernels.triton_moe` / `kernels.triton_mla_decode` pick by shape;
the JSON keeps every row so the choice can be re-checked.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import triton.testing

from bench.kernels_gpu import bench_copy, log, rel_err
from kernels.flashmla_decode import _extension, mla_decode_attention_flashmla
from kernels.fp8 import dequantize_fp8_gated, dequantize_fp8_weight, quantize_fp8_weight
from kernels.mla import mla_decode_attention
from kernels.triton_fp8 import Fp8GemmConfig
from kernels.triton_fp8_moe import _launch_masked as _launch_masked_fp8
from kernels.triton_fp8_moe import grouped_gemm_config
from kernels.triton_mla_decode import DecodeLaunchConfig, default_launch_config, mla_decode_attention_triton
from kernels.triton_moe import GemmConfig, _launch_masked, default_gemm_config

KEYS = ("kind", "tokens", "gated", "shared", "compact", "name", "batch", "heads", "context")
RESULTS = Path(__file__).resolve().parent / "results" / "tune_gpu.json"
EXPERTS, HIDDEN, INTER, TOP_K, SHARED_INTER = 64, 2048, 1408, 6, 2816
LORA, ROPE, PAGE = 512, 64, 64


def moe_configs(tokens: int, shared: bool) -> list[GemmConfig]:
    """Today's pick first (what `kernels.triton_moe` chose before this sweep), then the sweep."""
    if shared and tokens <= 16:
        out = [GemmConfig(block_m=16, block_n=16, block_k=256, group_m=1, num_warps=4, num_stages=4)]
    else:
        out = [default_gemm_config(tokens if shared else min(tokens, 16), torch.bfloat16)]
    for block_m in ([16] if tokens <= 16 else [16, 32]):
        for block_n in (16, 32, 64, 128):
            for block_k in (128, 256):
                if block_n * block_k > 128 * 128:
                    continue
                for stages in (3, 4):
                    for warps in ((4,) if block_n < 128 else (4, 8)):
                        cfg = GemmConfig(block_m, block_n, block_k, 1, warps, stages)
                        if cfg not in out:
                            out.append(cfg)
    return out


def fp8_moe_configs(tokens: int) -> list[Fp8GemmConfig]:
    """Today's pick first (`kernels.triton_fp8_moe.grouped_gemm_config`), then the sweep."""
    out = [grouped_gemm_config(min(tokens, 16))]
    for block_m in ([16] if tokens <= 16 else [16, 32]):
        for block_n in (16, 32, 64, 128):
            for stages in (3, 4, 5):
                for warps in ((4,) if block_n < 128 else (4, 8)):
                    cfg = Fp8GemmConfig(block_m, block_n, 1, warps, stages)
                    if cfg not in out:
                        out.append(cfg)
    return out


def mla_configs(batch: int, heads: int, context: int, quick: bool = False) -> list[DecodeLaunchConfig]:
    base = default_launch_config(batch, heads, context, torch.bfloat16, torch.device("cuda"))
    out = [base]
    if quick:
        return out
    if heads > 16:
        splits = sorted({base.num_splits, min(64, base.num_splits * 2)})
    elif base.num_splits <= 8:
        # A large batch is memory-bound and its split count sets how many programs share an SM (two vs four
        # per SM at batch 64 differ by 20 %): every count from half the default to twice it is tried.
        splits = list(range(max(1, base.num_splits // 2), base.num_splits * 2 + 1))
    else:
        splits = sorted({base.num_splits // 2, base.num_splits, min(64, base.num_splits * 2)})
    for block_h in ([16] if heads <= 16 else [32, 64]):
        for block_n in (32, 64):
            for warps in (4, 8):
                for stages in ((2, 3) if heads <= 16 else (1, 2, 3)):
                    for s in splits:
                        cfg = DecodeLaunchConfig(block_h, block_n, s, warps, stages)
                        if cfg not in out:
                            out.append(cfg)
    return out


# ---- cases: build inputs, return (callable, reference or None, bytes read, flops) ----

def _expert_counts(tokens: int, shared: bool, gen: torch.Generator) -> torch.Tensor:
    """Rows per expert of a decode batch: V2-Lite's top-6 of 64 on random scores, or every token (shared)."""
    if shared:
        return torch.full((1,), tokens, dtype=torch.int32, device="cuda")
    ids = torch.rand(tokens, EXPERTS, generator=gen, device="cuda").topk(TOP_K, dim=1).indices
    return torch.bincount(ids.reshape(-1), minlength=EXPERTS).to(torch.int32)


def _moe_case(tokens: int, gated: bool, cfg: GemmConfig, shared: bool = False, compact: bool = False):
    """``compact``: only the experts that have rows (the same weights, counts and bytes, a grid of the active
    experts alone): beside the full case it measures what the masked layout's empty experts cost."""
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    experts, inter = (1, SHARED_INTER) if shared else (EXPERTS, INTER)
    counts = _expert_counts(tokens, shared, gen)
    active = int((counts > 0).sum())
    if compact:
        experts, counts = active, counts[counts > 0].contiguous()
    w13 = torch.randn(experts, 2 * inter, HIDDEN, generator=gen, device="cuda").bfloat16() / HIDDEN**0.5
    w2 = torch.randn(experts, HIDDEN, inter, generator=gen, device="cuda").bfloat16() / inter**0.5
    if gated:
        a = torch.randn(experts, tokens, HIDDEN, generator=gen, device="cuda").bfloat16()
        out = torch.empty(experts, tokens, inter, device="cuda", dtype=torch.bfloat16)
        w, nbytes = w13, active * 2 * inter * HIDDEN * 2
    else:
        a = torch.randn(experts, tokens, inter, generator=gen, device="cuda").bfloat16()
        out = torch.empty(experts, tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
        w, nbytes = w2, active * inter * HIDDEN * 2

    def call() -> torch.Tensor:
        _launch_masked(a, w, out, counts, gated, cfg)
        return out

    masked_out, checked_ref = _masked_checks(call, a, w.float, counts, gated)
    rows = int(counts.sum())
    flops = 2 * rows * (2 * inter if gated else HIDDEN) * (HIDDEN if gated else inter)
    return masked_out, call, checked_ref, nbytes, flops


def _masked_checks(call: Callable[[], torch.Tensor], a: torch.Tensor, weight_f32: Callable[[], torch.Tensor],
                   counts: torch.Tensor, gated: bool) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """(the launch's output, its float32 reference: ``a`` times the weight, SiLU(gate) * up when gated), both on
    the rows within each count alone: rows past a count are unwritten (NaN may sit there). ``weight_f32`` gives
    the weight in float32 when the reference runs (an FP8 one dequantized), not while the case is built."""
    valid = (torch.arange(a.shape[1], device=a.device)[None, :] < counts[:, None])[..., None]

    def reference() -> torch.Tensor:
        y = torch.einsum("etk,enk->etn", a.float(), weight_f32())
        if gated:
            g, u = y.chunk(2, dim=-1)
            y = torch.nn.functional.silu(g) * u
        return torch.where(valid, y, 0.0)

    def checked() -> torch.Tensor:
        return torch.where(valid, call().float(), 0.0)

    return checked, reference


def _fp8_moe_case(tokens: int, gated: bool, cfg: Fp8GemmConfig, shared: bool = False):
    """`_moe_case` with FP8 weights (one scale per 128 x 128 block), the launch the FP8 decode step runs."""
    gen = torch.Generator(device="cuda").manual_seed(tokens + 1)
    experts, inter = (1, SHARED_INTER) if shared else (EXPERTS, INTER)
    counts = _expert_counts(tokens, shared, gen)
    n, k = (2 * inter, HIDDEN) if gated else (HIDDEN, inter)
    if gated:  # gate and up quantized apart: each half keeps its own block rows, as the checkpoint's
        halves = [quantize_fp8_weight(torch.randn(experts, inter, HIDDEN, generator=gen, device="cuda") / k**0.5)
                  for _ in range(2)]
        w, w_s = torch.cat([h[0] for h in halves], 1), torch.cat([h[1] for h in halves], 1)
    else:
        w, w_s = quantize_fp8_weight(torch.randn(experts, n, k, generator=gen, device="cuda") / k**0.5)
    a = torch.randn(experts, tokens, k, generator=gen, device="cuda").bfloat16()
    out = torch.empty(experts, tokens, inter if gated else HIDDEN, device="cuda", dtype=torch.bfloat16)

    def call() -> torch.Tensor:
        _launch_masked_fp8(a, None, w, w_s, out, counts, gated, cfg, (128, 128))
        return out

    def dequantized() -> torch.Tensor:
        return dequantize_fp8_gated(w, w_s) if gated else dequantize_fp8_weight(w, w_s)

    masked_out, fp8_ref = _masked_checks(call, a, dequantized, counts, gated)
    active, rows = int((counts > 0).sum()), int(counts.sum())
    return masked_out, call, fp8_ref, active * n * k, 2 * rows * n * k


DENSE = {"q_proj": (3072, 2048), "kv_a_proj": (576, 2048), "o_proj": (2048, 2048), "lm_head": (102400, 2048)}


def _dense_case(tokens: int, name: str, cfg: GemmConfig):
    """A bf16 linear layer as one expert of the masked GEMM: what a skinny decode projection could run."""
    n, k = DENSE[name]
    gen = torch.Generator(device="cuda").manual_seed(n + tokens)
    a = torch.randn(1, tokens, k, generator=gen, device="cuda").bfloat16()
    w = torch.randn(1, n, k, generator=gen, device="cuda").bfloat16() / k**0.5
    out = torch.empty(1, tokens, n, device="cuda", dtype=torch.bfloat16)
    counts = torch.full((1,), tokens, dtype=torch.int32, device="cuda")

    def call() -> torch.Tensor:
        _launch_masked(a, w, out, counts, False, cfg)
        return out

    def ref() -> torch.Tensor:
        return a[0].float() @ w[0].float().T

    def check() -> torch.Tensor:
        return call()[0]

    def cublas() -> torch.Tensor:
        return torch.nn.functional.linear(a[0], w[0])

    if cfg is None:
        return cublas, cublas, ref, n * k * 2, 2 * tokens * n * k
    return check, call, ref, n * k * 2, 2 * tokens * n * k


def _mla_case(batch: int, heads: int, context: int, cfg: DecodeLaunchConfig):
    gen = torch.Generator(device="cuda").manual_seed(batch * heads + context)
    pages_per_seq = context // PAGE
    num_pages = batch * pages_per_seq
    pool = torch.randn(num_pages, 2, PAGE, LORA + ROPE, generator=gen, device="cuda", dtype=torch.bfloat16)
    kv = pool[:, 1]
    page_table = torch.randperm(num_pages, generator=gen, device="cuda").reshape(batch, -1).to(torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q_latent = torch.randn(batch, heads, LORA, generator=gen, device="cuda", dtype=torch.bfloat16)
    q_rope = torch.randn(batch, heads, ROPE, generator=gen, device="cuda", dtype=torch.bfloat16)
    args = (q_latent, q_rope, kv, page_table, seq_lens, 1.0 / math.sqrt(192))

    def call() -> torch.Tensor:
        if cfg is None:  # FlashMLA
            return mla_decode_attention_flashmla(*args)
        return mla_decode_attention_triton(*args, config=cfg)

    def ref() -> torch.Tensor:
        return mla_decode_attention(*(t.double() if t.is_floating_point() else t for t in args[:5]), args[5])

    nbytes = batch * context * (LORA + ROPE) * 2
    flops = 2 * batch * heads * context * (LORA + ROPE + LORA)
    return call, call, ref, nbytes, flops


def graph_ms(fn: Any) -> dict[str, float]:
    """Median of a CUDA-graph replay (shorter than bench.kernels_gpu's: hundreds of configurations)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    p20, p50, p80 = triton.testing.do_bench(graph.replay, warmup=10, rep=40, quantiles=[0.2, 0.5, 0.8])
    return {"ms": p50, "p20_ms": p20, "p80_ms": p80}


def all_cases(only: set[str], quick: bool = False) -> list[tuple[str, dict[str, Any], Any]]:
    cases: list[tuple[str, dict[str, Any], Any]] = []
    if "moe" in only:
        for tokens in (1, 8, 64):
            for gated in (True, False):
                for shared in (False, True):
                    for cfg in moe_configs(tokens, shared):
                        key = {"tokens": tokens, "gated": gated, "shared": shared}
                        cases.append(("moe", key, cfg))

    if "moecompact" in only:  # today's pick over all 64 experts and over the active ones alone
        for tokens in (1, 8):
            for gated in (True, False):
                cfg = moe_configs(tokens, False)[0]
                for compact in (False, True):
                    cases.append(("moe", {"tokens": tokens, "gated": gated, "shared": False, "compact": compact},
                                  cfg))
    if "fp8moe" in only:
        for tokens in (1, 8, 64):
            for gated in (True, False):
                for shared in (False, True):
                    for cfg in fp8_moe_configs(tokens if shared else min(tokens, 16)):
                        cases.append(("fp8moe", {"tokens": tokens, "gated": gated, "shared": shared}, cfg))
    if "dense" in only:
        for tokens in (1, 8, 64):
            for name in DENSE:
                for cfg in [None, *moe_configs(tokens, True)[1:]]:
                    cases.append(("dense", {"tokens": tokens, "name": name}, cfg))
    for heads, name in ((16, "mla16"), (128, "mla128")):
        if name not in only:
            continue
        shapes = [(1, 1024), (8, 1024), (64, 1024), (64, 4096)] if heads == 16 else [(64, 4096), (8, 1024), (64, 1024)]
        for batch, context in shapes:
            for cfg in ([None] if _extension() is not None else []) + mla_configs(batch, heads, context, quick):
                cases.append((name, {"batch": batch, "heads": heads, "context": context}, cfg))
    return cases


def build(kind: str, key: dict[str, Any], cfg: Any):
    if kind == "moe":
        return _moe_case(key["tokens"], key["gated"], cfg, key["shared"], key.get("compact", False))
    if kind == "fp8moe":
        return _fp8_moe_case(key["tokens"], key["gated"], cfg, key["shared"])
    if kind == "dense":
        return _dense_case(key["tokens"], key["name"], cfg)
    return _mla_case(key["batch"], key["heads"], key["context"], cfg)


def _compile(job: tuple[str, dict[str, Any], Any]) -> str | None:
    try:
        check, call, _, _, _ = build(*job)
        check()
        torch.cuda.synchronize()
    except Exception as exc:  # a tile that does not fit: recorded when timed
        return f"{type(exc).__name__}: {exc}"[:200]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="MLA: the default tile (and FlashMLA) only")
    parser.add_argument("--only", default="moe,moecompact,fp8moe,dense,mla16,mla128")
    args = parser.parse_args()
    only = set(args.only.split(","))
    cases = all_cases(only, args.quick)
    started = time.monotonic()
    log(f"{len(cases)} configurations; compiling with {args.jobs} processes")
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        errors = pool.map(_compile, cases, chunksize=4)
    log(f"compiled in {time.monotonic() - started:.0f} s ({sum(e is not None for e in errors)} failed)")
    copy = bench_copy()
    rows = []
    refs: dict[str, torch.Tensor] = {}
    for (kind, key, cfg), error in zip(cases, errors, strict=True):
        row = {"kind": kind, **key,
               "config": asdict(cfg) if cfg is not None else ("cublas" if kind == "dense" else "flashmla")}
        if error:
            rows.append({**row, "error": error})
            continue
        check, call, ref, nbytes, flops = build(kind, key, cfg)
        ref_key = json.dumps([kind, key], sort_keys=True)
        if ref_key not in refs:
            refs[ref_key] = ref().float()
        try:
            err = rel_err(check().float(), refs[ref_key])
            t = graph_ms(call)
        except Exception as exc:
            rows.append({**row, "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        gbps = nbytes / t["ms"] / 1e6
        rows.append({**row, **t, "gbps": gbps, "vs_copy": gbps / copy["rw_gbps"], "tflops": flops / t["ms"] / 1e9,
                     "rel_err": err})
    best: dict[str, Any] = {}
    first: dict[str, Any] = {}  # each case's first row: today's pick (see moe_configs / mla_configs)
    for row in rows:
        key = json.dumps({k: v for k, v in row.items() if k in KEYS}, sort_keys=True)
        first.setdefault(key, row)
        if "ms" in row and row["rel_err"] <= 2e-2 and (key not in best or row["ms"] < best[key]["ms"]):
            best[key] = row
    for key, row in best.items():
        d = first[key]
        log(f"{key}: best {row['config']} {row['ms'] * 1e3:.1f} us {row['vs_copy']:.0%} of copy "
            f"{row['tflops']:.0f} TFLOP/s | first {d.get('config')} {d.get('ms', float('nan')) * 1e3:.1f} us")
    result = {"device": torch.cuda.get_device_name(), "copy": copy, "best": best, "rows": rows,
              "wall_s": time.monotonic() - started}
    for path in [RESULTS] + ([args.out] if args.out else []):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
