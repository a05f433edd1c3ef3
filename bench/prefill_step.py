"""Prefill forward against the GPU's dense bf16 matmul rate, on a dummy-weight model of a real shape.

    python -m bench.prefill_step --device cuda --model-config v2-lite [--seq-lens 4096] [--profile] \
        [--out bench/results/prefill_step_gpu.json]

One EXTEND forward over fresh sequences (no cached prefix; every token's latent is written into the pool,
the last token's logits computed), synchronised and timed; its FLOPs counted from the config (the matmuls
of the attention projections, causal attention, the experts each token is routed to, the shared experts,
the dense MLPs, the router and the LM head); TFLOP/s over the rate of a bf16 `torch.matmul` (8192^3)
timed in the same run. The headline is that ratio. ``--profile`` adds the kernels by device time, grouped
into expert GEMMs, other GEMMs, attention and the rest.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.decode_step import NAMED, profile_kernels, time_ms
from bench.report import write_report
from engine.config import ModelConfig
from engine.forward_batch import ForwardBatch, ForwardMode
from engine.kv_pool import KVPool
from engine.llm import resolve_dtype
from engine.model import DeepseekForCausalLM
from engine.quant import add_quantization_flag, plan_quantization
from engine.weights import load_model

log = logging.getLogger("bench.prefill_step")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.prefill_step", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model-config", default="v2-lite", help="v2-lite, v3, or a checkpoint directory")
    parser.add_argument("--load-format", default="dummy", choices=["dummy", "auto"])
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    add_quantization_flag(parser)
    parser.add_argument("--seq-lens", default="4096", help="comma list: one forward per entry (e.g. 4096,8x512)")
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/prefill_step_<device>.json)")
    return parser.parse_args(argv)


def parse_shape(spec: str) -> list[int]:
    """``4096`` -> one sequence of 4096 tokens; ``8x512`` -> eight of 512."""
    count, _, length = spec.rpartition("x")
    return [int(length)] * (int(count) if count else 1)


def forward_flops(config: ModelConfig, seq_lens: list[int]) -> dict[str, float]:
    """Matmul FLOPs (2 per multiply-add) of one prefill forward of fresh sequences, by part."""
    tokens = sum(seq_lens)
    d, heads = config.hidden_size, config.num_attention_heads
    qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    r, p = config.kv_lora_rank, config.qk_rope_head_dim
    q_proj = d * config.q_lora_rank + config.q_lora_rank * heads * qk if config.q_lora_rank else d * heads * qk
    proj = q_proj + d * (r + p) + r * heads * (config.qk_nope_head_dim + config.v_head_dim) + heads * config.v_head_dim * d
    causal_pairs = sum(n * (n + 1) // 2 for n in seq_lens)
    layers = config.num_hidden_layers
    moe_layers = sum(1 for i in range(layers) if config.n_routed_experts and i >= config.first_k_dense_replace
                     and i % config.moe_layer_freq == 0)
    dense_layers = layers - moe_layers
    moe_i = config.moe_intermediate_size
    parts = {
        "attention_projections": 2.0 * tokens * proj * layers,
        "attention_core": 2.0 * causal_pairs * heads * (qk + config.v_head_dim) * layers,
        "routed_experts": 2.0 * tokens * config.num_experts_per_tok * 3 * d * moe_i * moe_layers,
        "shared_experts": 2.0 * tokens * config.n_shared_experts * 3 * d * moe_i * moe_layers,
        "router": 2.0 * tokens * d * config.n_routed_experts * moe_layers,
        "dense_mlp": 2.0 * tokens * 3 * d * config.intermediate_size * dense_layers,
        "lm_head": 2.0 * len(seq_lens) * d * config.vocab_size,
    }
    parts["total"] = sum(parts.values())
    return parts


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 8192, iters: int = 20) -> float:
    """FLOP/s of an n^3 matmul in ``dtype`` (the GPU's dense rate as torch reaches it)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_ms(lambda: torch.matmul(a, b), device, iters, 3)["ms"]
    return 2.0 * n**3 / (t / 1e3)


def kernel_group(name: str) -> str:
    lowered = name.lower()
    if "moe" in lowered or "grouped" in lowered:
        return "expert GEMMs"
    if "attention" in lowered or "fmha" in lowered or "flash" in lowered or "attn" in lowered:
        return "attention"
    if "gemm" in lowered or "nvjet" in lowered or "cutlass" in lowered or "sm90" in lowered:
        return "other GEMMs"
    return "rest"


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    model_dir = NAMED.get(args.model_config, Path(args.model_config))
    config = ModelConfig.from_dir(model_dir)
    dtype = resolve_dtype(args.dtype, device)
    quant = plan_quantization(args.quantization, config, device, dtype)
    started = time.monotonic()
    model = DeepseekForCausalLM(config, dtype=dtype, device=device, fp8=quant.model_fp8)
    load_model(model, model_dir, args.load_format, seed=0, fp8=quant.in_effect)
    log.info("model %s (%s) loaded in %.1fs", args.model_config, dtype, time.monotonic() - started)
    rate = matmul_rate(device, dtype) if device.type == "cuda" else None
    if rate:
        log.info("bf16 matmul 8192^3: %.0f TFLOP/s", rate / 1e12)
    shapes = [parse_shape(s) for s in args.seq_lens.split(",")]
    pages_needed = max(sum(-(-n // args.page_size) for n in lens) for lens in shapes)
    pool = KVPool(pages_needed + 1, config.num_hidden_layers, args.page_size, config.kv_cache_dim, dtype, device)
    rows = []
    try:
        for lens in shapes:
            tables, ids, first = [], [], 0
            for i, n in enumerate(lens):
                count = -(-n // args.page_size)
                tables.append(list(range(first, first + count)))
                first += count
                ids.append([(1009 * (i + 1) * (j + 7)) % config.vocab_size for j in range(n)])
            batch = ForwardBatch.build(ForwardMode.EXTEND, ids, [0] * len(lens), tables, pool)
            timing = time_ms(lambda b=batch: model(b), device, args.iters, args.warmup)
            flops = forward_flops(config, lens)
            row: dict[str, Any] = {"seq_lens": lens, "tokens": sum(lens), "forward": timing, "flops": flops,
                                   "tflops": flops["total"] / (timing["ms"] / 1e3) / 1e12}
            if rate:
                row["share_of_matmul_rate"] = row["tflops"] * 1e12 / rate
            if args.profile and device.type == "cuda":
                kernels = profile_kernels(lambda b=batch: model(b), device, steps=3, top=60)
                groups: dict[str, float] = {}
                for k in kernels:
                    groups[kernel_group(k["kernel"])] = groups.get(kernel_group(k["kernel"]), 0.0) + k["us_per_step"]
                row["profile"] = kernels[:25]
                row["profile_groups_ms"] = {g: us / 1e3 for g, us in sorted(groups.items(), key=lambda x: -x[1])}
            log.info("%s: %.2f ms, %.0f TFLOP/s", "+".join(map(str, lens)), timing["ms"], row["tflops"])
            rows.append(row)
    finally:
        pool.close()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"bench": "prefill_step", "device": name, "torch": torch.__version__, "model": args.model_config,
            "dtype": str(dtype).removeprefix("torch."), "weights": "fp8" if quant.keep_fp8 else "model dtype",
            "matmul_tflops": rate / 1e12 if rate else None,
            "headline": {"+".join(map(str, r["seq_lens"])): r.get("share_of_matmul_rate") for r in rows},
            "results": rows}


def print_table(report: dict[str, Any]) -> None:
    rate = report["matmul_tflops"]
    print(f"prefill forward, {report['model']} {report['dtype']} on {report['device']}; bf16 matmul "
          f"{rate:.0f} TFLOP/s" if rate else f"prefill forward, {report['model']} on {report['device']}")
    print(f"{'sequences':>16} {'ms':>9} {'TFLOP':>7} {'TFLOP/s':>8} {'of matmul':>9}")
    for r in report["results"]:
        share = f"{100 * r['share_of_matmul_rate']:>8.1f}%" if "share_of_matmul_rate" in r else f"{'-':>9}"
        lens = r["seq_lens"]
        label = f"{len(lens)}x{lens[0]}" if len(set(lens)) == 1 else "+".join(map(str, lens))
        print(f"{label:>16} {r['forward']['ms']:>9.2f} {r['flops']['total'] / 1e12:>7.2f} {r['tflops']:>8.1f} {share}")
        for part, f in r["flops"].items():
            if part != "total":
                print(f"    {part:<22} {f / 1e12:>7.3f} TFLOP")
        for group, ms in r.get("profile_groups_ms", {}).items():
            print(f"    {group:<22} {ms:>7.2f} ms")
        for k in r.get("profile", []):
            print(f"      {k['us_per_step']:>9.1f} us {k['calls_per_step']:>6.1f}x {100 * k['share']:>5.1f}%  {k['kernel']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    report = run(args)
    print_table(report)
    write_report(report, "prefill_step", args.device, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
