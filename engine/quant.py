"""FP8 block-quantized weights: which weights are FP8, whether the model keeps them so, the flag.

``--quantization auto|fp8|none`` (one definition, ``add_quantization_flag``, used by ``engine.generate``
and both workers): ``auto`` follows the checkpoint's config.json ``quantization_config``; ``fp8`` also
quantizes a bf16 checkpoint (or dummy weights) per 128 x 128 block at load; ``none`` dequantizes an FP8
checkpoint at load. With FP8 in effect the model *keeps* the weights in FP8 only on a GPU that runs the
FP8 kernels (CUDA, sm89+); on CPU they are dequantized at load, so the CPU path stays the reference of
the GPU one: same FP8-representable weights, computed in the model dtype.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from dataclasses import dataclass

import torch

from engine.config import Fp8Config, ModelConfig
from kernels.fp8 import (
    ACT_ENV,
    FP8_DTYPE,
    dequantize_fp8_weight,
    quantize_fp8_weight,
    quantizes_activations,
    scale_shape,
)
from kernels.fp8_cublas import GEMM_ENV, gemm_choice

log = logging.getLogger(__name__)

QUANTIZATION_CHOICES = ("auto", "fp8", "none")
SCALE_SUFFIX = "_scale_inv"  # DeepSeek-V3: "X.weight" (e4m3) pairs with "X.weight_scale_inv" (float32)
# The linear weights V3 ships in FP8; embeddings, norms, the router and the LM head stay bf16.
_FP8_WEIGHT = re.compile(
    r"model\.layers\.\d+\..*\b(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj"
    r"|down_proj)\.weight$"
)


def add_quantization_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--quantization", choices=QUANTIZATION_CHOICES, default="auto",
                        help="weights: 'auto' = the checkpoint's quantization_config (FP8 for DeepSeek-V3/R1), "
                             "'fp8' = 128x128-block FP8 (bf16 checkpoints and dummy weights are quantized at "
                             "load), 'none' = dequantize FP8 checkpoints at load. FP8 weights stay FP8 on CUDA "
                             "(sm89+) and are dequantized at load on CPU")


def is_fp8_weight_name(name: str) -> bool:
    """Whether checkpoint tensor ``name`` is one of the linear weights DeepSeek-V3 stores in FP8."""
    return _FP8_WEIGHT.search(name) is not None


@dataclass(frozen=True)
class Fp8Weight:
    """One FP8 checkpoint weight with its block scales (``weight_scale_inv``: dequantized = q * scale)."""

    q: torch.Tensor
    scale: torch.Tensor
    block_size: tuple[int, int]

    def validate(self, name: str) -> None:
        if self.q.dtype != FP8_DTYPE:
            raise ValueError(f"checkpoint tensor {name!r} is {self.q.dtype}, FP8 weights must be {FP8_DTYPE}")
        if self.q.dim() != 2:
            raise ValueError(f"FP8 checkpoint tensor {name!r} must be 2-D, got {tuple(self.q.shape)}")
        want = scale_shape(self.q.shape[0], self.q.shape[1], self.block_size)
        if tuple(self.scale.shape) != want:
            raise ValueError(f"{name}{SCALE_SUFFIX} has shape {tuple(self.scale.shape)}; a {tuple(self.q.shape)} "
                             f"weight in {self.block_size[0]}x{self.block_size[1]} blocks needs {want}")

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def to(self, device: torch.device | str) -> Fp8Weight:
        return Fp8Weight(self.q.to(device), self.scale.to(device), self.block_size)

    def dequantize(self) -> torch.Tensor:
        """float32, exact (one rounding of q * scale); the loader casts it to the model dtype."""
        return dequantize_fp8_weight(self.q, self.scale, self.block_size, torch.float32)

    @classmethod
    def quantize(cls, weight: torch.Tensor, fp8: Fp8Config) -> Fp8Weight:
        q, scale = quantize_fp8_weight(weight, fp8.block_size)
        return cls(q, scale, fp8.block_size)

    def rows(self, start: int, end: int) -> Fp8Weight:
        """Rows [start, end) with their scale block rows; start must sit on a block boundary."""
        bn = self.block_size[0]
        assert start % bn == 0, (start, bn)
        return Fp8Weight(self.q[start:end], self.scale[start // bn : -(-end // bn)], self.block_size)

    def cols(self, start: int, end: int) -> Fp8Weight:
        bk = self.block_size[1]
        assert start % bk == 0, (start, bk)
        return Fp8Weight(self.q[:, start:end], self.scale[:, start // bk : -(-end // bk)], self.block_size)


def fp8_kernels_run_on(device: torch.device) -> bool:
    """Whether the model may keep FP8 weights on ``device``: CUDA with FP8 tensor cores (sm89+)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


@dataclass(frozen=True)
class QuantPlan:
    """What ``--quantization`` means for one model on one device.

    in_effect: the FP8 scheme the weights go through (the checkpoint's, or 128x128 for ``fp8`` on a bf16
        checkpoint / dummy weights); None = plain weights (FP8 checkpoints dequantized at load).
    keep_fp8: the model holds FP8 weights + scales (CUDA); False = dequantized at load to the model dtype.
    """

    in_effect: Fp8Config | None
    keep_fp8: bool

    @property
    def model_fp8(self) -> Fp8Config | None:
        """The argument of ``DeepseekForCausalLM(fp8=...)``."""
        return self.in_effect if self.keep_fp8 else None


def plan_quantization(flag: str, config: ModelConfig, device: torch.device | str, dtype: torch.dtype) -> QuantPlan:
    device = torch.device(device)
    if flag not in QUANTIZATION_CHOICES:
        raise ValueError(f"--quantization must be one of {', '.join(QUANTIZATION_CHOICES)}, got {flag!r}")
    if flag == "none":
        if config.quantization is not None:
            log.info("FP8 checkpoint with --quantization none: weights are dequantized at load to %s",
                     str(dtype).removeprefix("torch."))
        return QuantPlan(None, False)
    in_effect = config.quantization if flag == "auto" else (config.quantization or Fp8Config())
    if in_effect is None:
        return QuantPlan(None, False)
    keep = fp8_kernels_run_on(device)
    if not keep:
        reason = ("CPU: the dequantized weights are the reference path" if device.type == "cpu"
                  else "this GPU has no FP8 tensor cores (needs sm89+)")
        log.info("FP8 weights (%dx%d blocks) are dequantized at load to %s on %s (%s)", in_effect.block_n,
                 in_effect.block_k, str(dtype).removeprefix("torch."), device, reason)
    else:
        # The kernels read these per call: a bad value is refused here, at start-up, not by the first forward.
        quantizes_activations(0)
        from kernels.fp8_deepgemm import dense_gemm_plan

        log.info("FP8 weights (%dx%d blocks) are kept in FP8 on %s (activations: %s=%s, GEMMs: %s=%s: %s)",
                 in_effect.block_n, in_effect.block_k, device, ACT_ENV, os.environ.get(ACT_ENV, "auto"), GEMM_ENV,
                 gemm_choice(), dense_gemm_plan(device))
    return QuantPlan(in_effect, keep)
