"""Runs kernels.fp8_deepgemm's wrappers on the CPU against a stand-in for DeepGEMM (tests/fake_deep_gemm).

    TRITON_INTERPRET=1 PYTHONPATH=tests/fake_deep_gemm:. python tests/deepgemm_fake_check.py

Run as its own process by tests/test_fp8_deepgemm_gpu.py (the interpreter is chosen when Triton first decorates a
kernel). What it checks of our side, with DeepGEMM's host checks and row coverage kept by the stand-in: the
dense GEMM with a bias at odd row counts; the contiguous layout's gather, padding rows marked -1, expert with no
rows and slots routed elsewhere, and the weighted combine; the masked layout at a capacity that is padded to the
128-row tile and one that is not, with rows past each count zero. Each against the emulated DeepGEMM math
(tests/test_fp8_deepgemm_gpu.py's ``_deepgemm_expert``). SiLU * up runs as torch's here: the interpreter
truncates to bf16 where the GPU rounds. Exits 1 naming the first failing case; prints "ok" last.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deep_gemm  # noqa: E402
import torch  # noqa: E402
from fp8_cases import random_fp8_experts, rel_err  # noqa: E402
from test_fp8_deepgemm_gpu import _deepgemm_expert  # noqa: E402

from kernels import fp8, fp8_deepgemm, moe  # noqa: E402


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{name}: {'ok' if ok else 'FAIL'} {detail}")
    if not ok:
        raise SystemExit(f"FAIL {name} {detail}")


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1" or deep_gemm.__version__ != "cpu-stand-in":
        raise SystemExit("run with TRITON_INTERPRET=1 and tests/fake_deep_gemm first on PYTHONPATH")
    os.environ[fp8.ACT_ENV] = "fp8"
    fp8_deepgemm._silu_mul = moe.silu_mul
    gen = torch.Generator().manual_seed(0)
    for m in (1, 5, 64):
        w, ws = fp8.quantize_fp8_weight(torch.randn(192, 256, generator=gen) / 16)
        x = torch.randn(m, 256, generator=gen).bfloat16()
        bias = torch.randn(192, generator=gen)
        err = rel_err(fp8_deepgemm.fp8_linear_deepgemm(x, w, ws, bias), fp8.fp8_linear(x.float(), w, ws, bias))
        check(f"dense M{m}", err < 5e-3, f"{err:.1e}")
    experts, hidden, inter, top_k, tokens = 6, 256, 128, 2, 37
    w13, s13, w2, s2 = random_fp8_experts(experts, hidden, inter, gen)
    x = torch.randn(tokens, hidden, generator=gen).bfloat16()
    ids = torch.rand(tokens, experts, generator=gen).topk(top_k, dim=1).indices
    ids = torch.where(ids == experts - 1, torch.full_like(ids, experts - 2), ids)  # one expert gets no rows
    ids[::3, 0] = -1  # experts on other ranks
    weights = torch.rand(tokens, top_k, generator=gen)
    want = torch.zeros(x.shape)
    for e in torch.unique(ids[ids >= 0]).tolist():
        token, slot = (ids == e).nonzero(as_tuple=True)
        want.index_add_(0, token, _deepgemm_expert(x[token], w13[e], s13[e], w2[e], s2[e]).float()
                        * weights[token, slot, None])
    err = rel_err(fp8_deepgemm.fp8_moe_forward_deepgemm(x, ids, weights, w13, s13, w2, s2), want)
    check("contiguous", err < 5e-3, f"{err:.1e}")  # the combine's bf16 products only
    for capacity in (40, 128, 130):
        counts = torch.randint(0, capacity + 1, (experts,), generator=gen)
        counts[0], counts[-1] = 0, capacity
        xm = torch.randn(experts, capacity, hidden, generator=gen).bfloat16()
        want = torch.zeros_like(xm)
        for e, c in enumerate(counts.tolist()):
            xm[e, c:] = float("nan")  # never read
            if c:
                want[e, :c] = _deepgemm_expert(xm[e, :c], w13[e], s13[e], w2[e], s2[e])
        out = fp8_deepgemm.fp8_moe_forward_masked_deepgemm(xm, counts, w13, s13, w2, s2)
        check(f"masked capacity {capacity}", out.shape == xm.shape and torch.equal(out, want),
              f"rel {rel_err(out.nan_to_num(1e6), want):.1e}")
    aligned = {name: ok for name, ok in deep_gemm.CALLS}
    # Dense scales are M-major (aligned where M % 4 == 0), the contiguous layout's always; masked ones row-major.
    check("scale layouts", aligned == {"fp8_gemm_nt": True, "m_grouped_fp8_gemm_nt_contiguous": True,
                                       "m_grouped_fp8_gemm_nt_masked": False}, str(aligned))
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
