"""The fused decode-step ops: their torch references equal the unfused code they replace, and the Triton
kernels equal the references (in Triton's interpreter on CPU, float32; on the GPU in bf16 and inside a
CUDA graph).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.config import RopeConfig
from engine.rope import RotaryEmbedding
from kernels import backend, decode_fused
from kernels.norm import rms_norm

needs_triton = pytest.mark.skipif(not backend.triton_importable(), reason="needs Triton")
gpu = pytest.mark.gpu


def _rope(interleave: bool) -> RotaryEmbedding:
    return RotaryEmbedding(RopeConfig(theta=10000.0), 64, interleave, 512, "cpu")


def test_add_rms_norm_is_the_add_then_the_norm_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(0)
    x, r, w = (torch.randn(5, 96, generator=g).bfloat16() for _ in range(3))
    normed, summed = decode_fused.add_rms_norm(x, r, w[0], 1e-6)
    assert torch.equal(summed, x + r) and torch.equal(normed, rms_norm(x + r, w[0], 1e-6))


@pytest.mark.parametrize("interleave", [True, False])
def test_decode_prep_equals_the_unfused_norm_rope_and_pool_write(interleave: bool) -> None:
    g = torch.Generator().manual_seed(1)
    tokens, heads, nope, lora = 3, 4, 32, 64
    rope = _rope(interleave)
    q = torch.randn(tokens, heads, nope + 64, generator=g).bfloat16()
    kv_a = torch.randn(tokens, lora + 64, generator=g).bfloat16()
    w = torch.randn(lora, generator=g).bfloat16()
    cos, sin = rope.cos_sin(torch.tensor([0, 7, 300]))
    pages, slots = torch.tensor([2, 0, 2]), torch.tensor([1, 3, 0])
    cache = torch.zeros(3, 4, lora + 64, dtype=torch.bfloat16)
    q_pe = decode_fused.mla_decode_prep(q, kv_a, cos, sin, w, 1e-6, cache, pages, slots, nope, interleave)
    expected = torch.zeros_like(cache)
    expected[pages, slots] = torch.cat([rms_norm(kv_a[:, :lora], w, 1e-6), rope.apply(kv_a[:, lora:], cos, sin)], -1)
    assert torch.equal(cache, expected)
    assert torch.equal(q_pe, rope.apply(q[..., nope:], cos, sin))
    # in place: the same rotation over q's own rope part, q_nope untouched, the result a view of q
    q2 = q.clone()
    q_pe2 = decode_fused.mla_decode_prep(q2, kv_a, cos, sin, w, 1e-6, cache, pages, slots, nope, interleave,
                                         in_place=True)
    assert q_pe2.data_ptr() == q2[..., nope:].data_ptr() and torch.equal(q_pe2, q_pe)
    assert torch.equal(q2[..., :nope], q[..., :nope]) and not torch.equal(q2, q)


def test_moe_scatter_puts_each_row_at_its_rank_within_its_expert() -> None:
    hidden = torch.arange(3 * 2, dtype=torch.float32).view(3, 2)
    ids = torch.tensor([[2, 0], [2, -1], [0, 2]])
    rows, counts, dest = decode_fused.moe_scatter_rows(hidden, ids, 3)
    assert counts.tolist() == [2, 0, 3]
    assert dest.tolist() == [2 * 3 + 0, 0, 2 * 3 + 1, -1, 1, 2 * 3 + 2]
    assert rows[2, :3].tolist() == [[0, 1], [2, 3], [4, 5]] and rows[0, :2].tolist() == [[0, 1], [4, 5]]
    rows2, counts2, dest2, active = decode_fused.moe_scatter_rows_active(hidden, ids, 3)
    assert torch.equal(rows2, rows) and torch.equal(counts2, counts) and torch.equal(dest2, dest)
    assert active.dtype == torch.int32 and active[[0, 1, 3]].tolist() == [0, 2, 2]  # experts 0 and 2; 2 of them


def _interpreted(code: str) -> dict[str, Any]:
    """`code` (printing one JSON object) in a fresh interpreter under TRITON_INTERPRET=1 (fixed at import)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=400, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# Shared by the interpreter (float32, CPU) and GPU (bf16 and float32) checks: returns {case: max error}.
