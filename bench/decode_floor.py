"""The physical floor of one decode step: the bytes it must read over the GPU's `copy_` bandwidth.

A decode step at these batch sizes is bound by memory: it must read every weight it uses once — attention,
dense MLPs, shared experts, router gates, the LM head, and of the routed experts only those that its
router actually selected (counted per layer from the router's output) — plus every sequence's latent KV.
`copy_` bandwidth is measured beside it (a large device-to-device copy: bytes read + bytes written over its
time), so the ratio step / floor says how far the step is from what the memory system allows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from engine.forward_batch import ForwardBatch
from engine.model import DeepseekForCausalLM
from engine.moe import MoEBlock


def copy_bandwidth(device: torch.device, gib: float = 2.0, iters: int = 20) -> float:
    """Bytes per second a device-to-device `copy_` moves (read + write), median of ``iters`` copies."""
    n = int(gib * (1 << 30)) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(iters + 3):
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        times.append(time.perf_counter() - start)
    del src, dst
    times = sorted(times[3:])
    return 2 * n * 2 / times[len(times) // 2]


def selected_experts(model: DeepseekForCausalLM, run: Callable[[], Any]) -> list[int]:
    """Distinct routed experts the router picked in each MoE layer during ``run()`` (one eager forward)."""
    seen: list[set[int]] = []
    hooks = []
    for layer in model.model.layers:
        if isinstance(layer.mlp, MoEBlock):
            chosen: set[int] = set()
            seen.append(chosen)
            hooks.append(layer.mlp.gate.register_forward_hook(
                lambda _m, _i, out, chosen=chosen: chosen.update(out[1].reshape(-1).tolist())))
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return [len(s) for s in seen]


def step_bytes(model: DeepseekForCausalLM, batch: ForwardBatch, experts_per_layer: list[int]) -> dict[str, int]:
    """The bytes one DECODE step over ``batch`` must read, by kind."""
    routed = dense = embed = fp8_bytes = 0
    moe_blocks = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, MoEBlock)]
    for block, picked in zip(moe_blocks, experts_per_layer, strict=True):
        per_expert = (block.w13[0].numel() * block.w13.element_size() + block.w2[0].numel() * block.w2.element_size())
        routed += picked * per_expert
        fp8_bytes += picked * per_expert if block.w13.dtype == torch.float8_e4m3fn else 0
    routed_ids = {id(p) for b in moe_blocks for p in (b.w13, b.w2)}
    embed_weight = model.model.embed_tokens.weight
    for param in model.parameters():
        if id(param) in routed_ids:
            continue
        if param is embed_weight:  # only the batch's rows are read
            embed += batch.input_ids.numel() * param.shape[1] * param.element_size()
            continue
        dense += param.numel() * param.element_size()
        fp8_bytes += param.numel() * param.element_size() if param.dtype == torch.float8_e4m3fn else 0
    pool = batch.kv_pool
    per_token = pool.num_layers * pool.tensor.shape[-1] * pool.tensor.element_size()
    kv = int(batch.seq_lens.sum().item()) * per_token
    # fp8_weights: the FP8 weights among the above (what the FP8 GEMMs stream; their block scales, 1/4096 of
    # those bytes, are left out), for bench.decode_step_fp8's split of a step into FP8 GEMMs and the rest.
    return {"routed_experts": routed, "other_weights": dense, "embedding_rows": embed, "kv": kv,
            "total": routed + dense + embed + kv, "fp8_weights": fp8_bytes}


def kernels_per_step(fn: Callable[[], Any], device: torch.device, steps: int = 5) -> float:
    """Kernels launched per call of ``fn`` (a graph replay launches each of its kernels), by the profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize(device)
    # CUDA activities only: every entry with device time is a kernel, a copy or a fill.
    count = sum(e.count for e in prof.key_averages()
                if e.device_time_total > 0 and not e.key.lower().startswith(("memcpy", "memset")))
    return count / steps


def plot(report: dict[str, Any], path: str) -> None:
    """Step time beside its floor per batch size, the ratio over each pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if "floor_ms" in r]
    if not rows:
        return
    labels = [str(r["batch_size"]) for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([i - 0.2 for i in x], [r["graph"]["ms"] for r in rows], 0.4, label="CUDA-graph step")
    ax.bar([i + 0.2 for i in x], [r["floor_ms"] for r in rows], 0.4, label="floor (bytes / copy_ bandwidth)")
    for i, r in zip(x, rows, strict=True):
        ax.text(i, r["graph"]["ms"], f"{r['floor_ratio']:.2f}x\n{r['kernels_per_step']:.0f} kernels",
                ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), labels)
    ax.set_xlabel("batch size")
    ax.set_ylabel("ms per decode step")
    ax.set_title(f"decode step vs its floor: {report['model']} {report['dtype']}, context {report['context']}, "
                 f"{report['device']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
