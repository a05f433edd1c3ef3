"""CUDA MPS for a benchmark's servers: one GPU's prefill and decode processes run kernels side by side.

Without MPS, two processes on one GPU time-slice it: a decode step that meets a 50 ms prefill forward waits
for it, and neither uses the GPU the other leaves idle (the decode step reads weights, the prefill does
matmuls). With an MPS control daemon both processes' kernels share the SMs at once; each server may be given
a share of them (``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``) or the lower of MPS's two client priorities
(``CUDA_MPS_CLIENT_PRIORITY=1``, below normal: the GPU schedules a normal client's pending work first).

``mps_daemon(dir)`` starts a private daemon (its pipe and log directories under ``dir``, so it touches no
system-wide state), yields the environment a client needs, and tells the daemon to quit on exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

CONTROL = "nvidia-cuda-mps-control"
log = logging.getLogger(__name__)


def gpu_names() -> list[str]:
    """The machine's GPUs by name, as nvidia-smi lists them (empty where it is absent or fails): a result file
    names the card its numbers came from, not only its file name. nvidia-smi, not torch: the benchmark's client
    process would otherwise open a CUDA context of its own on the GPU its servers share."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def mps_available() -> bool:
    return shutil.which(CONTROL) is not None


@contextlib.contextmanager
def mps_daemon(directory: Path) -> Iterator[dict[str, str]]:
    """A running MPS control daemon; yields the env (pipe and log dirs) its clients must carry."""
    if not mps_available():
        raise RuntimeError(f"{CONTROL} is not on PATH: this machine cannot run MPS")
    pipe, logs = directory / "pipe", directory / "log"
    pipe.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(pipe), "CUDA_MPS_LOG_DIRECTORY": str(logs)}
    subprocess.run([CONTROL, "-d"], env={**os.environ, **env}, check=True, timeout=30)
    time.sleep(0.5)  # the daemon creates its control pipe in the background
    try:
        yield env
    finally:
        subprocess.run([CONTROL], input=b"quit\n", env={**os.environ, **env}, timeout=30, check=False)


def sm_share_env(percent: int | None) -> dict[str, str]:
    """The env giving one MPS client at most ``percent`` % of the SMs (None: all).

    A cap can make cuBLAS compute wrong products: on one H100 (torch 2.11, CUDA 13) the prefill's bf16 GEMMs
    at 4096 rows gave NaN or relative errors of 0.2-0.4 under caps of 55-90 %, and were right at 95 % and
    uncapped (``tests/nan_probe.py --gemms``, session 43). So a capped server is a timing experiment, logged as
    one, and its ranks check their GEMMs before they load (``engine.mps_cap_check``: a wrong product stops them)."""
    if percent is None:
        return {}
    if not 1 <= percent <= 100:
        raise ValueError(f"an SM share is a percentage in 1..100, got {percent}")
    if percent < 100:
        log.warning("MPS SM cap %d %%: cuBLAS has computed wrong GEMMs under such caps (bench.gpu_mps)", percent)
    return {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(percent)}


def client_env(sm_percent: int | None, low_priority: bool) -> dict[str, str]:
    """One MPS client's env: its SM share (``sm_share_env``) and, when ``low_priority``, the below-normal client
    priority (its kernels wait while the other client's are pending)."""
    return {**sm_share_env(sm_percent), **({"CUDA_MPS_CLIENT_PRIORITY": "1"} if low_priority else {})}