CHECKS = """
import json, os, torch
from kernels import decode_fused as ref
from kernels import triton_decode_fused as fast

def err(a, b):
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0

def run(device, dtype):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: (torch.randn(*s, generator=g) * 2).to(device=device, dtype=dtype)
    out = {}
    for rows, dim in ((1, 64), (7, 2048), (3, 100)):
        x, r, w = rnd(rows, dim), rnd(rows, dim), rnd(dim)
        (a, b), (c, d) = fast.add_rms_norm_triton(x, r, w, 1e-6), ref.add_rms_norm(x, r, w, 1e-6)
        out[f"add_norm_{rows}x{dim}"] = max(err(a, c), err(b, d))
    for interleave in (True, False):
        for tokens, heads in ((1, 16), (5, 3)):
            q, kv_a, w = rnd(tokens, heads, 192), rnd(tokens, 576), rnd(512)
            pos = torch.arange(tokens, device=device).float() * 37
            freqs = pos[:, None] * (1.0 / (10000 ** (torch.arange(0, 64, 2, device=device).float() / 64)))[None]
            cos, sin = freqs.cos().contiguous(), freqs.sin().contiguous()
            pages = torch.randperm(8, generator=g)[:tokens].to(device)
            slots = torch.randint(0, 4, (tokens,), generator=g).to(device)
            c1 = torch.zeros(8, 4, 576, device=device, dtype=dtype)
            c2 = c1.clone()
            p1 = fast.mla_decode_prep_triton(q, kv_a, cos, sin, w, 1e-6, c1, pages, slots, 128, interleave)
            p2 = ref.mla_decode_prep(q, kv_a, cos, sin, w, 1e-6, c2, pages, slots, 128, interleave)
            out[f"prep_{interleave}_{tokens}x{heads}"] = max(err(p1, p2), err(c1, c2))
            # in place over a column view of a wider buffer (prefill's q: the fused projection's output)
            tail = rnd(tokens, 8)
            wide = torch.cat([q.reshape(tokens, -1), tail], 1)
            q3 = wide[:, : heads * 192].view(tokens, heads, 192)
            p3 = fast.mla_decode_prep_triton(q3, kv_a, cos, sin, w, 1e-6, c1, pages, slots, 128, interleave,
                                             in_place=True)
            untouched = err(q3[..., :128], q[..., :128]) + err(wide[:, heads * 192:], tail)
            aliased = p3.data_ptr() == q3[..., 128:].data_ptr()
            out[f"prep_in_place_{interleave}_{tokens}x{heads}"] = max(err(p3, p2), err(q3[..., 128:], p2),
                                                                       untouched, 0.0 if aliased else 1e9)
    for name, (experts, k, scoring, method, groups, topk_group, norm, scale, bias) in {
        "v2lite": (64, 6, "softmax", "greedy", 1, 1, False, 1.0, False),
        "v2": (160, 6, "softmax", "group_limited_greedy", 8, 3, False, 16.0, False),
        "v3": (256, 8, "sigmoid", "noaux_tc", 8, 4, True, 2.5, True),
    }.items():
        logits = (torch.randn(33, experts, generator=g) * 3).to(device)
        b = (torch.randn(experts, generator=g) * 0.5).to(device) if bias else None
        w1, i1 = fast.router_topk_triton(logits, b, k, scoring, method, groups, topk_group, norm, scale)
        w2, i2 = ref.router_topk(logits, b, k, scoring, method, groups, topk_group, norm, scale)
        s1, o1 = i1.sort(1)
        s2, o2 = i2.sort(1)
        same = bool(torch.equal(s1, s2))
        out[f"router_{name}"] = err(w1.gather(1, o1), w2.gather(1, o2)) if same else 1e9
        # The whole router in one launch (the last program to finish its logits chooses): the same choice.
        from kernels import triton_router
        os.environ[triton_router.ROUTER_FUSED_ENV] = "1"
        for tokens in (1, 5):
            dim = 96
            hidden = rnd(tokens, dim)
            gate = (torch.randn(experts, dim, generator=g) * 0.3).to(device)
            w1, i1 = triton_router.router_logits_topk_triton(hidden, gate, b, k, scoring, method, groups, topk_group,
                                                             norm, scale)
            w2, i2 = ref.router_logits_topk(hidden, gate, b, k, scoring, method, groups, topk_group, norm, scale)
            s1, o1 = i1.sort(1)
            s2, o2 = i2.sort(1)
            same = bool(torch.equal(s1, s2))
            out[f"router_fused_{name}_{tokens}"] = err(w1.gather(1, o1), w2.gather(1, o2)) if same else 1e9
        del os.environ[triton_router.ROUTER_FUSED_ENV]
    for tokens, k, experts, dim in ((1, 6, 64, 256), (9, 6, 64, 256), (4, 8, 16, 100)):
        hidden = rnd(tokens, dim)
        ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)]).to(device)
        ids[0, -1] = -1
        r1, n1, d1 = fast.moe_scatter_rows_triton(hidden, ids, experts)
        r2, n2, d2 = ref.moe_scatter_rows(hidden, ids, experts)
        ok = torch.equal(n1, n2) and torch.equal(d1, d2)
        e = 0.0
        for ex in range(experts):
            e = max(e, err(r1[ex, : int(n2[ex])], r2[ex, : int(n2[ex])]))
        y = rnd(experts * tokens, dim)
        wts = torch.rand(tokens, k, generator=g).to(device)
        add = rnd(tokens, dim)
        e = max(e, err(fast.moe_combine_triton(y, d2, ids, wts, add), ref.moe_combine(y, d2, ids, wts, add)))
        e = max(e, err(fast.moe_combine_triton(y, d2, ids, wts), ref.moe_combine(y, d2, ids, wts)))
        out[f"moe_{tokens}x{k}x{experts}"] = e if ok else 1e9
        # ... and into the next layer's residual add and RMSNorm in the same launch (relative: the norm scales)
        res, nw = rnd(tokens, dim), rnd(dim)
        (a, b) = fast.moe_combine_add_rms_norm_triton(y, d2, ids, wts, add, res, nw, 1e-6)
        (c, d) = ref.moe_combine_add_rms_norm(y, d2, ids, wts, add, res, nw, 1e-6)
        out[f"combine_norm_{tokens}x{k}x{experts}"] = max(err(a, c) / float(c.float().abs().max()),
                                                          err(b, d) / float(d.float().abs().max()))
    # The scatter that also lists the active experts: equal to the scatter plus `active_experts(counts)`.
    # Cases: T=1 and T>1, -1 ids, empty experts, no active expert, and (tile 16) experts and pairs over
    # several tiles of the active list.
    for tokens, k, experts, dim, drop, tile in ((1, 6, 64, 32, 1, 1024), (9, 6, 64, 16, 3, 1024),
                                                (4, 8, 16, 20, 0, 1024), (2, 2, 5, 8, 2, 1024),
                                                (5, 8, 70, 4, 1, 16)):
        hidden = rnd(tokens, dim)
        ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)]).to(device)
        ids[:, k - drop:] = -1
        default_tile, fast.ACTIVE_TILE = fast.ACTIVE_TILE, tile
        r1, n1, d1, a1 = fast.moe_scatter_rows_active_triton(hidden, ids, experts)
        fast.ACTIVE_TILE = default_tile
        r2, n2, d2 = ref.moe_scatter_rows(hidden, ids, experts)
        a2 = ref.active_experts(n2)
        n = int(a2[-1])
        want = [e for e, c in enumerate(n2.tolist()) if c > 0]
        ok = torch.equal(n1, n2) and torch.equal(d1, d2) and a1.dtype == torch.int32 and a1.shape == a2.shape
        ok = ok and int(a1[-1]) == n == len(want) and a1[:n].tolist() == a2[:n].tolist() == want
        e = max((err(r1[ex, : int(n2[ex])], r2[ex, : int(n2[ex])]) for ex in range(experts)), default=0.0)
        out[f"scatter_active_{tokens}x{k}x{experts}"] = e if ok else 1e9
    # The scatter writing the rows and the tokens in f16 groups as well (kernels.f16_groups): the same values
    # and scales as the reference's for every counted row; a last group partly past the row (dim 200), one
    # token, and magnitudes past f16's range.
    for tokens, k, experts, dim, scale in ((1, 6, 64, 256, 1.0), (5, 2, 7, 200, 3e4), (3, 3, 4, 128, 1e-4)):
        hidden = rnd(tokens, dim) * scale
        ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)]).to(device)
        ids[0, -1] = -1
        got = fast.moe_scatter_rows_active_f16_triton(hidden, ids, experts, 128)
        want = ref.moe_scatter_rows_active_f16(hidden, ids, experts, 128)
        n2 = want[1]
        ok = torch.equal(got[1], n2) and torch.equal(got[2], want[2]) and torch.equal(got[4].hidden_scales,
                                                                                        want[4].hidden_scales)
        e = err(got[4].hidden.float(), want[4].hidden.float()) / float(want[4].hidden.float().abs().max())
        for ex in range(experts):
            c = int(n2[ex])
            ok = ok and torch.equal(got[4].row_scales[ex, :c], want[4].row_scales[ex, :c])
            if c:
                e = max(e, err(got[4].rows[ex, :c].float(), want[4].rows[ex, :c].float())
                        / float(want[4].rows[ex, :c].float().abs().max()))
        out[f"scatter_f16_{tokens}x{k}x{experts}x{dim}"] = e if ok else 1e9
    for counts in ([0, 3, 0, 0, 1, 2], [5] * 7, [0] * 9, [0, 0, 0, 1] + [0] * 60):
        c = torch.tensor(counts, device=device)
        a1, a2 = fast.active_experts_triton(c), ref.active_experts(c)
        n = int(a2[-1])
        ok = int(a1[-1]) == n == sum(x > 0 for x in counts) and torch.equal(a1[:n], a2[:n])
        out[f"active_{len(counts)}"] = 0.0 if ok and a2[:n].tolist() == [i for i, x in enumerate(counts) if x] else 1e9
    # Router logits: relative to the largest logit (the float32 sums run in another order than F.linear's).
    from kernels.triton_router import router_logits_triton
    for tokens, experts, dim in ((1, 64, 256), (5, 16, 100), (9, 12, 192), (2, 70, 4096), (11, 6, 40)):
        hidden = rnd(tokens, dim + 8)[:, :dim]  # a strided view, as a slice of a wider activation is
        weight = (torch.randn(experts, dim, generator=g) * 0.05).to(device)
        want = torch.nn.functional.linear(hidden.float(), weight)
        got = router_logits_triton(hidden, weight)
        ok = got.dtype == torch.float32 and got.shape == want.shape
        out[f"logits_{tokens}x{experts}x{dim}"] = err(got, want) / float(want.abs().max()) if ok else 1e9
    from kernels import moe as moe_ref
    for rows, inter in ((1, 64), (37, 1408), (5, 100)):
        gate_up = rnd(rows, 2 * inter)
        out[f"silu_mul_{rows}x{inter}"] = err(fast.silu_mul_triton(gate_up), moe_ref.silu_mul(gate_up))
    # The contiguous-layout grouped GEMMs (the GPU's float32 prefill MoE: no grouped mm there) and their
    # combine, a slot routed elsewhere (-1) and an expert with no rows among them.
    from kernels import triton_moe
    tokens, k, experts, dim, inter = 9, 3, 5, 64, 48
    hidden = rnd(tokens, dim)
    ids = torch.stack([torch.randperm(experts - 1, generator=g)[:k] for _ in range(tokens)]).to(device)
    ids[2, 1] = -1
    weights = torch.rand(tokens, k, generator=g).to(device)
    w13, w2 = rnd(experts, 2 * inter, dim) * 0.1, rnd(experts, dim, inter) * 0.1
    cfg = triton_moe.GemmConfig(16, 32, 16, 1, 4, 1)
    got = triton_moe.moe_forward_triton(hidden, ids, weights, w13, w2, config=cfg)
    want = moe_ref.moe_forward(hidden, ids, weights, w13, w2)
    out["moe_contiguous"] = err(got, want) / float(want.abs().max())
    return out
"""


