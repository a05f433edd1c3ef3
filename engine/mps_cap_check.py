"""A start-up check for ranks that run under a CUDA MPS SM cap (``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` < 100).

On one H100 (torch 2.11, CUDA 13) cuBLAS's bf16 GEMMs at a V2-Lite prefill's shapes gave NaN or relative errors of
0.2-0.4 under caps of 55-90 % of the SMs, and were right at 95 % and uncapped (`tests/nan_probe.py --gemms`,
session 43); served under a 70 % cap, prefill logits came out NaN. A capped process cannot tell from the
results' shape that they are wrong, so a rank under a cap multiplies random matrices of its model's dense
shapes once before it loads anything, compares each with a float64 product, and refuses to start if one is
off: a worker that would serve wrong tokens says so instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from engine.config import ModelConfig

CAP_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
MAX_REL_ERR = 1e-2  # bf16 products of these sizes land near 2e-3; the wrong ones were 0.2 and more, or NaN
MAX_ROWS = 4096  # the tallest product checked: the wrong ones showed at 4096 rows, and a rank's start stays short


def sm_cap_percent() -> float | None:
    """The cap this process runs under, or None (unset, unparsable or 100 %: no cap)."""
    try:
        percent = float(os.environ.get(CAP_ENV, ""))
    except ValueError:
        return None
    return percent if 0 < percent < 100 else None


def dense_shapes(config: ModelConfig) -> list[tuple[int, int, int]]:
    """(k, n, row stride of the input) of a layer's dense GEMMs at one rank's full width: the fused query and
    latent projection, the up projection from the latent (reading it out of the latent + rope row, as the model
    does), the output projection and a dense MLP's two halves."""
    latent_row = config.kv_lora_rank + config.qk_rope_head_dim
    heads = config.num_attention_heads
    query = config.q_lora_rank or heads * config.qk_head_dim
    shapes = [(config.hidden_size, query + latent_row, config.hidden_size),
              (config.kv_lora_rank, heads * (config.qk_nope_head_dim + config.v_head_dim), latent_row),
              (heads * config.v_head_dim, config.hidden_size, heads * config.v_head_dim),
              (config.hidden_size, 2 * config.intermediate_size, config.hidden_size),
              (config.intermediate_size, config.hidden_size, config.intermediate_size)]
    return list(dict.fromkeys(shapes))


def gemm_errors(config: ModelConfig, device: torch.device, rows: int,
                dtype: torch.dtype = torch.bfloat16) -> Iterator[tuple[int, int, int, int, float]]:
    """(rows, k, n, row stride, relative error against float64; NaN where the product is not finite) of each of
    `dense_shapes` at 8 and at `rows` rows in `dtype`, random inputs of unit scale."""
    gen = torch.Generator(device=device).manual_seed(0)
    for m in sorted({8, rows}):
        for k, n, stride in dense_shapes(config):
            x = torch.randn(m, stride, device=device, generator=gen).to(dtype)[:, :k]
            w = (torch.randn(n, k, device=device, generator=gen) / k**0.5).to(dtype)
            out = F.linear(x, w).double()
            ref = x.double() @ w.double().t()
            finite = bool(torch.isfinite(out).all())
            yield m, k, n, stride, float((out - ref).norm() / ref.norm()) if finite else float("nan")


def check_gemms_under_sm_cap(config: ModelConfig, device: torch.device, rows: int,
                             dtype: torch.dtype = torch.bfloat16) -> None:
    """Under an SM cap, `gemm_errors` at 8 rows and at ``rows`` (a rank's prefill tokens a forward; at most
    `MAX_ROWS`): a RuntimeError naming the first wrong product. Without a cap: nothing."""
    percent = sm_cap_percent()
    if percent is None:
        return
    for m, k, n, _, rel in gemm_errors(config, device, min(rows, MAX_ROWS), dtype):
        if not rel <= MAX_REL_ERR:  # NaN too
            raise RuntimeError(
                f"under an MPS SM cap of {percent:g} % ({CAP_ENV}) this GPU's GEMM library computed a wrong "
                f"product ({m}x{k} by {k}x{n} in {dtype}: relative error {rel:.2g} against float64); this "
                f"rank would serve wrong tokens: run it without the cap (or with one of 95 % or more)")
