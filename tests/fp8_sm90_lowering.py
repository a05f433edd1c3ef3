"""How the FP8 W8A16 decode kernels lower for an H100/H200 (sm90), on a machine without a GPU.

    python tests/fp8_sm90_lowering.py
    PYTHONPATH=/path/to/triton-3.6 python tests/fp8_sm90_lowering.py   (the GPU image's Triton)

Compiles the masked grouped kernel (V2-Lite's gated launch at one token: 16 x 32 tiles, 4 warps, 4 stages,
the shared experts' column) and the dense split-K kernel (16 x 32, 4 stages, 4 K blocks a split) through
Triton and ptxas for sm90, with the launch-time divisibility hints a real launch gets (without them no load is
vectorized or pipelined), under both weight conversions (``TANDEM_FP8_BF16_CONVERT`` cvt / bits) and 1 or 2
K blocks an iteration. Prints shared memory, cubin size, MMA count and the conversion instructions of each:
what a tile or conversion change does to the code before a GPU is lent to time it. Last, the dense kernel with
programmatic dependent launch (``kernels.triton_pdl``): its wait and trigger must come once each, before the
first load, and the dense kernel summing its split partials in the launch (``TANDEM_FP8_SPLIT_FIXUP``): its
counter atomic (acq_rel, gpu scope) after a barrier that follows the partial's stores, the partials read from L2
(exit status 1 otherwise). Triton versions lower differently (3.9 does not pipeline these loops at
all where 3.6 does): use the GPU image's.
"""

from __future__ import annotations

import collections
import inspect
import re
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, CompiledKernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import triton_fp8 as tf  # noqa: E402
from kernels import triton_fp8_moe as tfm  # noqa: E402

POINTERS = {"a_ptr": "*bf16", "as_ptr": "*fp32", "b_ptr": "*fp8e4nv", "bs_ptr": "*fp32", "c_ptr": "*bf16",
            "sorted_rows_ptr": "*i32", "block_expert_ptr": "*i32", "rows_padded_ptr": "*i32", "counts_ptr": "*i32",
            "x_a_ptr": "*bf16", "x_b_ptr": "*fp8e4nv", "x_bs_ptr": "*fp32", "x_c_ptr": "*bf16", "active_ptr": "*i32",
            "bias_ptr": "*bf16", "out_ptr": "*bf16", "done_ptr": "*i32", "x_as_ptr": "*fp32", "cs_ptr": "*fp32",
            "x_cs_ptr": "*fp32"}
ALIGNED_INTS = ("N", "K", "x_n", "x_k", "tile_n")  # multiples of 16 at V2-Lite's and V3's shapes, as strides are
CONVERSIONS = ("cvt", "prmt", "lop3", "mul.rn.bf16x2")


def compile_sm90(fn: triton.JITFunction, constants: dict[str, object], warps: int, stages: int,
                 pointers: dict[str, str] | None = None) -> CompiledKernel:
    """``pointers`` overrides POINTERS' element types for this kernel."""
    types = {**POINTERS, **(pointers or {})}
    params = list(inspect.signature(fn.fn).parameters)
    signature = {p: "constexpr" if p in constants else types.get(p, "i32") for p in params}
    aligned = [p for p in params if p not in constants and (p in types or p.startswith("stride") or p in ALIGNED_INTS)]
    source = ASTSource(fn=fn, signature=signature, constexprs={(params.index(k),): v for k, v in constants.items()},
                       attrs={(params.index(p),): [["tt.divisibility", 16]] for p in aligned})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def masked_gated(bits: bool, kb_step: int) -> CompiledKernel:
    return compile_sm90(tfm._fp8_moe_gemm_kernel, {
        "NUM_KB": 16, "NUM_KB_X": 16, "SCALE_BLOCK_N": 128, "A_ROW_DIV": 1, "GATED": True, "MASKED": True,
        "ZERO_TAIL": False, "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "GROUP_M": 1, "PROMOTE": 0, "W8A16": True,
        "DOT_PRECISION": "tf32", "EXTRA": True, "ACTIVE": True, "KB_STEP": kb_step, "BITS": bits,
        "KB_PER_SCALE": 1, "OUT_F16": False, "PDL": False}, 4, 4)


