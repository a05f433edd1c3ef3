"""Decode worker: receives prompts' KV from prefill instances and generates the answers, streaming them.

    python -m decode_worker --model DIR --tp N --dp M --port P --transfer-backend nixl|mooncake \
        [--max-running-requests] [--cuda-graph-max-bs] [--decode-prefix-cache]

Requests with bootstrap_host / bootstrap_port / bootstrap_room get their prompt's KV from that prefill
instance; requests without them are prefilled here (colocated), as the router's short-prompt path wants.
With `--kv-connector bench` every request's KV is random values filled in here instead (decode profiled
alone, no prefill instance and no transfer engine; responses carry `x-tandem-kv-connector: bench`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from decode_worker.runner import decode_entry
from engine.runtime.disagg import BENCH_CONNECTOR, add_kv_flags, kv_args, mark_bench_responses
from engine.server.cli import add_common_flags, add_elastic_flags, engine_args, instance_spec
from engine.server.serve import serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m decode_worker",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_common_flags(parser)
    role = parser.add_argument_group("decode")
    role.add_argument(
        "--cuda-graph-max-bs",
        type=int,
        default=None,
        help="decode batches up to this size replay captured CUDA graphs (at tp > 1 the graphs hold the "
        "low-latency EP exchange; on CPU the same padded path runs eagerly); unset: eager decode",
    )
    role.add_argument(
        "--decode-prefix-cache",
        action="store_true",
        help="decode-side prefix reuse: keep finished requests' KV pages (prompt and output) in this instance's "
        "prefix cache, and for a later request that starts with them (a conversation's next turn) tell the "
        "prefill instance which leading pages are here already, so it writes only the rest; hits are counted "
        "as decode_reused_tokens on /metrics and sent to the router in the X-Tandem-KV-Reused-Tokens header "
        "(run the router with --decode-policy cache_aware so that a conversation's turns come back here)",
    )
    add_elastic_flags(role)
    add_kv_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cuda_graph_max_bs is not None and args.cuda_graph_max_bs < 1:
        print("error: --cuda-graph-max-bs must be >= 1", file=sys.stderr)
        return 2
    if args.decode_prefix_cache and args.disable_prefix_cache:
        print("error: --decode-prefix-cache keeps pages in the prefix cache that --disable-prefix-cache turns off",
              file=sys.stderr)
        return 2
    try:
        instance_spec(args)  # a layout that cannot run fails here, before any rank starts
        kv = kv_args(args)
        if args.decode_prefix_cache and kv.connector == BENCH_CONNECTOR:
            raise ValueError("--decode-prefix-cache keeps received KV, and --kv-connector bench receives none")
        role_args = {
            # DESIGN.md: decode runs EP in low-latency mode (fixed per-rank budgets, the masked layout) on
            # every backend; prefill and colocated serving keep high-throughput.
            # The prefix cache serves the requests this worker prefills itself (no bootstrap fields: the
            # router's short-prompt path); KV received from prefill instances joins it only with
            # --decode-prefix-cache (decode-side reuse across a conversation's turns).
            "engine": dataclasses.replace(engine_args(args), ep_mode="low_latency"),
            "kv": kv,
            # One rank holds every expert and dispatches nothing (decode_worker.runner.decode_entry).
            "info": {"transfer_backend": args.transfer_backend, "kv_connector": kv.connector,
                     "ep_mode": "low_latency" if args.tp > 1 else "local",
                     "decode_prefix_cache": args.decode_prefix_cache},
            "cuda_graph_max_bs": args.cuda_graph_max_bs,
            "decode_prefix_cache": args.decode_prefix_cache,
        }
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    on_startup = mark_bench_responses if kv.connector == BENCH_CONNECTOR else None
    return serve(args, "decode", decode_entry, role_args, on_startup=on_startup)


if __name__ == "__main__":
    sys.exit(main())
