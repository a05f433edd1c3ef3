"""`kernels.head_matmul` (the absorbed MLA decode's per-head products): the reference equals a loop of per-head
matmuls, refuses bad shapes, and the Triton kernel equals it (Triton's interpreter on CPU in float32; bf16 on
the GPU, also inside a CUDA graph); the decode prep in the launch of the first product equals the two ops."""

from __future__ import annotations

import pytest
import torch

from kernels import backend, mla
from tests.test_kernels_decode_fused import _interpreted

needs_triton = pytest.mark.skipif(not backend.triton_importable(), reason="needs Triton")


def test_the_reference_is_each_heads_matmul_into_a_strided_or_given_output() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 40, generator=g)[..., :24]  # a strided view, as q_nope is of q
    kv_b = torch.randn(4, 24 + 16, 32, generator=g)
    w_kc, w_vc = kv_b[:, :24], kv_b[:, 24:]
    latent = mla.head_matmul(q, w_kc)
    assert latent.shape == (3, 4, 32) and latent.stride(2) == 1
    assert torch.allclose(latent, torch.stack([q[:, h] @ w_kc[h] for h in range(4)], 1), atol=1e-5)
    out = torch.empty(3, 4, 16)
    assert mla.head_matmul(latent, w_vc.transpose(1, 2), out) is out
    assert torch.allclose(out, torch.stack([latent[:, h] @ w_vc[h].T for h in range(4)], 1), atol=1e-5)


@pytest.mark.parametrize(("x", "w", "out", "message"), [
    ((2, 4, 8), (3, 8, 5), None, "must be"),
    ((2, 4, 8), (4, 7, 5), None, "must be"),
    ((2, 4, 8), (4, 8, 5), (2, 4, 6), "out must be"),
])
def test_mismatched_shapes_are_refused(x: tuple[int, ...], w: tuple[int, ...], out: tuple[int, ...] | None,
                                       message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mla.head_matmul(torch.zeros(x), torch.zeros(w), None if out is None else torch.zeros(out))


CHECK = """
import json, os, torch
from kernels import mla
from kernels.triton_head_matmul import head_matmul_triton
os.environ["TANDEM_HEAD_MATMUL"] = "triton"
device = "{device}"
dtype = {dtype}
g = torch.Generator().manual_seed(1)
errors = {{}}
for rows, heads, nope, v, rank in ((1, 16, 128, 128, 512), (5, 3, 48, 32, 80), (16, 2, 16, 16, 64), (17, 2, 16, 16, 64)):
    q = torch.randn(rows, heads, nope + 64, generator=g).to(device, dtype)[..., :nope]
    kv_b = (torch.randn(heads, nope + v, rank, generator=g) / rank ** 0.5).to(device, dtype)
    w_kc, w_vc = kv_b[:, :nope], kv_b[:, nope:]
    latent = head_matmul_triton(q, w_kc)
    out = torch.empty(rows, heads, v, device=device, dtype=dtype)
    head_matmul_triton(latent, w_vc.transpose(1, 2), out)
    ref_latent = mla.head_matmul(q, w_kc)
    ref_out = mla.head_matmul(ref_latent, w_vc.transpose(1, 2))
    scale = float(ref_out.float().abs().max()) + 1e-9
    errors[f"{{rows}}x{{heads}}x{{nope}}x{{rank}}"] = max(
        float((latent.float() - ref_latent.float()).abs().max()) / (float(ref_latent.float().abs().max()) + 1e-9),
        float((out.float() - ref_out.float()).abs().max()) / scale)
print(json.dumps(errors))
"""


PREP_Q_LATENT = """
import json, os, torch
from kernels import decode_fused
from kernels.triton_head_matmul import mla_decode_prep_q_latent_triton
os.environ["TANDEM_PREP_Q_LATENT"] = "{mode}"
g = torch.Generator().manual_seed(6)
errors = {{}}
for tokens, heads, nope, rope, rank, interleave in ((1, 16, 128, 64, 512, True), (5, 3, 32, 16, 64, False),
                                                    (17, 2, 16, 16, 32, False)):
    q = torch.randn(tokens, heads, nope + rope, generator=g)
    kv_a, norm_w = torch.randn(tokens, rank + rope, generator=g), torch.randn(rank, generator=g)
    freqs = torch.arange(tokens)[:, None].float() * 0.37 * torch.arange(1, rope // 2 + 1)[None].float()
    cos, sin = freqs.cos().contiguous(), freqs.sin().contiguous()
    pages, slots = torch.randperm(2 * tokens, generator=g)[:tokens], torch.randint(0, 4, (tokens,), generator=g)
    w_uk = torch.randn(heads, nope + 8, rank, generator=g)[:, :nope] / nope ** 0.5  # a view, as of kv_b_proj
    cache, ref_cache = torch.zeros(2 * tokens, 4, rank + rope), torch.zeros(2 * tokens, 4, rank + rope)
    q_pe, latent = mla_decode_prep_q_latent_triton(q, kv_a, cos, sin, norm_w, 1e-6, cache, pages, slots, nope,
                                                   interleave, 1.0, w_uk)
    want_pe, want_latent = decode_fused.mla_decode_prep_q_latent(q, kv_a, cos, sin, norm_w, 1e-6, ref_cache, pages,
                                                                 slots, nope, interleave, 1.0, w_uk)
    errors[f"{{tokens}}x{{heads}}"] = max(float((q_pe - want_pe).abs().max()), float((cache - ref_cache).abs().max()),
                                          float((latent - want_latent).abs().max() / want_latent.abs().max()))
print(json.dumps(errors))
"""


@needs_triton
@pytest.mark.parametrize("mode", ["1", "0"], ids=["one_launch", "separate_launches"])
def test_the_decode_prep_beside_the_absorbed_query_equals_the_reference_interpreted(mode: str) -> None:
    errors = _interpreted(PREP_Q_LATENT.format(mode=mode))
    assert len(errors) == 3 and max(errors.values()) < 1e-5, errors


@needs_triton
def test_the_triton_kernel_equals_the_reference_interpreted() -> None:
    errors = _interpreted(CHECK.format(device="cpu", dtype="torch.float32"))
    assert len(errors) == 4 and max(errors.values()) < 1e-5, errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_triton_kernel_equals_cublas_on_the_gpu_and_in_a_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    from kernels.triton_head_matmul import HEAD_MATMUL_ENV, head_matmul_triton

    monkeypatch.setenv(HEAD_MATMUL_ENV, "triton")
    g = torch.Generator().manual_seed(2)
    q = torch.randn(4, 16, 192, generator=g).cuda().bfloat16()[..., :128]
    kv_b = (torch.randn(16, 256, 512, generator=g) / 16).cuda().bfloat16()
    w_kc, w_vc = kv_b[:, :128], kv_b[:, 128:]
    expected = mla.head_matmul(mla.head_matmul(q, w_kc), w_vc.transpose(1, 2))
    out = torch.empty(4, 16, 128, device="cuda", dtype=torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    head_matmul_triton(head_matmul_triton(q, w_kc), w_vc.transpose(1, 2), out)  # compile outside the capture
    with torch.cuda.graph(graph):
        head_matmul_triton(head_matmul_triton(q, w_kc), w_vc.transpose(1, 2), out)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    rel = float((out.float() - expected.float()).abs().max() / expected.float().abs().max())
    assert rel < 2e-2, rel

