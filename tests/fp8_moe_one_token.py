"""One V2-Lite layer's FP8 GEMMs at one token, alone: tile sweeps and a target for a kernel profiler.

    python tests/fp8_moe_one_token.py [--iters 20] [--sweep] [--dense | --dense-only] [--gemv-sweep]
        [--best-env FILE]   (CUDA GPU, FP8)
    ncu --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \\
        -k regex:_fp8_moe_gemm_kernel -c 4 python tests/fp8_moe_one_token.py

Experts: V2-Lite's shapes (64 routed experts of 2048 x 1408, top 6, two shared experts riding in the same
launches as one 2816-wide expert), W8A16, capacity 1: the launches that took 1.67 ms of the FP8 decode step at
batch 1 on an H100 at 36 % of ``copy_``. ``--dense``: the attention's two FP8 projections at one row (fused
q + kv_a, 3648 x 2048; o_proj, 2048 x 2048), 0.43 ms of that step at about a quarter of ``copy_``.

Each variant is captured in a CUDA graph (several layers' worth of launches, as the decode step replays them,
so the graph's own launch is amortized) and timed against the bytes it must read (FP8 weights and scales)
moved at the rate of a ``copy_`` timed beside it. ``--sweep`` tries tile widths, K blocks an iteration, warps
and pipeline stages over the active-expert grid through the same environment overrides a deployment would set
(``TANDEM_FP8_MOE_DECODE_TILE``, ``TANDEM_MOE_ACTIVE_GRID``, ``TANDEM_FP8_DENSE_DECODE_TILE``,
``TANDEM_FP8_BF16_CONVERT``, ``TANDEM_FP8_SPLIT_FIXUP``); without it, the defaults, the other weight conversion
and the launches without PDL (``TANDEM_PDL=0``) only. The dense projections at one row run as a GEMV by default
(``TANDEM_FP8_DENSE_GEMV``); the tiled kernel is timed beside it, and ``--gemv-sweep`` tries the GEMV's tiles
(``TANDEM_FP8_GEMV_TILE``). ``--best-env`` writes the fastest as ``export`` lines when it beats the default by
more than 3 %.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fp8_cases import random_fp8_experts  # noqa: E402

from bench.decode_floor import copy_bandwidth  # noqa: E402
from engine.moe import ACTIVE_GRID_ENV, active_grid_enabled  # noqa: E402
from kernels import fp8  # noqa: E402
from kernels import triton_fp8 as tf  # noqa: E402
from kernels import triton_fp8_gemv as tfg  # noqa: E402
from kernels import triton_fp8_moe as tfm  # noqa: E402
from kernels.f16_groups import F16_DECODE_ENV  # noqa: E402
from kernels.triton_decode_fused import active_experts_triton  # noqa: E402
from kernels.triton_f16_groups import f16_groups_active  # noqa: E402
from kernels.triton_moe import moe_forward_masked_shared_triton  # noqa: E402
from kernels.triton_moe_fused_decode import FUSED_DECODE_ENV  # noqa: E402
from kernels.triton_pdl import PDL_ENV  # noqa: E402

EXPERTS, HIDDEN, INTER, SHARED_INTER, TOP_K = 64, 2048, 1408, 2816, 6
DENSE_SHAPES = ((3648, 2048), (2048, 2048))  # (N, K): fused q_proj + kv_a_proj_with_mqa, o_proj
REPS = 8  # launches (or layer pairs) per graph replay
MARGIN = 0.97  # an override must beat the default by more than 3 %

Variant = tuple[str, dict[str, str]]  # (label, environment overrides)
# Without programmatic dependent launch (kernels.triton_pdl, the default on sm90+ since session 41, where each
# launch of the graph may start while the one before still runs). A whole-slice L2 prefetch of each program's
# weights (before the PDL wait where it could be) was tried beside it in session 41 and dropped: 43.7 / 41.4 us
# (with PDL) for the experts against 37.7 / 36.8 (bench/results/fp8_one_token_prefetch_h100_s41.log).
PDL_VARIANTS: list[Variant] = [("default, without PDL", {PDL_ENV: "0"})]


def timed_us(fn: Callable[[], object], iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3


def graph_us(fn: Callable[[], object], env: dict[str, str], iters: int) -> tuple[float, set[int]]:
    """``fn`` under ``env``, REPS times in one CUDA graph: (microseconds per call (no host cost), the stages
    the masked launches of the decode tile ran at where fewer fitted than asked)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        fn()  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(REPS):
                fn()
        # A tile whose stages do not fit shared memory runs with fewer (kernels.triton_fp8_moe._launch_fitting).
        cfg = tfm.grouped_gemm_config(1)
        fitted = {s for key, s in tfm._STAGES_THAT_FIT.items() if key[0] == cfg and s != cfg.num_stages}
        return timed_us(graph.replay, iters) / REPS, fitted
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def floor_us(nbytes: int, copy_rate: float) -> float:
    """Moving ``nbytes`` once at ``copy_rate`` (bytes a second: ``bench.decode_floor.copy_bandwidth``)."""
    return nbytes / copy_rate * 1e6


