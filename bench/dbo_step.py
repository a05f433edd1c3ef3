"""One forward step with dual batch overlap (engine.dbo) on and off, side by side, at prefill-sized batches.

    python -m bench.dbo_step --device cuda [--model-config v2-lite] [--batches 2x512,4x512,8x512,4x1024] \\
        [--decode-batches 64,256]

On one GPU the model holds every expert (no EP traffic), so the overlap has nothing to hide: what this
measures is DBO's cost (two half-size passes through every layer, the comm stream's events) against one
pass, as a ratio per batch shape, and that the two give the same tokens (argmax agreement, relative logits
error). The figure where DBO pays, EP dispatch/combine over several GPUs, needs an instance of several ranks
(`engine.generate --tp N --dp N --enable-dbo` or the workers) on a multi-GPU machine. JSON + PNG go to
bench/results/dbo_step_<device>.json / .png. A prefill batch "BxL" is B sequences of L new tokens each
after no cached prefix; a decode batch B is B sequences of one token after `--context` cached ones.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.decode_step import NAMED, time_ms
from bench.report import write_report
from engine.config import ModelConfig
from engine.dbo import DboConfig, split_point
from engine.forward_batch import ForwardBatch, ForwardMode
from engine.kv_pool import KVPool
from engine.llm import resolve_dtype
from engine.model import DeepseekForCausalLM
from engine.weights import load_model

log = logging.getLogger("bench.dbo_step")
ON = DboConfig(True, decode_token_threshold=2, prefill_token_threshold=2)  # split every batch of 2+ sequences


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.dbo_step", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model-config", default="v2-lite", help="v2-lite, v3, or a checkpoint directory")
    p.add_argument("--load-format", default="dummy", choices=["dummy", "auto"])
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--batches", default="2x512,4x512,8x512,4x1024", help="prefill shapes BxL")
    p.add_argument("--decode-batches", default="64,256", help="decode batch sizes")
    p.add_argument("--context", type=int, default=1024, help="cached tokens per decode sequence")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON path (default bench/results/dbo_step_<device>.json)")
    p.add_argument("--replot", default=None, metavar="JSON", help="only draw the PNG of an earlier run's JSON")
    return p.parse_args(argv)


def _batch(pool: KVPool, mode: ForwardMode, lens: list[int], prefix: int, vocab: int) -> ForwardBatch:
    per_seq = pool.pages_for_tokens(prefix + max(lens))
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(lens))]
    ids = [[(7919 * i + 31 * j + 17) % vocab for j in range(n)] for i, n in enumerate(lens)]
    return ForwardBatch.build(mode, ids, [prefix] * len(lens), tables, pool)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    model_dir = NAMED.get(args.model_config, Path(args.model_config))
    config = ModelConfig.from_dir(model_dir)
    dtype = resolve_dtype(args.dtype, device)
    started = time.monotonic()
    model = DeepseekForCausalLM(config, dtype=dtype, device=device)
    load_model(model, model_dir, args.load_format, seed=0)
    log.info("model %s (%s) loaded in %.1fs", args.model_config, dtype, time.monotonic() - started)
    shapes: list[tuple[str, ForwardMode, list[int], int]] = []
    for spec in filter(None, args.batches.split(",")):
        b, n = (int(x) for x in spec.lower().split("x"))
        shapes.append((f"prefill {b}x{n}", ForwardMode.EXTEND, [n] * b, 0))
    for spec in filter(None, args.decode_batches.split(",")):
        shapes.append((f"decode {spec} @ {args.context}", ForwardMode.DECODE, [1] * int(spec), args.context))
    pages = max(len(lens) * -(-(prefix + max(lens)) // args.page_size) for _, _, lens, prefix in shapes)
    pool = KVPool(pages, config.num_hidden_layers, args.page_size, config.kv_cache_dim, dtype, device,
                  prefix_cache=False)
    rows = []
    try:
        for name, mode, lens, prefix in shapes:
            batch = _batch(pool, mode, lens, prefix, config.vocab_size)
            model.dbo = DboConfig()
            off = time_ms(lambda b=batch: model(b), device, args.iters, args.warmup)
            ref = model(batch).next_token_logits.float()
            model.dbo = ON
            assert split_point(batch, ON) is not None
            on = time_ms(lambda b=batch: model(b), device, args.iters, args.warmup)
            got = model(batch).next_token_logits.float()
            model.dbo = DboConfig()
            row = {"shape": name, "tokens": sum(lens), "off": off, "on": on, "on_over_off": on["ms"] / off["ms"],
                   "argmax_agree": float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
                   "logits_rel_err": float((got - ref).norm() / ref.norm().clamp_min(1e-30))}
            rows.append(row)
            log.info("%s: off %.2f ms, on %.2f ms (%.3fx), argmax agree %.3f", name, off["ms"], on["ms"],
                     row["on_over_off"], row["argmax_agree"])
    finally:
        pool.close()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"bench": "dbo_step", "device": device_name, "torch": torch.__version__, "model": args.model_config,
            "load_format": args.load_format, "dtype": str(dtype).removeprefix("torch."), "iters": args.iters,
            "ep": "none (one rank holds every expert)", "results": rows}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    fig, ax = plt.subplots(figsize=(8, 4))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["off"]["ms"] for r in rows], 0.4, label="DBO off", color="tab:gray")
    ax.bar([i + 0.2 for i in x], [r["on"]["ms"] for r in rows], 0.4, label="DBO on (2 micro-batches)", color="tab:blue")
    for i, r in enumerate(rows):
        ax.text(i + 0.2, r["on"]["ms"], f"{r['on_over_off']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), [r["shape"] for r in rows], rotation=15, fontsize=8)
    ax.set_ylabel("ms per forward (median)")
    ax.set_title(f"{report['model']} {report['dtype']} on {report['device']}: one step, DBO on vs off (no EP)",
                 fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        path = Path(args.replot)
        plot(json.loads(path.read_text()), path.with_suffix(".png"))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    report = run(args)
    print(f"DBO on vs off, {report['model']} {report['dtype']} on {report['device']} ({report['ep']})")
    print(f"{'shape':<24}{'off ms':>9}{'on ms':>9}{'on/off':>8}{'argmax':>8}{'rel err':>10}")
    for r in report["results"]:
        print(f"{r['shape']:<24}{r['off']['ms']:>9.2f}{r['on']['ms']:>9.2f}{r['on_over_off']:>8.3f}"
              f"{r['argmax_agree']:>8.3f}{r['logits_rel_err']:>10.2e}")
    write_report(report, "dbo_step", args.device, args.out, plot,
                 " (python -m bench.dbo_step --replot JSON draws it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