@needs_triton
def test_triton_kernels_equal_the_references_in_float32_interpreted() -> None:
    result = _interpreted(CHECKS + "\nprint(json.dumps(run('cpu', torch.float32)))\n")
    assert len(result) == 47
    for case, error in result.items():
        assert error < _tolerance(case, torch.float32), (case, error)


def _tolerance(case: str, dtype: torch.dtype) -> float:
    if case.startswith("logits_"):  # relative; float32 products and sums whatever the hidden dtype
        return 1e-5
    if case.startswith("combine_norm_"):  # relative: a neighbouring bf16 of the sum, then normed
        return 1e-5 if dtype == torch.float32 else 0.02
    # bf16: sums of float32 products in another order round to a neighbouring bf16 at most.
    return 1e-4 if dtype == torch.float32 else 0.07


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_equal_the_references_on_the_gpu(dtype: torch.dtype) -> None:
    scope: dict[str, Any] = {}
    exec(compile(CHECKS, "checks", "exec"), scope)  # noqa: S102 - the same checks as the interpreter's
    result = scope["run"]("cuda", dtype)
    for case, error in result.items():
        assert error < _tolerance(case, dtype), (case, error)


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 8, 64, 200, 1000])
def test_the_dense_mlp_as_one_expert_of_the_grouped_gemm_equals_three_linears(rows: int) -> None:
    from kernels.moe import gated_mlp
    from kernels.triton_moe import gated_mlp_triton

    g = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, 2048, device="cuda", generator=g).bfloat16()
    gate_up = (torch.randn(2 * 1408, 2048, device="cuda", generator=g) * 0.02).bfloat16()
    down = (torch.randn(2048, 1408, device="cuda", generator=g) * 0.02).bfloat16()
    got, ref = gated_mlp_triton(x, gate_up, down).float(), gated_mlp(x, gate_up, down).float()
    assert float((got - ref).norm() / ref.norm()) < 1e-2


