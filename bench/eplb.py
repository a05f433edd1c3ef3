"""EPLB off vs on under a skewed router: the MoE step time of an expert-parallel instance and its balancedness.

    python -m bench.eplb                  # CPU: scaled-down layer (bench/results/eplb_cpu.json + .png)
    python -m bench.eplb --device cuda    # one GPU: DeepSeek-V3's expert shapes (eplb_cuda.json + .png)

One MoE layer over ``--ranks`` EP ranks. The router is skewed: each token picks ``top_k`` distinct experts
with Zipf probabilities (``--zipf``, hot experts at random ids). EPLB off: ``E / ranks`` experts per rank in
the static layout. EPLB on: ``(E + redundant) / ranks`` slots per rank, placed by ``engine.eplb.policy`` from
the counts of a previous window (other tokens, same router), tokens spread over replicas by
``engine.eplb.placement.ExpertMap`` (what the EP dispatch runs). Each rank's share of one step (its
received tokens through its own experts, ``kernels.moe_forward``) is timed on this one device in turn: an EP
step lasts as long as its slowest rank, so ``step_ms`` is the maximum over ranks, beside the mean.
``balancedness`` = mean / max (token, expert) rows per rank. Also printed: the weight memory of one
redundant expert per rank for DeepSeek-V3 (FP8 experts with block scales, every MoE layer), and the time the
policy takes at V3's size.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from engine.eplb.placement import ExpertMap
from engine.eplb.policy import rebalance_experts
from kernels.moe import moe_forward

RESULTS = Path(__file__).resolve().parent / "results"
V3_CONFIG = Path(__file__).resolve().parents[1] / "engine" / "model_configs" / "deepseek-v3" / "config.json"
# (experts, top_k, hidden, intermediate, groups, ranks, redundant, tokens per step)
SHAPES = {"cpu": (64, 6, 512, 256, 8, 8, 8, 2048), "cuda": (256, 8, 7168, 2048, 8, 32, 32, 8192)}


def zipf_routing(num_tokens: int, num_experts: int, top_k: int, exponent: float, gen: torch.Generator,
                 hot: torch.Tensor) -> torch.Tensor:
    """``[T, K]`` distinct expert ids per token, expert ``hot[i]`` drawn with probability ~ 1 / (i + 1)^s."""
    probs = torch.zeros(num_experts, dtype=torch.float64)
    probs[hot] = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** exponent
    return torch.multinomial(probs.expand(num_tokens, -1), top_k, replacement=False, generator=gen)


def rank_shares(ids: torch.Tensor, emap: ExpertMap, num_ranks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per rank: the tokens it receives and their local slot ids (-1 = an expert elsewhere)."""
    slots = emap.num_physical // num_ranks
    phys = emap.to_physical(0, ids, 0, 0)
    owner = phys // slots
    shares = []
    for rank in range(num_ranks):
        mine = owner == rank
        tokens = mine.any(dim=1).nonzero().flatten()
        shares.append((tokens, torch.where(mine, phys - rank * slots, -1)[tokens]))
    return shares


