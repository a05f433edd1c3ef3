"""1P1D on one GPU: prefill and decode are separate processes on the same GPU and the KV moves GPU to GPU
(NIXL over UCX cuda_ipc; Mooncake over TCP, staging through the host, and over its CUDA IPC transport). Greedy outputs of 32
concurrent mixed requests equal colocated generation on that GPU, with 40-token prefill chunks (pages of
intermediate chunks are sent while later chunks compute) and the decode worker's CUDA graphs; every pool
is idle afterwards. Runs where CUDA is (the `gpu` marker); on the GPU machine: scripts/device_gpu_tests.sh.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pd_system import (
    FP8_KV_LOGPROB_TOL,
    PAGE_SIZE,
    PDSystem,
    check_concurrent_mixed_requests,
    skip_unless_backend,
)

from engine.llm import LLM
from engine.tiny_model import write_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

GPU_FLAGS = ["--device", "cuda", "--dtype", "float32"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("pd-gpu-model") / "tiny-v3")


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> Iterator[LLM]:
    """Colocated generation on the same GPU, in this process."""
    llm = LLM(tiny_model, device="cuda", dtype="float32", page_size=PAGE_SIZE)
    yield llm
    llm.close()


@pytest.mark.parametrize(
    ("backend", "kv_flags"),
    [("nixl", []), ("mooncake", []), ("mooncake", ["--kv-mooncake-protocol", "nvlink_intra"])],
    ids=["nixl", "mooncake-tcp", "mooncake-nvlink_intra"],
)
def test_gpu_1p1d_equals_colocated_generation_on_the_gpu(
    backend: str, kv_flags: list[str], tiny_model: Path, reference: LLM, tmp_path: Path
) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    skip_unless_backend(backend)
    decode_flags = [*GPU_FLAGS, *kv_flags, "--max-total-tokens", "2048", "--cuda-graph-max-bs", "8"]
    system = PDSystem(tiny_model, tmp_path, backend, prefill_flags=[*GPU_FLAGS, *kv_flags], decode_flags=decode_flags)
    try:
        check_concurrent_mixed_requests(system, reference, n=32, seed=23)
    finally:
        system.close()


def test_gpu_1p1d_with_an_fp8_kv_cache_equals_colocated_fp8_kv_generation(tiny_model: Path, tmp_path: Path) -> None:
    """`--kv-cache-dtype fp8_e4m3` on both workers: FP8 pages move GPU to GPU (NIXL) and the decode worker's
    CUDA graphs read them through the Triton kernel's dequantize-on-load. Same greedy tokens; logprobs within
    FP8_KV_LOGPROB_TOL (printed: the largest difference seen)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    skip_unless_backend("nixl")
    fp8 = ["--kv-cache-dtype", "fp8_e4m3"]
    reference = LLM(tiny_model, device="cuda", dtype="float32", page_size=PAGE_SIZE, kv_cache_dtype="fp8_e4m3")
    system = PDSystem(tiny_model, tmp_path, "nixl", prefill_flags=[*GPU_FLAGS, *fp8],
                      decode_flags=[*GPU_FLAGS, *fp8, "--max-total-tokens", "2048", "--cuda-graph-max-bs", "8"])
    try:
        worst = check_concurrent_mixed_requests(system, reference, n=32, seed=29, logprob_tol=FP8_KV_LOGPROB_TOL)
        print(f"FP8 KV 1P1D vs colocated: greedy tokens equal, largest logprob difference {worst:.2e}")
    finally:
        system.close()
        reference.close()