# Gate/up and down in one launch (kernels.triton_moe_fused_decode) against two, with and without PDL.
FUSED_VARIANTS: list[Variant] = [
    ("active experts, two launches", {tfm.MOE_DECODE_TILE_ENV: "", ACTIVE_GRID_ENV: "1", FUSED_DECODE_ENV: "0"}),
    ("active experts, one launch", {tfm.MOE_DECODE_TILE_ENV: "", ACTIVE_GRID_ENV: "1", FUSED_DECODE_ENV: "1"}),
    ("active experts, one launch, without PDL", {tfm.MOE_DECODE_TILE_ENV: "", ACTIVE_GRID_ENV: "1",
                                                 FUSED_DECODE_ENV: "1", PDL_ENV: "0"}),
    *((f"one launch 16x{n}x128 {w} warps {st} stages", {tfm.MOE_DECODE_TILE_ENV: f"{n},{w},{st},1",
                                                        ACTIVE_GRID_ENV: "1", FUSED_DECODE_ENV: "1"})
      for n, w, st in ((16, 4, 4), (32, 4, 3), (32, 4, 5), (64, 4, 4), (32, 8, 4))),
]


# The experts as GEMVs (a program per 4 whole columns of an expert, commit 72c0959) were timed here in session 46
# and dropped: 40.9 us a layer at one token (39.1 at their best tile) against the tiled launches' 37.3
# (bench/results/fp8_one_token_gemv_sweep_call1_h100_s46.log).
def moe_variants(sweep: bool) -> list[Variant]:
    out: list[Variant] = [  # the defaults first: what the others are compared with
        ("default tiles, active experts", {tfm.MOE_DECODE_TILE_ENV: "", ACTIVE_GRID_ENV: "1"}),
        ("default tiles, every expert's column", {tfm.MOE_DECODE_TILE_ENV: "", ACTIVE_GRID_ENV: "0"}),
        ("default tiles, active experts, cvt", {tfm.MOE_DECODE_TILE_ENV: "", ACTIVE_GRID_ENV: "1",
                                                tf.W8A16_CONVERT_ENV: "cvt"}),
        *PDL_VARIANTS,
        *FUSED_VARIANTS,
    ]
    if not sweep:  # 64-wide tiles, which beat the default for the routed experts alone (--act-probe)
        out[1:1] = [(f"16x64x128 4 warps {st} stages", {tfm.MOE_DECODE_TILE_ENV: f"64,4,{st},1", ACTIVE_GRID_ENV: "1"})
                    for st in (4, 3)]
    else:
        # Around session 41's winner (16 x 32 x 128, 4 warps, 4 stages, "bits", now the default): wider and
        # narrower tiles, 2-8 warps, 3-6 stages, one or two 128-wide K blocks an iteration. "cvt" lost every row
        # of that sweep (bench/results/fp8_one_token_sweep_h100_s41.log), so only "bits" here.
        for block_n, warps, stages, kb_step in itertools.product((16, 32, 64), (2, 4, 8), (3, 4, 5, 6), (1, 2)):
            out.append((f"16x{block_n}x{128 * kb_step} {warps} warps {stages} stages",
                        {tfm.MOE_DECODE_TILE_ENV: f"{block_n},{warps},{stages},{kb_step}", ACTIVE_GRID_ENV: "1"}))
        timed = {label for label, _ in out}  # FUSED_VARIANTS already hold five of one launch's tiles
        for block_n, warps, stages in itertools.product((16, 32, 64), (4, 8), (3, 4, 5)):  # one launch's tiles
            label = f"one launch 16x{block_n}x128 {warps} warps {stages} stages"
            if label not in timed:
                out.append((label, {tfm.MOE_DECODE_TILE_ENV: f"{block_n},{warps},{stages},1", ACTIVE_GRID_ENV: "1",
                                    FUSED_DECODE_ENV: "1"}))
    # f16 activations (kernels.triton_f16_groups: one launch writes the rows, the gated launch its output in f16),
    # at the default tile and around it; 64-wide gated tiles give the down launch 64-wide scale groups.
    out[1:1] = [(f"f16 activations 16x{n} {w} warps {st} stages",
                 {F16_DECODE_ENV: "1", tfm.MOE_DECODE_TILE_ENV: f"{n},{w},{st},1", ACTIVE_GRID_ENV: "1"})
                for n, w, st in ((32, 4, 4), (32, 4, 3), (32, 4, 5), (64, 4, 4), (16, 4, 4), (32, 8, 4))]
    return out


