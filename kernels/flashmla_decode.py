"""Paged MLA decode through FlashMLA (deepseek-ai/FlashMLA), an optional backend on Hopper (sm90a).

Same contract as `kernels.mla.mla_decode_attention`. FlashMLA's dense decode kernel holds 64 query heads
per tile with wgmma and TMA: DP attention's 128 heads (DeepSeek-V3) run compute-bound near the tensor
cores' rate, where the Triton kernel reaches a quarter of it. Used when
  - FlashMLA is importable: the `flash_mla` package (`pip install` of FlashMLA, whose extension module is
    `flash_mla.cuda`), or an extension built from FlashMLA's sm90 dense decode alone and named by
    `TANDEM_FLASHMLA_SO` (a path to the `.so`; its module is `flash_mla_dense`);
  - the GPU is sm90 (H100/H200/H800), q and the cache are bf16 and the pages hold 64 tokens (FlashMLA's
    block size and tandem's default);
  - `TANDEM_MLA_DECODE=flashmla` asks for it (and fails loudly when it cannot run). It is not picked by
    default (`auto`) yet: this path has not run on a GPU in this project's tests (its build did not finish
    in the one session that tried), so `auto` keeps the measured Triton kernel.
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


def flashmla_runs(q_latent: torch.Tensor, kv_cache: torch.Tensor, kv_scale: float) -> bool:
    """Whether this call goes to FlashMLA (see the module docstring for when)."""
    # auto and triton: the Triton kernel until FlashMLA has run here (see the module docstring); decided
    # before any shape check, since this runs on every decode attention call.
    if _mode() != "flashmla" or not q_latent.is_cuda:
        return False
    if _extension() is None:
        raise RuntimeError("TANDEM_MLA_DECODE=flashmla but FlashMLA is not importable (install flash_mla "
                           "or set TANDEM_FLASHMLA_SO)")
    fits = (q_latent.dtype == torch.bfloat16 and kv_cache.dtype == torch.bfloat16 and kv_scale == 1.0
            and kv_cache.shape[1] == PAGE_SIZE and q_latent.shape[2] == LORA and _sm90(q_latent.device.index or 0))
    if not fits:
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
