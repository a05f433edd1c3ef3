"""Runs the FP8 Triton kernels under Triton's CPU interpreter against the torch references.

    TRITON_INTERPRET=1 python tests/fp8_interpret_check.py

Run as its own process by tests/test_fp8_kernels_ref.py: the interpreter is chosen when ``triton.jit``
decorates a kernel, so the variable must be set before kernels.triton_fp8 is first imported. Exits 1
naming the first case whose relative error is over its bound. Shapes are small (the interpreter runs
each program in numpy) but cross every edge: partial K blocks, partial scale blocks, odd row counts,
experts with no rows, rows routed to another rank (-1).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kernels import fp8, moe  # noqa: E402

BS = (128, 128)
TOLERANCE = 1e-4  # float32 activations: accumulation order only (plus a rare one-ulp quantized value)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def check(name: str, err: float, bound: float = TOLERANCE) -> None:
    print(f"{name}: relative error {err:.2e}")
    if not err <= bound:
        raise SystemExit(f"FAIL {name}: {err:.2e} > {bound:.0e}")


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("set TRITON_INTERPRET=1")
    check_quantizer()
    # Both activation modes, at every size: FP8 activations (DeepSeek's recipe) and W8A16 (the model
    # dtype against the dequantized weight tile); the references follow the same switch.
    for mode in ("fp8", "bf16"):
        os.environ[fp8.ACT_ENV] = mode
        print(f"-- {fp8.ACT_ENV}={mode}")
        check_dense()
        check_experts()
    # auto: the small cases here run W8A16, like a decode step; the reference must have followed.
    os.environ[fp8.ACT_ENV] = "auto"
    assert not fp8.quantizes_activations(fp8.W8A16_MAX_ROWS) and fp8.quantizes_activations(fp8.W8A16_MAX_ROWS + 1)
    print("ok")
    return 0


def check_quantizer() -> None:
    from kernels import triton_fp8 as tf

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 300, generator=gen) * 3
    x[5] = 0.0  # an all-zero row
    x[6, :4] = torch.tensor([-1e-6, 1e-6, -3e-3, 3e-3])  # round to -0 / +0 / subnormals beside amax ~ 10
    q, s = tf.quantize_fp8_act_triton(x)
    rq, rs = fp8.quantize_fp8_act(x)
    check("quantize scales", rel(s, rs), 1e-6)
    check("quantize values", rel(fp8.dequantize_fp8_act(q, s), fp8.dequantize_fp8_act(rq, rs)), 1e-3)
    # Bytes, not values: -0 and +0 are equal values (the H100 run caught a +0 where torch writes -0).
    check("quantize bytes", float((q.view(torch.uint8) != rq.view(torch.uint8)).sum()), 0.5)
    # SiLU(gate) * up quantized in the same pass (bf16 [M, 2K]) against torch's SiLU * up, then the quantizer;
    # masked: 3 experts x capacity 13, only each expert's counted rows written.
    gate_up = (torch.randn(39, 600, generator=gen) * 3).bfloat16()
    rq, rs = fp8.quantize_fp8_act(moe.silu_mul(gate_up).float())
    q, s = tf.quantize_fp8_act_triton(gate_up, silu_mul=True)
    check("quantize silu_mul scales", rel(s, rs), 1e-6)
    check("quantize silu_mul bytes", float((q.view(torch.uint8) != rq.view(torch.uint8)).sum()), 0.5)
    counts = torch.tensor([13, 0, 5], dtype=torch.int32)
    q, s = tf.quantize_fp8_act_triton(gate_up, counts=counts, capacity=13, silu_mul=True)
    rows = torch.cat([torch.arange(13), 26 + torch.arange(5)])
    check("quantize silu_mul masked bytes", float((q.view(torch.uint8)[rows] != rq.view(torch.uint8)[rows]).sum()), 0.5)
    check("quantize silu_mul masked scales", rel(s[rows], rs[rows]), 1e-6)
    out = torch.full((3, 13, 70), 7.0).bfloat16()
    tf.zero_past_count_triton(out, counts)
    want = torch.full((3, 13, 70), 7.0).bfloat16()
    want[0, 13:], want[1], want[2, 5:] = 0, 0, 0
    check("zero rows past count", float((out != want).sum()), 0.5)


def check_dense() -> None:
    from kernels import triton_fp8 as tf
    from kernels import triton_last_program as last_program

    gen = torch.Generator().manual_seed(1)
    w8a16 = not fp8.quantizes_activations(1)
    for m, n, k in ((1, 200, 300), (19, 256, 256), (70, 130, 384)):
        w, ws = fp8.quantize_fp8_weight(torch.randn(n, k, generator=gen), BS)
        a = torch.randn(m, k, generator=gen)
        bias = torch.randn(n, generator=gen)
        ref = fp8.fp8_linear(a, w, ws, bias)
        check(f"fp8_linear M{m} N{n} K{k}", rel(tf.fp8_linear_triton(a, w, ws, bias), ref))
        for split in (2, 3):  # 3 K blocks at K=384 over 2 splits: the second has a dead tail block
            if w8a16:
                out = tf.fp8_gemm_triton(a, None, w, ws, torch.float32, bias, split_k=split, w8a16=True, fixup=False)
                check(f"fp8_gemm w8a16 split_k={split} M{m} N{n} K{k}", rel(out, ref))
                # Summed by each tile's last split inside the launch: the reduction launch's bits, twice (the
                # counters it leaves must start the next launch at 0).
                for _ in range(2):
                    fixed = tf.fp8_gemm_triton(a, None, w, ws, torch.float32, bias, split_k=split, w8a16=True,
                                               fixup=True)
                    check(f"fp8_gemm w8a16 split_k={split} in-launch sum M{m} N{n} K{k}",
                          float((fixed != out).sum()), 0.5)
                ring = last_program._RINGS[torch.device("cpu")]  # the launches took counters and left them at 0
                check("split counters taken and reset", float(ring.cursor == 0 or ring.buffer.any()), 0.5)
                continue
            aq, a_s = tf.quantize_fp8_act_triton(a)
            out = tf.fp8_gemm_triton(aq, a_s, w, ws, torch.float32, bias, split_k=split)
            check(f"fp8_gemm split_k={split} M{m} N{n} K{k}", rel(out, ref))
            fused = tf.fp8_gemm_triton(a, None, w, ws, torch.float32, bias, split_k=split)
            check(f"fp8_gemm quantizing in-kernel split_k={split} M{m} N{n} K{k}", rel(fused, ref))
        # Two or three K blocks an iteration: a step past the split's share (or past K) must load nothing.
        for split, kb_step in ((1, 2), (2, 2), (1, 3), (3, 2)):
            cfg = dataclasses.replace(tf.dense_gemm_config(m), kb_step=kb_step)
            if w8a16:
                out = tf.fp8_gemm_triton(a, None, w, ws, torch.float32, bias, config=cfg, split_k=split, w8a16=True)
            else:
                aq, a_s = tf.quantize_fp8_act_triton(a)
                out = tf.fp8_gemm_triton(aq, a_s, w, ws, torch.float32, bias, config=cfg, split_k=split)
            check(f"fp8_gemm split_k={split} kb_step={kb_step} M{m} N{n} K{k}", rel(out, ref))
    if w8a16:
        check_gemv(gen)


def check_gemv(gen: torch.Generator) -> None:
    """The GEMV (``kernels.triton_fp8_gemv``): partial column tiles and K blocks, several chunks of K
    (the first loaded before the PDL wait, the rest after), 1-4 rows, with and without bias; and through
    ``fp8_linear_triton`` under its switch."""
    from kernels import triton_fp8 as tf
    from kernels import triton_fp8_gemv as tfg
    from kernels.backend import switched

    for m, n, k, cfg in ((1, 200, 300, None), (4, 130, 640, tfg.GemvConfig(8, 4, 2)),
                         (3, 37, 1100, tfg.GemvConfig(16, 2, 4)), (2, 256, 256, tfg.GemvConfig(4, 4, 1))):
        w, ws = fp8.quantize_fp8_weight(torch.randn(n, k, generator=gen), BS)
        a = torch.randn(m, k, generator=gen)
        for bias in (None, torch.randn(n, generator=gen)):
            ref = fp8.fp8_linear(a, w, ws, bias)
            check(f"fp8_gemv M{m} N{n} K{k} {cfg} bias={bias is not None}",
                  rel(tfg.fp8_gemv_triton(a, w, ws, bias, BS, cfg), ref))
    with switched(tfg.GEMV_ENV, "1"):
        w, ws = fp8.quantize_fp8_weight(torch.randn(96, 384, generator=gen), BS)
        a = torch.randn(tfg.GEMV_MAX_ROWS, 384, generator=gen)
        check("fp8_linear as a GEMV", rel(tf.fp8_linear_triton(a, w, ws), fp8.fp8_linear(a, w, ws)))


def check_experts() -> None:
    from kernels import triton_fp8 as tf
    from kernels import triton_fp8_moe as tfm

    gen = torch.Generator().manual_seed(2)
    experts, hidden, inter, tokens, top_k = 4, 256, 192, 23, 2
    w13 = torch.cat([fp8.quantize_fp8_weight(torch.randn(experts, inter, hidden, generator=gen) / 16, BS)[0],
                     fp8.quantize_fp8_weight(torch.randn(experts, inter, hidden, generator=gen) / 16, BS)[0]], 1)
    gate_s = fp8.quantize_fp8_weight(torch.randn(experts, inter, hidden, generator=gen) / 16, BS)[1]
    up_s = fp8.quantize_fp8_weight(torch.randn(experts, inter, hidden, generator=gen) / 16, BS)[1]
    w13_s = torch.cat([gate_s, up_s], 1)
    w2, w2_s = fp8.quantize_fp8_weight(torch.randn(experts, hidden, inter, generator=gen) / 14, BS)
    h = torch.randn(tokens, hidden, generator=gen)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    ids[ids == 3] = -1  # expert 3 lives on another rank
    ids[0, 0] = -1
    wts = torch.rand(tokens, top_k, generator=gen)
    ref = fp8.fp8_moe_forward(h, ids, wts, w13, w13_s, w2, w2_s)
    # kb_step 2 and 3: K blocks loaded two or three an iteration, with a tail step past the last block (the
    # down projection's K is two blocks, the gated one's two: 3 leaves one empty block a step).
    for cfg in (None, tf.Fp8GemmConfig(16, 64, 1, 4, 2), tf.Fp8GemmConfig(16, 64, 1, 4, 2, kb_step=2),
                tf.Fp8GemmConfig(16, 32, 1, 4, 2, kb_step=3)):
        out = tfm.fp8_moe_forward_triton(h, ids, wts, w13, w13_s, w2, w2_s, config=cfg)
        check(f"fp8_moe_forward {cfg}", rel(out, ref))
    # The down launch's own tile (its row tile is the gated one's: both walk the same padded rows).
    out = tfm.fp8_moe_forward_triton(h, ids, wts, w13, w13_s, w2, w2_s, config=tf.Fp8GemmConfig(16, 64, 1, 4, 2),
                                     down_config=tf.Fp8GemmConfig(32, 32, 1, 4, 2))
    check("fp8_moe_forward down_config", rel(out, ref))

    capacity = 20
    counts = torch.tensor([0, 7, 20, 1])
    xm = torch.randn(experts, capacity, hidden, generator=gen)
    xm[0] = float("nan")  # rows past a count are never read
    xm[1, 7:] = float("nan")
    ref_m = fp8.fp8_moe_forward_masked(xm, counts, w13, w13_s, w2, w2_s)
    out_m = tfm.fp8_moe_forward_masked_triton(xm, counts, w13, w13_s, w2, w2_s)
    check("fp8_moe_forward_masked", rel(out_m, ref_m))
    out_d = tfm.fp8_moe_forward_masked_triton(xm, counts, w13, w13_s, w2, w2_s,
                                              down_config=tf.Fp8GemmConfig(32, 32, 1, 4, 2))
    check("fp8_moe_forward_masked down_config", rel(out_d, ref_m))
    out_k = tfm.fp8_moe_forward_masked_triton(xm, counts, w13, w13_s, w2, w2_s,
                                              config=tf.Fp8GemmConfig(16, 32, 1, 4, 2, kb_step=3))
    check("fp8_moe_forward_masked kb_step 3", rel(out_k, ref_m))
    if not bool((out_m[0] == 0).all() and (out_m[1, 7:] == 0).all()):
        raise SystemExit("FAIL masked rows past the count are not zero")

    # The shared experts (wider than a routed one: 320 columns, two and a half K blocks for the down
    # projection where the routed experts have one and a half) riding in the routed launches.
    shared_inter = 320
    sg, sg_s = fp8.quantize_fp8_weight(torch.randn(shared_inter, hidden, generator=gen) / 16, BS)
    su, su_s = fp8.quantize_fp8_weight(torch.randn(shared_inter, hidden, generator=gen) / 16, BS)
    sd, sd_s = fp8.quantize_fp8_weight(torch.randn(hidden, shared_inter, generator=gen) / 18, BS)
    shared = (torch.cat([sg, su]), torch.cat([sg_s, su_s]), sd, sd_s)
    hid = torch.randn(capacity, hidden, generator=gen)
    xm[0] = 0.0  # the fused path reads rows by count too, but keep NaN out of the reference's sums
    xm[1, 7:] = 0.0
    ref_r, ref_s = fp8.fp8_moe_forward_masked_shared(xm, counts, w13, w13_s, w2, w2_s, hid, *shared)
    out_r, out_s = tfm.fp8_moe_forward_masked_shared_triton(xm, counts, w13, w13_s, w2, w2_s, hid, *shared)
    check("fp8_moe_forward_masked_shared routed", rel(out_r, ref_r))
    check("fp8_moe_forward_masked_shared shared", rel(out_s, ref_s))
    # Two K blocks an iteration through the decode tile override (the shared down projection's three blocks
    # leave an empty one in its last step).
    os.environ[tfm.MOE_DECODE_TILE_ENV] = "32,4,2,2"
    try:
        two_r, two_s = tfm.fp8_moe_forward_masked_shared_triton(xm, counts, w13, w13_s, w2, w2_s, hid, *shared)
    finally:
        del os.environ[tfm.MOE_DECODE_TILE_ENV]
    check("fp8_moe_forward_masked_shared kb_step 2 routed", rel(two_r, ref_r))
    check("fp8_moe_forward_masked_shared kb_step 2 shared", rel(two_s, ref_s))
    if not fp8.quantizes_activations(16):  # W8A16: the fused launches, also over the active experts alone
        from kernels.triton_decode_fused import active_experts_triton

        active = (active_experts_triton(counts), 3)  # 3 of the 4 experts have rows
        act_r, act_s = tfm.fp8_moe_forward_masked_shared_triton(xm, counts, w13, w13_s, w2, w2_s, hid, *shared,
                                                                 active=active)
        valid = (torch.arange(capacity)[None, :] < counts[:, None])[..., None]
        check("fp8_moe_forward_masked_shared active grid, routed rows",
              rel(torch.where(valid, act_r, 0.0), torch.where(valid, ref_r, 0.0)))
        check("fp8_moe_forward_masked_shared active grid, shared", rel(act_s, ref_s))
    want_shared = fp8.fp8_gated_mlp(hid, *shared)
    if fp8.quantizes_activations(capacity) == fp8.quantizes_activations(16):  # the same mode either way
        check("fp8_moe_forward_masked_shared shared vs the gated MLP", rel(out_s, want_shared))
    if not fp8.quantizes_activations(16):
        check_fused_decode(xm[:, :3], counts.clamp(max=3), w13, w13_s, w2, w2_s, hid[:3], shared)
        check_f16_decode(xm[:, :3], counts.clamp(max=3), w13, w13_s, w2, w2_s, hid[:3], shared)


def check_f16_decode(xm: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w13_s: torch.Tensor,
                     w2: torch.Tensor, w2_s: torch.Tensor, hid: torch.Tensor, shared: tuple) -> None:
    """The two decode launches on f16 activations (kernels.triton_f16_groups) against the reference, on bf16
    rows (the interpreter's bf16 dot is not numpy's, so W8A16 itself is checked on float32 only): at unit
    magnitude, past f16's range (3e4 times the rows: an unscaled f16 cast would overflow) and deep in its
    subnormals (1e-4 times). The reference is each expert's float32 output (the intermediate rounded to bf16, as
    the kernels store it) cut to bf16 the way the interpreter's cast cuts (it truncates where the GPU rounds):
    what is left is the summation order's last bit."""
    from kernels import triton_fp8_moe as tfm
    from kernels.f16_groups import F16_DECODE_ENV
    from kernels.triton_decode_fused import active_experts_triton
    from kernels.triton_moe_fused_decode import FUSED_DECODE_ENV

    def truncated(v: torch.Tensor) -> torch.Tensor:
        return (v.float().view(torch.int32) & -65536).view(torch.float32)

    active = (active_experts_triton(counts), 3)
    for magnitude in (1.0, 3e4, 1e-4):
        x = (xm * magnitude).bfloat16().contiguous()
        h = (hid * magnitude).bfloat16()
        ref_s = truncated(fp8._expert_mlp_fp8(h, shared[0], shared[1], shared[2], shared[3], BS, False))
        os.environ.update({F16_DECODE_ENV: "1", FUSED_DECODE_ENV: "0"})
        try:
            out_r, out_s = tfm.fp8_moe_forward_masked_shared_triton(x, counts, w13, w13_s, w2, w2_s, h, *shared,
                                                                     active=active)
            # Without the shared experts (every expert's column), and a dense MLP as one expert (16-wide tiles):
            # the same scales, so at one magnitude (the interpreter's time is CI's).
            alone = tfm.fp8_moe_forward_masked_triton(x, counts, w13, w13_s, w2, w2_s) if magnitude == 1 else None
            mlp = tfm.fp8_gated_mlp_triton(h, *shared) if magnitude == 1 else None
        finally:
            del os.environ[F16_DECODE_ENV], os.environ[FUSED_DECODE_ENV]
        for e, count in enumerate(counts.tolist()):
            want = truncated(fp8._expert_mlp_fp8(x[e, :count], w13[e], w13_s[e], w2[e], w2_s[e], BS, False))
            check(f"f16 decode launches x{magnitude:g}, expert {e}'s {count} rows", rel(out_r[e, :count], want))
            if alone is not None:
                check(f"f16 masked launches, expert {e}'s {count} rows", rel(alone[e, :count], want))
        if alone is not None and not bool((alone[0] == 0).all() and (alone[3, 1:] == 0).all()):
            raise SystemExit("FAIL f16 masked rows past the count are not zero")
        check(f"f16 decode launches x{magnitude:g}, shared", rel(out_s, ref_s))
        if mlp is not None:
            check("f16 gated MLP", rel(mlp, ref_s))
    # The engine's way: the scatter writes the f16 rows (kernels.moe_scatter_rows_active_f16), the launches take
    # them instead of converting: the same bits as converting them in a launch of their own.
    from kernels.triton_decode_fused import moe_scatter_rows_active_f16_triton

    gen = torch.Generator().manual_seed(5)
    tokens, experts = hid.shape[0], w13.shape[0]
    h = torch.randn(tokens, hid.shape[1], generator=gen).bfloat16()
    ids = torch.stack([torch.randperm(experts, generator=gen)[:2] for _ in range(tokens)])
    rows, cnt, _, act, f16 = moe_scatter_rows_active_f16_triton(h, ids, experts, BS[1])
    os.environ.update({F16_DECODE_ENV: "1", FUSED_DECODE_ENV: "0"})
    try:
        given = tfm.fp8_moe_forward_masked_shared_triton(rows, cnt, w13, w13_s, w2, w2_s, h, *shared,
                                                         active=(act, experts), f16=f16)
        own = tfm.fp8_moe_forward_masked_shared_triton(rows, cnt, w13, w13_s, w2, w2_s, h, *shared,
                                                       active=(act, experts))
    finally:
        del os.environ[F16_DECODE_ENV], os.environ[FUSED_DECODE_ENV]
    valid = (torch.arange(tokens)[None, :] < cnt[:, None])[..., None]
    same = torch.equal(torch.where(valid, given[0], 0), torch.where(valid, own[0], 0)) and torch.equal(given[1], own[1])
    print(f"f16 rows from the scatter give the f16 launch's bits: {same}")
    if not same:
        raise SystemExit("FAIL the scatter's f16 rows differ from the f16 launch's")


