"""The masked FP8 expert GEMMs of one V2-Lite MoE layer at one token, alone, for a kernel profiler.

    python tests/fp8_moe_one_token.py [--iters 20] [--sweep]          (a CUDA GPU with FP8 support)
    ncu --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \\
        -k regex:_fp8_moe_gemm_kernel -c 4 python tests/fp8_moe_one_token.py

V2-Lite's shapes (64 routed experts of 2048 x 1408, top 6, two shared experts riding in the same launches as
one 2816-wide expert), W8A16, capacity 1: the launches that take 1.67 ms of the FP8 decode step at batch 1 on
an H100 at 36 % of ``copy_``. Prints each layer-pair's time and the bandwidth it reached on the bytes it must
read (the six routed experts' and the shared experts' FP8 weights and scales) against those bytes moved at the
rate of a ``copy_`` timed beside it; a profiler attached to it sees the same launches the CUDA graph replays.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fp8_cases import random_fp8_experts  # noqa: E402

from kernels import triton_fp8_moe as tfm  # noqa: E402
from kernels.triton_decode_fused import active_experts_triton  # noqa: E402
from kernels.triton_fp8 import Fp8GemmConfig  # noqa: E402

EXPERTS, HIDDEN, INTER, SHARED_INTER, TOP_K = 64, 2048, 1408, 2816, 6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="16 x 16, 32 or 64 tiles, 2-5 stages, active grid or not")
    args = parser.parse_args()
    default_config = tfm.grouped_gemm_config
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13, s13, w2, s2 = random_fp8_experts(EXPERTS, HIDDEN, INTER, gen)
    sw13, ss13, sw2, ss2 = random_fp8_experts(1, HIDDEN, SHARED_INTER, gen)
    shared = (sw13[0], ss13[0], sw2[0], ss2[0])
    counts = torch.zeros(EXPERTS, dtype=torch.int32, device="cuda")
    counts[torch.randperm(EXPERTS, device="cuda", generator=gen)[:TOP_K]] = 1
    x = torch.randn(EXPERTS, 1, HIDDEN, device="cuda", generator=gen).bfloat16()
    hidden = torch.randn(1, HIDDEN, device="cuda", generator=gen).bfloat16()
    per_expert = w13[0].numel() + w2[0].numel() + (s13[0].numel() + s2[0].numel()) * 4
    nbytes = TOP_K * per_expert + sum(t.numel() * t.element_size() for t in shared)
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)

    def timed(fn: object) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(3):
            fn()  # type: ignore[operator]
        torch.cuda.synchronize()
        start.record()
        for _ in range(args.iters):
            fn()  # type: ignore[operator]
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / args.iters * 1e3  # us

    active = (active_experts_triton(counts), TOP_K)

    def graph_us(config: Fp8GemmConfig | None, use_active: bool) -> float:
        """Both launches replayed from a CUDA graph, as the decode step replays them (no host cost)."""
        tfm.grouped_gemm_config = (lambda rows: config) if config else default_config  # type: ignore[assignment]
        try:
            def moe() -> object:
                return tfm.fp8_moe_forward_masked_shared_triton(x, counts, w13, s13, w2, s2, hidden, *shared,
                                                                active=active if use_active else None)

            moe()  # compile outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                moe()
            return timed(graph.replay)
        finally:
            tfm.grouped_gemm_config = default_config

    copy_us = timed(lambda: dst.copy_(src))
    floor_us = copy_us / 2  # copy_ moves 2 x nbytes: the time to move nbytes once at its rate
    print(f"one token, {TOP_K} routed + shared experts: {nbytes / 2**20:.1f} MiB of weights and scales; at copy_'s "
          f"rate ({2 * nbytes / copy_us / 1e3:.0f} GB/s) {floor_us:.1f} us", flush=True)
    variants: list[tuple[str, Fp8GemmConfig | None, bool]] = [("default tiles, every expert's column", None, False)]
    if args.sweep:
        for block_n in (16, 32, 64):
            for stages in (2, 3, 4, 5):
                for use_active in (False, True):
                    cfg = Fp8GemmConfig(block_m=16, block_n=block_n, group_m=1, num_warps=4, num_stages=stages)
                    variants.append((f"16x{block_n} {stages} stages, {'active experts' if use_active else 'all'}",
                                     cfg, use_active))
    for name, cfg, use_active in variants:
        try:
            us = graph_us(cfg, use_active)
        except Exception as exc:  # noqa: BLE001 - a tile that does not fit is a row of the table
            print(f"{name:44s} failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            continue
        # A tile whose stages do not fit shared memory runs with fewer (kernels.triton_fp8_moe._launch_fitting):
        # say so rather than credit the stages asked for.
        fitted = {tfm._STAGES_THAT_FIT.get((cfg, gated, True, True)) for gated in (True, False)} - {None}
        ran = f" (ran at {sorted(fitted)} stages)" if cfg is not None and fitted - {cfg.num_stages} else ""
        print(f"{name:44s} {us:8.1f} us  {nbytes / us / 1e3:6.0f} GB/s  {us / floor_us:5.2f}x the floor{ran}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