SHARED_CHECK = """
import json, torch
from kernels.moe import moe_forward_masked_shared
from kernels.triton_moe import moe_forward_masked_shared_triton

g = torch.Generator().manual_seed(3)
experts, cap, dim, inter, shared_inter = 4, 5, 64, 32, 48
x = torch.randn(experts, cap, dim, generator=g)
counts = torch.tensor([2, 0, 5, 1], dtype=torch.int32)
for e, c in enumerate(counts.tolist()):
    x[e, c:] = float("nan")  # never read
w13 = torch.randn(experts, 2 * inter, dim, generator=g) * 0.1
w2 = torch.randn(experts, dim, inter, generator=g) * 0.1
hidden = torch.randn(cap, dim, generator=g)
gate_up = torch.randn(2 * shared_inter, dim, generator=g) * 0.1
down = torch.randn(dim, shared_inter, generator=g) * 0.1
y, s = moe_forward_masked_shared_triton(x, counts, w13, w2, hidden, gate_up, down)
ry, rs = moe_forward_masked_shared(x, counts, w13, w2, hidden, gate_up, down)
valid = (torch.arange(cap)[None, :] < counts[:, None])[..., None]
# The grid of the active experts alone (3 of 4 have rows; 4 slots: one returns at once), in two launches.
import os
from kernels.triton_decode_fused import active_experts_triton
from kernels.triton_moe_fused_decode import FUSED_DECODE_ENV
os.environ[FUSED_DECODE_ENV] = "0"
ay, as_ = moe_forward_masked_shared_triton(x, counts, w13, w2, hidden, gate_up, down,
                                           active=(active_experts_triton(counts), 4))
# Both GEMMs in one launch (kernels.triton_moe_fused_decode): the two launches' bits, counters back at 0.
from kernels.triton_last_program import ring_buffer
os.environ[FUSED_DECODE_ENV] = "1"
fy, fs = moe_forward_masked_shared_triton(x, counts, w13, w2, hidden, gate_up, down,
                                          active=(active_experts_triton(counts), 4))
active_rows = valid & (counts > 0)[:, None, None]
print(json.dumps({"routed": float((torch.where(valid, y - ry, 0.0)).abs().max()),
                  "tail_zero": bool((torch.where(valid, 0.0, y) == 0).all()),
                  "shared": float((s - rs).abs().max()),
                  "active_routed": float((torch.where(valid, ay - ry, 0.0)).abs().max()),
                  "active_shared": float((as_ - rs).abs().max()),
                  "fused_equal": bool(torch.equal(torch.where(active_rows, fy, 0.0), torch.where(active_rows, ay, 0.0))
                                      and torch.equal(fs, as_)),
                  "fused_tail_zero": bool((fy[2, 5:] == 0).all() and (fy[0, 2:] == 0).all() and (fy[3, 1:] == 0).all()),
                  "counters_idle": bool((ring_buffer(x.device) == 0).all())}))
"""


