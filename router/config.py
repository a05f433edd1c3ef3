"""Router configuration: one dataclass, filled from the command line (`python -m router --help`)."""

from __future__ import annotations

import argparse
import enum
import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# SGLang's default `--disaggregation-bootstrap-port`: used for a prefill given without one.
DEFAULT_BOOTSTRAP_PORT = 8998
POLICIES = ("round_robin", "random", "power_of_two", "cache_aware")
DP_ROUTING = ("internal", "router")  # router.dp_routing.DP_ROUTING_MODES (kept import-free here)


class Role(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True)
class WorkerSpec:
    """One worker as configured: its HTTP base URL, its role, and (prefill only) its bootstrap port."""

    url: str
    role: Role
    bootstrap_port: int | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"worker URL must look like http://host:port, got {self.url!r}")
        if parts.path not in ("", "/"):
            raise ValueError(f"worker URL must not have a path, got {self.url!r}")
        if self.role is Role.PREFILL and self.bootstrap_port is None:
            object.__setattr__(self, "bootstrap_port", DEFAULT_BOOTSTRAP_PORT)
        if self.bootstrap_port is not None and not 0 < self.bootstrap_port < 65536:
            raise ValueError(f"bootstrap port out of range: {self.bootstrap_port}")
        object.__setattr__(self, "url", self.url.rstrip("/"))


@dataclass(frozen=True)
class GroupSpec:
    """This process's place among the `--workers N` router processes: its index, their number, and the
    directory where each one listens for its siblings (`router.group`: a Unix socket per process)."""

    index: int
    size: int
    socket_dir: str

    def socket_path(self, index: int) -> str:
        return os.path.join(self.socket_dir, f"p{index}.sock")


@dataclass
class RouterConfig:
    """Everything the router needs; the defaults are the command line's defaults."""

    prefill: list[WorkerSpec] = field(default_factory=list)
    decode: list[WorkerSpec] = field(default_factory=list)
    host: str = "0.0.0.0"
    port: int = 8000
    prefill_policy: str = "cache_aware"
    decode_policy: str = "power_of_two"
    # Prompts estimated below this many tokens go to decode alone (it prefills them locally); 0: never.
    # Estimate: len(input_ids) when ids are given, else ceil(characters / 4) of the prompt text.
    short_prompt_threshold: int = 0
    max_inflight: int = 0  # 0: unlimited; above it new requests get 503 + Retry-After
    request_timeout_s: float = 1800.0
    connect_timeout_s: float = 5.0
    max_retries: int = 2  # extra pairs tried when a worker cannot be reached (before any byte is sent)
    max_body_bytes: int = 32 * 1024 * 1024
    # Client connections: a request head (and each pause between body bytes) must arrive within
    # header_timeout_s; a kept-alive connection waiting for its next request is closed after
    # idle_timeout_s; at most max_connections are open at once. 0 turns a timeout off.
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0
    max_connections: int = 10000
    health_interval_s: float = 5.0
    health_timeout_s: float = 2.0
    health_failure_threshold: int = 3  # consecutive failures (probes or requests) before ejection
    # An ejected worker is probed at interval x 2^k up to this cap: the cap is how long a restarted
    # worker may wait to be re-admitted once healthy (the goal is 5 s: 4 leaves time for the probe and
    # the first request; a refused /health costs nothing).
    health_max_backoff_s: float = 4.0
    cache_block_chars: int = 64  # cache_aware: prompt prefix granularity
    cache_match_ratio: float = 0.5  # cache_aware: share of the prompt that must match to follow affinity
    cache_balance_abs: int = 32  # cache_aware: ignore affinity when the chosen worker has this many more
    # Attention-DP groups of the chosen instances: "router" picks them by load (router.dp_routing) and sends
    # `data_parallel_rank` / `disagg_prefill_dp_rank`; "internal" leaves them to the instances.
    dp_routing: str = "router"
    dp_load_interval_s: float = 0.1  # how often each worker's per-group load is polled (router mode)
    api_key: str | None = None
    processes: int = 1
    group: GroupSpec | None = None  # set by `router.server.run` in each of several processes
    use_uvloop: bool = True
    log_level: str = "info"

    def __post_init__(self) -> None:
        for name in ("prefill_policy", "decode_policy"):
            if getattr(self, name) not in POLICIES:
                raise ValueError(f"{name} must be one of {POLICIES}, got {getattr(self, name)!r}")
        if self.processes < 1:
            raise ValueError("processes must be >= 1")
        if self.max_retries < 0 or self.max_inflight < 0 or self.short_prompt_threshold < 0:
            raise ValueError("max_retries, max_inflight and short_prompt_threshold must be >= 0")
        if self.max_connections < 1 or self.header_timeout_s < 0 or self.idle_timeout_s < 0:
            raise ValueError("max_connections must be >= 1 and the timeouts >= 0")
        if self.health_failure_threshold < 1:
            raise ValueError("health_failure_threshold must be >= 1")
        if self.dp_routing not in DP_ROUTING:
            raise ValueError(f"dp_routing must be one of {DP_ROUTING}, got {self.dp_routing!r}")
        if self.dp_load_interval_s <= 0:
            raise ValueError("dp_load_interval_s must be > 0")


