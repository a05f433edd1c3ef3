"""Flags every worker role shares (SGLang's names where SGLang has one)."""

from __future__ import annotations

import argparse
from typing import Any

from ..dbo import add_dbo_flags, dbo_config_from_flags
from ..eplb.config import add_eplb_flags, eplb_config_from_flags
from ..kv_pool import KV_CACHE_DTYPES
from ..plan import DEFAULT_MEM_FRACTION
from ..quant import add_quantization_flag
from ..runtime.colocated import EngineArgs
from ..runtime.launch import InstanceSpec, add_attention_dp_flag


def add_kv_cache_dtype_flag(group: argparse._ActionsContainer) -> None:
    """`--kv-cache-dtype`, SGLang's and vLLM's flag; the one definition every entry point uses."""
    group.add_argument("--kv-cache-dtype", choices=list(KV_CACHE_DTYPES), default="auto",
                       help="KV pool storage: auto = the model dtype; fp8_e4m3 = float8 with a per-layer scale "
                            "(1.0), half of bf16's bytes per token and per transfer; prefill and decode must "
                            "agree (refused at bootstrap)")


def add_prefix_cache_flag(group: argparse._ActionsContainer) -> None:
    """`--disable-prefix-cache` (SGLang's `--disable-radix-cache` accepted too); the one definition."""
    group.add_argument("--disable-prefix-cache", "--disable-radix-cache", dest="disable_prefix_cache",
                       action="store_true",
                       help="recompute every prompt from its first token instead of reusing the KV pages of a "
                            "cached prompt prefix (engine.prefix_cache)")


def add_elastic_flags(group: Any) -> None:
    """Flags of a worker that scales live (``POST /scale_elastic_ep``), on a parser or an argument group."""
    group.add_argument("--elastic-ep-join-timeout", type=float, default=60.0,
                       help="POST /scale_elastic_ep: seconds the ranks wait for each other at the re-formed "
                            "instance's rendezvous; past it the old ranks go back to the old size (the new ranks "
                            "have built their shards before this wait starts)")


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--model", "--model-path", dest="model", default=None,
                       help="HF checkpoint directory (config.json + safetensors); default: a tiny random "
                            "DeepSeek-V3 written to runs/tiny-v3 on first use")
    model.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                       help="'dummy': random weights of the checkpoint's shapes (config.json only); "
                            "FP8 + block scales with FP8 quantization in effect")
    add_quantization_flag(model)
    model.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                       help="weights and KV dtype; auto = float32 on CPU, bfloat16 on CUDA")
    model.add_argument("--seed", type=int, default=0, help="seed of dummy weights")
    model.add_argument("--served-model-name", default=None, help="name reported by /v1/models")
    model.add_argument("--tool-call-parser", choices=["deepseekv3"], default=None,
                       help="chat `tools`: DeepSeek-V3's tool-call tokens parsed into OpenAI tool_calls (SGLang's "
                            "name); unset: requests with tools are refused")
    model.add_argument("--reasoning-parser", choices=["deepseek-r1"], default=None,
                       help="chat answers split at R1's </think> into reasoning_content and content")

    par = parser.add_argument_group("parallelism")
    par.add_argument("--tp", "--tp-size", dest="tp", type=int, default=1, help="ranks in this instance")
    par.add_argument("--dp", "--dp-size", dest="dp", type=int, default=1,
                     help="attention data-parallel groups (attn_tp = tp / dp)")
    add_attention_dp_flag(par)
    par.add_argument("--ep-backend", choices=["auto", "a2a", "local", "deepep"], default="auto",
                     help="MoE dispatch/combine backend")
    add_eplb_flags(par)
    par.add_argument("--nnodes", type=int, default=1, help="nodes this instance spans")
    par.add_argument("--node-rank", type=int, default=0, help="this node's index (0 serves HTTP)")
    par.add_argument("--dist-init-addr", default=None, help="host:port of node 0 for torch.distributed")
    par.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the ranks run")
    add_dbo_flags(par)

    mem = parser.add_argument_group("memory")
    mem.add_argument("--page-size", type=int, default=64, help="tokens per KV page (same on P and D)")
    mem.add_argument("--num-pages", type=int, default=None,
                     help="KV pages per rank (default: derived from --max-total-tokens)")
    mem.add_argument("--max-total-tokens", type=int, default=65536, help="KV capacity per DP group in tokens")
    mem.add_argument("--max-running-requests", type=int, default=256, help="decode batch limit per DP group")
    mem.add_argument("--max-prefill-tokens", "--chunked-prefill-size", dest="max_prefill_tokens", type=int,
                     default=8192, help="tokens per prefill forward (longer prompts are prefilled in chunks)")
    mem.add_argument("--context-length", type=int, default=None, help="max prompt + output tokens")
    add_kv_cache_dtype_flag(mem)
    add_prefix_cache_flag(mem)
    mem.add_argument("--reserve-tokens", type=int, default=None,
                     help="admission reserves KV for the prompt + this many output tokens (default: all of "
                          "max_tokens); requests then take pages as they grow and the newest are retracted "
                          "and recomputed when the pool runs out (counted as 'retractions' on /metrics); "
                          "prefill workers run no decode and ignore it")
    mem.add_argument("--disable-overlap-schedule", action="store_true",
                     help="on CUDA, decode turns of plain greedy requests launch the next forward before they "
                          "read the last one's tokens (engine.decode_overlap); this makes every turn wait")
    mem.add_argument("--gpu-memory-gb", type=float, default=None,
                     help="memory of one GPU in GB (1e9 bytes) for the start-up memory plan (engine.plan); "
                          "unset: the device's own on CUDA, no check on CPU")
    mem.add_argument("--mem-fraction-static", "--mem-fraction", dest="mem_fraction", type=float,
                     default=DEFAULT_MEM_FRACTION,
                     help="share of GPU memory for weights, activations, CUDA graphs and the KV pool; the "
                          "rest is left to the CUDA context, NCCL and fragmentation")

    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
    net.add_argument("--port", type=int, default=30000, help="HTTP port")
    net.add_argument("--transfer-backend", choices=["nixl", "mooncake"], default="nixl",
                     help="KV transfer engine")
    net.add_argument("--log-level", default="info", help="python logging level")


