"""Which DeepGEMM call crashes the process, and where: each case in a child of its own.

    python tests/deepgemm_bisect.py [--backtrace-so /tmp/segv_backtrace.so]   (sm90 GPU, deep_gemm importable)

From the least to the most of DeepGEMM each case needs: the import (and which C++ runtime the process mapped),
its cuBLASLt GEMM (no JIT), a JIT-compiled bf16 GEMM, the FP8 GEMM as DeepGEMM's own tests call it (K-major
activation scales, its default recipe), and the FP8 GEMM as ``kernels.fp8_deepgemm`` calls it (M-major scales,
recipe (1, 128, 128)). The ``_preload`` cases put the image's own libstdc++ (the one its g++ links against)
first in the process; ``_debug`` turns on ``DG_JIT_DEBUG``, whose config print is where 2.6.1 first crashed on
torch 2.11 / CUDA 13 (``std::ostream`` inserting a ``long``, inside the extension; the preload fixed it). A
child's C++ output is unbuffered (``stdbuf``) so a crash does not eat DeepGEMM's log lines; with
``--backtrace-so`` (scripts/segv_backtrace.c) a crashing child prints its native frames, and the frames inside
DeepGEMM's extension are named with ``addr2line``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRELUDE = """
import torch, deep_gemm
torch.manual_seed(0)
dev = torch.device('cuda', 0)
print('deep_gemm', deep_gemm.__version__, 'SMs', deep_gemm.get_num_sms(), flush=True)
def fp8_rows(x):  # 1 x 128 groups, as DeepGEMM's tests cast activations
    m, k = x.shape
    g = x.float().view(m, k // 128, 128)
    s = g.abs().amax(-1).clamp(min=1e-4) / 448.0
    return (g / s[..., None]).to(torch.float8_e4m3fn).view(m, k), s
def fp8_blocks(w):  # 128 x 128 blocks
    n, k = w.shape
    b = w.float().view(n // 128, 128, k // 128, 128)
    s = b.abs().amax(dim=(1, 3)).clamp(min=1e-4) / 448.0
    return (b / s[:, None, :, None]).to(torch.float8_e4m3fn).view(n, k), s
def check(out, ref, what):
    err = ((out.float() - ref).norm() / ref.norm()).item()
    print(what, 'rel err', f'{err:.2e}', flush=True)
m, n, k = 64, 256, 512
x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / 20
"""
MAPS = """
libs = sorted({line.split()[-1] for line in open('/proc/self/maps') if 'libstdc++' in line or 'libgcc_s' in line})
print('C++ runtime mapped:', libs, flush=True)
"""
# The image's own C++ runtime, preloaded (what the compiler that built the extension links against), for the
# cases that test whether another libstdc++ in the process is what breaks DeepGEMM's iostreams.
PRELOAD = "@libstdc++"
CASES: dict[str, tuple[dict[str, str], str]] = {
    "import": ({}, MAPS),
    "import_preload": ({"LD_PRELOAD": PRELOAD}, MAPS),
    "cublaslt_bf16": ({}, """
out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
deep_gemm.cublaslt_gemm_nt(x, w, out)
check(out, x.float() @ w.float().t(), 'cublaslt_gemm_nt')
"""),
    "jit_bf16": ({}, """
out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
deep_gemm.bf16_gemm_nt(x, w, out)
check(out, x.float() @ w.float().t(), 'bf16_gemm_nt')
"""),
    "fp8_k_major_scales": ({}, """
xq, xs = fp8_rows(x)
wq, ws = fp8_blocks(w)
out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
deep_gemm.fp8_gemm_nt((xq, xs), (wq, ws), out)
ref = (xq.float().view(m, -1, 128) * xs[..., None]).view(m, k) @ (
    wq.float().view(n // 128, 128, k // 128, 128) * ws[:, None, :, None]).view(n, k).t()
check(out, ref, 'fp8_gemm_nt K-major scales')
"""),
    "fp8_as_tandem": ({}, """
from kernels import fp8_deepgemm as dg
print('available:', dg.available(0), dg.PROBE_LOG, flush=True)
"""),
    "jit_bf16_preload": ({"LD_PRELOAD": PRELOAD}, """
out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
deep_gemm.bf16_gemm_nt(x, w, out)
check(out, x.float() @ w.float().t(), 'bf16_gemm_nt')
"""),
    "fp8_as_tandem_preload": ({"LD_PRELOAD": PRELOAD}, """
from kernels import fp8_deepgemm as dg
print('available:', dg.available(0), dg.PROBE_LOG, flush=True)
"""),
    "fp8_as_tandem_debug": ({"DG_JIT_DEBUG": "1"}, """
from kernels import fp8_deepgemm as dg
print('available:', dg.available(0), dg.PROBE_LOG, flush=True)
"""),
}
FRAME = re.compile(r"segv_backtrace: #(\d+) (\S+) \+0x([0-9a-f]+)")


def name_frames(stderr: str) -> list[str]:
    """addr2line names for the frames in DeepGEMM's (or any non-system) library."""
    if shutil.which("addr2line") is None:
        return ["(no addr2line here)"]
    named = []
    for index, lib, offset in FRAME.findall(stderr):
        if lib.startswith(("/lib", "/usr/lib")) or "segv_backtrace" in lib:
            continue
        result = subprocess.run(["addr2line", "-f", "-C", "-i", "-e", lib, f"0x{offset}"], capture_output=True,
                                text=True, timeout=60)
        where = " <- ".join(line.strip() for line in result.stdout.splitlines()[::2][:3])
        named.append(f"#{index} {Path(lib).name} +0x{offset}: {where[:300]}")
    return named


def system_libstdcxx() -> str:
    """The libstdc++ the compiler links against (its own runtime), found as scripts/build_deepgemm.sh finds the
    one its env.sh preloads (``${CXX:-c++}``), or "" where there is no compiler."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return ""
    path = subprocess.run([compiler, "-print-file-name=libstdc++.so.6"], capture_output=True, text=True).stdout.strip()
    return os.path.realpath(path) if os.path.isabs(path) else ""


def run_case(name: str, env_extra: dict[str, str], body: str, backtrace_so: str | None, timeout: int) -> bool:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
    env.pop("LD_PRELOAD", None)  # build_deepgemm.sh's env.sh preloads; only the _preload cases may
    env.update(env_extra)
    if env.get("LD_PRELOAD") == PRELOAD:
        env["LD_PRELOAD"] = system_libstdcxx()
    if backtrace_so:
        env["LD_PRELOAD"] = f"{backtrace_so} {env.get('LD_PRELOAD', '')}".strip()
    cmd = [sys.executable, "-c", PRELUDE + body]
    if shutil.which("stdbuf"):
        cmd = ["stdbuf", "-o0", "-e0", *cmd]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        print(f"== {name}: timed out after {timeout} s", flush=True)
        return False
    ok = proc.returncode == 0
    print(f"== {name}: {'ok' if ok else f'exit {proc.returncode}'}", flush=True)
    lines = (proc.stdout + proc.stderr).splitlines()
    keep = lines if not ok else [line for line in lines if any(w in line for w in ("rel err", "available",
                                                                                  "C++ runtime"))]
    for line in keep[-60:]:
        print("   ", line[:400])
    if not ok:
        for line in name_frames(proc.stderr):
            print("    named:", line)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backtrace-so", default=None, help="scripts/segv_backtrace.c built as a shared library")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per case")
    parser.add_argument("--only", default="", help="comma-separated case names")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    gxx = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout.splitlines()[:1] \
        if shutil.which("g++") else ["no g++"]
    print("g++:", *gxx, "| its libstdc++:", system_libstdcxx() or "-", flush=True)
    results = {name: run_case(name, env_extra, body, args.backtrace_so, args.timeout)
               for name, (env_extra, body) in CASES.items() if not only or name in only}
    print("deepgemm bisect:", " ".join(f"{name}={'ok' if ok else 'FAIL'}" for name, ok in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
