"""Engine throughput: prefill and decode tokens/s of offline generation (continuous batching).

    python -m bench.engine_throughput [--model DIR] [--batch 16] [--prompt-len 256] [--new-tokens 32]
                                      [--device cpu] [--dtype auto] [--load-format auto|dummy] [--threads N] [--json-out F]

Without --model it writes the tiny V3 model to a temporary directory. Steps are timed one by one and
classed as prefill (EXTEND) or decode (DECODE); one warm-up request runs first. On a CPU shared with
other work, ``--threads 1`` avoids torch's thread pool spinning against other processes (the tiny
model's ops are too small to gain from more threads).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from engine.llm import LLM
from engine.sampling import SamplingParams
from engine.scheduler import RequestStatus
from engine.tiny_model import write_tiny_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(llm: LLM, batch: int, prompt_len: int, new_tokens: int, seed: int = 0) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    vocab = llm.config.vocab_size
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    llm.generate([torch.randint(3, vocab, (prompt_len,), generator=gen).tolist()],
                 SamplingParams(max_new_tokens=2, ignore_eos=True))  # warm-up
    sched = llm.scheduler
    requests = [sched.add(torch.randint(3, vocab, (prompt_len,), generator=gen).tolist(), params)
                for _ in range(batch)]
    times = {"prefill": 0.0, "decode": 0.0}
    tokens = {"prefill": 0, "decode": 0}
    steps = {"prefill": 0, "decode": 0}
    while any(not r.finished for r in requests):
        before = {id(r): r.num_computed for r in requests}
        _sync(llm.device)
        started = time.perf_counter()
        sched._admit()
        kind = "prefill" if any(r.status is RequestStatus.PREFILLING for r in requests) else "decode"
        sched.step()
        _sync(llm.device)
        times[kind] += time.perf_counter() - started
        steps[kind] += 1
        tokens[kind] += sum(r.num_computed - before[id(r)] for r in requests)
    assert llm.kv_pool.available_pages == llm.kv_pool.num_pages
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "prefill_tokens": tokens["prefill"],
        "prefill_s": times["prefill"],
        "prefill_tok_per_s": tokens["prefill"] / times["prefill"],
        "decode_steps": steps["decode"],
        "decode_tokens": tokens["decode"],
        "decode_s": times["decode"],
        "decode_tok_per_s": tokens["decode"] / max(times["decode"], 1e-9),
        "decode_ms_per_step": 1000 * times["decode"] / max(steps["decode"], 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--json-out", default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or str(write_tiny_model(Path(tmp) / "tiny", "v3"))
        llm = LLM(model_dir, device=args.device, dtype=args.dtype, page_size=args.page_size,
                  load_format=args.load_format)
        try:
            result = measure(llm, args.batch, args.prompt_len, args.new_tokens)
        finally:
            llm.close()
    result.update(model=args.model or "tiny-v3", device=args.device, dtype=str(llm.dtype),
                  threads=torch.get_num_threads())
    print(f"{'model':>10} {'threads':>7} {'batch':>5} {'prompt':>6} {'new':>4} {'prefill tok/s':>14} {'decode tok/s':>13} "
          f"{'ms/decode step':>15}")
    print(f"{result['model']:>10} {result['threads']:>7} {args.batch:>5} {args.prompt_len:>6} {args.new_tokens:>4} "
          f"{result['prefill_tok_per_s']:>14.0f} {result['decode_tok_per_s']:>13.0f} "
          f"{result['decode_ms_per_step']:>15.2f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
