"""Multi-rank steps over expert parallelism (tp = dp = N, EP over every rank): the decode step with CUDA
graphs vs eager (the masked low-latency exchange inside the graph, engine.cuda_graph), and a prefill-sized
step with dual batch overlap on vs off (engine.dbo, high-throughput exchange).

    python -m bench.ep_decode_step --tp 2 --device cuda [--model-config v2-lite] [--batch-sizes 1,8,64] \\
        [--context 1024] [--prefill 2x512,4x512] [--out bench/results/ep_decode_step_gpu.json]

Every rank runs the same batch shape per DP group, in lockstep, each call followed by a device
synchronise; rank 0's medians are reported (`bench.decode_step.time_ms`). With NCCL each rank takes
cuda:<rank>. On CPU (gloo) the graph runner cannot capture and runs its padded static path eagerly: a smoke
test of this script, not a measurement. JSON + PNG go to bench/results/ep_decode_step_<device>.json.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.dbo_step import ON as DBO_ON
from bench.dbo_step import _batch
from bench.decode_step import NAMED, time_ms
from bench.report import write_report
from decode_worker.bench_connector import fill_pages
from engine.config import ModelConfig
from engine.cuda_graph import CudaGraphRunner
from engine.dbo import DboConfig
from engine.ep_moe import ExpertParallelMoE
from engine.forward_batch import ForwardMode
from engine.kv_pool import KVPool
from engine.llm import resolve_dtype
from engine.model import DeepseekForCausalLM
from engine.parallel import ParallelContext
from engine.runtime.launch import free_port
from engine.weights import load_model

log = logging.getLogger("bench.ep_decode_step")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ep_decode_step", description=__doc__.split("\n")[0])
    parser.add_argument("--tp", type=int, default=2, help="ranks (one DP group and one EP rank each)")
    parser.add_argument("--device", default="cuda", help="cuda (NCCL, cuda:<rank>) or cpu (gloo)")
    parser.add_argument("--model-config", default="v2-lite", help="v2-lite, v3, or a checkpoint directory")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-sizes", default="1,8,64", help="decode sequences per DP group")
    parser.add_argument("--context", type=int, default=1024, help="cached tokens per decode sequence")
    parser.add_argument("--prefill", default="2x512,4x512", help="BxL prefill shapes for DBO on/off ('' = none)")
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def _decode_rows(args: argparse.Namespace, model: DeepseekForCausalLM, pool: KVPool, device: torch.device,
                 sizes: list[int]) -> list[dict[str, Any]]:
    moe = ExpertParallelMoE(model, "a2a", "low_latency", max_tokens_per_rank=max(sizes))
    runner = CudaGraphRunner(model, pool, max(sizes), max_context_len=args.context + 1)  # captures on CUDA
    rows = []
    try:
        for bs in sizes:
            batch = _batch(pool, ForwardMode.DECODE, [1] * bs, args.context, model.config.vocab_size)
            eager = time_ms(lambda b=batch: model(b), device, args.iters, args.warmup)
            graph = time_ms(lambda b=batch: runner(b), device, args.iters, args.warmup)
            ref, got = model(batch).next_token_logits.float(), runner(batch).next_token_logits.float()
            rows.append({"batch_per_dp_group": bs, "eager": eager, "graph": graph, "speedup": eager["ms"] / graph["ms"],
                         "argmax_agree": float((ref.argmax(-1) == got.argmax(-1)).float().mean())})
    finally:
        runner.close()
        moe.close()
    return rows


def _dbo_rows(args: argparse.Namespace, model: DeepseekForCausalLM, pool: KVPool,
              device: torch.device) -> list[dict[str, Any]]:
    moe = ExpertParallelMoE(model, "a2a", "high_throughput")
    model.dbo_vote_group = dist.new_group(backend="gloo")  # DP groups agree on each split
    rows = []
    try:
        for spec in filter(None, args.prefill.split(",")):
            b, n = (int(x) for x in spec.lower().split("x"))
            batch = _batch(pool, ForwardMode.EXTEND, [n] * b, 0, model.config.vocab_size)
            model.dbo = DboConfig()
            off = time_ms(lambda bb=batch: model(bb), device, args.iters, args.warmup)
            model.dbo = DBO_ON
            on = time_ms(lambda bb=batch: model(bb), device, args.iters, args.warmup)
            model.dbo = DboConfig()
            rows.append({"shape": f"prefill {spec} per DP group", "off": off, "on": on,
                         "on_over_off": on["ms"] / off["ms"]})
    finally:
        moe.close()
    return rows


def rank_main(rank: int, args: argparse.Namespace, port: int, out: Any) -> None:
    nccl = args.device.startswith("cuda")
    device = torch.device("cuda", rank) if nccl else torch.device("cpu")
    if nccl:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if nccl else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.tp)
    try:
        model_dir = NAMED.get(args.model_config, Path(args.model_config))
        config = ModelConfig.from_dir(model_dir)
        dtype = resolve_dtype(args.dtype, device)
        pctx = ParallelContext(tp_rank=rank, tp_size=args.tp, dp_size=args.tp, tp_group=dist.group.WORLD)
        model = DeepseekForCausalLM(config, pctx, dtype=dtype, device=device)
        load_model(model, model_dir, "dummy", seed=0)
        sizes = [int(s) for s in args.batch_sizes.split(",")]
        prefill = [tuple(int(x) for x in s.lower().split("x")) for s in filter(None, args.prefill.split(","))]
        tokens = max([max(sizes) * (args.context + 1), *(b * n for b, n in prefill)])
        pool = KVPool(-(-tokens // args.page_size) + max(sizes) + 2, config.num_hidden_layers, args.page_size,
                      config.kv_cache_dim, dtype, device, prefix_cache=False)
        try:
            fill_pages(pool.tensor, list(range(pool.num_pages)), torch.Generator(device).manual_seed(rank))
            report = {"decode": _decode_rows(args, model, pool, device, sizes), "dbo": _dbo_rows(args, model, pool, device)}
        finally:
            pool.close()
        if rank == 0:
            name = torch.cuda.get_device_name(device) if nccl else "cpu"
            out.put({"bench": "ep_decode_step", "device": f"{args.tp} x {name}", "torch": torch.__version__,
                     "model": args.model_config, "dtype": str(dtype).removeprefix("torch."), "tp": args.tp,
                     "dp": args.tp, "ep": args.tp, "context": args.context, "iters": args.iters, **report})
    finally:
        dist.destroy_process_group()


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, rows, key, (a, b) in ((axes[0], report["decode"], "batch_per_dp_group", ("eager", "graph")),
                                  (axes[1], report["dbo"], "shape", ("off", "on"))):
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r[a]["ms"] for r in rows], 0.4, label=a, color="tab:gray")
        ax.bar([i + 0.2 for i in x], [r[b]["ms"] for r in rows], 0.4, label=b, color="tab:blue")
        ax.set_xticks(list(x), [str(r[key]) for r in rows], fontsize=8)
        ax.set_ylabel("ms per step (median)")
        ax.legend()
    axes[0].set_title("decode: CUDA graphs vs eager", fontsize=9)
    axes[1].set_title("prefill: DBO on vs off", fontsize=9)
    fig.suptitle(f"{report['model']} {report['dtype']}, tp {report['tp']} dp {report['dp']} EP, {report['device']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(rank_main, args=(args, free_port(), queue), nprocs=args.tp, join=True)
    report = queue.get()
    print(f"tp {args.tp} dp {args.tp} EP, {report['model']} {report['dtype']} on {report['device']}")
    for r in report["decode"]:
        print(f"decode bs {r['batch_per_dp_group']:>4}: eager {r['eager']['ms']:8.2f} ms  graph "
              f"{r['graph']['ms']:8.2f} ms  ({r['speedup']:.2f}x)  argmax agree {r['argmax_agree']:.3f}")
    for r in report["dbo"]:
        print(f"{r['shape']:<28}: off {r['off']['ms']:8.2f} ms  on {r['on']['ms']:8.2f} ms  ({r['on_over_off']:.3f}x)")
    write_report(report, "ep_decode_step", args.device, args.out, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
