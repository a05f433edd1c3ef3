"""The decode step's folded launches compiled for an H100/H200 (sm90) on a machine without a GPU.

    PYTHONPATH=/path/to/triton-3.6 python tests/decode_fusions_sm90.py   (the GPU image's Triton)

Compiles, at V2-Lite's decode shapes, the per-head products (``kernels.triton_head_matmul``: alone, with the
decode prep beside them), the router with its top-k in the launch
(``kernels.triton_router``, V2-Lite's and V3's) and the MoE sum with the next add + RMSNorm
(``kernels.triton_decode_fused``); prints each one's shared memory, MMA count and atomics. Exit status 1 where a
launch asks more than 48 KB of shared memory a program (a latency-bound decode launch wants several programs an
SM) or the router's last-program protocol lost its acquire-release atomic.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fp8_sm90_lowering import compile_sm90  # noqa: E402

from kernels import triton_decode_fused as fused  # noqa: E402
from kernels import triton_head_matmul as head  # noqa: E402
from kernels import triton_router as router  # noqa: E402

BF16 = "*bf16"
ROUTER_POINTERS = {"h_ptr": BF16, "w_ptr": "*fp32", "out_ptr": "*fp32", "bias_ptr": "*fp32", "w_out_ptr": "*fp32",
                   "id_out_ptr": "*i64", "counter_ptr": "*i32"}


def main() -> int:
    kernels = {
        "head matmul (W_UK, 64 wide)": compile_sm90(head._head_matmul_kernel, {
            "BLOCK_B": 16, "BLOCK_K": 128, "BLOCK_N": 64, "PRECISION": "tf32", "PDL": False}, 4, 2,
            {"x_ptr": BF16, "w_ptr": BF16, "out_ptr": BF16}),
        "decode prep beside W_UK's product": compile_sm90(head._prep_and_q_latent_kernel, {
            "BLOCK_B": 16, "BLOCK_K": 128, "BLOCK_N": 64, "PRECISION": "tf32", "HALF": 32, "BLOCK_R": 512,
            "BLOCK_H": 16, "INTERLEAVE": True, "PDL": False}, 4, 2,
            {"w_ptr": BF16, "lat_ptr": BF16, "q_ptr": BF16, "kv_a_ptr": BF16, "cos_ptr": "*fp32", "sin_ptr": "*fp32",
             "nw_ptr": BF16, "cache_ptr": BF16, "pages_ptr": "*i64", "slots_ptr": "*i64", "pe_ptr": BF16}),
        "router + top-k (V2-Lite)": compile_sm90(router._router_logits_kernel, {
            "TILE_T": 1, "TILE_E": 1, "TILE_K": 2048, "TOPK": True, "PDL": False,
            **fused.router_topk_constants(64, 6, "softmax", "greedy", 1, 1, False, False)}, 4, 1, ROUTER_POINTERS),
        "router + top-k (V3)": compile_sm90(router._router_logits_kernel, {
            "TILE_T": 1, "TILE_E": 1, "TILE_K": 4096, "TOPK": True, "PDL": False,
            **fused.router_topk_constants(256, 8, "sigmoid", "noaux_tc", 8, 4, True, True)}, 8, 1, ROUTER_POINTERS),
        "MoE sum + add + RMSNorm": compile_sm90(fused._moe_combine_add_rms_norm_kernel, {
            "TOP_K": 6, "BLOCK_K": 8, "BLOCK_D": 2048, "HAS_ADD": True, "PDL": False}, 4, 1,
            {"y_ptr": BF16, "dest_ptr": "*i64", "ids_ptr": "*i64", "w_ptr": "*fp32", "add_ptr": BF16, "r_ptr": BF16,
             "nw_ptr": BF16, "out_ptr": BF16, "sum_ptr": BF16}),
    }
    failed = False
    for name, kernel in kernels.items():
        ptx = kernel.asm["ptx"]
        atomics = sorted(set(re.findall(r"atom\.global\.[a-z0-9_.]+", ptx)))
        mma = len(re.findall(r"\bmma\.sync|wgmma\.mma_async", ptx))
        print(f"{name:36s} shared {kernel.metadata.shared:6d} B, {mma} MMA, atomics {atomics}")
        failed |= kernel.metadata.shared > 48 * 1024
        failed |= name.startswith("router") and not any("acq_rel.add" in a for a in atomics)
    print("FAILED" if failed else "ok")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