def time_ms(fn: Any, device: torch.device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_variant(name: str, emap: ExpertMap, ids: torch.Tensor, x: torch.Tensor, weights: torch.Tensor,
                w13: torch.Tensor, w2: torch.Tensor, num_ranks: int, repeats: int) -> dict[str, Any]:
    device = x.device
    slots = emap.num_physical // num_ranks
    w13, w2 = w13[:slots], w2[:slots]
    rows, times = [], []
    for tokens, local in rank_shares(ids, emap, num_ranks):
        rows.append(int((local >= 0).sum()))
        xs, ls, ws = x[tokens.to(device)], local.to(device), weights[tokens.to(device)]
        times.append(time_ms(lambda xs=xs, ls=ls, ws=ws: moe_forward(xs, ls, ws, w13, w2), device, repeats))
    mean_rows = sum(rows) / len(rows)
    return {"variant": name, "slots_per_rank": emap.num_physical // num_ranks, "rows_per_rank": rows,
            "rank_ms": [round(t, 3) for t in times], "step_ms": round(max(times), 3),
            "mean_rank_ms": round(sum(times) / len(times), 3), "balancedness": round(mean_rows / max(rows), 4)}


def v3_redundant_expert_bytes() -> dict[str, Any]:
    """Weights of one more physical expert in every MoE layer of DeepSeek-V3 (FP8 e4m3 + fp32 128x128 block
    scales, as V3 ships), i.e. the memory of one redundant expert per EP rank."""
    cfg = json.loads(V3_CONFIG.read_text())
    layers = cfg["num_hidden_layers"] - cfg["first_k_dense_replace"]
    hidden, inter = cfg["hidden_size"], cfg["moe_intermediate_size"]
    weights = 3 * hidden * inter  # gate, up, down: one byte each in FP8
    scales = 3 * -(-hidden // 128) * -(-inter // 128) * 4
    total = layers * (weights + scales)
    return {"moe_layers": layers, "bytes_per_layer": weights + scales, "bytes": total,
            "GB": round(total / 1e9, 3), "GiB": round(total / 2**30, 3)}


def v3_policy_ms(ranks: int = 32, redundant: int = 32) -> float:
    """Time of ``rebalance_experts`` at V3's size (58 layers, 256 experts in 8 groups, Zipf load)."""
    gen = torch.Generator().manual_seed(0)
    load = torch.stack([1e4 / torch.arange(1, 257).double()[torch.randperm(256, generator=gen)] for _ in range(58)])
    start = time.perf_counter()
    rebalance_experts(load, 256 + redundant, ranks, num_groups=8)
    return (time.perf_counter() - start) * 1e3


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    off, on = result["variants"]
    ranks = range(len(off["rows_per_rank"]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.4
    for ax, key, label in ((axes[0], "rows_per_rank", "(token, expert) rows"), (axes[1], "rank_ms", "ms")):
        ax.bar([r - width / 2 for r in ranks], off[key], width, label=f"EPLB off ({off['slots_per_rank']} experts/rank)")
        ax.bar([r + width / 2 for r in ranks], on[key], width, label=f"EPLB on ({on['slots_per_rank']} slots/rank)")
        ax.set_xlabel("EP rank")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    axes[0].set_title(f"rows per rank: balancedness {off['balancedness']:.2f} -> {on['balancedness']:.2f}")
    axes[1].set_title(f"MoE time per rank's share: step {off['step_ms']:.1f} -> {on['step_ms']:.1f} ms "
                      f"(x{result['step_speedup']:.2f})")
    fig.suptitle(f"EPLB under a Zipf({result['zipf']}) router, {result['experts']} experts top-{result['top_k']}, "
                 f"{result['ranks']} EP ranks, {result['tokens']} tokens/step, {result['device_name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.eplb", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--zipf", type=float, default=1.2, help="router skew: Zipf exponent over experts")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="result stem (default bench/results/eplb_<device>)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    experts, top_k, hidden, inter, groups, ranks, redundant, tokens = SHAPES[args.device]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(args.seed)
    hot = torch.randperm(experts, generator=gen)
    window = zipf_routing(tokens * 4, experts, top_k, args.zipf, gen, hot)  # the counts EPLB balances from
    ids = zipf_routing(tokens, experts, top_k, args.zipf, gen, hot)  # the measured step
    x = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    weights = torch.rand(tokens, top_k, generator=gen).to(device)
    slots = (experts + redundant) // ranks  # one rank's share of experts; every rank reuses the same tensors
    w13 = (torch.randn(slots, 2 * inter, hidden, generator=gen) * hidden**-0.5).to(device, dtype)
    w2 = (torch.randn(slots, hidden, inter, generator=gen) * inter**-0.5).to(device, dtype)

    off = ExpertMap(1, experts, experts)
    on = ExpertMap(1, experts, experts + redundant)
    load = torch.bincount(window.flatten(), minlength=experts).unsqueeze(0)
    on.switch([0], rebalance_experts(load, experts + redundant, ranks, num_groups=groups))
    variants = [run_variant("off", off, ids, x, weights, w13, w2, ranks, args.repeats),
                run_variant("on", on, ids, x, weights, w13, w2, ranks, args.repeats)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result = {"device": args.device, "device_name": name, "dtype": str(dtype).removeprefix("torch."),
              "experts": experts, "top_k": top_k, "hidden": hidden, "intermediate": inter, "ranks": ranks,
              "redundant": redundant, "tokens": tokens, "zipf": args.zipf, "variants": variants,
              "step_speedup": round(variants[0]["step_ms"] / variants[1]["step_ms"], 3),
              "v3_redundant_expert_memory": v3_redundant_expert_bytes(), "v3_policy_ms": round(v3_policy_ms(), 1)}
    print(f"{'variant':8} {'slots/rank':>10} {'balancedness':>12} {'step ms':>9} {'mean rank ms':>13}")
    for v in variants:
        print(f"{v['variant']:8} {v['slots_per_rank']:>10} {v['balancedness']:>12.4f} {v['step_ms']:>9.2f} "
              f"{v['mean_rank_ms']:>13.2f}")
    print(f"step time off / on: {result['step_speedup']:.2f}x on {name} ({result['dtype']})")
    mem = result["v3_redundant_expert_memory"]
    print(f"DeepSeek-V3, one redundant expert per EP rank: {mem['moe_layers']} MoE layers x "
          f"{mem['bytes_per_layer'] / 1e6:.1f} MB = {mem['GB']:.2f} GB ({mem['GiB']:.2f} GiB) of FP8 weights + scales")
    print(f"policy at V3's size (58 layers, 256 experts, 288 slots over 32 ranks): {result['v3_policy_ms']} ms")
    stem = Path(args.out) if args.out else RESULTS / f"eplb_{args.device}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, stem.with_suffix(".png"))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
