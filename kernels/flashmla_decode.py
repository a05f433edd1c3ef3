"""Paged MLA decode through FlashMLA (deepseek-ai/FlashMLA), an optional backend on Hopper (sm90a).

Same contract as `kernels.mla.mla_decode_attention`. FlashMLA's dense decode kernel holds 64 query heads
per tile with wgmma and TMA: DP attention's 128 heads (DeepSeek-V3) run compute-bound near the tensor
cores' rate, where the Triton kernel reaches a quarter of it. Used when
  - FlashMLA is importable: the `flash_mla` package (`pip install` of FlashMLA, whose extension module is
    `flash_mla.cuda`), or an extension built from FlashMLA's sm90 dense decode alone and named by
    `TANDEM_FLASHMLA_SO` (a path to the `.so`; its module is `flash_mla_dense`);
  - the GPU is sm90 (H100/H200/H800), q and the cache are bf16 and the pages hold 64 tokens (FlashMLA's
    block size and tandem's default);
  - `TANDEM_MLA_DECODE` is `auto` (the default) and the call has at least 64 query heads and 16 sequences,
    or it is `flashmla` (which fails loudly when FlashMLA cannot run).
`auto`'s rule is measured (one H100, CUDA-graph replays, L2 flushed; bench/results/tune_gpu_mla_h100.json):
at 128 heads FlashMLA took 165 us at batch 64 / context 4096 (442 TFLOP/s) where the Triton kernel took
362 us, and 76 vs 142 us at batch 64 / context 1024, but 43 vs 31 us at batch 8 / context 1024; at 16
heads the Triton kernel was faster at every size (e.g. 131 vs 162 us at batch 64 / context 4096).
Otherwise `kernels.triton_mla_decode` runs. FlashMLA computes its split schedule on the device from
`seq_lens` in every call (no host sync), so the call can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.util
import os
from types import ModuleType
from typing import Any

import torch

PAGE_SIZE = 64
LORA = 512
AUTO_MIN_HEADS = 64  # auto: FlashMLA from this many query heads per rank (DP attention's 128)...
AUTO_MIN_BATCH = 16  # ...and this many sequences in the call


@functools.cache
def _extension() -> ModuleType | None:
    path = os.environ.get("TANDEM_FLASHMLA_SO")
    if path:
        loader = importlib.machinery.ExtensionFileLoader("flash_mla_dense", path)
        spec = importlib.util.spec_from_file_location("flash_mla_dense", path, loader=loader)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        return module
    try:
        return importlib.import_module("flash_mla.cuda")
    except ImportError:
        return None


def _mode() -> str:
    mode = os.environ.get("TANDEM_MLA_DECODE", "auto")
    if mode not in ("auto", "flashmla", "triton"):
        raise ValueError(f"TANDEM_MLA_DECODE must be auto, flashmla or triton, got {mode!r}")
    return mode


@functools.cache
def _sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index) == (9, 0)


def _fits(q_latent: torch.Tensor, kv_cache: torch.Tensor, kv_scale: float) -> bool:
    return (q_latent.dtype == torch.bfloat16 and kv_cache.dtype == torch.bfloat16 and kv_scale == 1.0
            and kv_cache.shape[1] == PAGE_SIZE and q_latent.shape[2] == LORA and _sm90(q_latent.device.index or 0))


def flashmla_runs(q_latent: torch.Tensor, kv_cache: torch.Tensor, kv_scale: float) -> bool:
    """Whether this call goes to FlashMLA (see the module docstring for when)."""
    mode = _mode()
    if mode == "triton" or not q_latent.is_cuda:
        return False
    if mode == "auto":
        # Cheap checks first: this runs on every decode attention call.
        return (q_latent.shape[1] >= AUTO_MIN_HEADS and q_latent.shape[0] >= AUTO_MIN_BATCH
                and _extension() is not None and _fits(q_latent, kv_cache, kv_scale))
    if _extension() is None:
        raise RuntimeError("TANDEM_MLA_DECODE=flashmla but FlashMLA is not importable (install flash_mla "
                           "or set TANDEM_FLASHMLA_SO)")
    if not _fits(q_latent, kv_cache, kv_scale):
        raise RuntimeError("TANDEM_MLA_DECODE=flashmla needs sm90, bf16 q and cache, 64-token pages, "
                           f"kv_lora_rank 512; got {q_latent.dtype}/{kv_cache.dtype}, page {kv_cache.shape[1]}")
    return True


def mla_decode_attention_flashmla(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor,
                                  page_table: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q_latent [B, H, 512], q_rope [B, H, 64], kv_cache [pages, 64, 576] (any page stride: a pool[:, layer]
    view), page_table int32 [B, max_pages], seq_lens int32 [B] -> [B, H, 512] bf16."""
    ext: Any = _extension()
    q = torch.cat([q_latent, q_rope], dim=-1).unsqueeze(1)  # [B, 1, H, 576]: FlashMLA's single q tensor
    k = kv_cache.unsqueeze(2)  # [pages, 64, 1, 576]: one latent "KV head"
    out = ext.dense_decode_fwd(q, k, LORA, seq_lens, page_table, float(scale), False, None, None)[0]
    return out.squeeze(1)


__all__ = ["flashmla_runs", "mla_decode_attention_flashmla"]
