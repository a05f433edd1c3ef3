"""Shared pytest set-up: GPU tests are skipped without a GPU, transports are pinned to loopback."""

from __future__ import annotations

import os

import pytest

# UCX: without an RDMA NIC, its IB module can crash the process at exit (TRANSPORTS.md); TCP over
# loopback is what two processes on one CPU machine use. Set before any test imports nixl.
os.environ.setdefault("UCX_MODULES", "^ib")
os.environ.setdefault("UCX_NET_DEVICES", "lo")
# CI has 2 cores and many tests start several rank processes: torch's intra-op thread pools would
# spin against each other (a tiny-model decode step took 268 ms with the default pool, 12 ms with one
# thread). Children inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config: pytest.Config) -> None:
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
