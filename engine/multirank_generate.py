"""The multi-rank path of ``python -m engine.generate`` (``--tp``, ``--dp``, ``--ep-backend``, nodes).

Builds the instance layout from the flags, tokenizes in the launching process, runs the prompts on the
ranks (``engine.runtime.offline``) and returns outputs shaped like ``LLM.generate``'s, in prompt order.
"""

from __future__ import annotations

import argparse
import sys

from engine.config import ModelConfig
from engine.dbo import dbo_config_from_flags
from engine.eplb.config import eplb_config_from_flags
from engine.llm import Output
from engine.runtime.colocated import EngineArgs
from engine.runtime.launch import InstanceSpec
from engine.runtime.offline import generate_on_ranks, run_headless_node
from engine.sampling import SamplingParams
from engine.tokenizer import load_tokenizer


def instance_spec_from_flags(args: argparse.Namespace) -> InstanceSpec:
    device = "cuda" if str(args.device).startswith("cuda") else "cpu"
    return InstanceSpec(tp_size=args.tp, dp_size=args.dp, nnodes=args.nnodes, node_rank=args.node_rank,
                        dist_init_addr=args.dist_init_addr, device=device,
                        attention_dp=args.attention_dp)


def engine_args_from_flags(args: argparse.Namespace) -> EngineArgs:
    # --seed is the sampling seed here; dummy weights keep EngineArgs' default seed, as LLM does.
    return EngineArgs(model_dir=args.model, load_format=args.load_format, dtype=args.dtype, page_size=args.page_size,
                      num_pages=args.num_pages, ep_backend=args.ep_backend, kv_cache_dtype=args.kv_cache_dtype,
                      quantization=args.quantization, prefix_cache=not args.disable_prefix_cache,
                      eplb=eplb_config_from_flags(args), dbo=dbo_config_from_flags(args))


def generate_multirank(args: argparse.Namespace, prompts: list[str] | list[list[int]],
                       params: SamplingParams) -> list[Output] | None:
    """Outputs in prompt order on node 0; None on a headless node once its ranks have ended."""
    spec = instance_spec_from_flags(args)
    engine = engine_args_from_flags(args)
    if spec.node_rank != 0:
        reason = run_headless_node(spec, engine)
        print(f"node {spec.node_rank}: ranks ended ({reason or 'stopped'})", file=sys.stderr)
        return None
    config = ModelConfig.from_dir(args.model)
    tokenizer = load_tokenizer(args.model, config.eos_token_ids)
    token_lists = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    results = generate_on_ranks(spec, engine, token_lists, params, show_progress=sys.stderr.isatty())
    return [Output(ids, r.token_ids, tokenizer.decode(r.token_ids), r.finish_reason)
            for ids, r in zip(token_lists, results, strict=True)]