def dense_variants(sweep: bool, gemv_sweep: bool = False) -> list[Variant]:
    fixup = tf.SPLIT_FIXUP_ENV
    tiled = {tf.DENSE_DECODE_TILE_ENV: "", tfg.GEMV_ENV: "0"}  # the split-K tiles, whatever the default
    out: list[Variant] = [("default", {tf.DENSE_DECODE_TILE_ENV: ""}),
                          ("tiled", tiled),
                          ("tiled, cvt", {**tiled, tf.W8A16_CONVERT_ENV: "cvt"}),
                          ("tiled, splits summed by a launch of their own", {**tiled, fixup: "0"}),
                          ("tiled, without PDL", {**tiled, PDL_ENV: "0"}),
                          # one program per few whole columns, its weights read before the PDL wait
                          ("GEMV", {tfg.GEMV_ENV: "1", tfg.GEMV_TILE_ENV: ""}),
                          ("GEMV without PDL", {tfg.GEMV_ENV: "1", tfg.GEMV_TILE_ENV: "", PDL_ENV: "0"})]
    if gemv_sweep:
        for block_n, warps, chunk in itertools.product((4, 8, 16), (2, 4, 8), (4, 8, 16)):
            out.append((f"GEMV {block_n} columns {warps} warps {chunk} K blocks a load",
                        {tfg.GEMV_ENV: "1", tfg.GEMV_TILE_ENV: f"{block_n},{warps},{chunk}"}))
    if not sweep:
        return out
    # "bits" and the partials summed in the launch (the defaults since session 41's sweep); 32- and 64-wide tiles
    # (16-wide lost every row of it), 2-8 splits, 3-6 stages, 2-8 warps
    for block_n, split, stages, warps in itertools.product((32, 64), (2, 4, 8), (3, 4, 6), (2, 4, 8)):
        out.append((f"16x{block_n}x128 {warps} warps {stages} stages split {split}",
                    {tf.DENSE_DECODE_TILE_ENV: f"{block_n},{warps},{stages},{split},1", tfg.GEMV_ENV: "0"}))
    return out