class _PrefillAction(argparse.Action):
    """`--prefill URL [BOOTSTRAP_PORT]`, as sglang-router takes it (`--prefill http://h:p 8998`)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[override]
        if not 1 <= len(values) <= 2:
            parser.error("--prefill takes URL [BOOTSTRAP_PORT]")
        port: int | None = None
        if len(values) == 2 and values[1].lower() != "none":
            try:
                port = int(values[1])
            except ValueError:
                parser.error(f"--prefill bootstrap port must be an integer, got {values[1]!r}")
        getattr(namespace, self.dest).append((values[0], port))


def build_parser() -> argparse.ArgumentParser:
    d = RouterConfig()
    p = argparse.ArgumentParser(
        prog="python -m router",
        description="tandem PD router: pairs prefill and decode workers behind an OpenAI-compatible API.",
    )
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--prefill", nargs="+", action=_PrefillAction, default=[], metavar="URL [PORT]",
                   help=f"prefill worker and its bootstrap port (default {DEFAULT_BOOTSTRAP_PORT}); repeatable")
    p.add_argument("--bootstrap-port", type=int, default=None,
                   help="bootstrap port for every --prefill given without one")
    p.add_argument("--decode", action="append", default=[], metavar="URL", help="decode worker; repeatable")
    p.add_argument("--policy", choices=POLICIES, default=None, help="policy for both roles")
    p.add_argument("--prefill-policy", choices=POLICIES, default=None,
                   help=f"default {d.prefill_policy}")
    p.add_argument("--decode-policy", choices=POLICIES, default=None,
                   help=f"default {d.decode_policy}; cache_aware with decode workers that run --decode-prefix-cache "
                        "sends a conversation's turns to the decode instance holding its KV and learns evictions "
                        "from their X-Tandem-KV-Reused-Tokens reports")
    p.add_argument("--short-prompt-threshold", type=int, default=d.short_prompt_threshold,
                   help="prompts under this many estimated tokens (ids counted, text chars/4) go to "
                        "decode alone without bootstrap fields; 0 disables")
    p.add_argument("--max-inflight", type=int, default=d.max_inflight, help="0: unlimited")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout_s, help="seconds")
    p.add_argument("--connect-timeout", type=float, default=d.connect_timeout_s, help="seconds")
    p.add_argument("--max-retries", type=int, default=d.max_retries)
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--header-timeout", type=float, default=d.header_timeout_s,
                   help="seconds a client may take to send a request head (and between body bytes); 0: none")
    p.add_argument("--idle-timeout", type=float, default=d.idle_timeout_s,
                   help="seconds an idle keep-alive client connection is kept; 0: forever")
    p.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="open client connections at most; past it new ones get 503")
    p.add_argument("--health-interval", type=float, default=d.health_interval_s, help="seconds")
    p.add_argument("--health-timeout", type=float, default=d.health_timeout_s, help="seconds")
    p.add_argument("--health-failure-threshold", type=int, default=d.health_failure_threshold)
    p.add_argument("--health-max-backoff", type=float, default=d.health_max_backoff_s,
                   help="seconds between probes of an ejected worker at most (how late a restart is seen)")
    p.add_argument("--dp-routing", choices=DP_ROUTING, default=d.dp_routing,
                   help="'router': pick each request's attention-DP group on the decode and the prefill "
                        "instance by their per-group load (sent as data_parallel_rank / disagg_prefill_dp_rank); "
                        "'internal': the instances pick (decode: least loaded; prefill: bootstrap_room %% dp)")
    p.add_argument("--dp-load-interval", type=float, default=d.dp_load_interval_s,
                   help="seconds between polls of each worker's per-DP-group load (/get_load), router mode")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY`")
    p.add_argument("--workers", type=int, default=d.processes, dest="processes",
                   help="router processes sharing the port (SO_REUSEPORT)")
    p.add_argument("--no-uvloop", action="store_true")
    p.add_argument("--log-level", default=d.log_level)
    return p


def config_from_args(argv: list[str] | None = None) -> RouterConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    prefill = [
        WorkerSpec(url, Role.PREFILL, port if port is not None else args.bootstrap_port)
        for url, port in args.prefill
    ]
    decode = [WorkerSpec(url, Role.DECODE) for url in args.decode]
    if not decode:
        parser.error("at least one --decode worker is needed")
    return RouterConfig(
        prefill=prefill,
        decode=decode,
        host=args.host,
        port=args.port,
        prefill_policy=args.prefill_policy or args.policy or RouterConfig.prefill_policy,
        decode_policy=args.decode_policy or args.policy or RouterConfig.decode_policy,
        short_prompt_threshold=args.short_prompt_threshold,
        max_inflight=args.max_inflight,
        request_timeout_s=args.request_timeout,
        connect_timeout_s=args.connect_timeout,
        max_retries=args.max_retries,
        max_body_bytes=args.max_body_bytes,
        header_timeout_s=args.header_timeout,
        idle_timeout_s=args.idle_timeout,
        max_connections=args.max_connections,
        health_interval_s=args.health_interval,
        health_timeout_s=args.health_timeout,
        health_failure_threshold=args.health_failure_threshold,
        health_max_backoff_s=args.health_max_backoff,
        dp_routing=args.dp_routing,
        dp_load_interval_s=args.dp_load_interval,
        api_key=args.api_key,
        processes=args.processes,
        use_uvloop=not args.no_uvloop,
        log_level=args.log_level,
    )
