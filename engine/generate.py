"""Offline generation from the command line.

    python -m engine.generate --model DIR (--prompt TEXT ... | --prompt-token-ids JSON) \
        --max-new-tokens N [--temperature T] [--ignore-eos] [--json]

``--prompt-token-ids`` takes a JSON list of token-id lists. With ``--json`` it prints
``{"outputs": [{"token_ids": [...], "text": "..."}]}`` in prompt order (generated ids only).

Multi-rank: ``--tp N [--dp M] [--ep-backend auto|a2a|local]`` runs an instance of N rank processes
(``engine.runtime``); across nodes add ``--nnodes K --node-rank I --dist-init-addr HOST:PORT`` on every
node (node 0 prints the outputs, the others run their ranks headless).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from engine.dbo import add_dbo_flags, dbo_config_from_flags
from engine.eplb.config import add_eplb_flags
from engine.llm import LLM
from engine.quant import add_quantization_flag
from engine.runtime.launch import add_attention_dp_flag
from engine.sampling import SamplingParams
from engine.server.cli import add_kv_cache_dtype_flag, add_prefix_cache_flag


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="HF checkpoint directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="prompt text (repeat for several prompts)")
    source.add_argument("--prompt-token-ids", help="JSON list of token-id lists")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--num-pages", type=int, default=None)
    add_kv_cache_dtype_flag(parser)
    add_prefix_cache_flag(parser)
    add_dbo_flags(parser)
    parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    add_quantization_flag(parser)
    par = parser.add_argument_group("multi-rank instance")
    par.add_argument("--tp", "--tp-size", dest="tp", type=int, default=1, help="ranks (processes) of the instance")
    par.add_argument("--dp", "--dp-size", dest="dp", type=int, default=1,
                     help="attention data-parallel groups (attn_tp = tp / dp)")
    add_attention_dp_flag(par)
    par.add_argument("--ep-backend", default="auto", choices=["auto", "a2a", "local", "deepep"],
                     help="MoE dispatch/combine across ranks (auto: a2a when tp > 1)")
    add_eplb_flags(par)
    par.add_argument("--nnodes", type=int, default=1)
    par.add_argument("--node-rank", type=int, default=0)
    par.add_argument("--dist-init-addr", default=None, help="host:port of node 0 (needed with --nnodes > 1)")
    return parser.parse_args(argv)


def _token_id_prompts(raw: str) -> list[list[int]]:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--prompt-token-ids is not valid JSON: {exc}") from exc
    if not isinstance(value, list) or not all(
        isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in value
    ):
        raise ValueError("--prompt-token-ids must be a JSON list of lists of integers, e.g. [[1, 2, 3]]")
    if not value:
        raise ValueError("--prompt-token-ids holds no prompts")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        prompts: list[str] | list[list[int]] = (
            _token_id_prompts(args.prompt_token_ids) if args.prompt_token_ids is not None else args.prompt
        )
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                max_new_tokens=args.max_new_tokens, ignore_eos=args.ignore_eos)
        # EPLB's map lives in the expert-parallel dispatch: it runs on the rank runtime even at tp 1.
        if (args.tp > 1 or args.nnodes > 1 or args.ep_backend not in ("auto", "local") or args.enable_eplb
                or args.attention_dp != "whole"):
            from engine.multirank_generate import generate_multirank  # spawns rank processes

            outputs = generate_multirank(args, prompts, params)
            if outputs is None:  # a headless node: node 0 prints
                return 0
        else:
            llm = LLM(args.model, device=args.device, dtype=args.dtype, page_size=args.page_size,
                      num_pages=args.num_pages, load_format=args.load_format,
                      kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization,
                      prefix_cache=not args.disable_prefix_cache, dbo=dbo_config_from_flags(args))
            try:
                outputs = llm.generate(prompts, params)
            finally:
                llm.close()
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"outputs": [{"token_ids": o.token_ids, "text": o.text} for o in outputs]}))
    else:
        for i, o in enumerate(outputs):
            print(f"[{i}] {o.text!r} ({len(o.token_ids)} tokens, {o.finish_reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