def check_fused_decode(xm: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w13_s: torch.Tensor,
                       w2: torch.Tensor, w2_s: torch.Tensor, hid: torch.Tensor, shared: tuple) -> None:
    """Both expert GEMMs in one launch (kernels.triton_moe_fused_decode) give the two launches' bits: 10
    gate/up tiles of 32 columns for the shared expert (5 for a routed one: the rest return), 8 down tiles,
    the shared down projection's K three blocks (2.5), a routed one's two (1.5); the counters end at 0. W8A16
    on float32 rows, and f16 activations (kernels.triton_f16_groups) on bf16 ones."""
    from kernels import triton_fp8_moe as tfm
    from kernels.f16_groups import F16_DECODE_ENV
    from kernels.triton_decode_fused import active_experts_triton
    from kernels.triton_last_program import ring_buffer
    from kernels.triton_moe_fused_decode import FUSED_DECODE_ENV

    active = (active_experts_triton(counts), 3)
    for f16 in ("0", "1"):
        x = xm.contiguous() if f16 == "0" else xm.bfloat16().contiguous()
        h = hid if f16 == "0" else hid.bfloat16()
        os.environ.update({FUSED_DECODE_ENV: "0", F16_DECODE_ENV: f16})
        try:
            two_r, two_s = tfm.fp8_moe_forward_masked_shared_triton(x, counts, w13, w13_s, w2, w2_s, h, *shared,
                                                                     active=active)
            os.environ[FUSED_DECODE_ENV] = "1"
            one_r, one_s = tfm.fp8_moe_forward_masked_shared_triton(x, counts, w13, w13_s, w2, w2_s, h, *shared,
                                                                     active=active)
        finally:
            del os.environ[FUSED_DECODE_ENV], os.environ[F16_DECODE_ENV]
        rows = (counts > 0)[:, None, None] & (torch.arange(x.shape[1])[None, :, None] < x.shape[1])
        same = (torch.equal(torch.where(rows, one_r, 0.0), torch.where(rows, two_r, 0.0))
                and torch.equal(one_s, two_s))
        label = "f16 activations" if f16 == "1" else "W8A16"
        print(f"fused decode MoE equals the two launches ({label}): {same}")
        if not same:
            raise SystemExit(f"FAIL the fused decode MoE differs from the two launches ({label})")
        if not bool((ring_buffer(x.device) == 0).all()):
            raise SystemExit(f"FAIL the fused decode MoE left a counter set ({label})")


if __name__ == "__main__":
    sys.exit(main())