def engine_args(args: argparse.Namespace) -> EngineArgs:
    """What each rank needs to build its model; resolves the default tiny model first."""
    from .serve import resolve_model_dir

    if args.reserve_tokens is not None and args.reserve_tokens < 1:
        raise ValueError(f"--reserve-tokens must be >= 1, got {args.reserve_tokens}")
    args.model = resolve_model_dir(args.model)
    return EngineArgs(model_dir=args.model, load_format=args.load_format, dtype=args.dtype,
                      kv_cache_dtype=args.kv_cache_dtype, seed=args.seed, gpu_memory_gb=args.gpu_memory_gb,
                      mem_fraction=args.mem_fraction, cuda_graph_max_bs=getattr(args, "cuda_graph_max_bs", None) or 0,
                      page_size=args.page_size, num_pages=args.num_pages, max_total_tokens=args.max_total_tokens,
                      max_prefill_tokens=args.max_prefill_tokens, max_running=args.max_running_requests,
                      ep_backend=args.ep_backend, quantization=args.quantization,
                      prefix_cache=not args.disable_prefix_cache, reserve_tokens=args.reserve_tokens,
                      overlap_schedule=not args.disable_overlap_schedule, eplb=eplb_config_from_flags(args),
                      dbo=dbo_config_from_flags(args))


def instance_spec(args: argparse.Namespace) -> InstanceSpec:
    return InstanceSpec(tp_size=args.tp, dp_size=args.dp, nnodes=args.nnodes, node_rank=args.node_rank,
                        dist_init_addr=args.dist_init_addr, device=args.device,
                        attention_dp=args.attention_dp)