@needs_triton
def test_shared_experts_in_the_routed_launch_equal_the_separate_references_interpreted() -> None:
    result = _interpreted(SHARED_CHECK)
    assert result["routed"] < 1e-4 and result["shared"] < 1e-4 and result["tail_zero"], result
    assert result["active_routed"] < 1e-4 and result["active_shared"] < 1e-4, result
    assert result["fused_equal"] and result["fused_tail_zero"] and result["counters_idle"], result


def test_combine_then_norm_is_the_combine_then_the_add_and_norm_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 32, generator=g).bfloat16()
    ids = torch.tensor([[4, 1], [0, -1], [1, 2]])
    _, _, dest = decode_fused.moe_scatter_rows(hidden, ids, 5)
    y, add, res, nw = (torch.randn(*s, generator=g).bfloat16() for s in ((5 * 3, 32), (3, 32), (3, 32), (32,)))
    weights = torch.rand(3, 2, generator=g)
    normed, summed = decode_fused.moe_combine_add_rms_norm(y, dest, ids, weights, add, res, nw, 1e-6)
    combined = decode_fused.moe_combine(y, dest, ids, weights, add)
    assert torch.equal(summed, combined + res) and torch.equal(normed, rms_norm(combined + res, nw, 1e-6))


@needs_triton
def test_the_decode_moe_takes_one_launch_where_it_was_measured_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` runs one launch at 2-8 tokens an expert (where the GPU runs had it faster), never past one row
    block or with several K blocks an iteration; ``1`` / ``0`` force it where it applies / never; a bad value is
    refused."""
    from kernels.triton_moe_fused_decode import AUTO_ROWS, FUSED_DECODE_ENV, fused_decode_applies

    def takes(capacity: int, block_m: int = 16, kb_step: int = 1) -> bool:
        return fused_decode_applies(torch.empty(4, capacity, 8), block_m, kb_step)

    monkeypatch.delenv(FUSED_DECODE_ENV, raising=False)
    assert AUTO_ROWS == (2, 8)
    assert [takes(c) for c in (1, 2, 8, 9, 16)] == [False, True, True, False, False]
    assert not takes(4, kb_step=2) and not takes(4, block_m=2)
    monkeypatch.setenv(FUSED_DECODE_ENV, "1")
    assert [takes(c) for c in (1, 16, 17)] == [True, True, False]
    monkeypatch.setenv(FUSED_DECODE_ENV, "0")
    assert not takes(4)
    monkeypatch.setenv(FUSED_DECODE_ENV, "yes")
    with pytest.raises(ValueError, match=FUSED_DECODE_ENV):
        takes(4)