def sweep(title: str, variants: list[Variant], make: Callable[[], Callable[[], object]], nbytes: int,
          floor: float, iters: int) -> tuple[float, Variant | None]:
    """Prints a row per variant; returns (default's us, the fastest variant or None)."""
    print(f"{title}: {nbytes / 2**20:.1f} MiB of weights and scales, {floor:.1f} us at copy_'s rate", flush=True)
    fn = make()
    times: list[tuple[float, Variant]] = []
    for label, env in variants:
        try:
            us, fitted = graph_us(fn, env, iters)
        except Exception as exc:  # noqa: BLE001 - a tile that does not fit is a row of the table
            print(f"  {label:48s} failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            continue
        ran = f" (ran at {sorted(fitted)} stages)" if fitted else ""
        print(f"  {label:48s} {us:8.1f} us  {nbytes / us / 1e3:6.0f} GB/s  {us / floor:5.2f}x the floor{ran}",
              flush=True)
        times.append((us, (label, env)))
    if not times:
        return float("nan"), None
    best_us, best = min(times, key=lambda t: t[0])
    print(f"  best: {best[0]} {best_us:.1f} us ({times[0][0] / best_us:.2f}x faster than the default)", flush=True)
    return times[0][0], best if best_us < MARGIN * times[0][0] else None


def one_token_counts(gen: torch.Generator) -> torch.Tensor:
    """The masked layout's per-expert counts at one token: TOP_K experts picked at random hold its one row."""
    counts = torch.zeros(EXPERTS, dtype=torch.int32, device="cuda")
    counts[torch.randperm(EXPERTS, device="cuda", generator=gen)[:TOP_K]] = 1
    return counts


def moe_case(gen: torch.Generator) -> tuple[Callable[[], Callable[[], object]], int]:
    w13, s13, w2, s2 = random_fp8_experts(EXPERTS, HIDDEN, INTER, gen)
    sw13, ss13, sw2, ss2 = random_fp8_experts(1, HIDDEN, SHARED_INTER, gen)
    shared = (sw13[0], ss13[0], sw2[0], ss2[0])
    counts = one_token_counts(gen)
    x = torch.randn(EXPERTS, 1, HIDDEN, device="cuda", generator=gen).bfloat16()
    hidden = torch.randn(1, HIDDEN, device="cuda", generator=gen).bfloat16()
    per_expert = w13[0].numel() + w2[0].numel() + (s13[0].numel() + s2[0].numel()) * 4
    nbytes = TOP_K * per_expert + sum(t.numel() * t.element_size() for t in shared)
    active_ids = active_experts_triton(counts)

    def make() -> Callable[[], object]:
        def moe() -> object:  # the active grid read from the environment, as engine.moe reads it
            active = (active_ids, TOP_K) if active_grid_enabled() else None
            return tfm.fp8_moe_forward_masked_shared_triton(x, counts, w13, s13, w2, s2, hidden, *shared,
                                                            active=active)
        return moe

    return make, nbytes


def bf16_moe_case(gen: torch.Generator) -> tuple[Callable[[], Callable[[], object]], int]:
    """The same layer in bf16 (``kernels.triton_moe``'s masked launches): what one launch gives the bf16 step."""
    def weights(experts: int, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
        return ((torch.randn(experts, 2 * inter, HIDDEN, device="cuda", generator=gen) / 45).bfloat16(),
                (torch.randn(experts, HIDDEN, inter, device="cuda", generator=gen) / 38).bfloat16())

    w13, w2 = weights(EXPERTS, INTER)
    sw13, sw2 = weights(1, SHARED_INTER)
    counts = one_token_counts(gen)
    x = torch.randn(EXPERTS, 1, HIDDEN, device="cuda", generator=gen).bfloat16()
    hidden = torch.randn(1, HIDDEN, device="cuda", generator=gen).bfloat16()
    nbytes = 2 * (TOP_K * (w13[0].numel() + w2[0].numel()) + sw13.numel() + sw2.numel())
    active = (active_experts_triton(counts), TOP_K)

    def make() -> Callable[[], object]:
        return lambda: moe_forward_masked_shared_triton(x, counts, w13, w2, hidden, sw13[0], sw2[0], active=active)

    return make, nbytes


def dense_case(n: int, k: int, gen: torch.Generator) -> tuple[Callable[[], Callable[[], object]], int]:
    w, s = fp8.quantize_fp8_weight(torch.randn(n, k, device="cuda", generator=gen) / k**0.5)
    x = torch.randn(1, k, device="cuda", generator=gen).bfloat16()
    nbytes = w.numel() + s.numel() * 4

    def make() -> Callable[[], object]:
        return lambda: tf.fp8_linear_triton(x, w, s)  # W8A16 at one row; the tiled kernel or the GEMV by GEMV_ENV

    return make, nbytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="16 x 16/32/64 x 128/256 expert tiles, 2-8 warps, 3-6 stages")
    parser.add_argument("--dense", action="store_true", help="the attention's dense FP8 GEMMs at one row as well")
    parser.add_argument("--dense-only", action="store_true", help="--dense without the expert launches")
    parser.add_argument("--gemv-sweep", action="store_true", help="the dense GEMV's columns, warps and K chunks")
    parser.add_argument("--best-env", type=Path, help="write the fastest overrides here as export lines")
    parser.add_argument("--act-probe", action="store_true",
                        help="first the routed experts' two launches alone: W8A16 beside FP8 activations quantized ahead")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    exports: dict[str, str] = {}
    copy_rate = copy_bandwidth(torch.device("cuda"))  # once, beside every variant of this run
    if args.act_probe:
        act_probe(gen, copy_rate, args.iters)
    if not args.dense_only:
        experts(args, gen, copy_rate, exports)
    if args.dense or args.dense_only:
        dense(args, gen, copy_rate, exports)
    write_exports(args.best_env, exports)
    return 0


def experts(args: argparse.Namespace, gen: torch.Generator, copy_rate: float, exports: dict[str, str]) -> None:
    make, nbytes = moe_case(gen)
    _, best = sweep(f"one token, {TOP_K} routed + shared experts", moe_variants(args.sweep), make, nbytes,
                    floor_us(nbytes, copy_rate), args.iters)
    if best is not None:
        exports.update(best[1])
    make, nbytes = bf16_moe_case(gen)
    sweep(f"bf16, one token, {TOP_K} routed + shared experts", [
        ("two launches", {FUSED_DECODE_ENV: "0"}), ("one launch", {FUSED_DECODE_ENV: "1"}),
        ("one launch, without PDL", {FUSED_DECODE_ENV: "1", PDL_ENV: "0"})], make, nbytes,
        floor_us(nbytes, copy_rate), args.iters)
    write_exports(args.best_env, exports)  # now as well: a call cut short during --dense keeps the experts' pick


def dense(args: argparse.Namespace, gen: torch.Generator, copy_rate: float, exports: dict[str, str]) -> None:
    # One tile for both projections: the one with the least summed time (each shape's default first).
    totals: dict[str, float] = {}
    variants = dense_variants(args.sweep, args.gemv_sweep)
    for n, k in DENSE_SHAPES:
        make, nbytes = dense_case(n, k, gen)
        fn = make()
        floor = floor_us(nbytes, copy_rate)
        print(f"dense {n} x {k} at one row: {nbytes / 2**20:.1f} MiB, {floor:.1f} us at copy_'s rate", flush=True)
        for label, env in variants:
            try:
                us = graph_us(fn, env, args.iters)[0]
            except Exception as exc:  # noqa: BLE001
                print(f"  {label:48s} failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                totals[label] = float("inf")
                continue
            print(f"  {label:48s} {us:8.1f} us  {us / floor:5.2f}x the floor", flush=True)
            totals[label] = totals.get(label, 0.0) + us
    best_label = min(totals, key=lambda lb: totals[lb])
    print(f"dense best over both shapes: {best_label} {totals[best_label]:.1f} us "
          f"(default {totals['default']:.1f} us)", flush=True)
    if totals[best_label] < MARGIN * totals["default"]:
        dense_env = dict(variants)[best_label]
        if tf.W8A16_CONVERT_ENV in exports:  # one switch for both kernels: the experts' pick (most of the time)
            dense_env = {k: v for k, v in dense_env.items() if k != tf.W8A16_CONVERT_ENV}
        exports.update(dense_env)


# Session 47 (bench/results/device_call{1,2}_h100_s47_console.log): 37.7-37.9 us W8A16 at the default tile, 23.0-23.1
# on rows quantized ahead. Quantizing the row inside each program of the launch instead (commit cbf6386) took 36.3
# us for these launches, and 52.0 against W8A16's 36.2 with the shared experts riding along: dropped.
def act_probe(gen: torch.Generator, copy_rate: float, iters: int) -> None:
    """The routed experts' gated and down launches at one token (no shared experts), W8A16 (the bf16 row
    against each weight tile converted to bf16) beside W8A8 (the row and the intermediate quantized per 1 x 128
    group *ahead*, outside the timing, so the FP8 tensor cores take the weight tile as stored): what the
    conversion costs, the most quantizing the rows ahead (in the launch that writes them) could win back."""
    w13, s13, w2, s2 = random_fp8_experts(EXPERTS, HIDDEN, INTER, gen)
    counts = one_token_counts(gen)
    active = (active_experts_triton(counts), TOP_K)
    x = torch.randn(EXPERTS, 1, HIDDEN, device="cuda", generator=gen).bfloat16()
    inter = torch.randn(EXPERTS, 1, INTER, device="cuda", generator=gen).bfloat16()
    xq, xs = tf.quantize_fp8_act_triton(x.view(EXPERTS, HIDDEN))
    iq, is_ = tf.quantize_fp8_act_triton(inter.view(EXPERTS, INTER))
    xq, xs, iq, is_ = xq.view(EXPERTS, 1, HIDDEN), xs.view(EXPERTS, 1, -1), iq.view(EXPERTS, 1, INTER), \
        is_.view(EXPERTS, 1, -1)
    mid = torch.empty(EXPERTS, 1, INTER, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(EXPERTS, 1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    nbytes = TOP_K * (w13[0].numel() + w2[0].numel() + (s13[0].numel() + s2[0].numel()) * 4)
    floor = floor_us(nbytes, copy_rate)
    print(f"routed experts alone, one token: {nbytes / 2**20:.1f} MiB, {floor:.1f} us at copy_'s rate", flush=True)
    bs = (fp8.BLOCK, fp8.BLOCK)
    # f16 rows with a scale per 128 columns (written ahead, as the step's first launch writes them); the gated
    # launch writes its output in f16 with a scale per row and tile, which the down launch reads.
    fq, fs = f16_groups_active(x, counts, active, x[0], fp8.BLOCK)[:2]
    mid16 = torch.empty(EXPERTS, 1, INTER, device="cuda", dtype=torch.float16)
    for block_n, warps, stages in ((32, 4, 4), (32, 4, 3), (64, 4, 4), (32, 8, 4), (16, 4, 4)):
        cfg = tf.Fp8GemmConfig(block_m=16, block_n=block_n, group_m=1, num_warps=warps, num_stages=stages)
        mid16_s = torch.empty(EXPERTS, 1, INTER // block_n, device="cuda")
        for label, a, a_s, b, b_s in (("W8A16", x, None, inter, None), ("W8A8", xq, xs, iq, is_),
                                      ("f16", fq, fs, mid16, mid16_s)):
            def pair(a=a, a_s=a_s, b=b, b_s=b_s, cfg=cfg, f16=label == "f16") -> None:
                tfm._launch_masked(a, a_s, w13, s13, mid16 if f16 else mid, counts, True, cfg, bs, active=active,
                                   out_scales=(b_s, None) if f16 else None)
                tfm._launch_masked(b, b_s, w2, s2, out, counts, False, cfg, bs, active=active,
                                   a_group=cfg.block_n if f16 else None)
            try:
                us = graph_us(pair, {}, iters)[0]
            except Exception as exc:  # noqa: BLE001 - a tile that does not fit is a row of the table
                print(f"  16x{block_n} {warps} warps {stages} stages {label:6s} failed: {type(exc).__name__}: "
                      f"{str(exc)[:120]}", flush=True)
                continue
            print(f"  16x{block_n} {warps} warps {stages} stages {label:6s} {us:8.1f} us  {us / floor:5.2f}x the floor",
                  flush=True)


def write_exports(path: Path | None, exports: dict[str, str]) -> None:
    if path is not None:
        lines = [f"export {k}={v}" for k, v in exports.items() if v]
        path.write_text("".join(line + "\n" for line in lines))
        print(f"wrote {path}: {lines or 'the defaults'}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
