"""Where the FP8 model on the GPU parts from its CPU reference: module by module, on one prompt.

    python tests/fp8_layer_diff.py [--promote-k 128]      (needs a CUDA GPU with FP8 tensor cores)

Writes the tiny FP8 checkpoint of tests/test_fp8_gpu.py, runs one teacher-forced prefill of the same
tokens on the GPU (Triton FP8 kernels, float32 activations) and on the CPU (the torch references on the same
FP8 weights), with a forward hook on every module, and prints each module's output difference
(||gpu - cpu|| / ||cpu||) in call order, so the first module whose difference jumps is the one to read.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def capture(llm: object, ids: list[int]) -> list[tuple[str, torch.Tensor]]:
    from engine.forward_batch import ForwardBatch, ForwardMode

    outputs: list[tuple[str, torch.Tensor]] = []
    hooks = []
    for name, module in llm.model.named_modules():  # type: ignore[attr-defined]
        def hook(_m: object, _i: object, out: object, name: str = name) -> None:
            t = out[0] if isinstance(out, tuple) else out
            t = getattr(t, "all_logits", t)
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                outputs.append((name or "model", t.detach().float().cpu().clone()))
        hooks.append(module.register_forward_hook(hook))
    pool = llm.kv_pool  # type: ignore[attr-defined]
    pages = pool.alloc(pool.pages_for_tokens(len(ids)))
    try:
        batch = ForwardBatch.build(ForwardMode.EXTEND, [ids], [0], [pages], pool, return_all_logits=True)
        llm.model(batch)  # type: ignore[attr-defined]
    finally:
        pool.free(pages)
        for h in hooks:
            h.remove()
    return outputs


def numbered(outputs: list[tuple[str, torch.Tensor]]) -> list[tuple[str, int]]:
    """(module name, how many earlier outputs that module gave): one key per call, alike on both sides."""
    calls: Counter[str] = Counter()
    keys = []
    for name, _ in outputs:
        keys.append((name, calls[name]))
        calls[name] += 1
    return keys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--promote-k", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=37)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (both sides CPU)")
    args = parser.parse_args()
    import engine.quant
    import kernels.triton_fp8
    from engine.llm import LLM
    from engine.tiny_model import write_tiny_model

    kernels.triton_fp8.PROMOTE_K = args.promote_k
    ckpt = write_tiny_model(Path(tempfile.mkdtemp()), "v3-fp8", seed=3)
    ids = torch.randint(3, 320, (args.prompt_len,), generator=torch.Generator().manual_seed(2)).tolist()
    engine.quant.fp8_kernels_run_on = lambda device: True  # the CPU model keeps FP8 weights too
    gpu = LLM(str(ckpt), device=args.device, dtype="float32", quantization="fp8", page_size=16, num_pages=64)
    cpu = LLM(str(ckpt), dtype="float32", page_size=16, num_pages=64)
    got, want = capture(gpu, ids), capture(cpu, ids)
    print(f"{len(got)} GPU outputs, {len(want)} CPU outputs (promote every {args.promote_k})")
    # Paired by module name and call number: a module only one side calls (a fused path) is listed alone.
    ref = dict(zip(numbered(want), (t for _, t in want), strict=True))
    for key, (name, g) in zip(numbered(got), got, strict=True):
        c = ref.pop(key, None)
        if c is None or c.shape != g.shape:
            print(f"  {'GPU only':>9}  {name}  {tuple(g.shape)}")
            continue
        rel = ((g - c).norm() / c.norm().clamp(min=1e-30)).item()
        print(f"  {rel:9.2e}  {name}  {tuple(g.shape)}")
    for (name, _), c in ref.items():
        print(f"  {'CPU only':>9}  {name}  {tuple(c.shape)}")
    gpu.close()
    cpu.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