def masked_f16(gated: bool) -> CompiledKernel:
    """The decode launches on f16 activations (``kernels.triton_f16_groups``): the gated one (K blocks of 128,
    its output f16 with scales) and the down one (K in the gated tiles' 32-wide scale groups, four a step)."""
    f16 = {"a_ptr": "*fp16", "x_a_ptr": "*fp16", "x_as_ptr": "*fp32", "cs_ptr": "*fp32", "x_cs_ptr": "*fp32"}
    if gated:
        f16.update(c_ptr="*fp16", x_c_ptr="*fp16")
    return compile_sm90(tfm._fp8_moe_gemm_kernel, {
        "NUM_KB": 16 if gated else 44, "NUM_KB_X": 16 if gated else 88, "SCALE_BLOCK_N": 128, "A_ROW_DIV": 1,
        "GATED": gated, "MASKED": True, "ZERO_TAIL": not gated, "BLOCK_M": 16, "BLOCK_N": 32,
        "BLOCK_K": 128 if gated else 32, "GROUP_M": 1, "PROMOTE": 128, "W8A16": False, "DOT_PRECISION": "tf32",
        "EXTRA": True, "ACTIVE": True, "KB_STEP": 1 if gated else 4, "BITS": False,
        "KB_PER_SCALE": 1 if gated else 4, "OUT_F16": gated, "PDL": False}, 4, 4, pointers=f16)


def dense_split(bits: bool, kb_step: int, pdl: bool = False, fixup: bool = False) -> CompiledKernel:
    return compile_sm90(tf._fp8_gemm_kernel, {
        "NUM_KB": 16, "KB_PER_SPLIT": 4, "SCALE_BLOCK_N": 128, "HAS_BIAS": False, "BLOCK_M": 16, "BLOCK_N": 32,
        "BLOCK_K": 128, "GROUP_M": 1, "A_MODE": tf.A_W8A16, "PROMOTE": 0, "DOT_PRECISION": "tf32",
        "KB_STEP": kb_step, "BITS": bits, "SPLITS": 4, "FIXUP": fixup, "PDL": pdl}, 4, 4,
        pointers={"c_ptr": "*fp32"})  # c holds the split partials


def main() -> int:
    print(f"Triton {triton.__version__}, sm90", flush=True)
    for name, build in (("masked gated", masked_gated), ("dense split-K", dense_split)):
        for bits in (False, True):
            for kb_step in (1, 2):
                kernel = build(bits, kb_step)
                ops = collections.Counter(re.findall(r"^\s*([a-z][a-z0-9_.]*)", kernel.asm["ptx"], re.M))
                mma = sum(n for op, n in ops.items() if op.startswith(("mma", "wgmma")))
                conv = {op: n for op, n in sorted(ops.items()) if op.startswith(CONVERSIONS) and "64" not in op}
                print(f"{name:14s} {'bits' if bits else 'cvt':4s} kb_step {kb_step}: shared {kernel.metadata.shared:6d} B,"
                      f" cubin {len(kernel.asm['cubin']):6d} B, {mma} MMA, {conv}", flush=True)
    for gated in (True, False):
        kernel = masked_f16(gated)
        ops = collections.Counter(re.findall(r"^\s*([a-z][a-z0-9_.]*)", kernel.asm["ptx"], re.M))
        mma = sum(n for op, n in ops.items() if op.startswith(("mma", "wgmma")))
        conv = {op: n for op, n in sorted(ops.items()) if op.startswith(CONVERSIONS) and "64" not in op}
        print(f"masked f16 {'gated' if gated else 'down '}: shared {kernel.metadata.shared:6d} B, cubin "
              f"{len(kernel.asm['cubin']):6d} B, {mma} MMA, {conv}", flush=True)
    # Programmatic dependent launch (kernels.triton_pdl): the wait and the trigger, each once, ahead of the loads.
    ptx = dense_split(False, 1, pdl=True).asm["ptx"]
    first_load = min(i for i in (ptx.find("ld.global"), ptx.find("cp.async"), len(ptx)) if i >= 0)
    found = [(op, ptx.count(op), 0 <= ptx.find(op) < first_load) for op in ("griddepcontrol.wait",
                                                                             "griddepcontrol.launch_dependents")]
    print(f"dense split-K with PDL: {found} (instruction, count, before the first load)", flush=True)
    # The split sums inside the launch (TANDEM_FP8_SPLIT_FIXUP): one acq_rel counter atomic at gpu scope after a
    # CTA barrier that follows the partial's stores, then the partials read past L1 (.cg).
    fixup = dense_split(False, 1, fixup=True)
    ptx = fixup.asm["ptx"]
    atom = re.search(r"atom\.[a-z.]*acq_rel[a-z.]*gpu[a-z.0-9]*add|atom\.[a-z.]*gpu[a-z.]*acq_rel[a-z.0-9]*add", ptx)
    last_store = ptx.rfind("st.global", 0, atom.start()) if atom else -1
    barrier = ptx.rfind("bar.sync", 0, atom.start()) if atom else -1
    ordered = atom is not None and 0 <= last_store < barrier
    cg_loads = len(re.findall(r"ld\.global\.cg", ptx))
    print(f"dense split-K summing its splits in the launch: {atom.group(0) if atom else 'no acq_rel atomic'}, barrier "
          f"between the partial's stores and it: {ordered}, {cg_loads} L2 loads, shared {fixup.metadata.shared} B",
          flush=True)
    return 0 if all(n == 1 and early for _, n, early in found) and ordered and cg_loads > 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
