"""Where a prefill forward first goes non-finite: every module's output checked, optionally under an MPS SM cap.

    python tests/nan_probe.py [--tokens 4096] [--mps-percent 70]   (CUDA GPU; V2-Lite's shape, dummy weights)
    python tests/nan_probe.py --device cpu --model-config DIR --tokens 64   (a checkpoint's own weights)
    python tests/nan_probe.py --gemms --mps-percent 55,60,65,70,75,80,85,90   (the prefill's GEMMs alone, per cap)

Session 41 saw a one-GPU 1P1D's prefill return NaN logits for its first request whenever the prefill worker ran
with ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=70`` (twice in two calls; never at 50 % or uncapped). With
``--mps-percent`` this starts a private MPS daemon (``bench.gpu_mps``) and runs the probe in a child process
under that cap. It prints the SM count the process sees, then the first module (in call order) whose output
holds NaN or inf, with the MoE's grouped GEMMs through ``torch._grouped_mm`` and again through the Triton
kernel (``kernels.triton_moe.PREFER_GROUPED_MM``), and exits 1 where a forward went non-finite.

Session 42 found the first one: layer 0's ``kv_b_proj``, a bf16 ``F.linear`` (cuBLAS) of finite inputs, at 92
SMs (70 %). ``--gemms`` checks the dense GEMMs of a V2-Lite layer alone (bf16 ``F.linear`` against a float64
product of the same operands, ``engine.mps_cap_check``), one child process per cap in a comma list. Session 43
(float32 reference then): wrong products under every cap of 55-90 %, right at 95 % and uncapped; so a rank under
a cap now runs that check before it loads its model and refuses to start if a product is wrong.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode_step import NAMED  # noqa: E402
from bench.gpu_mps import mps_daemon  # noqa: E402
from engine.config import ModelConfig  # noqa: E402
from engine.forward_batch import ForwardBatch, ForwardMode  # noqa: E402
from engine.kv_pool import KVPool  # noqa: E402
from engine.model import DeepseekForCausalLM  # noqa: E402
from engine.mps_cap_check import MAX_REL_ERR, gemm_errors  # noqa: E402
from engine.weights import load_model  # noqa: E402
from kernels import triton_moe  # noqa: E402

PAGE = 64


def first_nonfinite(model: DeepseekForCausalLM, batch: ForwardBatch) -> tuple[str | None, bool]:
    """(the first module whose output is not finite, or None; whether the logits are finite)."""
    found: list[str] = []
    hooks = []

    def check(name: str):  # noqa: ANN202 - a forward hook
        def hook(_module: torch.nn.Module, _args: object, out: object) -> None:
            t = out[0] if isinstance(out, tuple) else out
            if not found and isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                found.append(name)
        return hook

    for name, module in model.named_modules():
        if name:
            hooks.append(module.register_forward_hook(check(name)))
    try:
        logits = model(batch).next_token_logits
    finally:
        for h in hooks:
            h.remove()
    return (found[0] if found else None), bool(torch.isfinite(logits).all())


def _say_sms() -> None:
    """The SM count this process sees under its MPS cap (if any), first line of every probe."""
    print(f"SMs this process sees: {torch.cuda.get_device_properties(0).multi_processor_count}; "
          f"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE={os.environ.get('CUDA_MPS_ACTIVE_THREAD_PERCENTAGE')}", flush=True)


def probe(tokens: int, device: torch.device, model_config: str) -> int:
    if device.type == "cuda":
        _say_sms()
    model_dir = NAMED.get(model_config, Path(model_config))
    config = ModelConfig.from_dir(model_dir)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = DeepseekForCausalLM(config, dtype=dtype, device=device)
    load_model(model, model_dir, "dummy" if model_config in NAMED else "auto", seed=0)
    pages = -(-tokens // PAGE)
    pool = KVPool(pages + 1, config.num_hidden_layers, PAGE, config.kv_cache_dim, dtype, device)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config.vocab_size, (tokens,), generator=gen).tolist()
    batch = ForwardBatch.build(ForwardMode.EXTEND, [ids], [0], [list(range(pages))], pool)
    bad = 0
    for grouped_mm in (True, False):
        triton_moe.PREFER_GROUPED_MM = grouped_mm
        for run in range(2):
            module, finite = first_nonfinite(model, batch)
            print(f"grouped_mm={grouped_mm} run {run}: logits finite {finite}; first non-finite module: {module}",
                  flush=True)
            bad += not finite
    return 1 if bad else 0


def probe_gemms(tokens: int, model_config: str) -> int:
    """Each of the model's dense GEMM shapes in bf16 against float64 (`engine.mps_cap_check`, which a capped rank
    runs at start-up): non-finite outputs or a relative error past bf16's."""
    _say_sms()
    bad = 0
    config = ModelConfig.from_dir(NAMED.get(model_config, Path(model_config)))
    for m, k, n, stride, rel in gemm_errors(config, torch.device("cuda"), tokens):
        ok = rel <= MAX_REL_ERR
        bad += not ok
        print(f"  {m}x{k} (row stride {stride}) @ {k}x{n}: rel. err. {rel:.2e}{'' if ok else '  <- WRONG'}", flush=True)
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--mps-percent", default=None, help="an SM cap in percent, or a comma list (one child each)")
    parser.add_argument("--gemms", action="store_true", help="the prefill's dense GEMMs alone, not a forward")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model-config", default="v2-lite", help="v2-lite (dummy weights) or a checkpoint dir")
    args = parser.parse_args()
    if args.mps_percent is None:
        if args.gemms:
            return probe_gemms(args.tokens, args.model_config)
        return probe(args.tokens, torch.device(args.device), args.model_config)
    failed = 0
    with tempfile.TemporaryDirectory() as tmp, mps_daemon(Path(tmp)) as env:
        for percent in args.mps_percent.split(","):
            child = {**os.environ, **env, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": percent.strip()}
            command = [sys.executable, __file__, "--tokens", str(args.tokens), "--device", args.device,
                       "--model-config", args.model_config, *(["--gemms"] if args.gemms else [])]
            failed += subprocess.run(command, env=child, check=False).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
